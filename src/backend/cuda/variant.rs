//! Kernel variants: which source, entry point and `-D` defines one compiled kernel has. The
//! same variant name keys the in-memory and disk caches and appears in errors (kernels/README).

use super::compile::{
    Source, KERNEL_ACT, KERNEL_ALIGN, KERNEL_COMBINE, KERNEL_DISPATCH, KERNEL_GEMM, KERNEL_LORA,
};
use super::lora;
use crate::activation::{ActFn, GateUpLayout};
use crate::dtype::DType;
use crate::error::{unsupported, Result};
use crate::tiles::TileConfig;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Variant {
    pub source: &'static str,
    pub entry: &'static str,
    /// (NAME, value) pairs passed as -DNAME=value.
    pub defines: Vec<(&'static str, i64)>,
    /// Readable and unique: "moe_gemm1__bf16_m64n64k32_w2x2_s3_v8".
    pub name: String,
    /// Dynamic shared memory the launch needs, in bytes.
    pub shared_bytes: usize,
    /// Threads per block.
    pub threads: u32,
}

impl Variant {
    pub fn source(&self) -> &'static Source {
        [
            &KERNEL_ALIGN,
            &KERNEL_GEMM,
            &KERNEL_ACT,
            &KERNEL_COMBINE,
            &KERNEL_DISPATCH,
            &KERNEL_LORA,
        ]
        .into_iter()
        .find(|s| s.name == self.source)
        .expect("every variant names an embedded source")
    }

    pub fn options(&self) -> Vec<String> {
        self.defines
            .iter()
            .map(|(k, v)| format!("-D{k}={v}"))
            .collect()
    }
}

/// The FM_DTYPE code of a layer dtype (kernels/common.cuh) and the float kind code of
/// biases and router weights (the same numbering).
pub fn dtype_code(d: DType) -> i64 {
    match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
    }
}

pub fn align(ids_i64: bool) -> Variant {
    align_entry(
        if ids_i64 {
            "moe_align__i64"
        } else {
            "moe_align__i32"
        },
        ALIGN_SHARED_BYTES,
    )
}

/// The align step in one warp, for at most ALIGN_WARP_ROUTES routes (decode).
pub fn align_warp(ids_i64: bool) -> Variant {
    Variant {
        threads: 32,
        ..align_entry(
            if ids_i64 {
                "moe_align_warp__i64"
            } else {
                "moe_align_warp__i32"
            },
            0,
        )
    }
}

/// Up to this many routes the align step runs in one warp (a route per lane).
pub(crate) const ALIGN_WARP_ROUTES: usize = 32;

/// The align step over many blocks (kernels/moe_align.cu: count and scatter a block per chunk
/// of the routes, the scan in one block), for batches with many routes.
pub fn align_count(ids_i64: bool) -> Variant {
    align_entry(
        if ids_i64 {
            "moe_align_count__i64"
        } else {
            "moe_align_count__i32"
        },
        ALIGN_SHARED_BYTES,
    )
}

pub fn align_scan() -> Variant {
    // padded starts [E + 1], totals [E] and one counter, in ints, at E = MAX_EXPERTS
    align_entry("moe_align_scan_chunks", (2 * 4096 + 2) * 4)
}

pub fn align_scatter(ids_i64: bool) -> Variant {
    align_entry(
        if ids_i64 {
            "moe_align_scatter__i64"
        } else {
            "moe_align_scatter__i32"
        },
        0,
    )
}

fn align_entry(entry: &'static str, shared_bytes: usize) -> Variant {
    Variant {
        source: KERNEL_ALIGN.name,
        entry,
        defines: vec![],
        name: entry.to_string(),
        shared_bytes,
        threads: ALIGN_THREADS,
    }
}

/// Routes per chunk of the many-block align step: below two chunks' worth the one-block
/// kernel runs (it needs one launch, not three).
const ALIGN_CHUNK_ROUTES: usize = 2048;
const ALIGN_MAX_CHUNKS: usize = 64;

/// How many chunks the align step cuts `numel` routes into: 1 means the one-block kernel.
/// The chunks' counts ([chunks][E + 1] ints) borrow the workspace's compact_routes section
/// ([numel] ints), so chunks · (E + 1) ≤ numel.
pub fn align_chunks(numel: usize, experts: usize) -> usize {
    let chunks = (numel / ALIGN_CHUNK_ROUTES)
        .min(ALIGN_MAX_CHUNKS)
        .min(numel / (experts + 1));
    if chunks < 2 {
        1
    } else {
        chunks
    }
}

const ALIGN_THREADS: u32 = 1024;
/// The most shared memory the align kernel asks for: within every cc ≥ 8.0 device's opt-in
/// (sm_86/89 allow 99 KB).
const ALIGN_SHARED_BYTES: usize = 96 * 1024;

/// The align kernel's route pieces (one warp each; more pieces, fewer steps per warp) and its
/// shared memory: piece counts [pieces][E] and padded starts [E + 1] plus one counter, in ints.
/// E ≤ 744 gets a piece per warp; E = 4096 still gets 4.
pub fn align_segments(experts: usize, threads: u32) -> (usize, usize) {
    let fixed = (experts + 2) * 4;
    let per_piece = experts.max(1) * 4;
    let warps = threads as usize / 32;
    let pieces = (ALIGN_SHARED_BYTES.saturating_sub(fixed) / per_piece).clamp(1, warps);
    (pieces, fixed + pieces * per_piece)
}

