//! The library-alone GPU benchmark (issues 5 and 6): bf16 MoE layers of four models through
//! the C ABI on CUDA device 0, next to the device's copy bandwidth measured in the same run.
//!
//!   cargo build --release --examples                  # on a machine with Rust; then, on the GPU:
//!   FUSEDMOE_NVRTC_PATH=/path/to/libnvrtc.so.13 target/release/examples/bench [--quick]
//!       [--shapes mixtral,qwen3,deepseek,gpt-oss,ep,lora] [--tokens 1,16,256] [--reps N] [--json PATH]
//!       [--option KEY=VALUE]...
//!
//! Per shape and token count M (random softmax top-k routing, fresh per input set):
//! - time per call of moe_prepare + moe_run: CUDA graph replays for M ≤ 256 (one graph per
//!   input set, captured after moe_warmup), direct calls above; CUDA events around many
//!   calls, the median of the repeats. Input sets (hidden, ids, router weights, out) rotate
//!   between calls, so a call does not find the previous call's inputs in L2. For M ≤ 256
//!   also every set in one graph, per call: the launch cost of a replay spread over the sets.
//! - TB/s: the weight bytes the batch must read (distinct experts hit × one expert's w13, w2
//!   and biases) over the time; its % of the copy bandwidth (cuMemcpyDtoDAsync of 1 GiB,
//!   counting bytes read plus bytes written, 2 GiB per copy); TFLOP/s: 2·routes·(N1·H + H·I).
//! - moe_prepare alone, graph replays.
//!
//! The table comes last; --json PATH writes every number (BENCHMARKS.md says more).
//!
//! Issue 6 (`ep` in --shapes): moe_dispatch alone on a CUDA dispatcher (E_g 257, 8 ranks,
//! rank 0, one shared expert), and DeepSeek-V3's rank-0 layer (32 routed + 1 shared = 33
//! local experts) on the dispatched ids against the full 257-expert layer at M = 16.
//!
//! Issue 7 (`lora` in --shapes, only when named): the LoRA overhead on the qwen3 shape, 4
//! adapters of rank 16 with every token on one of them, M = 64 and 1024 (or --tokens where
//! given): moe_prepare +
//! moe_run against moe_prepare + moe_run_lora, both as graph replays (one graph per set).
//!
//! Without a GPU (or NVRTC) it exits with status 1 and the library's reason.

// The model shapes, the device with its timing, buffers, weights and layers live in
// support/gpu.rs, shared with examples/tune.
#[path = "support/mod.rs"]
mod support;

use cudarc::driver::CudaGraph;
use fusedmoe::ffi::*;
use serde_json::{json, Value};
use std::ffi::CStr;
use std::ptr::{null, null_mut};
use std::time::Instant;
use support::gpu::*;
use support::{check, Rng};

const ALL_TOKENS: [usize; 8] = [1, 4, 16, 64, 256, 1024, 4096, 16384];
const QUICK_TOKENS: [usize; 6] = [1, 16, 64, 256, 1024, 4096];
/// Token counts up to this are timed as graph replays, larger ones as direct calls.
const GRAPH_MAX_TOKENS: usize = 256;
/// Input sets together should exceed twice the 50 MB L2 of an H100/H200 ...
const SETS_TARGET_BYTES: usize = 100_000_000;
/// ... with at least this many sets, at most SETS_MAX (a graph and a plan each), within
/// SETS_MEMORY bytes, and never fewer than 2.
const SETS_MIN: usize = 4;
const SETS_MAX: usize = 16;
const SETS_MEMORY: usize = 4 << 30;
/// The copy whose rate is the bandwidth ceiling.
const COPY_BYTES: usize = 1 << 30;
/// Issue 6: the expert-parallel setup (DeepSeek-V3 on 8 ranks, rank 0, 1 shared expert).
const EP_SIZE: i64 = 8;
const EP_TOKENS: usize = 16;
const DISPATCH_TOKENS: [usize; 4] = [1, 16, 256, 4096];
/// Issue 7: the LoRA overhead's setup (qwen3's shape).
const LORA_SLOTS: usize = 4;
const LORA_RANK: usize = 16;
const LORA_TOKENS: [usize; 2] = [64, 1024];

/// How many input sets of `bytes` each to rotate through (see SETS_*).
fn set_count(bytes: usize) -> usize {
    let want = SETS_TARGET_BYTES.div_ceil(bytes.max(1)).max(SETS_MIN);
    want.min(SETS_MAX).min(SETS_MEMORY / bytes.max(1)).max(2)
}

// ---------------------------------------------------------------- ABI handles

struct Dispatcher(*mut moe_dispatcher);

impl Drop for Dispatcher {
    fn drop(&mut self) {
        unsafe { moe_dispatcher_free(self.0) };
    }
}

impl Dispatcher {
    /// The contiguous partition of E_g experts with `shared` shared ones, for `rank`.
    fn contiguous(global: usize, shared: usize, rank: i64) -> Dispatcher {
        let mut d = null_mut();
        let (g, s) = (global as i64, shared as i64);
        let status =
            unsafe { moe_dispatcher_create_contiguous(g, EP_SIZE, rank, s, CUDA0, &mut d) };
        check(status, "moe_dispatcher_create_contiguous");
        Dispatcher(d)
    }

