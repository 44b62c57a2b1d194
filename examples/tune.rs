//! The tile-config tuner (issue 5, deliverable 2; SPEC §5): on CUDA device 0, for each model
//! shape of examples/bench and each token count M, it times the tile configs the CUDA kernels
//! take and writes the fastest per M as a "fusedmoe-tiles/1" table keyed by the GPU's name. A
//! layer uses the file through `tile.config_file` or FUSEDMOE_TILE_CONFIG, or once it ships
//! inside the library.
//!
//!   cargo build --release --examples                  # on a machine with Rust; then, on the GPU:
//!   FUSEDMOE_NVRTC_PATH=/path/to/libnvrtc.so.13 FUSEDMOE_CACHE_DIR=/a/dir target/release/examples/tune
//!       [--quick] [--shapes mixtral,qwen3,deepseek,gpt-oss] [--tokens 1,16,256] [--out tiles.json]
//!       [--json report.json] [--threads N] [--reps N] [--fresh] [--dry-run]
//!
//! 1. Candidates per (shape, M): BLOCK_M {16, 32, 64, 128} × BLOCK_N {32, 64, 128, 256} ×
//!    BLOCK_K {32, 64, 128} × warps {4, 8} × stages {2, 3, 4} (and 5, 6 for BLOCK_K 64 with
//!    BLOCK_M ≥ 64, the tiles Hopper's wgmma takes), less the obviously useless:
//!    BLOCK_M above twice the routes per expert (2·M·K/E) rounded up to a power of two, or below an
//!    eighth of them (at most 64: large batches skip thin tiles); BLOCK_N 32 above M = 256;
//!    more than 128 accumulators per thread (BLOCK_M·BLOCK_N over the threads: they spill).
//!    --quick also drops 2 stages, and BLOCK_K 32 where BLOCK_M ≤ 32 and 128 where BLOCK_M ≥ 64.
//!    GROUP_M is the default rule's for that M (the CUDA kernels do not read it today).
//!    On a GPU with thread-block clusters (compute capability 9.0), for M ≤ 64, every
//!    candidate of BLOCK_M ≤ 32 is also tried with split-K 2 and 4 on GEMM1, and on GEMM2
//!    (table keys SPLIT_K, SPLIT_K_DOWN), one GEMM at a time. On any GPU, for M ≤ 64, each
//!    of those candidates is also tried with GEMM2 wider than GEMM1, at every wider BLOCK_N
//!    (table key BLOCK_N_DOWN; GEMM2 shares BLOCK_M only).
//! 2. The kernels of every candidate are compiled first, on --threads threads (a small layer
//!    per config and moe_warmup; FUSEDMOE_CACHE_DIR keeps them for the next run). Configs the
//!    backend refuses (warp layout, shared memory: MOE_ERR_UNSUPPORTED) are dropped, reasons
//!    printed.
//! 3. Per (shape, M), on rotating input sets (random softmax top-k routing, as bench):
//!    the library's own choice (no tile options: a table where one applies, else the default
//!    rule) first; its output is the reference. Then one layer per candidate with all ten
//!    `tile.*` options, borrowing the shape's weights and sharing one workspace: a first direct
//!    call (refused at creation, warm-up, prepare or run: skipped), then moe_prepare + moe_run
//!    as CUDA-graph replays (M ≤ 256, one graph per set) or direct calls, CUDA events around.
//!    Screening: one short timing each; a candidate whose first calls take 2.5× the best
//!    screening time so far stops there. On sm_90 at M ≤ 256 (graph replays) candidates
//!    are screened as programmatic dependents with GEMM2 let in at GEMM1's start (`tile.pdl`
//!    2, table key PDL), and the kept ones again in order (0) and with PDL 1. Every other candidate's output (set 0) must be finite
//!    and within 1e-2 of the reference: |got − want| ≤ 1e-2·(|want| + rms(want)) (the head and
//!    tail rows of outputs over 64 MiB; the winner's whole output). The fastest few and the
//!    default are then timed in interleaved rounds; the lowest median wins.
//! 4. After each M the table goes to --out, merged per (key, M) with the file's tables unless
//!    --fresh. After each shape, a layer given the file through `tile.config_file` must prepare
//!    every tuned M with the tuned config: the check that the table's key (device name
//!    included) is the one the library looks up.
//!
//! It prints an estimate of its run time first, progress per M, and per shape a summary (per
//! M: tuned config, its µs, the default's, the speed-up). --json PATH writes every number.
//! Without a GPU (or NVRTC) it exits with status 1 and the library's reason; a table the
//! library does not pick up makes it exit with status 3 after writing everything.

#[path = "support/mod.rs"]
mod support;
#[path = "support/tile_table.rs"]
mod tile_table;

use cudarc::driver::CudaGraph;
use fusedmoe::dtype::DType;
use fusedmoe::ffi::*;
use fusedmoe::tiles::{default_config, Pdl, TableKey, TileConfig, TileTable};
use half::bf16;
use rayon::prelude::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::ffi::{c_void, CStr};
use std::path::PathBuf;
use std::ptr::{null, null_mut};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use support::gpu::*;
use support::Rng;

const ALL_TOKENS: [usize; 15] = [
    1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384,
];
const QUICK_TOKENS: [usize; 6] = [1, 16, 64, 256, 1024, 4096];
/// Token counts up to this are timed as graph replays, larger ones as direct calls.
const GRAPH_MAX_TOKENS: usize = 256;

const BLOCK_MS: [u32; 4] = [16, 32, 64, 128];
const BLOCK_NS: [u32; 4] = [32, 64, 128, 256];
const BLOCK_KS: [u32; 3] = [32, 64, 128];
const WARPS: [u32; 2] = [4, 8];
const STAGES: [u32; 3] = [2, 3, 4];
/// Above this many f32 accumulators per thread a tile spills registers.
const MAX_ACCUMULATORS: u32 = 128;
/// Split-K (a thread-block cluster per GEMM tile, compute capability 9.0 and later) is tried
/// up to this M, on the thin tiles of decode, one GEMM at a time: it pays where a GEMM's
/// output tiles leave SMs idle (BENCHMARKS.md: DeepSeek GEMM1 at M = 1 and 16, Mixtral GEMM2
/// at M = 1), and slows the rest.
const SPLIT_MAX_TOKENS: usize = 64;
const SPLIT_MAX_BLOCK_M: u32 = 32;
const SPLITS: [u32; 2] = [2, 4];

/// Input sets together should exceed twice the 50 MB L2 ...
const SETS_TARGET_BYTES: usize = 100_000_000;
/// ... with at most this many (a plan, and for graphs a graph, per set and candidate) ...
const SETS_MAX_GRAPH: usize = 8;
const SETS_MAX_DIRECT: usize = 4;
/// ... within this memory, and never fewer than 2.
const SETS_MEMORY: usize = 4 << 30;

/// A candidate whose first calls take this many times the best screening time stops there.
const CUTOFF: f64 = 2.5;
/// |got − want| ≤ TOLERANCE·(|want| + rms(want)) against the default config's output.
const TOLERANCE: f64 = 1e-2;
/// Outputs up to this size are compared whole while screening; larger ones by their first
/// and last CHECK_ROWS token rows (the winner's whole output is compared in the end).
const FULL_CHECK_BYTES: usize = 64 << 20;
const CHECK_ROWS: usize = 512;