/// What picks a GEMM variant beyond the dtype, the stage and the tile config.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct GemmPath {
    /// Every row of A and W starts 16-byte aligned (kdim a multiple of 8 and aligned bases),
    /// so 16-byte cp.async applies.
    pub vec8: bool,
    /// The device runs sm_90a code and the layer allows it, so a tile of wgmma's shape
    /// (wgmma_layout) takes the wgmma main loop.
    pub hopper: bool,
    /// With `hopper`, a tile of wgmma's shape takes the warp-specialised wgmma main loop
    /// (kernels/moe_gemm_wgmma_ws.cuh: a producer warpgroup beside the tile's; option
    /// cuda.wgmma_ws).
    pub wgmma_ws: bool,
    /// With `hopper`, which tiles of wgmma's shape in a GEMM without LoRA take the main loop
    /// whose CTA pairs multicast their shared weight tile by TMA (moe_gemm_wgmma_mc.cuh;
    /// option cuda.wgmma_multicast).
    pub multicast: Multicast,
    /// The device has thread-block clusters (sm_90), which a split-K GEMM needs.
    pub clusters: bool,
    /// The moe_run_lora variant, whose epilogue adds the LoRA delta (kernels/lora.cuh).
    pub lora: bool,
    /// GEMM1 applies this activation in its epilogue (tensor-core paths only; see
    /// `fuses_act`).
    pub act: Option<FusedAct>,
    /// The mma.sync loop without LoRA compiles GEMM2's combine in (FM_FUSED_COMBINE; option
    /// cuda.fuse_combine): GEMM1 zeroes the counts, GEMM2 counts and combines where a run
    /// gives it counts. Elsewhere, and without the option, the kernels are as before.
    pub combine: bool,
}

/// Which wgmma tiles take the multicast main loop (option cuda.wgmma_multicast).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Multicast {
    /// Tiles 256 columns wide (the option unset). On the H100 (BENCHMARKS.md, thirteenth
    /// session) every such row measured 1.03-1.08x (Mixtral M = 1024-16384, Qwen3 16384): there
    /// W is two thirds of a k-tile's bytes. At 128 columns, half, the pair's lockstep cost
    /// more than the bytes saved (DeepSeek, gpt-oss, Qwen3 4096: 0.94-1.03x).
    #[default]
    Wide,
    /// Every wgmma tile (cuda.wgmma_multicast=1).
    All,
    /// None (cuda.wgmma_multicast=0).
    Off,
}

impl Multicast {
    fn takes(self, block_n: u32) -> bool {
        match self {
            Multicast::Wide => block_n == 256,
            Multicast::All => true,
            Multicast::Off => false,
        }
    }
}

/// The activation a GEMM1 variant applies in its epilogue (moe_gemm.cu, FM_FUSED_ACT): the
/// FM_ACT code and the gate/up form, as moe_act's defines; alpha and limit come at launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FusedAct {
    code: i64,
    gated: bool,
    interleaved: bool,
}

impl FusedAct {
    pub fn new(f: ActFn, gated: bool, layout: GateUpLayout) -> FusedAct {
        FusedAct {
            code: act_code(f),
            gated,
            interleaved: gated && layout == GateUpLayout::Interleaved,
        }
    }