    fn local_experts(&self) -> usize {
        let mut n = 0i64;
        let status = unsafe { moe_dispatcher_num_local_experts(self.0, &mut n) };
        check(status, "moe_dispatcher_num_local_experts");
        n as usize
    }

    fn mapping(&self, global: usize) -> Vec<i32> {
        let (mut map, mut len) = (vec![0i32; global], 0usize);
        let status = unsafe { moe_dispatcher_mapping(self.0, map.as_mut_ptr(), global, &mut len) };
        check(status, "moe_dispatcher_mapping");
        map
    }

    fn dispatch(&self, gpu: &Gpu, ids: &DevBuf, local: &DevBuf) {
        let (i, l) = (ids.tensor(), local.tensor());
        check(
            unsafe { moe_dispatch(self.0, &i, &l, gpu.raw()) },
            "moe_dispatch",
        );
    }
}

// ---------------------------------------------------------------- input sets

/// One batch's buffers on the device and its plan (one per set, so each captured graph has
/// its own).
struct InputSet {
    hidden: DevBuf,
    ids: DevBuf,
    router: DevBuf,
    out: DevBuf,
    plan: Plan,
    /// Distinct experts the ids hit and the routes kept (ids ≥ 0).
    distinct: usize,
    routes: usize,
}

/// What a set is built from: host routing and the pattern its hidden rows are copied from.
struct Batch<'a> {
    ids: &'a [i32],
    router: &'a [f32],
    hidden: &'a Pattern,
    salt: usize,
}

impl InputSet {
    fn new(gpu: &Gpu, layer: &Layer, m: &Model, b: Batch) -> InputSet {
        let (t, h, k) = (
            (b.ids.len() / m.top_k) as i64,
            m.hidden as i64,
            m.top_k as i64,
        );
        let hidden = DevBuf::new(gpu, BF16, &[t, h]);
        b.hidden.fill(gpu, hidden.ptr, hidden.bytes(), b.salt * 7);
        let out = DevBuf::new(gpu, BF16, &[t, h]);
        gpu.memset(out.ptr, 0xFF, out.bytes()); // NaN: an unwritten row shows
        InputSet {
            hidden,
            ids: DevBuf::upload(gpu, I32, &[t, k], b.ids),
            router: DevBuf::upload(gpu, F32, &[t, k], b.router),
            out,
            plan: layer.plan(),
            distinct: distinct(b.ids),
            routes: b.ids.iter().filter(|&&e| e >= 0).count(),
        }
    }

    fn prepare(&self, layer: &Layer, ws: &DevBuf, gpu: &Gpu) {
        let (ids, w) = (self.ids.tensor(), ws.tensor());
        check(
            unsafe { moe_prepare(layer.0, &ids, &w, self.plan.0, gpu.raw()) },
            "moe_prepare",
        );
    }

    fn forward(&self, layer: &Layer, ws: &DevBuf, gpu: &Gpu) {
        self.prepare(layer, ws, gpu);
        let (h, r, o) = (
            self.hidden.tensor(),
            self.router.tensor(),
            self.out.tensor(),
        );
        let p = self.plan.0;
        check(
            unsafe { moe_run(layer.0, null(), p, &h, &r, &o, gpu.raw()) },
            "moe_run",
        );
    }

    fn tile(&self) -> moe_tile_config {
        let mut t = moe_tile_config {
            block_m: 0,
            block_n: 0,
            block_k: 0,
            group_m: 0,
            num_warps: 0,
            num_stages: 0,
            flags: 0,
        };
        check(
            unsafe { moe_plan_tile_config(self.plan.0, &mut t) },
            "moe_plan_tile_config",
        );
        t
    }

    /// Every output value finite (the poison is NaN) and some not zero.
    fn check_output(&self, gpu: &Gpu, what: &str) {
        let bytes = self.out.download(gpu);
        let v: Vec<u16> = bytes
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        if let Some(i) = v.iter().position(|&x| x & 0x7F80 == 0x7F80) {
            die(&format!(
                "{what}: output element {i} is not finite (unwritten or wrong)"
            ));
        }
        if v.iter().all(|&x| x & 0x7FFF == 0) {
            die(&format!("{what}: the output is all zeros"));
        }
    }
}

/// `n` sets of `tokens` tokens with fresh routing.
fn make_sets(
    gpu: &Gpu,
    layer: &Layer,
    m: &Model,
    tokens: usize,
    n: usize,
    hidden: &Pattern,
) -> Vec<InputSet> {
    let mut rng = Rng(1000 + tokens as u64);
    let sets = (0..n)
        .map(|s| {
            let (ids, router) = m.route(&mut rng, tokens);
            let b = Batch {
                ids: &ids,
                router: &router,
                hidden,
                salt: s,
            };
            InputSet::new(gpu, layer, m, b)
        })
        .collect();
    gpu.sync();
    sets
}