/// How long each timing lasts and how many candidates reach the final rounds.
#[derive(Clone, Copy, Debug)]
struct Budget {
    /// Device time of a candidate's screening timing (at least one call).
    screen_ms: f64,
    /// Device time of each finalist's timing per round (at least one call).
    refine_ms: f64,
    /// Interleaved rounds over the finalists; the median counts.
    reps: usize,
    /// The fastest this many candidates of the screening, plus the default, are finalists.
    finalists: usize,
}

const QUICK_BUDGET: Budget = Budget {
    screen_ms: 1.0,
    refine_ms: 3.0,
    reps: 3,
    finalists: 3,
};
const FULL_BUDGET: Budget = Budget {
    screen_ms: 2.0,
    refine_ms: 8.0,
    reps: 5,
    finalists: 5,
};

// ---------------------------------------------------------------- tile configs

/// A config's kernels: what the CUDA backend compiles (GROUP_M is not in it; the flags'
/// split-K are).
type Kernel = (u32, u32, u32, u32, u32, u32);

fn kernel(c: &TileConfig) -> Kernel {
    (
        c.block_m,
        c.block_n,
        c.block_k,
        c.num_warps,
        c.num_stages,
        c.with_pdl(Pdl::Off).flags, // the launch mode compiles nothing of its own
    )
}

/// "64×128×64 w4 s3": BLOCK_M×BLOCK_N×BLOCK_K, warps, stages ("16×32/128×64": GEMM2 at its
/// own BLOCK_N); " split-K 4/1" (GEMM1/GEMM2) where a GEMM splits; " PDL 2" where it
/// launches as programmatic dependents.
fn tile_str(c: &TileConfig) -> String {
    let dims = format!(
        "{}×{}×{} w{} s{}",
        c.block_m,
        support::block_n_text(c),
        c.block_k,
        c.num_warps,
        c.num_stages
    );
    let dims = match (c.split_k(1), c.split_k(2)) {
        (1, 1) => dims,
        (g1, g2) => format!("{dims} split-K {g1}/{g2}"),
    };
    match c.pdl() {
        Pdl::Off => dims,
        p => format!("{dims} PDL {}", p.key()),
    }
}

fn tile_json(c: &TileConfig) -> Value {
    let mut v = json!({
        "BLOCK_M": c.block_m, "BLOCK_N": c.block_n, "BLOCK_K": c.block_k,
        "GROUP_M": c.group_m, "num_warps": c.num_warps, "num_stages": c.num_stages,
        "SPLIT_K": c.split_k(1), "SPLIT_K_DOWN": c.split_k(2),
    });
    if let Some(block_n) = c.block_n_down() {
        v["BLOCK_N_DOWN"] = json!(block_n);
    }
    if c.pdl() != Pdl::Off {
        v["PDL"] = json!(c.pdl().key());
    }
    v
}

/// The ten `tile.*` options that pin a layer to `c` at every M.
fn tile_options(c: &TileConfig) -> Vec<(&'static str, String)> {
    vec![
        ("tile.block_m", c.block_m.to_string()),
        ("tile.block_n", c.block_n.to_string()),
        // GEMM2's width too, else a shipped entry's BLOCK_N_DOWN would decide it
        ("tile.block_n_down", c.for_gemm(2).block_n.to_string()),
        ("tile.block_k", c.block_k.to_string()),
        ("tile.group_m", c.group_m.to_string()),
        ("tile.num_warps", c.num_warps.to_string()),
        ("tile.num_stages", c.num_stages.to_string()),
        ("tile.split_k", c.split_k(1).to_string()),
        ("tile.split_k_down", c.split_k(2).to_string()),
        // the launch order too, else the nearest shipped entry's PDL would decide it
        ("tile.pdl", c.pdl().key().to_string()),
    ]
}

/// Routes per expert on average: M·K/E.
fn routes_per_expert(m: &Model, tokens: usize) -> f64 {
    (tokens * m.top_k) as f64 / m.experts as f64
}

/// The BLOCK_M values worth timing at M: from an eighth of the routes per expert (rounded
/// down to a power of two, at most 64) to twice them (rounded up), within [16, 128]. Twice:
/// random routing gives the busier experts more than the mean, and each further block of an
/// expert reads its weights again (Mixtral at M = 64, 16 routes per expert on average, ran
/// 1.5× slower with BLOCK_M 16 than at M = 16).
fn block_m_range(m: &Model, tokens: usize) -> (u32, u32) {
    let rpe = routes_per_expert(m, tokens);
    let hi = ((2.0 * rpe).ceil().max(1.0) as u32)
        .next_power_of_two()
        .clamp(16, 128);
    let eighth = (rpe / 8.0).floor() as u32;
    let lo = if eighth < 16 {
        16
    } else {
        (1u32 << (31 - eighth.leading_zeros())).min(64)
    };
    (lo, hi.max(lo))
}

/// The configs timed for `m` at `tokens` tokens (see the header): at decode also the thin
/// tiles with a wider GEMM2, and with `split_k` (the GPU has thread-block clusters) their
/// split-K variants.
fn candidates(m: &Model, tokens: usize, quick: bool, split_k: bool) -> Vec<TileConfig> {
    let (lo, hi) = block_m_range(m, tokens);
    let group_m = default_config(tokens, m.experts).group_m;
    let mut out = Vec::new();
    for bm in BLOCK_MS.into_iter().filter(|&b| b >= lo && b <= hi) {
        for bn in BLOCK_NS {
            for bk in BLOCK_KS {
                for warps in WARPS {
                    // wgmma's tiles (BLOCK_K 64, BLOCK_M ≥ 64) prefetch STAGES − 2 k-tiles
                    // ahead (kernels/moe_gemm_wgmma.cuh), so they also try 5 and 6
                    let wgmma_shaped = bk == 64 && bm >= 64;
                    let deeper = if wgmma_shaped { &[5, 6][..] } else { &[] };
                    for stages in STAGES.into_iter().chain(deeper.iter().copied()) {
                        if bm * bn / (32 * warps) > MAX_ACCUMULATORS {
                            continue;
                        }
                        if tokens > GRAPH_MAX_TOKENS && bn == 32 {
                            continue;
                        }
                        let dropped_by_quick =
                            stages == 2 || (bm <= 32 && bk == 32) || (bm >= 64 && bk == 128);
                        if quick && dropped_by_quick {
                            continue;
                        }
                        out.push(TileConfig {
                            block_m: bm,
                            block_n: bn,
                            block_k: bk,
                            group_m,
                            num_warps: warps,
                            num_stages: stages,
                            flags: 0,
                        });
                    }
                }
            }
        }
    }
    if tokens <= SPLIT_MAX_TOKENS {
        let thin: Vec<TileConfig> = out
            .iter()
            .filter(|c| c.block_m <= SPLIT_MAX_BLOCK_M)
            .copied()
            .collect();
        for c in thin {
            if split_k {
                for gemm in [1, 2] {
                    out.extend(SPLITS.iter().map(|&s| c.with_split_k(gemm, s)));
                }
            }
            // GEMM2 wider than GEMM1 (BLOCK_N_DOWN): at decode GEMM1's narrow tiles fill the
            // SMs, while GEMM2 at that width can be thousands of CTAs of a few KB each
            let wider = BLOCK_NS.into_iter().filter(|&bn| bn > c.block_n);
            out.extend(wider.map(|bn| c.with_block_n_down(bn)));
        }
    }
    out
}

// ---------------------------------------------------------------- estimates