    fn defines(self) -> [(&'static str, i64); 4] {
        [
            ("FM_FUSED_ACT", 1),
            ("FM_ACT", self.code),
            ("FM_GATED", self.gated as i64),
            ("FM_INTERLEAVED", self.interleaved as i64),
        ]
    }
}

/// Whether a GEMM1 of this dtype can take the activation into its epilogue: the tensor-core
/// paths can (their threads hold columns in pairs); the f32 SIMT path does not.
pub fn fuses_act(dtype: DType) -> bool {
    dtype != DType::F32
}

/// GEMM1 (mode 1) or GEMM2 (mode 2) for a tile config (GEMM2 at its own BLOCK_N where the
/// config gives it one: `TileConfig::for_gemm`).
pub fn gemm(dtype: DType, mode: u8, tile: TileConfig, path: GemmPath) -> Result<Variant> {
    // where GEMM2 has its own width, a refusal says so: its BLOCK_N is not tile.block_n
    let what = match mode == 2 && tile.block_n_down().is_some() {
        true => "tile config: GEMM2 at tile.block_n_down",
        false => "tile config",
    };
    let tile = tile.for_gemm(mode);
    let split = tile.split_k(mode);
    let (layout, main_loop, shared_bytes) = main_loop(dtype, tile, path, split > 1, what)?;
    if split > 1 {
        let key = if mode == 1 { "split_k" } else { "split_k_down" };
        if !path.clusters {
            return Err(unsupported!(
                "tile config: tile.{key} {split} needs thread-block clusters (compute capability 9.0 or later); this GPU has none"
            ));
        }
        if !matches!(main_loop, MainLoop::MmaSync { .. }) {
            return Err(unsupported!(
                "tile config: tile.{key} {split} needs the tensor-core path of f16/bf16 layers; this layer is f32"
            ));
        }
    }
    // A split GEMM's CTAs leave their partial tiles (f32) in the stages' shared memory.
    let shared_bytes = if split > 1 {
        let partials = (tile.block_m * tile.block_n) as usize * 4;
        // (split-K is mma.sync: its LoRA variants group their rows)
        shared_bytes.max(tile_rows_bytes(tile.block_m, path.lora) + partials)
    } else {
        shared_bytes
    };
    Ok(gemm_variant(
        dtype,
        mode,
        tile,
        layout,
        main_loop,
        path,
        shared_bytes,
    ))
}

/// The shared bytes of the row table (kernels/moe_gemm.cu's FmRows: 12 bytes a row, 16 in
/// the tensor-core LoRA GEMMs, which keep each row's place in the align block),
/// 128-byte aligned: the tiles start after it.
fn tile_rows_bytes(bm: u32, grouped: bool) -> usize {
    // grouped: each row's place in the align block too, and the CTA's slot mask (8 bytes)
    let bytes = if grouped {
        bm as usize * 16 + 8
    } else {
        bm as usize * 12
    };
    bytes.div_ceil(128) * 128
}

/// The main loop a tile config takes on `path`: its warps (along M, along N), the loop, and
/// the dynamic shared memory it needs. `what` begins a refusal's message.
/// A split-K GEMM keeps to mma.sync: its reduction over the cluster is written for
/// mma.sync's fragments, and it is meant for decode's thin tiles, never wgmma's.
fn main_loop(
    dtype: DType,
    tile: TileConfig,
    path: GemmPath,
    split: bool,
    what: &str,
) -> Result<((u32, u32), MainLoop, usize)> {
    let TileConfig {
        block_m: bm,
        block_n: bn,
        block_k: bk,
        num_warps: warps,
        num_stages: stages,
        ..
    } = tile;
    let mma = dtype != DType::F32;
    let rows_bytes = tile_rows_bytes(bm, path.lora && mma);
    let esize = dtype.size();
    if mma && path.vec8 && path.hopper && !split {
        if let Some(layout) = wgmma_layout(bm, bn, bk, warps, stages) {
            // the row table, 1024 bytes to align the first stage, the swizzled stages
            let shared_bytes = rows_bytes + 1024 + stages as usize * (bm + bn) as usize * 128;
            // and, for the two loops with mbarriers, a full and an empty one (8 bytes each)
            // per stage after them
            let barriers = 2 * stages as usize * 8;
            if path.wgmma_ws {
                return Ok((layout, MainLoop::WgmmaWs, shared_bytes + barriers));
            }
            if path.multicast.takes(bn) && !path.lora {
                return Ok((layout, MainLoop::WgmmaMulticast, shared_bytes + barriers));
            }
            return Ok((layout, MainLoop::Wgmma, shared_bytes));
        }
    }
    let layout = warp_layout(bm, bn, warps, mma).ok_or_else(|| {
        unsupported!(
            "{what}: BLOCK_M {bm} x BLOCK_N {bn} cannot be shared by {warps} warps on CUDA (each warp needs at least {} rows and 8 columns); set tile.num_warps lower or the blocks larger",
            if mma { 16 } else { 1 }
        )
    })?;
    if !mma {
        let per_thread = (bm * bn).div_ceil(warps * 32);
        if per_thread > 64 {
            return Err(unsupported!(
                "{what}: BLOCK_M {bm} x BLOCK_N {bn} over {} threads is {per_thread} outputs per thread; the f32 CUDA path takes at most 64 (raise tile.num_warps or shrink the blocks)",
                warps * 32
            ));
        }
        let shared_bytes = rows_bytes + (bm + bn) as usize * (bk as usize + 1) * esize;
        return Ok((layout, MainLoop::Simt, shared_bytes));
    }
    let shared_bytes =
        rows_bytes + stages as usize * (bm + bn) as usize * (bk as usize + 8) * esize;
    Ok((layout, MainLoop::MmaSync { vec8: path.vec8 }, shared_bytes))
}

/// The GEMM's main loop: its FM_MMA, FM_WGMMA and FM_VEC.
#[derive(Clone, Copy)]
enum MainLoop {
    Simt,
    MmaSync { vec8: bool },
    Wgmma,
    // with a producer warpgroup (FM_WGMMA 2): WS_PRODUCER_THREADS beside the tile's warps
    WgmmaWs,
    // CTA pairs multicasting the weight tile (FM_WGMMA 3): a cluster of two, a tensor map
    WgmmaMulticast,
}

/// FM_WGMMA of the multicast main loop.
const MULTICAST_WGMMA: i64 = 3;

/// The warp-specialised loop's producer warpgroup (FM_WS_PRODUCERS in moe_gemm_wgmma_ws.cuh).
const WS_PRODUCER_THREADS: u32 = 128;

fn gemm_variant(
    dtype: DType,
    mode: u8,
    tile: TileConfig,
    (wm, wn): (u32, u32),
    main_loop: MainLoop,
    path: GemmPath,
    shared_bytes: usize,
) -> Variant {
    let fused = match path.act {
        Some(a) if mode == 1 && fuses_act(dtype) => Some(a),
        _ => None,
    };
    let (bm, bn, bk, stages) = (tile.block_m, tile.block_n, tile.block_k, tile.num_stages);
    let (mma, wgmma, vec) = match main_loop {
        MainLoop::Simt => (0, 0, 1),
        MainLoop::MmaSync { vec8 } => (1, 0, if vec8 { 8 } else { 1 }),
        MainLoop::Wgmma => (1, 1, 8),
        MainLoop::WgmmaWs => (1, 2, 8),
        MainLoop::WgmmaMulticast => (1, MULTICAST_WGMMA, 8),
    };
    let act = fused.map_or(String::new(), |a| {
        format!(
            "_act{}{}{}",
            a.code,
            if a.gated { "g" } else { "" },
            if a.interleaved { "i" } else { "" }
        )
    });
    // GEMM2's combine (and GEMM1's zeroing of its counts): the mma.sync loop without LoRA
    let combine = path.combine && !path.lora && matches!(main_loop, MainLoop::MmaSync { .. });
    let split = tile.split_k(mode);
    let name = format!(
        "moe_gemm{mode}__{}_m{bm}n{bn}k{bk}_w{wm}x{wn}_s{stages}_v{vec}{}{}{}{act}{}",
        dtype.name(),
        match wgmma {
            1 => "_wgmma",
            2 => "_wgmma_ws",
            MULTICAST_WGMMA => "_wgmma_mc",
            _ => "",
        },
        if split > 1 {
            format!("_sk{split}")
        } else {
            String::new()
        },
        if path.lora { "_lora" } else { "" },
        if combine { "_fc" } else { "" }
    );
    let mut defines = vec![
        ("FM_DTYPE", dtype_code(dtype)),
        ("FM_GEMM_MODE", mode as i64),
        ("FM_BM", bm as i64),
        ("FM_BN", bn as i64),
        ("FM_BK", bk as i64),
        ("FM_WARPS_M", wm as i64),
        ("FM_WARPS_N", wn as i64),
        ("FM_STAGES", stages as i64),
        ("FM_VEC", vec),
        ("FM_MMA", mma),
        ("FM_WGMMA", wgmma),
        ("FM_SPLIT_K", split as i64),
        (
            "FM_GEMM_PARAMS_BYTES",
            super::kernels::GEMM_PARAMS_BYTES as i64,
        ),
        (
            "FM_ROW_TABLE_BYTES",
            tile_rows_bytes(tile.block_m, path.lora && mma == 1) as i64,
        ),
    ];
    if path.lora {
        defines.extend(lora::expand_defines());
    }
    if combine {
        defines.push(("FM_FUSED_COMBINE", 1));
    }
    if let Some(a) = fused {
        defines.extend(a.defines());
    }
    Variant {
        source: KERNEL_GEMM.name,
        entry: "moe_gemm",
        defines,
        name,
        shared_bytes,
        threads: wm * wn * 32 + if wgmma == 2 { WS_PRODUCER_THREADS } else { 0 },
    }
}

/// The warps (along M, along N) of a wgmma tile, if the tile has wgmma's shape: BLOCK_K 64 (a
/// 128-byte swizzle row), a warpgroup of 4 warps per 64 rows, the warpgroups along N each
/// taking 64, 128 or 256 columns (one wgmma's N), and 3 stages at least.
pub fn wgmma_layout(bm: u32, bn: u32, bk: u32, warps: u32, stages: u32) -> Option<(u32, u32)> {
    if bk != 64 || bm % 64 != 0 || warps % 4 != 0 || stages < 3 {
        return None;
    }
    let (groups, groups_m) = (warps / 4, bm / 64);
    if groups % groups_m != 0 {
        return None;
    }
    let groups_n = groups / groups_m;
    let cols = bn / groups_n;
    (bn % groups_n == 0 && matches!(cols, 64 | 128 | 256)).then_some((4 * groups_m, groups_n))
}

impl Variant {
    /// Whether this GEMM variant has GEMM2's combine compiled in (FM_FUSED_COMBINE).
    pub fn combines(&self) -> bool {
        self.defines.contains(&("FM_FUSED_COMBINE", 1))
    }