fn tile_json(t: &moe_tile_config) -> Value {
    let c = fusedmoe::tiles::TileConfig::from(*t);
    json!({
        "block_m": c.block_m, "block_n": c.block_n, "block_n_down": c.for_gemm(2).block_n,
        "block_k": c.block_k,
        "group_m": c.group_m, "num_warps": c.num_warps, "num_stages": c.num_stages,
        "split_k": c.split_k(1), "split_k_down": c.split_k(2),
        "pdl": format!("{:?}", c.pdl()),
    })
}

/// "16×64×128" ("16×32/128×64": GEMM2 at its own BLOCK_N), with " split-K 4/1"
/// (GEMM1/GEMM2) where a GEMM splits and " PDL" (" PDL early": GEMM2 let in at GEMM1's
/// start) where the config launches its kernels as programmatic dependents.
fn tile_label(t: &moe_tile_config) -> String {
    let c = fusedmoe::tiles::TileConfig::from(*t);
    let dims = format!("{}×{}×{}", c.block_m, support::block_n_text(&c), c.block_k);
    let dims = match (c.split_k(1), c.split_k(2)) {
        (1, 1) => dims,
        (g1, g2) => format!("{dims} split-K {g1}/{g2}"),
    };
    match c.pdl() {
        fusedmoe::tiles::Pdl::Off => dims,
        fusedmoe::tiles::Pdl::AfterGemm1Loop => format!("{dims} PDL"),
        fusedmoe::tiles::Pdl::AtGemm1Start => format!("{dims} PDL early"),
    }
}

// ---------------------------------------------------------------- the measurements

struct Options {
    models: Vec<Model>,
    ep: bool,
    /// Issue 7's LoRA overhead (only when `lora` is in --shapes).
    lora: bool,
    tokens: Vec<usize>,
    /// The LoRA rows' M: LORA_TOKENS, or --tokens where given.
    lora_tokens: Vec<usize>,
    repeats: Repeats,
    json: Option<String>,
    quick: bool,
    /// Backend options for every model layer (`cuda.wgmma=0`: the A/B of the GEMM main loop).
    layer_options: Vec<(String, String)>,
}

/// What every measurement needs.
struct Bench<'a> {
    gpu: &'a Gpu,
    o: &'a Options,
    /// Hidden rows are copied from it: ~U(−1, 1).
    hidden: &'a Pattern,
    /// The copy bandwidth, read + write bytes, TB/s.
    copy_tbs: f64,
}

/// Graph replays, per call: one graph per input set replayed in turn (the launch cost of
/// each replay included), and one graph that runs every set in turn (that cost spread over
/// the sets: what a host's graph of a whole forward pass sees).
struct Replays {
    per_set: Timing,
    one_graph: Timing,
}

impl Replays {
    /// `work(s)` enqueues set s's work; it is captured once per set and once for all.
    fn time(b: &Bench, sets: usize, work: impl Fn(usize)) -> Replays {
        let gpu = b.gpu;
        let graphs: Vec<CudaGraph> = (0..sets).map(|s| gpu.capture(|| work(s))).collect();
        let per_set = gpu.time(b.o.repeats, sets, |i| launch(&graphs[i]));
        drop(graphs);
        let all = gpu.capture(|| (0..sets).for_each(&work));
        let one_graph = gpu.time(b.o.repeats, 1, |_| launch(&all)).per_call(sets);
        Replays { per_set, one_graph }
    }

    fn json(&self) -> Value {
        json!({ "graph_per_set": self.per_set.json(), "one_graph_all_sets": self.one_graph.json() })
    }
}

impl Timing {
    /// A timing of calls that each did `n` calls' work.
    fn per_call(self, n: usize) -> Timing {
        let n_f = n as f64;
        Timing {
            median_us: self.median_us / n_f,
            min_us: self.min_us / n_f,
            max_us: self.max_us / n_f,
            iters: self.iters * n,
            reps: self.reps,
        }
    }
}

/// One table row: a shape at one token count.
struct Row {
    model: Model,
    tokens: usize,
    sets: usize,
    /// moe_prepare + moe_run: graph replays (M ≤ 256), else direct calls.
    run: Timing,
    /// The same in one graph over all sets (M ≤ 256).
    run_one_graph: Option<Timing>,
    prepare: Replays,
    distinct: f64,
    weight_bytes: f64,
    routes: usize,
    tile: moe_tile_config,
    copy_tbs: f64,
}

impl Row {
    fn graph(&self) -> bool {
        self.run_one_graph.is_some()
    }

    fn tbs(&self) -> f64 {
        self.weight_bytes / (self.run.median_us * 1e-6) / 1e12
    }

    fn tflops(&self) -> f64 {
        self.model.flops(self.routes) / (self.run.median_us * 1e-6) / 1e12
    }

    fn json(&self) -> Value {
        json!({
            "shape": self.model.name, "tokens": self.tokens, "routes": self.routes,
            "timed_as": if self.graph() { "graph replay, one graph per input set" } else { "direct calls" },
            "input_sets": self.sets, "time_us": self.run.median_us, "run": self.run.json(),
            "run_one_graph_all_sets": self.run_one_graph.map(|t| t.json()),
            "distinct_experts": self.distinct, "weight_bytes": self.weight_bytes,
            "tb_per_s": self.tbs(), "pct_copy_bw": 100.0 * self.tbs() / self.copy_tbs,
            "tflop_per_s": self.tflops(), "prepare_us": self.prepare.per_set.median_us,
            "prepare": self.prepare.json(), "tile": tile_json(&self.tile),
        })
    }