/// A guess at one call's µs before anything is measured: the weight bytes of the experts a
/// batch hits at 2.5 TB/s or its FLOPs at 250 TFLOP/s, whichever is longer, times 1.5, plus
/// 15 µs of launches.
fn guess_call_us(m: &Model, tokens: usize) -> f64 {
    let (e, k) = (m.experts as f64, m.top_k as f64);
    let hit = e * (1.0 - (1.0 - k / e).powf(tokens as f64));
    let bytes = hit * m.expert_bytes() as f64;
    let flops = m.flops(tokens * m.top_k);
    15.0 + 1.5e6 * (bytes / 2.5e12).max(flops / 250e12)
}

/// Single-thread NVRTC seconds for a config's two GEMM kernels: ptxas time grows with the
/// accumulators per thread (a fit to sm_90a compilations of the whole space on an EPYC core,
/// ±50 %: 1.5 s at 16, 6 s at 64, 20 s at 128).
fn guess_compile_s(c: &TileConfig) -> f64 {
    let acc = (c.block_m * c.block_n / (32 * c.num_warps)) as f64;
    1.2 + acc * acc / 900.0
}

/// How many input sets of `bytes` each to rotate through.
fn set_count(bytes: usize, graph: bool) -> usize {
    let max = if graph {
        SETS_MAX_GRAPH
    } else {
        SETS_MAX_DIRECT
    };
    SETS_TARGET_BYTES
        .div_ceil(bytes.max(1))
        .min(max)
        .min(SETS_MEMORY / bytes.max(1))
        .max(2)
}

/// Seconds one (shape, M) should take with `n` candidates.
fn guess_point_s(m: &Model, tokens: usize, n: usize, b: Budget) -> f64 {
    let t = guess_call_us(m, tokens) * 1e-6;
    let graph = tokens <= GRAPH_MAX_TOKENS;
    let sets = set_count(m.set_bytes(tokens), graph) as f64;
    let screen = (b.screen_ms * 1e-3).max(t);
    let check = (tokens * m.hidden * 2).min(FULL_CHECK_BYTES) as f64 / 3e9;
    let per_candidate = if graph {
        0.004 + sets * (0.0004 + t) + 4.0 * t + screen + check
    } else {
        0.002 + sets * t + t + screen + check
    };
    let refine = ((b.finalists + 1) * b.reps) as f64 * ((b.refine_ms * 1e-3).max(t) + 0.0005);
    let routing = sets * tokens as f64 * m.experts as f64 * 1e-7;
    0.2 + routing + 0.8 * n as f64 * per_candidate + refine
}

fn fmt_s(s: f64) -> String {
    if s < 90.0 {
        format!("{s:.0} s")
    } else {
        format!("{:.1} min", s / 60.0)
    }
}

// ---------------------------------------------------------------- batches and candidates

/// One input set on the device: hidden and out [M, H] bf16, ids [M, K] int32, router [M, K] f32.
struct Batch {
    hidden: DevBuf,
    ids: DevBuf,
    router: DevBuf,
    out: DevBuf,
}

fn make_batches(gpu: &Gpu, m: &Model, tokens: usize, n: usize, hidden: &Pattern) -> Vec<Batch> {
    let mut rng = Rng(1000 + tokens as u64);
    let (t, h, k) = (tokens as i64, m.hidden as i64, m.top_k as i64);
    let batches = (0..n)
        .map(|s| {
            let (ids, router) = m.route(&mut rng, tokens);
            let x = DevBuf::new(gpu, BF16, &[t, h]);
            hidden.fill(gpu, x.ptr, x.bytes(), s * 7);
            let out = DevBuf::new(gpu, BF16, &[t, h]);
            gpu.memset(out.ptr, 0xFF, out.bytes());
            Batch {
                hidden: x,
                ids: DevBuf::upload(gpu, I32, &[t, k], &ids),
                router: DevBuf::upload(gpu, F32, &[t, k], &router),
                out,
            }
        })
        .collect();
    gpu.sync();
    batches
}

/// moe_prepare then moe_run of one batch.
fn forward(
    layer: *mut moe_layer,
    plan: *mut moe_plan,
    b: &Batch,
    ws: &DevBuf,
    gpu: &Gpu,
) -> Result<(), String> {
    let (ids, w) = (b.ids.tensor(), ws.tensor());
    attempt(
        unsafe { moe_prepare(layer, &ids, &w, plan, gpu.raw()) },
        "moe_prepare",
    )?;
    let (h, r, o) = (b.hidden.tensor(), b.router.tensor(), b.out.tensor());
    attempt(
        unsafe { moe_run(layer, null(), plan, &h, &r, &o, gpu.raw()) },
        "moe_run",
    )
}

fn plan_tile(plan: *mut moe_plan) -> TileConfig {
    let mut t: moe_tile_config = unsafe { std::mem::zeroed() };
    support::check(
        unsafe { moe_plan_tile_config(plan, &mut t) },
        "moe_plan_tile_config",
    );
    t.into()
}

/// A layer ready to be timed on the batches of one M: a plan per set and, for graph
/// replays, a graph per set. Fields drop in order: graphs, plans, then an owned layer.
struct Candidate {
    /// The config moe_prepare chose (read back from the plan).
    tile: TileConfig,
    graphs: Vec<CudaGraph>,
    plans: Vec<Plan>,
    layer: *mut moe_layer,
    _owned: Option<Layer>,
}

impl Candidate {
    /// Plans, a first direct call on set 0 (its refusal is the Err), then the graphs.
    fn new(
        gpu: &Gpu,
        what: &str,
        layer: *mut moe_layer,
        owned: Option<Layer>,
        batches: &[Batch],
        ws: &DevBuf,
        graph: bool,
    ) -> Result<Candidate, String> {
        let mut plans = Vec::new();
        for _ in batches {
            let mut p = null_mut();
            attempt(unsafe { moe_plan_create(layer, &mut p) }, "moe_plan_create")?;
            plans.push(Plan(p));
        }
        let b = &batches[0];
        gpu.memset(b.out.ptr, 0xFF, b.out.bytes()); // NaN: an unwritten row shows
        let first = forward(layer, plans[0].0, b, ws, gpu);
        if let Err(e) = gpu.stream.synchronize() {
            die(&format!(
                "{what}: the device failed in this config's first call ({e:?}); the CUDA context is lost, so the sweep stops here"
            ));
        }
        first?;
        let tile = plan_tile(plans[0].0);
        let mut c = Candidate {
            tile,
            graphs: Vec::new(),
            plans,
            layer,
            _owned: owned,
        };
        if graph {
            let graphs = (0..batches.len())
                .map(|s| gpu.capture(|| c.direct(s, batches, ws, gpu)))
                .collect();
            c.graphs = graphs;
        }
        Ok(c)
    }

    fn direct(&self, s: usize, batches: &[Batch], ws: &DevBuf, gpu: &Gpu) {
        forward(self.layer, self.plans[s].0, &batches[s], ws, gpu).unwrap_or_else(|e| die(&e));
    }

    /// Enqueues one call on set s: its graph's replay, or the direct calls.
    fn call(&self, s: usize, batches: &[Batch], ws: &DevBuf, gpu: &Gpu) {
        match self.graphs.get(s) {
            Some(g) => launch(g),
            None => self.direct(s, batches, ws, gpu),
        }
    }
}

// ---------------------------------------------------------------- timing

/// What the candidates of one M are timed on.
struct Bench<'a> {
    gpu: &'a Gpu,
    batches: &'a [Batch],
    ws: &'a DevBuf,
    graph: bool,
}