    /// Whether this is a GEMM of the multicast main loop: its CTAs launch in pairs (an even
    /// grid, even GROUP_M and m-blocks) and take the weights' tensor map as a second argument
    /// (kernels.rs).
    pub fn multicasts_w(&self) -> bool {
        self.defines.contains(&("FM_WGMMA", MULTICAST_WGMMA))
    }

    /// Whether this variant compiles for sm_90a only (a wgmma main loop, or a split-K
    /// GEMM's cluster).
    #[cfg(test)]
    pub fn needs_sm90a(&self) -> bool {
        self.defines
            .iter()
            .any(|&(k, v)| (k == "FM_WGMMA" && v > 0) || (k == "FM_SPLIT_K" && v > 1))
    }
}

/// Splits `warps` into (along M, along N) so that each warp's tile is as square as it can
/// be; tensor-core warps need 16 rows and 8 columns at least.
fn warp_layout(bm: u32, bn: u32, warps: u32, mma: bool) -> Option<(u32, u32)> {
    let (min_m, min_n) = if mma { (16, 8) } else { (1, 1) };
    (0..=warps.trailing_zeros())
        .map(|s| (1u32 << s, warps >> s))
        .filter(|&(wm, wn)| bm % wm == 0 && bn % wn == 0 && bm / wm >= min_m && bn / wn >= min_n)
        .min_by_key(|&(wm, wn)| ((bm / wm) as i64 - (bn / wn) as i64).abs())
}

/// The FM_ACT code of an activation (kernels/act.cuh).
fn act_code(f: ActFn) -> i64 {
    match f {
        ActFn::Silu => 0,
        ActFn::Gelu => 1,
        ActFn::GeluTanh => 2,
        ActFn::SwigluOai { .. } => 3,
        ActFn::SiluClamp { .. } => 4,
        ActFn::SiluPreclamp { .. } => 5,
        ActFn::Relu2 => 6,
    }
}

pub fn act(dtype: DType, f: ActFn, gated: bool, layout: GateUpLayout) -> Variant {
    let code = act_code(f);
    let interleaved = gated && layout == GateUpLayout::Interleaved;
    let name = format!(
        "moe_act__{}_{}{}{}",
        dtype.name(),
        act_name(f),
        if gated { "_gated" } else { "" },
        if interleaved { "_interleaved" } else { "" }
    );
    Variant {
        source: KERNEL_ACT.name,
        entry: "moe_act",
        defines: vec![
            ("FM_DTYPE", dtype_code(dtype)),
            ("FM_ACT", code),
            ("FM_GATED", gated as i64),
            ("FM_INTERLEAVED", interleaved as i64),
            ("FM_ROW_ITEMS", ROW_ITEMS as i64),
        ],
        name,
        shared_bytes: 0,
        threads: ROW_THREADS,
    }
}

fn act_name(f: ActFn) -> &'static str {
    match f {
        ActFn::Silu => "silu",
        ActFn::Gelu => "gelu",
        ActFn::GeluTanh => "gelu_tanh",
        ActFn::SwigluOai { .. } => "swiglu_oai",
        ActFn::SiluClamp { .. } => "silu_clamp",
        ActFn::SiluPreclamp { .. } => "silu_preclamp",
        ActFn::Relu2 => "relu2",
    }
}

/// moe_combine or moe_zero_dropped.
pub fn combine(dtype: DType, entry: &'static str) -> Variant {
    Variant {
        source: KERNEL_COMBINE.name,
        entry,
        defines: vec![
            ("FM_DTYPE", dtype_code(dtype)),
            ("FM_ROW_ITEMS", ROW_ITEMS as i64),
        ],
        name: format!("{entry}__{}", dtype.name()),
        shared_bytes: 0,
        threads: ROW_THREADS,
    }
}