    fn print(&self) {
        let pct = if self.tokens <= 64 {
            format!("{:.0} %", 100.0 * self.tbs() / self.copy_tbs)
        } else {
            "–".into()
        };
        let one = self
            .run_one_graph
            .map_or("–".into(), |t| format!("{:.1}", t.median_us));
        println!(
            "| {} | {} | {} | {} | {:.1} | {one} | {:.1} | {:.3} | {:.2} | {pct} | {:.1} | {:.1} | {:.1} | {} |",
            self.model.name,
            self.tokens,
            if self.graph() { "graph" } else { "direct" },
            self.sets,
            self.run.median_us,
            self.distinct,
            self.weight_bytes / 1e9,
            self.tbs(),
            self.tflops(),
            self.prepare.per_set.median_us,
            self.prepare.one_graph.median_us,
            tile_label(&self.tile)
        );
    }
}

/// The same-run ceiling: cuMemcpyDtoDAsync of 1 GiB, counted as 2 GiB (read + write).
fn copy_bandwidth(gpu: &Gpu, o: &Options) -> (Timing, f64) {
    let src = DevBuf::new(gpu, U8, &[COPY_BYTES as i64]);
    let dst = DevBuf::new(gpu, U8, &[COPY_BYTES as i64]);
    gpu.memset(src.ptr, 0x3C, COPY_BYTES);
    let t = gpu.time(o.repeats, 1, |_| gpu.copy(dst.ptr, src.ptr, COPY_BYTES));
    let tbs = 2.0 * COPY_BYTES as f64 / (t.median_us * 1e-6) / 1e12;
    (t, tbs)
}

/// One shape at one token count: the layer, then moe_prepare alone.
fn bench_row(b: &Bench, m: &Model, layer: &Layer, ws: &DevBuf, tokens: usize) -> Row {
    let gpu = b.gpu;
    let n = set_count(m.set_bytes(tokens));
    let sets = make_sets(gpu, layer, m, tokens, n, b.hidden);
    let forward = |s: usize| sets[s].forward(layer, ws, gpu);
    let (run, run_one_graph) = if tokens <= GRAPH_MAX_TOKENS {
        let r = Replays::time(b, n, forward);
        (r.per_set, Some(r.one_graph))
    } else {
        (gpu.time(b.o.repeats, n, forward), None)
    };
    // every set has run (the warm-up pass of each timing)
    let what = format!("{} M={tokens}", m.name);
    let check_all = n * sets[0].out.bytes() <= 256 << 20;
    for s in sets.iter().take(if check_all { n } else { 1 }) {
        s.check_output(gpu, &what);
    }
    let prepare = Replays::time(b, n, |s| sets[s].prepare(layer, ws, gpu));
    let distinct = sets.iter().map(|s| s.distinct as f64).sum::<f64>() / n as f64;
    Row {
        model: *m,
        tokens,
        sets: n,
        run,
        run_one_graph,
        prepare,
        distinct,
        weight_bytes: distinct * m.expert_bytes() as f64,
        routes: sets[0].routes,
        tile: sets[0].tile(),
        copy_tbs: b.copy_tbs,
    }
}

/// Every token count of one shape, then (DeepSeek-V3 with `ep`) the EP comparison.
fn bench_model(b: &Bench, m: &Model, ep: Option<&Dispatcher>) -> (Vec<Row>, Option<Value>) {
    let (gpu, t0) = (b.gpu, Instant::now());
    let w = Weights::random(gpu, m, 7);
    let options: Vec<(&str, String)> = (b.o.layer_options.iter())
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    let layer = Layer::with_options(m, &w, m.experts, &options).unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(1)
    });
    let max_tokens = b.o.tokens.iter().copied().chain([EP_TOKENS]).max().unwrap();
    let ws = layer.workspace(gpu, max_tokens);
    let warm = layer.warmup(gpu, max_tokens);
    eprintln!(
        "{}: weights {:.2} GB, workspace {:.2} GB for M ≤ {max_tokens}; ready in {:.1} s (moe_warmup {:.1} s)",
        m.name,
        w.bytes() as f64 / 1e9,
        ws.bytes() as f64 / 1e9,
        t0.elapsed().as_secs_f64(),
        warm
    );
    let mut rows = Vec::new();
    for &tokens in &b.o.tokens {
        let t = Instant::now();
        let row = bench_row(b, m, &layer, &ws, tokens);
        eprintln!(
            "  M={tokens}: {:.1} µs, {:.2} TB/s, {:.1} TFLOP/s, prepare {:.1} µs ({:.1} s)",
            row.run.median_us,
            row.tbs(),
            row.tflops(),
            row.prepare.per_set.median_us,
            t.elapsed().as_secs_f64()
        );
        rows.push(row);
    }
    let full = (&layer, &ws);
    let ep = ep.map(|d| expert_parallel(b, m, &w, full, d));
    drop(layer);
    gpu.sync();
    (rows, ep)
}