impl Bench<'_> {
    /// Device µs per call of `iters` calls of `c`, sets in turn from `*next`, after `head`
    /// untimed calls that keep the device busy while the host enqueues.
    fn per_call_us(&self, c: &Candidate, iters: usize, head: usize, next: &mut usize) -> f64 {
        let n = self.batches.len();
        let mut enqueue = |k: usize| {
            for _ in 0..k {
                c.call(*next % n, self.batches, self.ws, self.gpu);
                *next += 1;
            }
        };
        enqueue(head);
        let ms = self.gpu.span_ms(|| enqueue(iters));
        ms * 1e3 / iters as f64
    }

    /// Calls queued ahead of a timing whose calls last `us` each.
    fn head(us: f64) -> usize {
        let head_us = HEAD_START_MS * 1e3;
        if us < head_us {
            ((head_us / us).ceil() as usize).min(MAX_ITERS)
        } else {
            0
        }
    }

    /// The screening timing, µs per call, and whether it stopped early: the first calls
    /// (the pilot) already took CUTOFF × `best`.
    fn screen(&self, c: &Candidate, budget: Budget, best: f64) -> (f64, bool) {
        let n = self.batches.len();
        // every set once (set 0 ran in the first call): warm graphs, caches and clocks
        for s in 0..n {
            if self.graph || s > 0 {
                c.call(s, self.batches, self.ws, self.gpu);
            }
        }
        self.gpu.sync();
        let mut next = 1;
        let (pilot_iters, pilot_head) = if self.graph { (4, 2) } else { (1, 0) };
        let pilot = self.per_call_us(c, pilot_iters, pilot_head, &mut next);
        if pilot > CUTOFF * best {
            return (pilot, true);
        }
        let iters = ((budget.screen_ms * 1e3 / pilot).ceil() as usize).clamp(1, MAX_ITERS);
        if iters <= pilot_iters {
            return (pilot, false);
        }
        (
            self.per_call_us(c, iters, Self::head(pilot), &mut next),
            false,
        )
    }

    /// Interleaved rounds over the finalists; per finalist every round's µs per call.
    fn refine(&self, finalists: &[(&Candidate, f64)], budget: Budget) -> Vec<Vec<f64>> {
        let mut us = vec![Vec::new(); finalists.len()];
        let mut next = 0;
        for _ in 0..budget.reps {
            for (i, &(c, screen_us)) in finalists.iter().enumerate() {
                let iters =
                    ((budget.refine_ms * 1e3 / screen_us).ceil() as usize).clamp(1, MAX_ITERS);
                us[i].push(self.per_call_us(c, iters, Self::head(screen_us), &mut next));
            }
        }
        us
    }
}

// ---------------------------------------------------------------- output checks

/// The default config's output of set 0, the reference of every candidate.
struct Reference {
    values: Vec<u16>,
    rms: f64,
    hidden: usize,
}

fn download_u16(gpu: &Gpu, buf: &DevBuf, start: usize, len: usize) -> Vec<u16> {
    let mut host = vec![0u16; len];
    // SAFETY: u16 storage viewed as its bytes.
    let bytes = unsafe { std::slice::from_raw_parts_mut(host.as_mut_ptr() as *mut u8, 2 * len) };
    let view = buf.buf.slice(2 * start..2 * (start + len));
    gpu.stream
        .memcpy_dtoh(&view, bytes)
        .unwrap_or_else(|e| die(&format!("cuMemcpyDtoH: {e:?}")));
    gpu.sync();
    host
}

impl Reference {
    fn new(gpu: &Gpu, b: &Batch, what: &str) -> Reference {
        let hidden = b.out.shape[1] as usize;
        let values = download_u16(gpu, &b.out, 0, b.out.bytes() / 2);
        let sum: f64 = values
            .par_iter()
            .map(|&v| bf16::from_bits(v).to_f64().powi(2))
            .sum();
        if let Some(i) = values.par_iter().position_any(|&v| v & 0x7F80 == 0x7F80) {
            die(&format!(
                "{what}: the library's own config wrote a non-finite output (element {i})"
            ));
        }
        if sum == 0.0 {
            die(&format!(
                "{what}: the library's own config wrote an all-zero output"
            ));
        }
        let rms = (sum / values.len() as f64).sqrt();
        Reference {
            values,
            rms,
            hidden,
        }
    }

    /// The worst |got − want| / (|want| + rms) over `got`, which starts at element `start`.
    fn worst(&self, got: &[u16], start: usize) -> Result<f64, String> {
        const CHUNK: usize = 1 << 16;
        let want = &self.values[start..start + got.len()];
        let h = self.hidden;
        got.par_chunks(CHUNK)
            .zip(want.par_chunks(CHUNK))
            .enumerate()
            .map(|(ci, (g, w))| {
                let mut worst = (0.0f64, 0usize);
                for (i, (&g, &w)) in g.iter().zip(w).enumerate() {
                    let at = start + ci * CHUNK + i;
                    let (g, w) = (bf16::from_bits(g).to_f64(), bf16::from_bits(w).to_f64());
                    if !g.is_finite() {
                        return Err(format!(
                            "output [{}, {}] is not finite (unwritten or wrong)",
                            at / h,
                            at % h
                        ));
                    }
                    let e = (g - w).abs() / (w.abs() + self.rms);
                    if e > worst.0 {
                        worst = (e, at);
                    }
                }
                Ok(worst)
            })
            .try_reduce(|| (0.0, 0), |a, b| Ok(if b.0 > a.0 { b } else { a }))
            .and_then(|(e, at)| {
                if e > TOLERANCE {
                    Err(format!(
                        "output [{}, {}] differs from the default config's by {e:.3} of (|want| + rms), tolerance {TOLERANCE}",
                        at / h,
                        at % h
                    ))
                } else {
                    Ok(e)
                }
            })
    }

    /// Set 0's output of the candidate that ran last: whole, or its head and tail rows.
    fn check(&self, gpu: &Gpu, b: &Batch, whole: bool) -> Result<f64, String> {
        let (rows, h) = (b.out.shape[0] as usize, self.hidden);
        let ranges = if whole || b.out.bytes() <= FULL_CHECK_BYTES || rows <= 2 * CHECK_ROWS {
            vec![(0, rows)]
        } else {
            vec![(0, CHECK_ROWS), (rows - CHECK_ROWS, rows)]
        };
        let mut worst = 0.0f64;
        for (a, z) in ranges {
            let got = download_u16(gpu, &b.out, a * h, (z - a) * h);
            worst = worst.max(self.worst(&got, a * h)?);
        }
        Ok(worst)
    }
}

// ---------------------------------------------------------------- one (shape, M)

/// A finalist's numbers.
#[derive(Clone, Debug)]
struct Timed {
    tile: TileConfig,
    screen_us: f64,
    median_us: f64,
    min_us: f64,
    max_us: f64,
    /// The worst deviation from the reference (0 for the default itself).
    deviation: f64,
}

impl Timed {
    /// Screened only: no final rounds yet.
    fn screened(tile: TileConfig, screen_us: f64) -> Timed {
        Timed {
            tile,
            screen_us,
            median_us: f64::NAN,
            min_us: f64::NAN,
            max_us: f64::NAN,
            deviation: 0.0,
        }
    }

    fn json(&self) -> Value {
        json!({
            "tile": tile_json(&self.tile), "median_us": self.median_us, "min_us": self.min_us,
            "max_us": self.max_us, "screen_us": self.screen_us, "deviation": self.deviation,
        })
    }
}