/// The row kernels (activation, combine, zero rows): threads per block and the columns each
/// thread takes; a block covers ROW_THREADS · ROW_ITEMS columns of one row.
const ROW_THREADS: u32 = 128;
const ROW_ITEMS: usize = 8;

/// Blocks along a row of `cols` columns.
pub fn row_chunks(cols: usize) -> usize {
    cols.div_ceil(ROW_THREADS as usize * ROW_ITEMS).max(1)
}

/// moe_lora_map: each token's active LoRA slot (no dtype: it moves int32 only).
pub fn lora_map() -> Variant {
    Variant {
        source: KERNEL_LORA.name,
        entry: "moe_lora_map",
        defines: lora::map_defines(),
        name: "moe_lora_map".to_string(),
        shared_bytes: 0,
        threads: lora::MAP_THREADS,
    }
}

/// moe_lora_shrink: the LoRA rank intermediates of GEMM1 or GEMM2 (one kernel for both).
pub fn lora_shrink(dtype: DType) -> Variant {
    let mut defines = vec![("FM_DTYPE", dtype_code(dtype))];
    defines.extend(lora::shrink_defines());
    Variant {
        source: KERNEL_LORA.name,
        entry: "moe_lora_shrink",
        defines,
        name: format!("moe_lora_shrink__{}", dtype.name()),
        shared_bytes: 0,
        threads: lora::SHRINK_THREADS,
    }
}

/// moe_dispatch for int32 or int64 ids in and out.
pub fn dispatch(ids_i64: bool, out_i64: bool) -> Variant {
    let bits = |b: bool| if b { "i64" } else { "i32" };
    Variant {
        source: KERNEL_DISPATCH.name,
        entry: "moe_dispatch",
        defines: vec![
            ("FM_IDS_I64", ids_i64 as i64),
            ("FM_OUT_I64", out_i64 as i64),
        ],
        name: format!("moe_dispatch__{}_{}", bits(ids_i64), bits(out_i64)),
        shared_bytes: 0,
        threads: 256,
    }
}