/// Issue 6: rank 0's 33-expert layer on dispatched ids vs the full 257-expert layer, M = 16,
/// one graph per input set; also with moe_dispatch inside the rank's graph.
fn expert_parallel(
    b: &Bench,
    m: &Model,
    w: &Weights,
    (full, full_ws): (&Layer, &DevBuf),
    d: &Dispatcher,
) -> Value {
    let gpu = b.gpu;
    let local_experts = d.local_experts();
    let mapping = d.mapping(m.experts);
    let local = Layer::new(m, w, local_experts);
    let local_ws = local.workspace(gpu, EP_TOKENS);
    local.warmup(gpu, EP_TOKENS);
    let n = set_count(m.set_bytes(EP_TOKENS));
    let mut rng = Rng(6000);
    let (mut full_sets, mut local_sets) = (Vec::new(), Vec::new());
    for s in 0..n {
        let (ids, router) = m.route(&mut rng, EP_TOKENS);
        let mapped: Vec<i32> = ids.iter().map(|&e| mapping[e as usize]).collect();
        for (layer, ids, sets) in [
            (full, &ids, &mut full_sets),
            (&local, &mapped, &mut local_sets),
        ] {
            let batch = Batch {
                ids,
                router: &router,
                hidden: b.hidden,
                salt: s,
            };
            sets.push(InputSet::new(gpu, layer, m, batch));
        }
        // the device's dispatch must give what the mapping says
        let (f, l): (&InputSet, &InputSet) = (&full_sets[s], &local_sets[s]);
        gpu.memset(l.ids.ptr, 0xEE, l.ids.bytes());
        d.dispatch(gpu, &f.ids, &l.ids);
        if l.ids.download(gpu) != as_bytes(&mapped) {
            die("moe_dispatch on CUDA disagrees with moe_dispatcher_mapping");
        }
    }
    let t_full = Replays::time(b, n, |s| full_sets[s].forward(full, full_ws, gpu));
    let t_local = Replays::time(b, n, |s| local_sets[s].forward(&local, &local_ws, gpu));
    let t_both = Replays::time(b, n, |s| {
        d.dispatch(gpu, &full_sets[s].ids, &local_sets[s].ids);
        local_sets[s].forward(&local, &local_ws, gpu)
    });
    for (f, l) in full_sets.iter().zip(&local_sets) {
        f.check_output(gpu, "EP full layer");
        l.check_output(gpu, "EP local layer");
    }
    let avg = |sets: &[InputSet], f: fn(&InputSet) -> usize| {
        sets.iter().map(|s| f(s) as f64).sum::<f64>() / sets.len() as f64
    };
    let (full_us, local_us, both_us) = (
        t_full.per_set.median_us,
        t_local.per_set.median_us,
        t_both.per_set.median_us,
    );
    json!({
        "tokens": EP_TOKENS, "ep_size": EP_SIZE, "ep_rank": 0, "input_sets": n,
        "global_experts": m.experts, "local_experts": local_experts,
        "full": { "time_us": full_us, "replays": t_full.json(),
                  "distinct_experts": avg(&full_sets, |s| s.distinct),
                  "routes": avg(&full_sets, |s| s.routes) },
        "local": { "time_us": local_us, "replays": t_local.json(),
                   "distinct_experts": avg(&local_sets, |s| s.distinct),
                   "routes": avg(&local_sets, |s| s.routes) },
        "local_with_dispatch": { "time_us": both_us, "replays": t_both.json() },
        "speedup": full_us / local_us,
        "speedup_with_dispatch": full_us / both_us,
        "target_speedup": 4.0,
    })
}

/// Issue 6: moe_dispatch alone, [M, 9] int32 ids, graph replays.
fn dispatch_alone(b: &Bench, d: &Dispatcher, m: &Model) -> Vec<Value> {
    let gpu = b.gpu;
    let mapping = d.mapping(m.experts);
    let mut rows = Vec::new();
    for tokens in DISPATCH_TOKENS {
        let shape = [tokens as i64, m.top_k as i64];
        let n = set_count(tokens * m.top_k * 8);
        let mut rng = Rng(9000 + tokens as u64);
        let (mut global, mut local, mut want) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..n {
            let (ids, _) = m.route(&mut rng, tokens);
            want.push(
                ids.iter()
                    .map(|&e| mapping[e as usize])
                    .collect::<Vec<i32>>(),
            );
            global.push(DevBuf::upload(gpu, I32, &shape, &ids));
            let out = DevBuf::new(gpu, I32, &shape);
            gpu.memset(out.ptr, 0xEE, out.bytes());
            local.push(out);
        }
        let t = Replays::time(b, n, |s| d.dispatch(gpu, &global[s], &local[s]));
        for (out, want) in local.iter().zip(&want) {
            if out.download(gpu) != as_bytes(want) {
                die(&format!("moe_dispatch M={tokens}: wrong local ids"));
            }
        }
        eprintln!(
            "dispatch M={tokens}: {:.2} µs ({:.2} µs in one graph)",
            t.per_set.median_us, t.one_graph.median_us
        );
        rows.push(json!({
            "tokens": tokens, "top_k": m.top_k, "input_sets": n,
            "time_us": t.per_set.median_us, "replays": t.json(),
        }));
    }
    rows
}