struct Point {
    tokens: usize,
    sets: usize,
    graph: bool,
    /// Candidates of the space at this M, the default's own kernel excluded.
    candidates: usize,
    /// Screened in full / stopped early as slow.
    timed: usize,
    slow: usize,
    refused: Vec<(TileConfig, String)>,
    wrong: Vec<(TileConfig, String)>,
    /// (config, screening µs, stopped early) of every candidate that ran.
    screened: Vec<(TileConfig, f64, bool)>,
    default: Timed,
    best: Timed,
    finalists: Vec<Timed>,
    seconds: f64,
    /// Set 0's ids, for the table check at the end of the shape.
    ids: DevBuf,
}

impl Point {
    fn speedup(&self) -> f64 {
        self.default.median_us / self.best.median_us
    }

    fn json(&self) -> Value {
        let screened: Vec<Value> = self
            .screened
            .iter()
            .map(|(c, us, slow)| json!({ "tile": tile_json(c), "us": us, "stopped_early": slow }))
            .collect();
        let reasons = |v: &[(TileConfig, String)]| -> Vec<Value> {
            v.iter()
                .map(|(c, why)| json!({ "tile": tile_json(c), "why": why }))
                .collect()
        };
        json!({
            "tokens": self.tokens, "input_sets": self.sets,
            "timed_as": if self.graph { "graph replay, one graph per input set" } else { "direct calls" },
            "candidates": self.candidates, "screened": self.timed, "stopped_early": self.slow,
            "refused": reasons(&self.refused), "wrong_output": reasons(&self.wrong),
            "default": self.default.json(), "best": self.best.json(), "speedup": self.speedup(),
            "finalists": self.finalists.iter().map(Timed::json).collect::<Vec<_>>(),
            "screening": screened, "seconds": self.seconds,
        })
    }
}

/// What one shape's points share.
struct ShapeRun<'a> {
    gpu: &'a Gpu,
    o: &'a Args,
    m: &'a Model,
    w: &'a Weights,
    /// The layer without tile options: the library's own choice.
    default: &'a Layer,
    ws: &'a DevBuf,
    hidden: &'a Pattern,
    compiled: &'a HashMap<Kernel, Result<(), String>>,
}

