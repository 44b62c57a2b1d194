//! The kernels one (layer, tile config) runs, loaded, and their launches. The parameter
//! structs mirror the ones in kernels/*.cu field for field (#[repr(C)], 8-byte fields first).

use super::device::{driver_error, DeviceState};
use super::lora;
use super::tma;
use super::variant::{self, dtype_code, Variant};
use crate::activation::GateUpLayout;
use crate::config::Validated;
use crate::error::{unsupported, Result};
use crate::layer::{Bias, Layer, Weights};
use crate::plan::{Prepared, RunIo};
use crate::tiles::TileConfig;
use crate::workspace::Layout;
use cudarc::driver::{
    sys, CudaFunction, CudaStream, DeviceRepr, DriverError, LaunchConfig, PushKernelArg,
};
use std::ffi::c_void;
use std::sync::Arc;

pub(super) struct Loaded {
    f: CudaFunction,
    v: Variant,
}

impl Loaded {
    pub(super) fn new(dev: &DeviceState, v: Variant) -> Result<Loaded> {
        Ok(Loaded {
            f: dev.function(&v)?,
            v,
        })
    }

    /// A row kernel (variant::ROW_THREADS): a block per row and per chunk of `cols` columns.
    fn launch_rows<P: DeviceRepr>(
        &self,
        stream: &Arc<CudaStream>,
        rows: usize,
        cols: usize,
        params: &P,
        start: Start,
    ) -> Result<()> {
        self.launch_with::<P, P>(
            stream,
            (rows, variant::row_chunks(cols)),
            params,
            None,
            start,
        )
    }

    pub(super) fn launch_2d<P: DeviceRepr>(
        &self,
        stream: &Arc<CudaStream>,
        grid: (usize, usize),
        params: &P,
    ) -> Result<()> {
        self.launch_with::<P, P>(stream, grid, params, None, Start::AfterPrevious)
    }

    /// A launch with a second by-value parameter struct where `extra` is given (the LoRA
    /// variants of the GEMM take the expand stage's parameters so).
    fn launch_with<P: DeviceRepr, Q: DeviceRepr>(
        &self,
        stream: &Arc<CudaStream>,
        (x, y): (usize, usize),
        params: &P,
        extra: Option<&Q>,
        start: Start,
    ) -> Result<()> {
        if x == 0 || y == 0 {
            return Ok(());
        }
        let grid_x = u32::try_from(x)
            .ok()
            .filter(|&b| b < i32::MAX as u32)
            .ok_or_else(|| unsupported!("kernel {}: {x} blocks exceed one launch", self.v.name))?;
        let grid_y = u32::try_from(y)
            .ok()
            .filter(|&b| b <= u16::MAX as u32)
            .ok_or_else(|| {
                unsupported!(
                    "kernel {}: {y} column blocks exceed one launch",
                    self.v.name
                )
            })?;
        let cfg = LaunchConfig {
            grid_dim: (grid_x, grid_y, 1),
            block_dim: (self.v.threads, 1, 1),
            shared_mem_bytes: self.v.shared_bytes as u32,
        };
        let fail = |e| driver_error(&format!("kernel {}", self.v.name), e);
        if let Start::Programmatic { .. } = start {
            // by value, as the kernel's parameters: a pointer to each (on the stack: moe_run
            // does not allocate)
            let mut args = [
                params as *const P as *mut c_void,
                extra.map_or(std::ptr::null_mut(), |q| q as *const Q as *mut c_void),
            ];
            let count = 1 + extra.is_some() as usize;
            return unsafe { launch_programmatic(stream, &self.f, cfg, &mut args[..count]) }
                .map_err(fail);
        }
        let mut b = stream.launch_builder(&self.f);
        b.arg(params);
        if let Some(extra) = extra {
            b.arg(extra);
        }
        unsafe { b.launch(cfg) }.map(|_| ()).map_err(fail)
    }
}

/// How a launch orders after the stream's previous kernel.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// When it has finished (an ordinary launch).
    AfterPrevious,
    /// As a programmatic dependent (sm_90, tile.pdl): the kernel may start once every block
    /// of the previous one has called griddepcontrol.launch_dependents (or exited), and waits
    /// in griddepcontrol.wait before it reads what that one writes (kernels/common.cuh,
    /// fm_pdl_wait). The launch gap goes, and GEMM2 streams its first weight stages while
    /// GEMM1 ends; with `early_gemm2` GEMM1 lets it start at once, else after its k loops.
    Programmatic { early_gemm2: bool },
}