// ---------------------------------------------------------------- LoRA (issue 7)

/// A LoRA wrapper over a layer with `LORA_SLOTS` random adapters of rank `LORA_RANK` (A
/// ~U(±1/√(its reduction length)), B ~U(±1/√r), scaling 2 as alpha 32 / r 16 gives).
struct Lora {
    handle: *mut moe_lora,
    /// Each slot's gate_up A [E, 2r, H], gate_up B [E, N1, r], down A [E, r, I], down B
    /// [E, H, r]: borrowed by the wrapper, freed after it.
    _weights: Vec<[DevBuf; 4]>,
}

impl Drop for Lora {
    fn drop(&mut self) {
        unsafe { moe_lora_free(self.handle) };
    }
}

impl Lora {
    fn new(gpu: &Gpu, layer: &Layer, m: &Model) -> Lora {
        let (e, n1, h, i, r) = (
            m.experts as i64,
            m.n1() as i64,
            m.hidden as i64,
            m.inter as i64,
            LORA_RANK as i64,
        );
        let mut handle = null_mut();
        let status = unsafe { moe_lora_create(layer.0, LORA_SLOTS as i64, r, &mut handle) };
        check(status, "moe_lora_create");
        let scale = |n: i64| 1.0 / (n as f32).sqrt();
        let (pa1, pa2, pb) = (
            Pattern::new(gpu, 21, scale(h)),
            Pattern::new(gpu, 22, scale(i)),
            Pattern::new(gpu, 23, scale(r)),
        );
        let filled = |p: &Pattern, shape: &[i64], salt: usize| {
            let b = DevBuf::new(gpu, BF16, shape);
            p.fill(gpu, b.ptr, b.bytes(), salt);
            b
        };
        let mut weights = Vec::new();
        for slot in 0..LORA_SLOTS {
            let w = [
                filled(&pa1, &[e, 2 * r, h], slot),
                filled(&pb, &[e, n1, r], slot),
                filled(&pa2, &[e, r, i], slot),
                filled(&pb, &[e, h, r], slot + 7),
            ];
            let [ga, gb, da, db] = w.each_ref().map(|b| b.tensor());
            let set = unsafe { moe_lora_set_slot(handle, slot as i64, &ga, &gb, &da, &db, 2.0) };
            check(set, "moe_lora_set_slot");
            weights.push(w);
        }
        gpu.sync();
        Lora {
            handle,
            _weights: weights,
        }
    }

    /// A workspace for LoRA runs of up to `max_tokens` tokens (the layer's and the LoRA
    /// intermediates).
    fn workspace(&self, gpu: &Gpu, max_tokens: usize) -> DevBuf {
        let mut bytes = 0usize;
        let status = unsafe { moe_lora_workspace_size(self.handle, max_tokens as i64, &mut bytes) };
        check(status, "moe_lora_workspace_size");
        DevBuf::new(gpu, U8, &[bytes as i64])
    }

    /// moe_prepare + moe_run_lora of a set with a per-token adapter map.
    fn forward(&self, layer: &Layer, set: &InputSet, adapters: &DevBuf, ws: &DevBuf, gpu: &Gpu) {
        set.prepare(layer, ws, gpu);
        let (h, r, o, a) = (
            set.hidden.tensor(),
            set.router.tensor(),
            set.out.tensor(),
            adapters.tensor(),
        );
        let status = unsafe {
            moe_run_lora(
                self.handle,
                set.plan.0,
                &h,
                &r,
                &a,
                null(),
                null(),
                &o,
                gpu.raw(),
            )
        };
        check(status, "moe_run_lora");
    }
}

/// Issue 7: the base layer against the LoRA path on qwen3's shape, graph replays per set.
fn lora_overhead(b: &Bench) -> Vec<Value> {
    let gpu = b.gpu;
    let m = MODELS
        .iter()
        .find(|m| m.name == "qwen3")
        .expect("the qwen3 shape");
    let w = Weights::random(gpu, m, 7);
    let layer = Layer::new(m, &w, m.experts);
    let lora = Lora::new(gpu, &layer, m);
    let max_tokens = *b.o.lora_tokens.iter().max().unwrap();
    let ws = lora.workspace(gpu, max_tokens);
    // after moe_lora_create, moe_warmup compiles the LoRA kernels too
    let warm = layer.warmup(gpu, max_tokens);
    eprintln!(
        "LoRA on {}: {LORA_SLOTS} adapters of rank {LORA_RANK}; moe_warmup {warm:.1} s",
        m.name
    );
    let mut rows = Vec::new();
    for &tokens in &b.o.lora_tokens {
        let n = set_count(m.set_bytes(tokens));
        let sets = make_sets(gpu, &layer, m, tokens, n, b.hidden);
        // every token on an adapter, the four in turn (shifted per set)
        let maps: Vec<DevBuf> = (0..n)
            .map(|s| {
                let ids: Vec<i32> = (0..tokens).map(|t| ((t + s) % LORA_SLOTS) as i32).collect();
                DevBuf::upload(gpu, I32, &[tokens as i64], &ids)
            })
            .collect();
        // LoRA first: a profiler's first launches (ncu --launch-count) are then the LoRA path's
        let with_lora = Replays::time(b, n, |s| lora.forward(&layer, &sets[s], &maps[s], &ws, gpu));
        let base = Replays::time(b, n, |s| sets[s].forward(&layer, &ws, gpu));
        for s in &sets {
            s.check_output(gpu, &format!("LoRA M={tokens}"));
        }
        let (base_us, lora_us) = (base.per_set.median_us, with_lora.per_set.median_us);
        let overhead = 100.0 * (lora_us / base_us - 1.0);
        eprintln!(
            "  LoRA M={tokens}: base {base_us:.1} µs, LoRA {lora_us:.1} µs ({overhead:+.1} %)"
        );
        rows.push(json!({
            "shape": m.name, "tokens": tokens, "input_sets": n, "adapters": LORA_SLOTS,
            "rank": LORA_RANK, "timed_as": "graph replay, one graph per input set",
            "base_us": base_us, "lora_us": lora_us, "overhead_pct": overhead,
            "base": base.json(), "lora": with_lora.json(), "tile": tile_json(&sets[0].tile()),
        }));
    }
    rows
}