fn median_min_max(v: &[f64]) -> (f64, f64, f64) {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn tune_point(r: &ShapeRun, tokens: usize) -> Point {
    let (gpu, m, budget) = (r.gpu, r.m, r.o.budget);
    let t0 = Instant::now();
    let what = format!("{} M={tokens}", m.name);
    let graph = tokens <= GRAPH_MAX_TOKENS;
    let n = set_count(m.set_bytes(tokens), graph);
    let batches = make_batches(gpu, m, tokens, n, r.hidden);
    let bench = Bench {
        gpu,
        batches: &batches,
        ws: r.ws,
        graph,
    };
    let default = Candidate::new(gpu, &what, r.default.0, None, &batches, r.ws, graph)
        .unwrap_or_else(|e| die(&format!("{what}: the library's own config fails: {e}")));
    let reference = Reference::new(gpu, &batches[0], &what);
    let (default_screen, _) = bench.screen(&default, budget, f64::INFINITY);
    let mut best = default_screen;

    // Where graphs replay (decode) on sm_90 every candidate is screened as programmatic
    // dependents with GEMM2 let in at GEMM1's start (PDL 2, the H100 table's usual pick):
    // GEMM2's early weight loads can change which stages win. The kept ones are then tried
    // in order and with PDL 1 too (below).
    let pdl_modes = graph && r.o.split_k;
    let screen_pdl = if pdl_modes {
        Pdl::AtGemm1Start
    } else {
        Pdl::Off
    };
    let space: Vec<TileConfig> = candidates(m, tokens, r.o.quick, r.o.split_k)
        .into_iter()
        .map(|c| c.with_pdl(screen_pdl))
        .filter(|c| kernel(c) != kernel(&default.tile))
        .collect();
    let mut p = Point {
        tokens,
        sets: n,
        graph,
        candidates: space.len(),
        timed: 0,
        slow: 0,
        refused: Vec::new(),
        wrong: Vec::new(),
        screened: Vec::new(),
        // both set after the final rounds
        default: Timed::screened(default.tile, default_screen),
        best: Timed::screened(default.tile, default_screen),
        finalists: Vec::new(),
        seconds: 0.0,
        ids: DevBuf::new(gpu, I32, &batches[0].ids.shape),
    };
    gpu.copy(p.ids.ptr, batches[0].ids.ptr, batches[0].ids.bytes());
    // the fastest `budget.finalists` screened candidates, ascending
    let mut kept: Vec<(f64, f64, Candidate)> = Vec::new();
    for cfg in space {
        if let Some(Err(why)) = r.compiled.get(&kernel(&cfg)) {
            p.refused.push((cfg, why.clone()));
            continue;
        }
        let c = match make_candidate(r, &cfg, tokens, &what, &batches, graph) {
            Ok(c) => c,
            Err(why) => {
                p.refused.push((cfg, why));
                continue;
            }
        };
        let (us, slow) = bench.screen(&c, budget, best);
        p.screened.push((cfg, us, slow));
        if slow {
            p.slow += 1;
            continue;
        }
        p.timed += 1;
        let deviation = match reference.check(gpu, &batches[0], false) {
            Ok(d) => d,
            Err(why) => {
                eprintln!("  {what} {}: WRONG OUTPUT: {why}", tile_str(&cfg));
                p.wrong.push((cfg, why));
                continue;
            }
        };
        best = best.min(us);
        if kept.len() < budget.finalists || us < kept.last().unwrap().0 {
            let at = kept.partition_point(|k| k.0 <= us);
            kept.insert(at, (us, deviation, c));
            kept.truncate(budget.finalists);
        }
    }

    // The other launch modes of the kept ones (tile.pdl 0, 1): only theirs, since the mode
    // moved a point by 0.85-1.08x (BENCHMARKS.md), less than tiles do
    if pdl_modes {
        let tiles: Vec<TileConfig> = kept.iter().map(|k| k.2.tile).collect();
        for cfg in tiles
            .into_iter()
            .flat_map(|t| [Pdl::Off, Pdl::AfterGemm1Loop].map(|p| t.with_pdl(p)))
        {
            let c = match make_candidate(r, &cfg, tokens, &what, &batches, graph) {
                Ok(c) => c,
                Err(why) => {
                    p.refused.push((cfg, why));
                    continue;
                }
            };
            let (us, _) = bench.screen(&c, budget, f64::INFINITY);
            p.screened.push((cfg, us, false));
            p.timed += 1;
            match reference.check(gpu, &batches[0], false) {
                Ok(d) => kept.push((us, d, c)),
                Err(why) => {
                    eprintln!("  {what} {}: WRONG OUTPUT: {why}", tile_str(&cfg));
                    p.wrong.push((cfg, why));
                }
            }
        }
        kept.sort_by(|a, b| a.0.total_cmp(&b.0));
        kept.truncate(budget.finalists + 2); // a little more room: modes of one tile crowd it
    }

    // the final rounds: the default first, then the kept ones
    let mut finalists: Vec<(&Candidate, f64)> = vec![(&default, default_screen)];
    finalists.extend(kept.iter().map(|(us, _, c)| (c, *us)));
    let rounds = bench.refine(&finalists, budget);
    let mut timed: Vec<Timed> = finalists
        .iter()
        .zip(&rounds)
        .enumerate()
        .map(|(i, ((c, screen_us), us))| {
            let (median_us, min_us, max_us) = median_min_max(us);
            Timed {
                tile: c.tile,
                screen_us: *screen_us,
                median_us,
                min_us,
                max_us,
                deviation: if i == 0 { 0.0 } else { kept[i - 1].1 },
            }
        })
        .collect();
    p.default = timed[0].clone();
    // the fastest median wins; a large output is now compared whole (after one more call)
    let mut order: Vec<usize> = (0..timed.len()).collect();
    order.sort_by(|&a, &b| timed[a].median_us.total_cmp(&timed[b].median_us));
    let mut winner = 0;
    for &i in &order {
        if i == 0 || batches[0].out.bytes() <= FULL_CHECK_BYTES {
            winner = i;
            break;
        }
        let c = finalists[i].0;
        gpu.memset(batches[0].out.ptr, 0xFF, batches[0].out.bytes());
        c.call(0, &batches, r.ws, gpu);
        match reference.check(gpu, &batches[0], true) {
            Ok(d) => {
                timed[i].deviation = d;
                winner = i;
                break;
            }
            Err(why) => {
                eprintln!(
                    "  {what} {}: WRONG OUTPUT (whole): {why}",
                    tile_str(&timed[i].tile)
                );
                p.wrong.push((timed[i].tile, why));
            }
        }
    }
    p.best = timed[winner].clone();
    p.finalists = timed;
    drop(kept);
    drop(default);
    gpu.sync();
    p.seconds = t0.elapsed().as_secs_f64();
    p
}

/// A layer pinned to `cfg` (tile_options), warmed up for `tokens`, as a candidate.
fn make_candidate(
    r: &ShapeRun,
    cfg: &TileConfig,
    tokens: usize,
    what: &str,
    batches: &[Batch],
    graph: bool,
) -> Result<Candidate, String> {
    let (gpu, m) = (r.gpu, r.m);
    let layer = Layer::with_options(m, r.w, m.experts, &tile_options(cfg))?;
    attempt(
        unsafe { moe_warmup(layer.0, tokens as i64, gpu.raw()) },
        "moe_warmup",
    )?;
    let what = format!("{what} {}", tile_str(cfg));
    Candidate::new(gpu, &what, layer.0, Some(layer), batches, r.ws, graph)
}

// ---------------------------------------------------------------- one shape

struct ShapeResult {
    model: Model,
    key: TableKey,
    points: Vec<Point>,
    /// (M, what the table-file layer chose instead of the tuned config).
    check_failures: Vec<String>,
    seconds: f64,
}

impl ShapeResult {
    fn json(&self) -> Value {
        json!({
            "shape": self.model.describe(),
            "key": { "E": self.key.experts, "N": self.key.n, "K": self.key.k,
                     "dtype": self.key.dtype.name(), "quant": self.key.quant, "device": self.key.device },
            "points": self.points.iter().map(Point::json).collect::<Vec<_>>(),
            "table_check_failures": self.check_failures,
            "seconds": self.seconds,
        })
    }

    fn print(&self, device: &str, o: &Args) {
        let m = &self.model;
        println!(
            "\n{} (E {}, H {}, I {}, top-k {}, {}) on {device}: µs per moe_prepare + moe_run, median of {} interleaved rounds",
            m.name, m.experts, m.hidden, m.inter, m.top_k, m.activation(), o.budget.reps
        );
        println!("| M | timed as | tuned BM×BN×BK warps stages | µs | default | µs | speed-up | timed / stopped early / refused / wrong |");
        println!("|---|---|---|---|---|---|---|---|");
        for p in &self.points {
            println!(
                "| {} | {} | {} | {:.1} | {} | {:.1} | {:.2}× | {} / {} / {} / {} |",
                p.tokens,
                if p.graph { "graph" } else { "direct" },
                tile_str(&p.best.tile),
                p.best.median_us,
                tile_str(&p.default.tile),
                p.default.median_us,
                p.speedup(),
                p.timed,
                p.slow,
                p.refused.len(),
                p.wrong.len()
            );
        }
        if self.check_failures.is_empty() {
            println!(
                "table check: a layer given {} through tile.config_file prepares every M above with its tuned config",
                o.out.display()
            );
        } else {
            println!("TABLE CHECK FAILED (the library does not use the written table as tuned):");
            for f in &self.check_failures {
                println!("  {f}");
            }
        }
    }
}

/// Bytes of workspace a layer needs for `max_tokens`.
fn workspace_bytes(layer: &Layer, max_tokens: usize) -> usize {
    let mut bytes = 0usize;
    support::check(
        unsafe { moe_workspace_size(layer.0, max_tokens as i64, &mut bytes) },
        "moe_workspace_size",
    );
    bytes
}

/// A layer given the written file through `tile.config_file` must prepare each point's
/// batch with the point's tuned config.
fn check_table(r: &ShapeRun, points: &[Point]) -> Vec<String> {
    let path = std::fs::canonicalize(&r.o.out).unwrap_or_else(|_| r.o.out.clone());
    let option = [("tile.config_file", path.display().to_string())];
    let layer = match Layer::with_options(r.m, r.w, r.m.experts, &option) {
        Ok(l) => l,
        Err(e) => return vec![format!("a layer with tile.config_file: {e}")],
    };
    let max_tokens = points.iter().map(|p| p.tokens).max().unwrap_or(1);
    let own_ws;
    let ws = if workspace_bytes(&layer, max_tokens) <= r.ws.bytes() {
        r.ws
    } else {
        own_ws = layer.workspace(r.gpu, max_tokens);
        &own_ws
    };
    let mut failures = Vec::new();
    for p in points {
        let plan = layer.plan();
        let (ids, w) = (p.ids.tensor(), ws.tensor());
        let status = unsafe { moe_prepare(layer.0, &ids, &w, plan.0, r.gpu.raw()) };
        match attempt(status, "moe_prepare") {
            Err(e) => failures.push(format!("M={}: {e}", p.tokens)),
            Ok(()) => {
                let got = plan_tile(plan.0);
                if got != p.best.tile {
                    failures.push(format!(
                        "M={}: the layer chose {} (GROUP_M {}, flags {}), the table says {} (GROUP_M {})",
                        p.tokens,
                        tile_str(&got),
                        got.group_m,
                        got.flags,
                        tile_str(&p.best.tile),
                        p.best.tile.group_m
                    ));
                }
            }
        }
    }
    r.gpu.sync();
    failures
}

struct Tuner<'a> {
    gpu: &'a Gpu,
    o: &'a Args,
    device: String,
    hidden: Pattern,
    compiled: HashMap<Kernel, Result<(), String>>,
    /// Every table of the output file, this run's entries merged in.
    tables: Vec<TileTable>,
    /// Guessed seconds of the points not run yet, and the ratio measured / guessed so far.
    guessed_left: f64,
    guessed_done: f64,
    measured_done: f64,
}