/// The variants CI compiles for sm_80 and sm_90a: every dtype, activation, layout, stage
/// entry and load width, at the default tile configs and a few tuned-table shapes; the LoRA
/// kernels, and the LoRA GEMMs at two tiles.
#[cfg(test)]
pub fn ci_set() -> Vec<Variant> {
    let tiles = [
        crate::tiles::default_config(1, 8),
        crate::tiles::default_config(1000, 8),
        TileConfig {
            block_m: 128,
            block_n: 128,
            block_k: 64,
            group_m: 8,
            num_warps: 8,
            num_stages: 4,
            flags: 0,
        },
        TileConfig {
            block_m: 16,
            block_n: 64,
            block_k: 128,
            group_m: 1,
            num_warps: 4,
            num_stages: 1,
            flags: 0,
        },
        // GEMM2 wider than GEMM1 (tile.block_n_down): decode's 16 rows at 256 columns
        crate::tiles::default_config(1, 8).with_block_n_down(256),
    ];
    // wgmma's three widths per warpgroup: 64 (64×64, w4), 128 (64×256, w8 as 1×2
    // warpgroups) and 256 (128×256, w8)
    let wgmma_tiles =
        [(64, 64, 4), (64, 256, 8), (128, 256, 8)].map(|(bm, bn, warps)| TileConfig {
            block_m: bm,
            block_n: bn,
            block_k: 64,
            group_m: 8,
            num_warps: warps,
            num_stages: 3,
            flags: 0,
        });

    let mut all = vec![align(false), align(true), align_scan()];
    for ids_i64 in [false, true] {
        all.push(align_count(ids_i64));
        all.push(align_scatter(ids_i64));
    }
    for (a, b) in [(false, false), (false, true), (true, false), (true, true)] {
        all.push(dispatch(a, b));
    }
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let loads = [(false, false), (true, false), (true, true)];
        let gemm_cases = tiles
            .iter()
            .flat_map(|&t| loads.map(|l| (t, l)))
            .chain(wgmma_tiles.map(|t| (t, (true, true))));
        for (tile, (vec8, hopper)) in gemm_cases {
            for mode in [1, 2] {
                let path = GemmPath {
                    vec8,
                    hopper,
                    wgmma_ws: false,
                    multicast: Multicast::Off,
                    clusters: hopper,
                    lora: false,
                    act: None,
                    combine: false,
                };
                if let Ok(g) = gemm(dtype, mode, tile, path) {
                    if !all.contains(&g) {
                        all.push(g);
                    }
                }
            }
        }
        let acts = [
            (ActFn::Silu, true),
            (ActFn::Gelu, true),
            (ActFn::GeluTanh, true),
            (
                ActFn::SwigluOai {
                    alpha: 1.0,
                    limit: 1.0,
                },
                true,
            ),
            (ActFn::SiluClamp { limit: 1.0 }, true),
            (ActFn::SiluPreclamp { limit: 1.0 }, true),
            (ActFn::Silu, false),
            (ActFn::Gelu, false),
            (ActFn::Relu2, false),
        ];
        for (f, gated) in acts {
            for layout in [GateUpLayout::Halves, GateUpLayout::Interleaved] {
                let a = act(dtype, f, gated, layout);
                if !all.contains(&a) {
                    all.push(a);
                }
                // GEMM1 with the activation fused: every activation and layout at the
                // smallest default tile; the wgmma main loop at its widest tile for the
                // first activation of each form
                let fused = Some(FusedAct::new(f, gated, layout));
                let mut cases = vec![(tiles[0], false)];
                if matches!(f, ActFn::Silu) {
                    cases.push((wgmma_tiles[2], true));
                }
                if !fuses_act(dtype) {
                    cases.clear();
                }
                for (tile, hopper) in cases {
                    let path = GemmPath {
                        vec8: true,
                        hopper,
                        wgmma_ws: false,
                        multicast: Multicast::Off,
                        clusters: hopper,
                        lora: false,
                        act: fused,
                        combine: false,
                    };
                    let g = gemm(dtype, 1, tile, path).expect("a CI tile");
                    if !all.contains(&g) {
                        all.push(g);
                    }
                }
            }
        }
        // split-K (sm_90a): GEMM1 with the activation and LoRA, GEMM2 plain; GEMM2's combine
        // (cuda.fuse_combine): both GEMMs, at the smallest tile and split
        if fuses_act(dtype) {
            let silu = Some(FusedAct::new(ActFn::Silu, true, GateUpLayout::Halves));
            let split = tiles[3].with_split_k(1, 4).with_split_k(2, 2);
            let cases = [
                (split, 1, false, silu, false),
                (split, 1, true, silu, false),
                (split, 2, false, None, false),
                (split, 2, true, None, false),
                (tiles[0], 1, false, silu, true),
                (tiles[0], 2, false, None, true),
                (split, 1, false, silu, true),
                (split, 2, false, None, true),
            ];
            for (tile, mode, lora, act, combine) in cases {
                let path = GemmPath {
                    vec8: true,
                    hopper: true,
                    wgmma_ws: false,
                    multicast: Multicast::Off,
                    clusters: true,
                    lora,
                    act,
                    combine,
                };
                let g = gemm(dtype, mode, tile, path).expect("a CI tile");
                if !all.contains(&g) {
                    all.push(g);
                }
            }
        }
        // the warp-specialised wgmma loop (sm_90a): its three widths per warpgroup for both
        // GEMMs, GEMM1 with the activation at the widest, LoRA at 128×128
        if fuses_act(dtype) {
            let silu = Some(FusedAct::new(ActFn::Silu, true, GateUpLayout::Halves));
            let ws_cases = wgmma_tiles
                .iter()
                .flat_map(|&t| [(t, 1, false, None), (t, 2, false, None)])
                .chain([
                    (wgmma_tiles[2], 1, false, silu),
                    (tiles[2], 1, true, silu),
                    (tiles[2], 2, true, None),
                ]);
            for (tile, mode, lora, act) in ws_cases {
                let path = GemmPath {
                    vec8: true,
                    hopper: true,
                    wgmma_ws: true,
                    multicast: Multicast::Off,
                    clusters: true,
                    lora,
                    act,
                    combine: false,
                };
                let g = gemm(dtype, mode, tile, path).expect("a CI tile");
                assert!(g.name.contains("_wgmma_ws"), "{}", g.name);
                if !all.contains(&g) {
                    all.push(g);
                }
            }
        }
        // the multicast wgmma loop (sm_90a): its three widths per warpgroup for both GEMMs,
        // GEMM1 with the activation at 128×128 in both gate/up layouts (the halves one takes
        // the tensor map's paired rows)
        if fuses_act(dtype) {
            let fused = |layout| Some(FusedAct::new(ActFn::Silu, true, layout));
            let mc_cases = wgmma_tiles
                .iter()
                .flat_map(|&t| [(t, 1, None), (t, 2, None)])
                .chain([
                    (tiles[2], 1, fused(GateUpLayout::Halves)),
                    (tiles[2], 1, fused(GateUpLayout::Interleaved)),
                ]);
            for (tile, mode, act) in mc_cases {
                let path = GemmPath {
                    vec8: true,
                    hopper: true,
                    wgmma_ws: false,
                    multicast: Multicast::All,
                    clusters: true,
                    lora: false,
                    act,
                    combine: false,
                };
                let g = gemm(dtype, mode, tile, path).expect("a CI tile");
                assert!(g.multicasts_w(), "{}", g.name);
                if !all.contains(&g) {
                    all.push(g);
                }
            }
        }
        all.push(combine(dtype, "moe_combine"));
        all.push(combine(dtype, "moe_zero_dropped"));
        // LoRA: the epilogue hook is the same at every tile, so the smallest default tile and
        // the largest (the most accumulators live around the hook) per GEMM, 16-byte loads
        // (and the largest on the wgmma main loop too)
        for (tile, hopper) in [(tiles[0], false), (tiles[2], false), (tiles[2], true)] {
            for mode in [1, 2] {
                let path = GemmPath {
                    vec8: true,
                    hopper,
                    wgmma_ws: false,
                    multicast: Multicast::Off,
                    clusters: hopper,
                    lora: true,
                    act: Some(FusedAct::new(ActFn::Silu, true, GateUpLayout::Halves)),
                    combine: false,
                };
                let g = gemm(dtype, mode, tile, path).expect("a CI tile");
                if !all.contains(&g) {
                    all.push(g);
                }
            }
        }
        all.push(lora_shrink(dtype));
    }
    all.push(lora_map());
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warp_layouts_keep_tensor_core_tiles_whole() {
        assert_eq!(warp_layout(16, 32, 4, true), Some((1, 4)));
        assert_eq!(warp_layout(64, 64, 4, true), Some((2, 2)));
        assert_eq!(warp_layout(128, 128, 8, true), Some((2, 4)));
        assert_eq!(warp_layout(16, 16, 4, true), None);
        assert_eq!(warp_layout(16, 16, 4, false), Some((2, 2)));
    }

    #[test]
    fn wgmma_takes_tiles_of_its_shape_only() {
        // a warpgroup (4 warps) per 64 rows; the warpgroups along N take 64/128/256 columns
        assert_eq!(wgmma_layout(128, 128, 64, 8, 4), Some((8, 1)));
        assert_eq!(wgmma_layout(64, 256, 64, 8, 3), Some((4, 2)));
        assert_eq!(wgmma_layout(128, 256, 64, 8, 3), Some((8, 1)));
        assert_eq!(wgmma_layout(64, 64, 64, 4, 3), Some((4, 1)));
        assert_eq!(
            wgmma_layout(64, 64, 64, 8, 3),
            None,
            "32 columns per warpgroup"
        );
        assert_eq!(wgmma_layout(128, 128, 32, 8, 4), None, "BLOCK_K 32");
        assert_eq!(wgmma_layout(16, 64, 64, 4, 3), None, "BLOCK_M 16");
        assert_eq!(
            wgmma_layout(128, 128, 64, 4, 3),
            None,
            "one warpgroup, two slabs"
        );
        assert_eq!(wgmma_layout(128, 128, 64, 8, 2), None, "two stages");
        let tile = TileConfig {
            block_m: 128,
            block_n: 128,
            block_k: 64,
            group_m: 8,
            num_warps: 8,
            num_stages: 4,
            flags: 0,
        };
        let path = |vec8, hopper| GemmPath {
            vec8,
            hopper,
            wgmma_ws: false,
            multicast: Multicast::Off,
            clusters: hopper,
            lora: false,
            act: None,
            combine: false,
        };
        let on = gemm(DType::BF16, 1, tile, path(true, true)).unwrap();
        assert!(
            on.needs_sm90a() && on.name.ends_with("_wgmma"),
            "{}",
            on.name
        );
        for (dtype, vec8, hopper) in [
            (DType::BF16, true, false),
            (DType::BF16, false, true),
            (DType::F32, true, true),
        ] {
            let off = gemm(dtype, 1, tile, path(vec8, hopper)).unwrap();
            assert!(!off.needs_sm90a(), "{}", off.name);
        }
    }

    /// cuda.fuse_combine compiles the combine into the plain mma.sync loop only: not into
    /// LoRA's GEMMs, the wgmma loops or f32's SIMT loop, which keep moe_combine.
    #[test]
    fn only_the_plain_mma_sync_loop_takes_the_combine() {
        let decode = crate::tiles::default_config(1, 8);
        let wide = wgmma_128x128();
        let path = GemmPath {
            combine: true,
            ..hopper_path()
        };
        for mode in [1, 2] {
            let plain = gemm(DType::BF16, mode, decode, path).unwrap();
            assert!(
                plain.combines() && plain.name.ends_with("_fc"),
                "{}",
                plain.name
            );
            let off = GemmPath {
                combine: false,
                ..path
            };
            assert!(!gemm(DType::BF16, mode, decode, off).unwrap().combines());
            let lora = GemmPath { lora: true, ..path };
            assert!(!gemm(DType::BF16, mode, decode, lora).unwrap().combines());
            assert!(!gemm(DType::BF16, mode, wide, path).unwrap().combines());
            assert!(!gemm(DType::F32, mode, decode, path).unwrap().combines());
        }
    }

    #[test]
    fn gemm2_takes_its_own_block_n_and_gemm1_keeps_block_n() {
        let decode = crate::tiles::default_config(1, 8).with_block_n_down(128);
        let g1 = gemm(DType::BF16, 1, decode, hopper_path()).unwrap();
        let g2 = gemm(DType::BF16, 2, decode, hopper_path()).unwrap();
        assert!(g1.name.contains("_m16n32k64_"), "{}", g1.name);
        assert!(g2.name.contains("_m16n128k64_"), "{}", g2.name);
        assert!(g1.defines.contains(&("FM_BN", 32)), "{:?}", g1.defines);
        assert!(g2.defines.contains(&("FM_BN", 128)), "{:?}", g2.defines);
        // GEMM2 is the variant a config of its width alone would give
        let alone = TileConfig {
            block_n: 128,
            ..crate::tiles::default_config(1, 8)
        };
        assert_eq!(g2, gemm(DType::BF16, 2, alone, hopper_path()).unwrap());
        // prefill: a 256-wide GEMM2 takes the multicast by default, GEMM1 at 128 does not
        let wide = wgmma_128x128().with_block_n_down(256);
        let path = GemmPath {
            multicast: Multicast::Wide,
            ..hopper_path()
        };
        assert!(!gemm(DType::BF16, 1, wide, path).unwrap().multicasts_w());
        assert!(gemm(DType::BF16, 2, wide, path).unwrap().multicasts_w());
        // a width GEMM2 cannot take is refused as GEMM2's: f32 at 128 outputs per thread
        let e = gemm(DType::F32, 2, wide, path).unwrap_err();
        assert!(
            e.message
                .starts_with("tile config: GEMM2 at tile.block_n_down: BLOCK_M 128 x BLOCK_N 256"),
            "{}",
            e.message
        );
        assert!(gemm(DType::F32, 1, wide, path).is_ok());
    }

    /// A prefill tile of wgmma's shape: 128×128×64, 8 warps (two warpgroups).
    fn wgmma_128x128() -> TileConfig {
        TileConfig {
            block_m: 128,
            block_n: 128,
            block_k: 64,
            num_warps: 8,
            ..crate::tiles::default_config(1, 8)
        }
    }

    /// 16-byte loads on an sm_90a GPU with clusters, no LoRA, no fused activation.
    fn hopper_path() -> GemmPath {
        GemmPath {
            vec8: true,
            hopper: true,
            wgmma_ws: false,
            multicast: Multicast::Off,
            clusters: true,
            lora: false,
            act: None,
            combine: false,
        }
    }

    /// By default (the option unset) the wgmma tiles 256 columns wide take the multicast
    /// loop, with its barriers; 128-column tiles, LoRA's GEMMs and the warp-specialised loop
    /// do not. With the option at 1 every wgmma tile does.
    #[test]
    fn multicast_takes_the_wide_tiles_by_default() {
        let tile = |block_n| TileConfig {
            block_m: 128,
            block_n,
            block_k: 64,
            group_m: 8,
            num_warps: 8,
            num_stages: 3,
            flags: 0,
        };
        let path = |multicast, lora, wgmma_ws| GemmPath {
            multicast,
            lora,
            wgmma_ws,
            ..hopper_path()
        };
        let wide = Multicast::default();
        let cases = [
            (256, wide, false, false, true),
            (128, wide, false, false, false),
            (256, wide, true, false, false),
            (256, wide, false, true, false),
            (128, Multicast::All, false, false, true),
            (256, Multicast::Off, false, false, false),
        ];
        for (bn, mc, lora, ws, expect) in cases {
            for mode in [1, 2] {
                let g = gemm(DType::BF16, mode, tile(bn), path(mc, lora, ws)).unwrap();
                assert_eq!(g.multicasts_w(), expect, "{} ({mc:?})", g.name);
                if expect {
                    let plain = gemm(DType::BF16, mode, tile(bn), path(Multicast::Off, lora, ws));
                    let barriers = 2 * 3 * 8;
                    assert_eq!(g.shared_bytes, plain.unwrap().shared_bytes + barriers);
                    assert!(
                        g.name.ends_with("_wgmma_mc") && g.needs_sm90a(),
                        "{}",
                        g.name
                    );
                }
            }
        }
    }

    #[test]
    fn a_wgmma_ws_variant_adds_a_producer_warpgroup_and_its_barriers() {
        let tile = TileConfig {
            block_m: 128,
            block_n: 256,
            block_k: 64,
            group_m: 8,
            num_warps: 8,
            num_stages: 4,
            flags: 0,
        };
        let path = hopper_path();
        let plain = gemm(DType::BF16, 1, tile, path).unwrap();
        let ws = gemm(
            DType::BF16,
            1,
            tile,
            GemmPath {
                wgmma_ws: true,
                multicast: Multicast::Off,
                ..path
            },
        )
        .unwrap();
        assert!(
            ws.name.ends_with("_wgmma_ws") && ws.needs_sm90a(),
            "{}",
            ws.name
        );
        assert!(ws.defines.contains(&("FM_WGMMA", 2)));
        assert_eq!((plain.threads, ws.threads), (256, 384));
        assert_eq!(ws.shared_bytes, plain.shared_bytes + 2 * 4 * 8);
        // without sm_90a, or for a tile of another shape, the option changes nothing
        let k32 = TileConfig {
            block_k: 32,
            ..tile
        };
        for (t, hopper) in [(tile, false), (k32, true)] {
            let off = GemmPath { hopper, ..path };
            let on = GemmPath {
                wgmma_ws: true,
                multicast: Multicast::Off,
                ..off
            };
            assert_eq!(
                gemm(DType::BF16, 1, t, on).unwrap(),
                gemm(DType::BF16, 1, t, off).unwrap()
            );
        }
    }

    #[test]
    fn a_split_k_gemm_is_an_sm90_mma_sync_variant_with_room_for_its_partials() {
        let thin = TileConfig {
            block_m: 16,
            block_n: 64,
            block_k: 128,
            group_m: 1,
            num_warps: 4,
            num_stages: 1,
            flags: 0,
        };
        let hopper = hopper_path();
        let split = thin.with_split_k(1, 4);
        assert_eq!((split.split_k(1), split.split_k(2)), (4, 1));
        let g1 = gemm(DType::BF16, 1, split, hopper).unwrap();
        assert!(g1.name.ends_with("_sk4") && g1.needs_sm90a(), "{}", g1.name);
        let g2 = gemm(DType::BF16, 2, split, hopper).unwrap();
        assert!(!g2.name.contains("_sk") && !g2.needs_sm90a(), "{}", g2.name);
        // one stage of 16 + 64 rows is smaller than the 16×64 f32 partial tile
        assert!(g1.shared_bytes >= 128 + 16 * 64 * 4, "{}", g1.shared_bytes);

        // a wgmma-shaped tile keeps to mma.sync when it splits
        let wide = TileConfig {
            block_m: 64,
            block_n: 64,
            block_k: 64,
            num_stages: 3,
            ..thin
        }
        .with_split_k(2, 2);
        let g2 = gemm(DType::BF16, 2, wide, hopper).unwrap();
        assert!(g2.name.ends_with("_sk2"), "{}", g2.name);
        assert!(!g2.defines.contains(&("FM_WGMMA", 1)));

        let no_clusters = GemmPath {
            clusters: false,
            ..hopper
        };
        let e = gemm(DType::BF16, 1, split, no_clusters).unwrap_err();
        assert!(e.to_string().contains("tile.split_k 4"), "{e}");
        let e = gemm(DType::F32, 1, split, hopper).unwrap_err();
        assert!(e.to_string().contains("f32"), "{e}");
    }

    #[test]
    fn many_routes_take_the_many_block_align_within_the_borrowed_section() {
        assert_eq!(align_chunks(0, 8), 1);
        assert_eq!(align_chunks(2304, 257), 1, "DeepSeek M=256: one block");
        assert_eq!(align_chunks(8192, 128), 4, "Qwen3 M=1024");
        assert_eq!(align_chunks(36864, 257), 18, "DeepSeek M=4096");
        assert_eq!(
            align_chunks(147456, 257),
            64,
            "DeepSeek M=16384: at most 64"
        );
        assert_eq!(
            align_chunks(4800, 4096),
            1,
            "E=4096: the counts would not fit"
        );
        for (numel, experts) in [(4096, 8), (5000, 1000), (100_000, 4096), (9999, 33)] {
            let c = align_chunks(numel, experts);
            assert!(
                c == 1 || c * (experts + 1) <= numel,
                "{numel} {experts}: {c}"
            );
        }
    }

    #[test]
    fn align_pieces_fill_the_warps_and_fit_the_shared_memory() {
        for (experts, pieces) in [
            (1, 32),
            (8, 32),
            (257, 32),
            (744, 32),
            (1024, 22),
            (4096, 4),
        ] {
            let (p, bytes) = align_segments(experts, ALIGN_THREADS);
            assert_eq!(p, pieces, "E {experts}");
            assert_eq!(bytes, (experts + 2 + p * experts) * 4);
            assert!(bytes <= ALIGN_SHARED_BYTES, "E {experts}: {bytes} bytes");
        }
    }
}