// ---------------------------------------------------------------- main

const USAGE: &str = "usage: bench [--quick] [--shapes mixtral,qwen3,deepseek,gpt-oss,ep,lora] [--tokens 1,16,...] [--reps N] [--json PATH] [--option KEY=VALUE]...
  --quick   M in 1,16,64,256,1024,4096; 5 repeats of ≥ 10 ms (default: every M to 16384; 7 repeats of ≥ 25 ms)
  --shapes  which layers; `ep` adds moe_dispatch alone and the DeepSeek-V3 rank-0 comparison (needs deepseek);
            `lora` (only when named) adds the LoRA overhead on qwen3's shape, M = 64 and 1024
  --tokens  token counts M of the layer rows (and of the LoRA rows)
  --json    also write every number to PATH (rewritten after each shape)
  --option  a backend option for every model layer (repeatable), e.g. cuda.wgmma=0
env: FUSEDMOE_NVRTC_PATH=/full/path/libnvrtc.so.13; FUSEDMOE_TILE_CONFIG=table.json (optional)";

fn usage(why: &str) -> ! {
    eprintln!("{why}\n{USAGE}");
    std::process::exit(2)
}

fn parse_args() -> Options {
    let mut o = Options {
        models: MODELS.to_vec(),
        ep: true,
        lora: false,
        tokens: Vec::new(),
        lora_tokens: LORA_TOKENS.to_vec(),
        repeats: Repeats {
            reps: 7,
            target_ms: 25.0,
        },
        json: None,
        quick: false,
        layer_options: Vec::new(),
    };
    let mut reps = None;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--quick" => {
                o.quick = true;
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
        match flag.as_str() {
            "--shapes" => {
                o.ep = value.split(',').any(|s| s == "ep");
                o.lora = value.split(',').any(|s| s == "lora");
                o.models = parse_models(&value, &["ep", "lora"], usage);
            }
            "--tokens" => o.tokens = parse_tokens(&value, usage),
            "--reps" => {
                reps = match value.parse() {
                    Ok(n) if n >= 1 => Some(n),
                    _ => usage("--reps is a count ≥ 1"),
                }
            }
            "--json" => o.json = Some(value),
            "--option" => match value.split_once('=') {
                Some((k, v)) => o.layer_options.push((k.to_string(), v.to_string())),
                None => usage("--option takes KEY=VALUE"),
            },
            _ => usage(&format!("unknown argument {flag}")),
        }
    }
    if o.quick {
        o.repeats = Repeats {
            reps: 5,
            target_ms: 10.0,
        };
    }
    if let Some(n) = reps {
        o.repeats.reps = n;
    }
    if !o.tokens.is_empty() {
        o.lora_tokens = o.tokens.clone();
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

fn main() {
    let o = parse_args();
    require_cuda();
    let wall = Instant::now();
    let gpu = Gpu::new();
    let mut r = Report {
        device: gpu.ctx.name().unwrap_or_default(),
        driver: driver_version(),
        copy: None,
        rows: Vec::new(),
        dispatch: None,
        ep: None,
        lora: None,
    };
    let version = unsafe { CStr::from_ptr(moe_version()) }.to_string_lossy();
    eprintln!("{}, driver {}, fusedmoe {version}", r.device, r.driver);

    let (copy, copy_tbs) = copy_bandwidth(&gpu, &o);
    eprintln!("copy bandwidth: {copy_tbs:.2} TB/s (read + write)");
    r.copy = Some((copy, copy_tbs));
    let hidden = Pattern::new(&gpu, 99, 1.0);
    let b = Bench {
        gpu: &gpu,
        o: &o,
        hidden: &hidden,
        copy_tbs,
    };
    let deepseek = MODELS.iter().find(|m| m.shared).unwrap();
    let dispatcher = o.ep.then(|| Dispatcher::contiguous(deepseek.experts, 1, 0));
    if o.ep && !o.models.iter().any(|m| m.shared) {
        eprintln!("the EP layer comparison needs the deepseek shape: skipped");
    }
    for m in &o.models {
        let d = dispatcher.as_ref().filter(|_| m.shared);
        let (rows, ep) = bench_model(&b, m, d);
        r.rows.extend(rows);
        r.ep = r.ep.or(ep);
        r.save(&o, wall); // a later failure keeps what was measured
    }
    r.dispatch = dispatcher.as_ref().map(|d| dispatch_alone(&b, d, deepseek));
    r.save(&o, wall);
    if o.lora {
        r.lora = Some(lora_overhead(&b));
        r.save(&o, wall);
    }
    r.print();
    println!("total {:.0} s", wall.elapsed().as_secs_f64());
}

/// Everything measured, for the table and the JSON file.
struct Report {
    device: String,
    driver: i32,
    /// The copy's timing and its bandwidth in TB/s (read + write).
    copy: Option<(Timing, f64)>,
    rows: Vec<Row>,
    dispatch: Option<Vec<Value>>,
    ep: Option<Value>,
    lora: Option<Vec<Value>>,
}

impl Report {
    /// Writes the JSON file (--json), all that is measured so far.
    fn save(&self, o: &Options, wall: Instant) {
        let Some(path) = &o.json else {
            return;
        };
        let version = unsafe { CStr::from_ptr(moe_version()) }.to_string_lossy();
        let copy = self.copy.map(|(t, tbs)| {
            json!({ "bytes_per_copy": COPY_BYTES, "counted_bytes": 2 * COPY_BYTES,
                    "convention": "read + write", "tb_per_s": tbs, "copy": t.json() })
        });
        let doc = json!({
            "device": self.device, "driver_version": self.driver, "fusedmoe_version": version,
            "dtype": "bf16", "quick": o.quick, "tokens": o.tokens, "layer_options": o.layer_options,
            "tile_config_env": std::env::var("FUSEDMOE_TILE_CONFIG").ok(),
            "shapes": o.models.iter().map(Model::describe).collect::<Vec<_>>(),
            "copy_bandwidth": copy,
            "rows": self.rows.iter().map(Row::json).collect::<Vec<_>>(),
            "dispatch": self.dispatch, "expert_parallel": self.ep, "lora": self.lora,
            "wall_s": wall.elapsed().as_secs_f64(),
        });
        let text = serde_json::to_string_pretty(&doc).expect("JSON");
        std::fs::write(path, text).unwrap_or_else(|e| die(&format!("{path}: {e}")));
    }

    /// The table, last, so that the end of the output carries it.
    fn print(&self) {
        let copy_tbs = self.copy.map_or(f64::NAN, |c| c.1);
        println!(
            "\n{}, driver {}; bf16; µs per call, median of the repeats",
            self.device, self.driver
        );
        println!(
            "copy bandwidth (cuMemcpyDtoDAsync 1 GiB, read + write bytes): {copy_tbs:.2} TB/s"
        );
        println!("TB/s = weight bytes of the experts hit / time; % copy BW for M ≤ 64; 'one graph' = all sets in one graph, per call");
        println!("| shape | M | timed as | sets | µs | µs one graph | experts hit | weights GB | TB/s | % copy BW | TFLOP/s | prepare µs | prepare µs one graph | tile m×n×k |");
        println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        for row in &self.rows {
            row.print();
        }
        if let Some(d) = &self.dispatch {
            let cells: Vec<String> = d
                .iter()
                .map(|r| {
                    let one = r["replays"]["one_graph_all_sets"]["median_us"].as_f64();
                    format!(
                        "M={} {:.2} µs ({:.2} in one graph)",
                        r["tokens"],
                        r["time_us"].as_f64().unwrap(),
                        one.unwrap()
                    )
                })
                .collect();
            println!(
                "moe_dispatch alone (E_g 257, 8 ranks, K 9, int32, graph per set): {}",
                cells.join("; ")
            );
        }
        if let Some(e) = &self.ep {
            let us = |k: &str| e[k]["time_us"].as_f64().unwrap();
            println!(
                "EP, DeepSeek-V3 M=16 (graph per set): full 257 experts {:.1} µs; rank 0 (33 local) {:.1} µs, with moe_dispatch {:.1} µs; speed-up {:.2}× ({:.2}× with dispatch; target ≥ 4×)",
                us("full"),
                us("local"),
                us("local_with_dispatch"),
                e["speedup"].as_f64().unwrap(),
                e["speedup_with_dispatch"].as_f64().unwrap()
            );
        }
        if let Some(rows) = &self.lora {
            let cells: Vec<String> = rows
                .iter()
                .map(|r| {
                    let f = |k: &str| r[k].as_f64().unwrap();
                    format!(
                        "M={} base {:.1} µs, LoRA {:.1} µs ({:+.1} %)",
                        r["tokens"],
                        f("base_us"),
                        f("lora_us"),
                        f("overhead_pct")
                    )
                })
                .collect();
            println!(
                "LoRA, qwen3 ({LORA_SLOTS} adapters, r {LORA_RANK}, every token on one; graph per set): {}",
                cells.join("; ")
            );
        }
    }
}