/// What moe_run launches: the base layer's stages, or LoRA's, whose map and shrinks launch in
/// order between the GEMMs (no programmatic edges there).
pub enum Stages<'a> {
    Base(Start),
    Lora(&'a lora::Run),
}

/// cuLaunchKernelEx with programmatic stream serialization allowed; `args` point at the
/// kernel's parameters, which must outlive the call (the driver copies them).
unsafe fn launch_programmatic(
    stream: &Arc<CudaStream>,
    f: &CudaFunction,
    cfg: LaunchConfig,
    args: &mut [*mut c_void],
) -> std::result::Result<(), DriverError> {
    let mut attr = sys::CUlaunchAttribute {
        id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
        pad: [0; 4],
        value: std::mem::zeroed(),
    };
    attr.value.programmaticStreamSerializationAllowed = 1;
    let config = sys::CUlaunchConfig {
        gridDimX: cfg.grid_dim.0,
        gridDimY: cfg.grid_dim.1,
        gridDimZ: cfg.grid_dim.2,
        blockDimX: cfg.block_dim.0,
        blockDimY: cfg.block_dim.1,
        blockDimZ: cfg.block_dim.2,
        sharedMemBytes: cfg.shared_mem_bytes,
        hStream: stream.cu_stream(),
        attrs: &mut attr,
        numAttrs: 1,
    };
    stream.context().bind_to_thread()?;
    sys::cuLaunchKernelEx(
        &config,
        f.cu_function(),
        args.as_mut_ptr(),
        std::ptr::null_mut(),
    )
    .result()
}

/// The align kernels for one id type (int32, int64): the one-warp and the one-block kernel,
/// and the count and scatter of the many-block align step.
struct AlignKernels {
    one_warp: Loaded,
    one_block: Loaded,
    count: Loaded,
    scatter: Loaded,
}

impl AlignKernels {
    fn load(dev: &DeviceState, ids_i64: bool) -> Result<AlignKernels> {
        Ok(AlignKernels {
            one_warp: Loaded::new(dev, variant::align_warp(ids_i64))?,
            one_block: Loaded::new(dev, variant::align(ids_i64))?,
            count: Loaded::new(dev, variant::align_count(ids_i64))?,
            scatter: Loaded::new(dev, variant::align_scatter(ids_i64))?,
        })
    }
}

pub struct KernelSet {
    /// int32 ids, int64 ids
    align: [AlignKernels; 2],
    align_scan: Loaded,
    gemm1: Loaded,
    /// moe_act, or None where GEMM1 applies the activation in its epilogue.
    act: Option<Loaded>,
    gemm2: Loaded,
    /// moe_combine, or moe_zero_dropped with no_combine.
    finish: Loaded,
    /// A LoRA set (moe_run_lora): its map and shrink kernels; gemm1 and gemm2 are then the
    /// FM_LORA variants.
    lora: Option<lora::Kernels>,
    /// The weights' tensor maps of GEMM1 and GEMM2 where they multicast (tma.rs), encoded
    /// once with the set: the layer's weights stay where they are for its lifetime.
    w_maps: [Option<tma::WeightMap>; 2],
    tile: TileConfig,
}

pub struct AlignArgs<'a> {
    pub ids: u64,
    pub ws: u64,
    pub layout: &'a Layout,
    pub experts: usize,
    pub block_m: usize,
    pub bad_ids: u64,
}

pub struct ScratchPtrs {
    pub g1: u64,
    pub act: u64,
    pub y: u64,
    /// GEMM2's arrival counts where it does the combine (fuses_combine), else 0.
    pub combine_counts: u64,
}

#[repr(C)]
struct GemmParams {
    a: u64,
    w: u64,
    bias: u64,
    router: u64,
    out: u64,
    sorted_route_ids: u64,
    block_expert: u64,
    num_padded: u64,
    n: i32,
    kdim: i32,
    numel: i32,
    top_k: i32,
    bias_kind: i32,
    router_kind: i32,
    apply_router: i32,
    n_tiles: i32,
    /// GROUP_M: m-blocks that take each n-tile in turn before the next n-tile (see fm_block)
    group_m: i32,
    m_blocks: i32,
    /// I, alpha and limit: the activation a GEMM1 with FM_FUSED_ACT applies
    inter: i32,
    alpha: f32,
    limit: f32,
    /// GEMM1 (mma.sync loop) lets GEMM2 start at once instead of after its k loop (tile.pdl)
    early_dependents: i32,
}