impl Tuner<'_> {
    fn key(&self, m: &Model) -> TableKey {
        TableKey {
            experts: m.experts,
            n: m.inter,
            k: m.hidden,
            dtype: DType::BF16,
            quant: "none".into(),
            device: self.device.clone(),
        }
    }

    fn left(&self) -> f64 {
        let ratio = if self.guessed_done > 0.0 {
            self.measured_done / self.guessed_done
        } else {
            1.0
        };
        self.guessed_left * ratio
    }

    fn shape(&mut self, m: &Model, wall: Instant) -> ShapeResult {
        let (gpu, o) = (self.gpu, self.o);
        let t0 = Instant::now();
        let w = Weights::random(gpu, m, 7);
        let default = Layer::new(m, &w, m.experts);
        let max_tokens = *o.tokens.iter().max().unwrap();
        let sizing = Layer::with_options(m, &w, m.experts, &[("tile.block_m", "128".into())])
            .unwrap_or_else(|e| die(&e));
        let bytes = workspace_bytes(&default, max_tokens).max(workspace_bytes(&sizing, max_tokens));
        drop(sizing);
        let ws = DevBuf::new(gpu, U8, &[bytes as i64]);
        let warm = default.warmup(gpu, max_tokens);
        eprintln!(
            "{}: weights {:.2} GB, workspace {:.2} GB for M ≤ {max_tokens}; ready in {:.1} s (moe_warmup {warm:.1} s)",
            m.name,
            w.bytes() as f64 / 1e9,
            bytes as f64 / 1e9,
            t0.elapsed().as_secs_f64()
        );
        let key = self.key(m);
        let run = ShapeRun {
            gpu,
            o,
            m,
            w: &w,
            default: &default,
            ws: &ws,
            hidden: &self.hidden,
            compiled: &self.compiled,
        };
        let mut points: Vec<Point> = Vec::new();
        for &tokens in &o.tokens {
            let guess = guess_point_s(
                m,
                tokens,
                candidates(m, tokens, o.quick, o.split_k).len(),
                o.budget,
            );
            let p = tune_point(&run, tokens);
            self.guessed_left -= guess;
            self.guessed_done += guess;
            self.measured_done += p.seconds;
            eprintln!(
                "  {} M={tokens}: {} configs ({} stopped early, {} refused, {} wrong); tuned {} {:.1} µs, default {} {:.1} µs: {:.2}× ({:.1} s; {} in, ~{} left)",
                m.name,
                p.candidates,
                p.slow,
                p.refused.len(),
                p.wrong.len(),
                tile_str(&p.best.tile),
                p.best.median_us,
                tile_str(&p.default.tile),
                p.default.median_us,
                p.speedup(),
                p.seconds,
                fmt_s(wall.elapsed().as_secs_f64()),
                fmt_s(self.left().max(0.0))
            );
            let entry = tile_table::table(key.clone(), &[(tokens, p.best.tile)]);
            self.tables = tile_table::merge(std::mem::take(&mut self.tables), &entry);
            tile_table::write(&o.out, &self.tables)
                .unwrap_or_else(|e| die(&format!("--out {}: {e}", o.out.display())));
            points.push(p);
        }
        let check_failures = check_table(&run, &points);
        drop(default);
        gpu.sync();
        ShapeResult {
            model: *m,
            key,
            points,
            check_failures,
            seconds: t0.elapsed().as_secs_f64(),
        }
    }
}

// ---------------------------------------------------------------- compiling up front

/// Compiles (or loads from FUSEDMOE_CACHE_DIR) the kernels of every config on `threads`
/// threads, each creating a small layer pinned to the config and calling moe_warmup: the
/// library keeps loaded kernels per device, so the sweep's layers find them ready. `configs`
/// comes sorted slowest first (the threads finish together).
fn precompile(
    gpu: &Gpu,
    configs: &[TileConfig],
    threads: usize,
) -> HashMap<Kernel, Result<(), String>> {
    let tiny = Model {
        name: "tiny",
        experts: 8,
        hidden: 64,
        inter: 64,
        top_k: 2,
        shared: false,
        oai: false,
    };
    let w = Weights {
        w13: DevBuf::new(gpu, BF16, &[8, 128, 64]),
        w2: DevBuf::new(gpu, BF16, &[8, 64, 64]),
        b13: None,
        b2: None,
    };
    gpu.memset(w.w13.ptr, 0, w.w13.bytes());
    gpu.memset(w.w2.ptr, 0, w.w2.bytes());
    gpu.sync();
    let stream = gpu.raw() as usize;
    let compile = |c: &TileConfig| {
        Layer::with_options(&tiny, &w, 8, &tile_options(c)).and_then(|l| {
            attempt(
                unsafe { moe_warmup(l.0, 1, stream as *mut c_void) },
                "moe_warmup",
            )
        })
    };
    let results = Mutex::new(HashMap::new());
    let t0 = Instant::now();
    // the cheapest config first, alone: it also brings the align, activation and combine
    // kernels every layer loads, which the threads would otherwise all compile at once
    let Some((first, rest)) = configs.split_last() else {
        return HashMap::new();
    };
    results
        .lock()
        .unwrap()
        .insert(kernel(first), compile(first));
    let (next, done) = (AtomicUsize::new(0), AtomicUsize::new(1));
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads.clamp(1, rest.len().max(1)))
            .map(|_| {
                s.spawn(|| {
                    while let Some(c) = rest.get(next.fetch_add(1, Ordering::Relaxed)) {
                        let r = compile(c);
                        results.lock().unwrap().insert(kernel(c), r);
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        let mut shown = Instant::now();
        while !workers.iter().all(|h| h.is_finished()) {
            std::thread::sleep(Duration::from_millis(100));
            if shown.elapsed() > Duration::from_secs(15) {
                eprintln!(
                    "  compiled {}/{} configs ({:.0} s)",
                    done.load(Ordering::Relaxed),
                    configs.len(),
                    t0.elapsed().as_secs_f64()
                );
                shown = Instant::now();
            }
        }
    });
    results.into_inner().unwrap()
}

// ---------------------------------------------------------------- main

struct Args {
    models: Vec<Model>,
    tokens: Vec<usize>,
    quick: bool,
    budget: Budget,
    out: PathBuf,
    json: Option<PathBuf>,
    threads: usize,
    fresh: bool,
    dry_run: bool,
    /// Whether split-K configs are candidates: the GPU has thread-block clusters (a dry run
    /// assumes it has).
    split_k: bool,
}

const USAGE: &str = "usage: tune [--quick] [--shapes mixtral,qwen3,deepseek,gpt-oss] [--tokens 1,16,...] [--out PATH] [--json PATH] [--threads N] [--reps N] [--fresh] [--dry-run]
  --quick    M in 1,16,64,256,1024,4096, a smaller config space, shorter timings, 3 finalists × 3 rounds
             (default: M in 1,2,4,...,16384; 5 finalists × 5 rounds)
  --shapes   which layers (bf16, as examples/bench)
  --tokens   token counts M to tune (table keys)
  --out      the table file (default tiles.json); tables there are merged per (key, M) unless --fresh
  --json     also write every measurement to PATH
  --threads  NVRTC compile threads (default: every CPU)
  --reps     rounds of the final timing
  --dry-run  print the points, their config counts and the time estimate; touch no GPU
env: FUSEDMOE_NVRTC_PATH=/full/path/libnvrtc.so.13; FUSEDMOE_CACHE_DIR=dir keeps compiled kernels
for the next run; FUSEDMOE_TILE_CONFIG=table.json changes what the default (the baseline) is";

fn usage(why: &str) -> ! {
    eprintln!("{why}\n{USAGE}");
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut o = Args {
        models: MODELS.to_vec(),
        tokens: Vec::new(),
        quick: false,
        budget: FULL_BUDGET,
        out: PathBuf::from("tiles.json"),
        json: None,
        threads: std::thread::available_parallelism().map_or(4, |n| n.get()),
        fresh: false,
        dry_run: false,
        split_k: true,
    };
    let mut reps = None;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--quick" => {
                o.quick = true;
                continue;
            }
            "--fresh" => {
                o.fresh = true;
                continue;
            }
            "--dry-run" => {
                o.dry_run = true;
                continue;
            }
            "-h" | "--help" => {
                eprintln!("{USAGE}");
                std::process::exit(0)
            }
            _ => {}
        }
        let value = it
            .next()
            .unwrap_or_else(|| usage(&format!("{flag} needs a value")));
        let count = |what: &str| match value.parse::<usize>() {
            Ok(n) if n >= 1 => n,
            _ => usage(&format!("{what} is a count ≥ 1")),
        };
        match flag.as_str() {
            "--shapes" => {
                o.models = parse_models(&value, &[], usage);
            }
            "--tokens" => {
                o.tokens = parse_tokens(&value, usage);
                o.tokens.sort_unstable();
                o.tokens.dedup();
            }
            "--out" => o.out = PathBuf::from(value),
            "--json" => o.json = Some(PathBuf::from(value)),
            "--threads" => o.threads = count("--threads"),
            "--reps" => reps = Some(count("--reps")),
            _ => usage(&format!("unknown argument {flag}")),
        }
    }
    if o.quick {
        o.budget = QUICK_BUDGET;
    }
    if let Some(n) = reps {
        o.budget.reps = n;
    }
    if o.tokens.is_empty() {
        o.tokens = if o.quick {
            QUICK_TOKENS.to_vec()
        } else {
            ALL_TOKENS.to_vec()
        };
    }
    o
}