/// The GEMMs' second argument where they do the combine (moe_gemm.cu FmCombine,
/// FM_FUSED_COMBINE): GEMM2's arrival counts (0: moe_combine runs), the route slots, out,
/// the counts' shape (M, GEMM2's n-tiles) and routed_scaling_factor.
#[repr(C)]
struct CombineArgs {
    counts: u64,
    route_slot: u64,
    out: u64,
    tokens: i32,
    tiles: i32,
    rsf: f32,
}

/// The size moe_gemm.cu checks FmGemmParams against (FM_GEMM_PARAMS_BYTES).
pub const GEMM_PARAMS_BYTES: usize = std::mem::size_of::<GemmParams>();

#[repr(C)]
struct ActParams {
    g1: u64,
    act: u64,
    sorted_route_ids: u64,
    num_padded: u64,
    numel: i32,
    inter: i32,
    alpha: f32,
    limit: f32,
}

#[repr(C)]
struct CombineParams {
    y: u64,
    route_slot: u64,
    out: u64,
    top_k: i32,
    hidden: i32,
    rsf: f32,
}

#[repr(C)]
struct ZeroParams {
    route_slot: u64,
    out: u64,
    hidden: i32,
}

unsafe impl DeviceRepr for GemmParams {}
unsafe impl DeviceRepr for CombineArgs {}
unsafe impl DeviceRepr for ActParams {}
unsafe impl DeviceRepr for CombineParams {}
unsafe impl DeviceRepr for ZeroParams {}

fn bias_parts(b: &Option<Bias>) -> (u64, i32) {
    match b {
        Some(b) => (b.data as u64, dtype_code(b.dtype) as i32),
        None => (0, 0),
    }
}

impl KernelSet {
    /// One GEMM over the grid its params describe (m_blocks × n_tiles CTAs; grid y: the CTAs
    /// of a split-K cluster, moe_gemm.cu FM_SPLIT_K). A multicast GEMM
    /// (moe_gemm_wgmma_mc.cuh) runs in CTA pairs on consecutive m-blocks of one n-tile, so its
    /// m_blocks and GROUP_M are made even (the extra m-block lies past num_padded and exits),
    /// and it takes the weights' tensor map where LoRA's GEMMs take the expand's parameters.
    fn launch_gemm<Q: DeviceRepr>(
        &self,
        mode: u8,
        stream: &Arc<CudaStream>,
        mut params: GemmParams,
        (lora, combine): (Option<&Q>, Option<&CombineArgs>),
        start: Start,
    ) -> Result<()> {
        let gemm = if mode == 1 { &self.gemm1 } else { &self.gemm2 };
        let map = self.w_maps[mode as usize - 1].as_ref();
        if map.is_some() {
            params.m_blocks += params.m_blocks & 1;
            params.group_m += params.group_m & 1;
        }
        let ctas = params.m_blocks as usize * params.n_tiles as usize;
        let split = self.tile.split_k(mode) as usize;
        match (map, combine) {
            (Some(map), _) => gemm.launch_with(stream, (ctas, 1), &params, Some(map), start),
            (None, Some(c)) => gemm.launch_with(stream, (ctas, split), &params, Some(c), start),
            (None, None) => gemm.launch_with(stream, (ctas, split), &params, lora, start),
        }
    }

    /// Whether GEMM2 may do the combine (moe_gemm.cu fm_combine_arrive): both GEMMs have it
    /// compiled in (the mma.sync loop of a layer with cuda.fuse_combine), GEMM1 zeroing the
    /// counts and GEMM2 counting its arrivals.
    pub fn fuses_combine(&self) -> bool {
        self.gemm1.v.combines() && self.gemm2.v.combines()
    }