/// Every config some point times, one per kernel.
fn all_configs(o: &Args) -> Vec<TileConfig> {
    let mut seen = HashMap::new();
    for m in &o.models {
        for &t in &o.tokens {
            for c in candidates(m, t, o.quick, o.split_k) {
                seen.entry(kernel(&c)).or_insert(c);
            }
        }
    }
    let mut v: Vec<TileConfig> = seen.into_values().collect();
    // the slowest compilations first, so that the threads finish together
    v.sort_by(|a, b| guess_compile_s(b).total_cmp(&guess_compile_s(a)));
    v
}

fn save_report(o: &Args, device: &str, compile: &Value, shapes: &[ShapeResult], wall: Instant) {
    let Some(path) = &o.json else {
        return;
    };
    let version = unsafe { CStr::from_ptr(moe_version()) }.to_string_lossy();
    let doc = json!({
        "device": device, "driver_version": driver_version(), "fusedmoe_version": version,
        "dtype": "bf16", "quick": o.quick, "tokens": o.tokens,
        "budget": { "screen_ms": o.budget.screen_ms, "refine_ms": o.budget.refine_ms,
                    "rounds": o.budget.reps, "finalists": o.budget.finalists,
                    "cutoff": CUTOFF, "tolerance": TOLERANCE },
        "table_file": o.out, "tile_config_env": std::env::var("FUSEDMOE_TILE_CONFIG").ok(),
        "compile": compile,
        "shapes": shapes.iter().map(ShapeResult::json).collect::<Vec<_>>(),
        "wall_s": wall.elapsed().as_secs_f64(),
    });
    let text = serde_json::to_string_pretty(&doc).expect("JSON");
    std::fs::write(path, text).unwrap_or_else(|e| die(&format!("{}: {e}", path.display())));
}

/// Whether CUDA device 0 has thread-block clusters (compute capability 9.0 or later), which
/// the split-K variants need.
fn has_clusters() -> bool {
    use cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR;
    let ctx = cudarc::driver::CudaContext::new(0)
        .unwrap_or_else(|e| die(&format!("CUDA device 0: {e:?}")));
    let major = ctx
        .attribute(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
        .unwrap_or_else(|e| die(&format!("cuDeviceGetAttribute: {e:?}")));
    major >= 9
}

fn main() {
    let o = parse_args();
    // a table file that does not parse stops the run before any GPU work
    let tables = if o.fresh {
        Vec::new()
    } else {
        tile_table::read(&o.out).unwrap_or_else(|e| {
            die(&format!(
                "--out {}: {e} (fix or move it, or pass --fresh)",
                o.out.display()
            ))
        })
    };
    let mut o = o;
    if !o.dry_run {
        require_cuda();
        o.split_k = has_clusters();
    }
    let configs = all_configs(&o);
    let compile_guess = configs.iter().map(guess_compile_s).sum::<f64>() / o.threads as f64;
    let points: Vec<(Model, usize, usize)> = o
        .models
        .iter()
        .flat_map(|m| {
            o.tokens
                .iter()
                .map(|&t| (*m, t, candidates(m, t, o.quick, o.split_k).len()))
        })
        .collect();
    let sweep_guess: f64 = points
        .iter()
        .map(|(m, t, n)| guess_point_s(m, *t, *n, o.budget))
        .sum::<f64>()
        + 2.0 * o.models.len() as f64;
    if o.dry_run {
        for (m, t, n) in &points {
            let (lo, hi) = block_m_range(m, *t);
            eprintln!(
                "  {} M={t}: {n} configs, BLOCK_M {lo}..{hi}, ≈ {}",
                m.name,
                fmt_s(guess_point_s(m, *t, *n, o.budget))
            );
        }
    }
    eprintln!(
        "estimate: compiling {} configs ≈ {} on {} threads (less where FUSEDMOE_CACHE_DIR holds them), sweeping {} timings at {} points ≈ {}; total ≈ {}",
        configs.len(),
        fmt_s(compile_guess),
        o.threads,
        points.iter().map(|p| p.2).sum::<usize>(),
        points.len(),
        fmt_s(sweep_guess),
        fmt_s(compile_guess + sweep_guess)
    );
    if o.dry_run {
        return;
    }

    let wall = Instant::now();
    let gpu = Gpu::new();
    let device = gpu
        .ctx
        .name()
        .unwrap_or_else(|e| die(&format!("cuDeviceGetName: {e:?}")));
    let version = unsafe { CStr::from_ptr(moe_version()) }.to_string_lossy();
    eprintln!(
        "{device}, driver {}, fusedmoe {version}; table → {}",
        driver_version(),
        o.out.display()
    );

    let t = Instant::now();
    let compiled = precompile(&gpu, &configs, o.threads);
    let compile_s = t.elapsed().as_secs_f64();
    let mut refused: Vec<(&TileConfig, &String)> = configs
        .iter()
        .filter_map(|c| match compiled.get(&kernel(c)) {
            Some(Err(why)) => Some((c, why)),
            _ => None,
        })
        .collect();
    refused.sort_by_key(|(c, _)| kernel(c));
    eprintln!(
        "compiled {} configs in {compile_s:.1} s; the backend refused {}",
        configs.len() - refused.len(),
        refused.len()
    );
    for (c, why) in &refused {
        eprintln!("  {}: {why}", tile_str(c));
    }
    let compile = json!({
        "configs": configs.len(), "seconds": compile_s, "threads": o.threads,
        "refused": refused.iter().map(|(c, why)| json!({ "tile": tile_json(c), "why": why })).collect::<Vec<_>>(),
    });

    let mut tuner = Tuner {
        gpu: &gpu,
        o: &o,
        device: device.clone(),
        hidden: Pattern::new(&gpu, 99, 1.0),
        compiled,
        tables,
        guessed_left: sweep_guess,
        guessed_done: 0.0,
        measured_done: 0.0,
    };
    let mut shapes = Vec::new();
    for m in &o.models {
        let r = tuner.shape(m, wall);
        r.print(&device, &o);
        shapes.push(r);
        save_report(&o, &device, &compile, &shapes, wall); // a later failure keeps what was measured
    }
    let failed = shapes.iter().any(|s| !s.check_failures.is_empty());
    println!(
        "\ntable: {} ({} tables); total {}",
        o.out.display(),
        tuner.tables.len(),
        fmt_s(wall.elapsed().as_secs_f64())
    );
    if failed {
        eprintln!("tune: the library does not pick up the written table as tuned (see TABLE CHECK FAILED above)");
        std::process::exit(3);
    }
}