    /// The tensor map of a GEMM that multicasts its weight tiles, else None.
    fn weight_map(
        gemm: &Loaded,
        w: tma::WeightRows,
        tile: TileConfig,
    ) -> Result<Option<tma::WeightMap>> {
        match gemm.v.multicasts_w() {
            true => tma::weight_map(&w, tile.block_n).map(Some),
            false => Ok(None),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn load(
        dev: &DeviceState,
        v: &Validated,
        weights: &Weights,
        tile: TileConfig,
        (gemm1_vec8, gemm2_vec8): (bool, bool),
        (hopper, wgmma_ws, multicast): (bool, bool, variant::Multicast),
        with_lora: bool,
        (fuse_act, fuse_combine): (bool, bool),
    ) -> Result<KernelSet> {
        let finish = if v.no_combine {
            "moe_zero_dropped"
        } else {
            "moe_combine"
        };
        let fused = (fuse_act && variant::fuses_act(v.dtype))
            .then(|| variant::FusedAct::new(v.act, v.gated, v.layout));
        let path = |vec8, act| variant::GemmPath {
            vec8,
            hopper,
            wgmma_ws,
            multicast,
            clusters: dev.traits.compute_capability.0 >= 9,
            lora: with_lora,
            act,
            combine: fuse_combine,
        };
        let gemm1 = variant::gemm(v.dtype, 1, tile, path(gemm1_vec8, fused))?;
        let gemm2 = variant::gemm(v.dtype, 2, tile, path(gemm2_vec8, None))?;
        // the set's two NVRTC compilations that take seconds, side by side
        let (gemm1, gemm2) = rayon::join(|| Loaded::new(dev, gemm1), || Loaded::new(dev, gemm2));
        let (gemm1, gemm2) = (gemm1?, gemm2?);
        let d = v.dims;
        let w13 = tma::WeightRows {
            base: weights.w13.data as u64,
            dtype: v.dtype,
            experts: d.experts,
            rows: d.n1,
            kdim: d.hidden,
            // GEMM1 pairs gate and up columns where it applies a gated activation
            paired_halves: fused.is_some() && v.gated && v.layout == GateUpLayout::Halves,
        };
        let w2 = tma::WeightRows {
            base: weights.w2.data as u64,
            dtype: v.dtype,
            experts: d.experts,
            rows: d.hidden,
            kdim: d.inter,
            paired_halves: false,
        };
        Ok(KernelSet {
            w_maps: [
                Self::weight_map(&gemm1, w13, tile.for_gemm(1))?,
                Self::weight_map(&gemm2, w2, tile.for_gemm(2))?,
            ],
            align: [
                AlignKernels::load(dev, false)?,
                AlignKernels::load(dev, true)?,
            ],
            align_scan: Loaded::new(dev, variant::align_scan())?,
            gemm1,
            act: match fused {
                Some(_) => None,
                None => Some(Loaded::new(
                    dev,
                    variant::act(v.dtype, v.act, v.gated, v.layout),
                )?),
            },
            gemm2,
            finish: Loaded::new(dev, variant::combine(v.dtype, finish))?,
            lora: match with_lora {
                true => Some(lora::Kernels::load(dev, v.dtype)?),
                false => None,
            },
            tile,
        })
    }

    /// SPEC §4 on the device (kernels/moe_align.cu): up to 32 routes in one warp, a route per
    /// lane; then the routes in pieces ranked per warp, the scans and the scatter, in one
    /// block; for many routes in three launches over chunks of them (variant::align_chunks).
    pub fn align(&self, stream: &Arc<CudaStream>, ids_i64: bool, a: AlignArgs) -> Result<()> {
        let k = &self.align[ids_i64 as usize];
        let l = a.layout;
        let at = |s: crate::workspace::Section| a.ws + s.offset as u64;
        let (numel, experts, block_m) =
            (l.route_slot.len as i32, a.experts as i32, a.block_m as i32);
        let (capacity, max_blocks) = (l.sorted_route_ids.len as i32, l.block_expert.len as i32);
        let (sorted, blocks, padded, offsets, slots) = (
            at(l.sorted_route_ids),
            at(l.block_expert),
            at(l.num_padded),
            at(l.expert_offsets),
            at(l.route_slot),
        );
        let (segments, shared_bytes) = variant::align_segments(a.experts, k.one_block.v.threads);
        let segments = segments as i32;
        let chunks = variant::align_chunks(l.route_slot.len, a.experts);
        let launch = |f: &Loaded, blocks: usize, shared: usize| LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (f.v.threads, 1, 1),
            shared_mem_bytes: shared as u32,
        };
        let fail = |f: &Loaded| {
            let name = f.v.name.clone();
            move |e| driver_error(&format!("kernel {name}"), e)
        };
        if chunks == 1 {
            // one launch: one warp for a few routes, else one block; the same arguments (the
            // warp kernel ignores segments)
            let (f, shared) = match l.route_slot.len <= variant::ALIGN_WARP_ROUTES {
                true => (&k.one_warp, 0),
                false => (&k.one_block, shared_bytes),
            };
            let mut b = stream.launch_builder(&f.f);
            b.arg(&a.ids)
                .arg(&numel)
                .arg(&experts)
                .arg(&block_m)
                .arg(&capacity)
                .arg(&max_blocks)
                .arg(&segments)
                .arg(&sorted)
                .arg(&blocks)
                .arg(&padded)
                .arg(&offsets)
                .arg(&slots)
                .arg(&a.bad_ids);
            return unsafe { b.launch(launch(f, 1, shared)) }
                .map(|_| ())
                .map_err(fail(f));
        }
        // the chunks' counts borrow compact_routes, which the CUDA path does not fill
        let counts = at(l.compact_routes);
        let chunk_len = l.route_slot.len.div_ceil(chunks) as i32;
        let n_chunks = chunks as i32;
        let f = &k.count;
        let mut b = stream.launch_builder(&f.f);
        b.arg(&a.ids)
            .arg(&numel)
            .arg(&experts)
            .arg(&chunk_len)
            .arg(&segments)
            .arg(&slots)
            .arg(&counts);
        unsafe { b.launch(launch(f, chunks, shared_bytes)) }.map_err(fail(f))?;
        let f = &self.align_scan;
        let mut b = stream.launch_builder(&f.f);
        b.arg(&numel)
            .arg(&experts)
            .arg(&block_m)
            .arg(&capacity)
            .arg(&max_blocks)
            .arg(&n_chunks)
            .arg(&counts)
            .arg(&sorted)
            .arg(&blocks)
            .arg(&padded)
            .arg(&offsets)
            .arg(&a.bad_ids);
        unsafe { b.launch(launch(f, 1, (2 * a.experts + 2) * 4)) }.map_err(fail(f))?;
        let f = &k.scatter;
        let mut b = stream.launch_builder(&f.f);
        b.arg(&a.ids)
            .arg(&numel)
            .arg(&experts)
            .arg(&chunk_len)
            .arg(&counts)
            .arg(&sorted)
            .arg(&slots);
        unsafe { b.launch(launch(f, chunks, 0)) }
            .map(|_| ())
            .map_err(fail(f))
    }

    /// GEMM1, activation (in GEMM1's epilogue where fused), GEMM2, then combine (or the
    /// zero rows of no_combine). With `lora`
    /// (a set loaded with LoRA): the map first, each GEMM after its shrink and with the
    /// expand in its epilogue.
    pub fn run(
        &self,
        stream: &Arc<CudaStream>,
        layer: &Layer,
        p: &Prepared,
        io: &RunIo,
        s: ScratchPtrs,
        stages: Stages,
    ) -> Result<()> {
        let (lora, start) = match stages {
            Stages::Base(start) => (None, start),
            Stages::Lora(run) => (Some(run), Start::AfterPrevious),
        };
        let early_gemm2 = matches!(start, Start::Programmatic { early_gemm2: true });
        let v = &layer.v;
        let d = v.dims;
        let l = &p.layout;
        let ws = p.workspace as u64;
        let at = |sec: crate::workspace::Section| ws + sec.offset as u64;
        let (sorted, blocks, padded, slots) = (
            at(l.sorted_route_ids),
            at(l.block_expert),
            at(l.num_padded),
            at(l.route_slot),
        );
        let max_blocks = l.block_expert.len;
        let capacity = l.sorted_route_ids.len;
        let router = io.router_weights.data as u64;
        let router_kind = dtype_code(io.router_dtype) as i32;
        let lora = match (lora, &self.lora) {
            (Some(run), Some(kernels)) => Some((run, kernels)),
            (None, _) => None,
            (Some(_), None) => unreachable!("a LoRA run gets a kernel set loaded with LoRA"),
        };
        let align = lora::Align {
            sorted_route_ids: sorted,
            block_expert: blocks,
            num_padded: padded,
            max_blocks,
            block_m: self.tile.block_m as usize,
        };
        if let Some((run, k)) = lora {
            k.map(stream, run)?;
            k.shrink(stream, &run.shrink_gate_up(&align, io.hidden.data as u64))?;
        }

        let (alpha, limit) = match v.act {
            crate::activation::ActFn::SwigluOai { alpha, limit } => (alpha, limit),
            crate::activation::ActFn::SiluClamp { limit }
            | crate::activation::ActFn::SiluPreclamp { limit } => (0.0, limit),
            _ => (0.0, 0.0),
        };
        let (b13, b13_kind) = bias_parts(&layer.b13);
        let n_tiles1 = d.n1.div_ceil(self.tile.for_gemm(1).block_n as usize);
        let n_tiles2 = d.hidden.div_ceil(self.tile.for_gemm(2).block_n as usize);
        // GEMMs with the combine compiled in take its argument, which has counts where the
        // caller gave them (fuses_combine; no_combine has none): then GEMM2 combines
        let combine = self.fuses_combine().then_some(CombineArgs {
            counts: s.combine_counts,
            route_slot: slots,
            out: io.out.data as u64,
            tokens: p.num_tokens as i32,
            tiles: n_tiles2 as i32,
            rsf: v.rsf,
        });
        self.launch_gemm(
            1,
            stream,
            GemmParams {
                a: io.hidden.data as u64,
                w: layer.weights.w13.data as u64,
                bias: b13,
                router,
                // a GEMM1 with the activation fused writes the activation rows itself
                out: if self.act.is_some() { s.g1 } else { s.act },
                sorted_route_ids: sorted,
                block_expert: blocks,
                num_padded: padded,
                n: d.n1 as i32,
                kdim: d.hidden as i32,
                numel: p.numel as i32,
                top_k: d.top_k as i32,
                bias_kind: b13_kind,
                router_kind,
                apply_router: v.weight_on_input as i32,
                n_tiles: n_tiles1 as i32,
                group_m: self.tile.group_m.max(1) as i32,
                m_blocks: max_blocks as i32,
                inter: d.inter as i32,
                alpha,
                limit,
                early_dependents: early_gemm2 as i32,
            },
            (
                lora.map(|(run, _)| run.expand_gate_up()).as_ref(),
                combine.as_ref(),
            ),
            start,
        )?;
        if let Some(act) = &self.act {
            act.launch_rows(
                stream,
                capacity,
                d.inter,
                &ActParams {
                    g1: s.g1,
                    act: s.act,
                    sorted_route_ids: sorted,
                    num_padded: padded,
                    numel: p.numel as i32,
                    inter: d.inter as i32,
                    alpha,
                    limit,
                },
                start,
            )?;
        }
        if let Some((run, k)) = lora {
            k.shrink(stream, &run.shrink_down(&align, s.act))?;
        }
        let (b2, b2_kind) = bias_parts(&layer.b2);
        let y = if v.no_combine {
            io.out.data as u64
        } else {
            s.y
        };
        self.launch_gemm(
            2,
            stream,
            GemmParams {
                a: s.act,
                w: layer.weights.w2.data as u64,
                bias: b2,
                router,
                out: y,
                sorted_route_ids: sorted,
                block_expert: blocks,
                num_padded: padded,
                n: d.hidden as i32,
                kdim: d.inter as i32,
                numel: p.numel as i32,
                top_k: d.top_k as i32,
                bias_kind: b2_kind,
                router_kind,
                apply_router: v.weight_after_gemm2() as i32,
                n_tiles: n_tiles2 as i32,
                group_m: self.tile.group_m.max(1) as i32,
                m_blocks: max_blocks as i32,
                inter: d.inter as i32,
                alpha,
                limit,
                early_dependents: early_gemm2 as i32,
            },
            (
                lora.map(|(run, _)| run.expand_down()).as_ref(),
                combine.as_ref(),
            ),
            start,
        )?;
        if combine.is_some_and(|c| c.counts != 0) {
            Ok(()) // GEMM2 combined
        } else if v.no_combine {
            self.finish.launch_rows(
                stream,
                p.numel,
                d.hidden,
                &ZeroParams {
                    route_slot: slots,
                    out: io.out.data as u64,
                    hidden: d.hidden as i32,
                },
                start,
            )
        } else {
            self.finish.launch_rows(
                stream,
                p.num_tokens,
                d.hidden,
                &CombineParams {
                    y: s.y,
                    route_slot: slots,
                    out: io.out.data as u64,
                    top_k: d.top_k as i32,
                    hidden: d.hidden as i32,
                    rsf: v.rsf,
                },
                start,
            )
        }
    }
}
