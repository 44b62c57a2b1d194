//! The CUDA backend (DESIGN §4–5): kernels compiled by NVRTC at first use (or moe_warmup),
//! launched on the host's stream with raw device pointers, all scratch in the host's
//! workspace. moe_prepare and moe_run allocate nothing, never synchronize and copy nothing to
//! the host, so a host can capture them in a CUDA graph.

pub mod cache;
pub mod compile;
mod device;
pub mod dispatch;
mod kernels;
mod lora;
mod mapped;
pub mod probe;
mod tma;
pub mod variant;

use super::{Backend, LayerState};
use crate::config::Validated;
use crate::error::{Error, ErrorKind, Result};
use crate::layer::{Layer, Weights};
use crate::lora::LoraBatch;
use crate::plan::{Prepared, RunIo};
use crate::tensor::{Device, Tensor};
use crate::tiles::{GpuTraits, Pdl, TileConfig};
use crate::workspace::Layout;
use device::{driver_error, DeviceState};
use kernels::KernelSet;
use rayon::prelude::*;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub struct CudaBackend;

static BACKEND: CudaBackend = CudaBackend;

/// The most experts the one-block align kernel takes (its counts live in shared memory).
const MAX_EXPERTS: usize = 4096;

/// Whether this machine can run CUDA layers: the libraries, a device, and compute
/// capability 8.0 or newer on device 0. Computed once.
pub fn available() -> bool {
    static ANSWER: once_cell::sync::Lazy<bool> = once_cell::sync::Lazy::new(|| {
        probe::AVAILABILITY.missing().is_none()
            && matches!(probe::AVAILABILITY.devices, Ok(n) if n > 0)
            && device::device(0).is_ok()
    });
    *ANSWER
}

/// The GPU's name as the driver reports it (tile tables are keyed by it), with its compute
/// capability and multiprocessor count (a sibling GPU's table may stand in for a missing one).
pub fn device_identity(ordinal: usize) -> Result<(String, GpuTraits)> {
    let d = device::device(ordinal)?;
    Ok((d.name.clone(), d.traits))
}

/// The backend for a layer on `device`, after checking the libraries and the ordinal.
pub fn backend(device: Device) -> Result<&'static dyn Backend> {
    let a = &*probe::AVAILABILITY;
    if let Some(missing) = a.missing() {
        return Err(Error::new(
            ErrorKind::Device,
            format!("device: {device}: {missing}"),
        ));
    }
    let count = *a.devices.as_ref().expect("checked by missing()");
    if device.id < 0 || device.id >= count {
        return Err(crate::error::invalid!(
            "device: {device}, but this machine has {count} CUDA device(s)"
        ));
    }
    Ok(&BACKEND)
}

/// A CUDA layer's own state: its device, the counter of ids the device found out of range
/// (host memory the align kernel writes), and its kernels per tile config.
pub struct CudaLayer {
    dev: Arc<DeviceState>,
    bad_ids: mapped::Counter,
    /// GEMM1 may use 16-byte loads when hidden is aligned too (H % 8 == 0, w13 aligned).
    gemm1_vec8: bool,
    /// GEMM2 reads the workspace's activation rows and w2 (I % 8 == 0, w2 aligned).
    gemm2_vec8: bool,
    /// GEMM tiles of wgmma's shape take the wgmma main loop (sm_90a, option cuda.wgmma).
    hopper: bool,
    /// Those wgmma tiles take the warp-specialised main loop (option cuda.wgmma_ws).
    wgmma_ws: bool,
    /// Or, LoRA's aside, which take the multicast one (option cuda.wgmma_multicast).
    wgmma_multicast: variant::Multicast,
    /// f16/bf16 GEMM1s apply the activation in their epilogue (option cuda.fuse_act).
    fuse_act: bool,
    /// Up to this many tokens GEMM2 does the combine (option cuda.fuse_combine; 0: never).
    fuse_combine_tokens: usize,
    /// Compute capability 9.0 or newer: tile configs with PDL launch programmatically.
    pdl_capable: bool,
    kernels: Mutex<HashMap<SetKey, Arc<KernelSet>>>,
    /// Made when the first LoRA wrapper over the layer is: the LoRA map kernel's error
    /// counters. While it exists, moe_warmup also loads the LoRA kernel sets.
    lora: once_cell::sync::OnceCell<Box<lora::Errors>>,
}

/// Which kernel set: the tile config, GEMM1's 16-byte loads, and LoRA (moe_run_lora) or not.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct SetKey {
    tile: TileConfig,
    vec8: bool,
    lora: bool,
}

fn cuda_layer(layer: &Layer) -> &CudaLayer {
    match &layer.state {
        LayerState::Cuda(c) => c,
        LayerState::Cpu => unreachable!("the CUDA backend runs CUDA layers only"),
    }
}

impl CudaLayer {
    fn kernel_set(&self, layer: &Layer, key: SetKey) -> Result<Arc<KernelSet>> {
        if let Some(k) = self.kernels.lock().unwrap().get(&key) {
            return Ok(k.clone());
        }
        // the context on this thread (moe_warmup loads sets on rayon's threads): a set whose
        // kernels another thread loaded still encodes its TMA weight maps here
        let what = format!("device: cuda:{}", self.dev.ordinal);
        self.dev
            .ctx
            .bind_to_thread()
            .map_err(|e| driver_error(&what, e))?;
        let vec8 = (key.vec8, self.gemm2_vec8);
        let k = Arc::new(KernelSet::load(
            &self.dev,
            &layer.v,
            &layer.weights,
            key.tile,
            vec8,
            (self.hopper, self.wgmma_ws, self.wgmma_multicast),
            key.lora,
            (self.fuse_act, self.fuse_combine_tokens > 0),
        )?);
        self.kernels.lock().unwrap().insert(key, k.clone());
        Ok(k)
    }

    /// `kernel_set` for a launch on the host's `stream`, which must not compile inside a graph
    /// capture (NVRTC and module loads there would break it, or fail as an unsupported call
    /// in the capture's global mode): a set moe_warmup did not load is refused while `stream`
    /// captures, with what to do instead.
    fn launch_kernel_set(
        &self,
        layer: &Layer,
        key: SetKey,
        stream: &Arc<cudarc::driver::CudaStream>,
    ) -> Result<Arc<KernelSet>> {
        if !self.kernels.lock().unwrap().contains_key(&key) {
            let status = stream
                .capture_status()
                .map_err(|e| driver_error("stream: querying its capture status", e))?;
            if status != cudarc::driver::sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE {
                let (which, warmup) = if key.lora {
                    (
                        "LoRA kernels",
                        "call moe_warmup(layer, max_tokens) after moe_lora_create",
                    )
                } else {
                    ("kernels", "call moe_warmup(layer, max_tokens)")
                };
                return Err(crate::error::invalid!(
                    "stream: capturing a CUDA graph, but the {which} of tile config {}x{}x{} \
                     are not compiled yet (compiling inside a capture is not possible); \
                     {warmup} with the largest batch the graph will take, before the capture",
                    key.tile.block_m,
                    key.tile.block_n,
                    key.tile.block_k
                ));
            }
        }
        self.kernel_set(layer, key)
    }
}

/// Up to how many tokens GEMM2 does the combine where option cuda.fuse_combine is not given.
const DEFAULT_FUSE_COMBINE_TOKENS: usize = 0;

/// The most tokens option cuda.fuse_combine may name: up to these the scratch section holds
/// GEMM2's combine counts (M times H / 16 ints at most: 458 KB at H = 7168).
const FUSE_COMBINE_MAX_TOKENS: usize = crate::options::FUSE_COMBINE_MAX_TOKENS as usize;

/// Where GEMM1's output, the activation, GEMM2's route rows and its combine counts (None
/// past FUSE_COMBINE_MAX_TOKENS, or without a combine) sit in the scratch section.
struct Scratch {
    g1: usize,
    act: usize,
    y: usize,
    combine_counts: Option<usize>,
    total: usize,
}

fn scratch(v: &Validated, numel: usize, capacity: usize) -> Scratch {
    let d = v.dims;
    let e = v.dtype.size();
    let up = |x: usize| x.div_ceil(256) * 256;
    let g1 = 0;
    let act = up(g1 + capacity * d.n1 * e);
    let y = up(act + capacity * d.inter * e);
    let end = match v.no_combine {
        true => y,
        false => up(y + numel * d.hidden * e),
    };
    // GEMM2's combine counts: a count per token and n-tile, of 16 columns at the narrowest
    let tokens = numel / d.top_k.max(1);
    let combine_counts = (!v.no_combine && tokens <= FUSE_COMBINE_MAX_TOKENS).then_some(end);
    let total = match combine_counts {
        Some(at) => up(at + tokens * d.hidden.div_ceil(16) * 4),
        None => end,
    };
    Scratch {
        g1,
        act,
        y,
        combine_counts,
        total,
    }
}

/// How a base run's kernels launch: as its tile config's PDL says, where the GPU can.
fn start_of(c: &CudaLayer, p: &Prepared) -> kernels::Start {
    match p.tile.pdl() {
        _ if !c.pdl_capable => kernels::Start::AfterPrevious,
        Pdl::Off => kernels::Start::AfterPrevious,
        Pdl::AfterGemm1Loop => kernels::Start::Programmatic { early_gemm2: false },
        Pdl::AtGemm1Start => kernels::Start::Programmatic { early_gemm2: true },
    }
}

/// moe_run, or moe_run_lora with `lora`: every stage launched on the host's stream.
fn run_stages(
    layer: &Layer,
    p: &Prepared,
    io: &RunIo,
    stream: usize,
    lora: Option<&LoraBatch>,
) -> Result<()> {
    let c = cuda_layer(layer);
    let stream = unsafe { c.dev.ctx.wrap_borrowed_stream(stream as _) };
    let key = SetKey {
        tile: p.tile,
        vec8: c.gemm1_vec8 && io.hidden.data as usize % 16 == 0,
        lora: lora.is_some(),
    };
    let (k, run) = match lora {
        None => (c.launch_kernel_set(layer, key, &stream)?, None),
        Some(batch) => {
            // moe_lora_create made the counters (Backend::attach_lora)
            let errors = c
                .lora
                .get()
                .expect("a LoRA wrapper was attached to the layer");
            let run = lora::Run::new(layer, p, batch, errors)?;
            (c.launch_kernel_set(layer, key, &stream)?, Some(run))
        }
    };
    let s = scratch(&layer.v, p.numel, p.layout.sorted_route_ids.len);
    let base = p.workspace as u64 + p.layout.scratch.offset as u64;
    // GEMM2 combines up to the option's token count, where both GEMMs can (fuses_combine:
    // never LoRA's, whose kernel set has no combine)
    let fuse_combine = p.num_tokens <= c.fuse_combine_tokens && k.fuses_combine();
    let ptrs = kernels::ScratchPtrs {
        g1: base + s.g1 as u64,
        act: base + s.act as u64,
        y: base + s.y as u64,
        combine_counts: match s.combine_counts {
            Some(at) if fuse_combine => base + at as u64,
            _ => 0,
        },
    };
    let stages = match &run {
        Some(run) => kernels::Stages::Lora(run),
        None => kernels::Stages::Base(start_of(c, p)),
    };
    k.run(&stream, layer, p, io, ptrs, stages)
}

impl Backend for CudaBackend {
    fn layer_state(
        &self,
        v: &Validated,
        weights: &Weights,
        options: &crate::options::Options,
    ) -> Result<LayerState> {
        let d = v.dims;
        if d.experts > MAX_EXPERTS {
            return Err(crate::error::unsupported!(
                "config: {} local experts; the CUDA align kernel takes at most {MAX_EXPERTS}",
                d.experts
            ));
        }
        let dev = device::device(v.device.id as usize)?;
        let hopper = dev.arch == "sm_90a" && options.int("cuda.wgmma") != Some(0);
        let wgmma_ws = options.int("cuda.wgmma_ws") == Some(1);
        if wgmma_ws && !hopper {
            return Err(crate::error::unsupported!(
                "option \"cuda.wgmma_ws\": the warp-specialised loop is a form of the wgmma one, which {} ({}) does not run",
                dev.name,
                if dev.arch == "sm_90a" { "cuda.wgmma is 0" } else { "compute capability 9.0 only" }
            ));
        }
        let wgmma_multicast = match options.int("cuda.wgmma_multicast") {
            None => variant::Multicast::Wide,
            Some(0) => variant::Multicast::Off,
            Some(_) => variant::Multicast::All,
        };
        if wgmma_multicast == variant::Multicast::All && (!hopper || wgmma_ws) {
            return Err(crate::error::unsupported!(
                "option \"cuda.wgmma_multicast\": the multicast loop is a form of the wgmma one, which {}",
                if wgmma_ws {
                    "cuda.wgmma_ws=1 replaces; set one of them".to_string()
                } else {
                    format!("{} ({}) does not run", dev.name, if dev.arch == "sm_90a" { "cuda.wgmma is 0" } else { "compute capability 9.0 only" })
                }
            ));
        }
        let pdl_capable = dev.traits.compute_capability.0 >= 9;
        if options.int("tile.pdl").unwrap_or(0) > 0 && !pdl_capable {
            return Err(crate::error::unsupported!(
                "option \"tile.pdl\": programmatic dependent launch needs compute capability 9.0 or newer; {} has {}.{}",
                dev.name,
                dev.traits.compute_capability.0,
                dev.traits.compute_capability.1
            ));
        }
        let aligned = |t: &Tensor| t.data as usize % 16 == 0;
        Ok(LayerState::Cuda(CudaLayer {
            bad_ids: mapped::Counter::new(&dev, 1)?,
            gemm1_vec8: d.hidden % 8 == 0 && aligned(&weights.w13),
            gemm2_vec8: d.inter % 8 == 0 && aligned(&weights.w2),
            hopper,
            wgmma_ws,
            wgmma_multicast,
            fuse_act: options.int("cuda.fuse_act") != Some(0),
            fuse_combine_tokens: options
                .int("cuda.fuse_combine")
                .map_or(DEFAULT_FUSE_COMBINE_TOKENS, |t| t as usize),
            pdl_capable,
            kernels: Mutex::new(HashMap::new()),
            lora: once_cell::sync::OnceCell::new(),
            dev,
        }))
    }

    fn scratch_bytes(&self, v: &Validated, numel: usize, capacity: usize) -> usize {
        scratch(v, numel, capacity).total
    }

    fn take_device_errors(&self, layer: &Layer) -> Result<()> {
        let c = cuda_layer(layer);
        let mut found = Vec::new();
        let bad = c.bad_ids.take();
        if bad > 0 {
            found.push(format!(
                "topk_ids: an earlier batch on this layer held {bad} id(s) outside [-1, {}); the device treated them as -1 (dropped), so those outputs are wrong",
                layer.v.dims.experts
            ));
        }
        if let Some(lora) = c.lora.get() {
            found.extend(lora.take());
        }
        match found.is_empty() {
            true => Ok(()),
            // all at once: each count is cleared as it is read
            false => Err(crate::error::invalid!("{}", found.join("; and "))),
        }
    }

    fn attach_lora(&self, layer: &Layer, num_slots: usize) -> Result<()> {
        if num_slots > lora::MAX_SLOTS {
            return Err(crate::error::unsupported!(
                "num_slots: {num_slots}; a LoRA wrapper over a CUDA layer takes at most {} slots (its kernels get the slot table as a launch parameter)",
                lora::MAX_SLOTS
            ));
        }
        let c = cuda_layer(layer);
        c.lora
            .get_or_try_init(|| lora::Errors::new(&c.dev).map(Box::new))?;
        Ok(())
    }

    fn warmup(&self, layer: &Layer, max_tokens: usize) -> Result<()> {
        let c = cuda_layer(layer);
        let with_lora = c.lora.get().is_some();
        let mut keys = Vec::new();
        for tile in layer.tiles.configs_up_to(max_tokens) {
            // both GEMM1 load widths: a hidden that is not 16-byte aligned takes the narrow
            // one, and compiling it later could fall inside the host's graph capture
            for vec8 in [c.gemm1_vec8, false] {
                for lora in [false, with_lora] {
                    let key = SetKey { tile, vec8, lora };
                    if !keys.contains(&key) {
                        keys.push(key);
                    }
                }
            }
        }
        // The sets in parallel: with a cold cache each compiles its GEMMs with NVRTC (a few
        // seconds for a wgmma variant), so a layer's warmup took 15-25 s one at a time. The
        // kernels sets share are compiled once (DeviceState::function). The first failure
        // in the sets' order is the one reported, as before.
        let loaded: Vec<Result<()>> = keys
            .par_iter()
            .map(|&key| c.kernel_set(layer, key).map(drop))
            .collect();
        loaded.into_iter().collect()
    }

    fn prepare(
        &self,
        layer: &Layer,
        ids: &Tensor,
        ws: *mut u8,
        layout: &Layout,
        tile: TileConfig,
        stream: usize,
    ) -> Result<usize> {
        let c = cuda_layer(layer);
        let key = SetKey {
            tile,
            vec8: c.gemm1_vec8,
            lora: false,
        };
        let stream = unsafe { c.dev.ctx.wrap_borrowed_stream(stream as _) };
        let k = c.launch_kernel_set(layer, key, &stream)?;
        let ids_i64 = ids.elem == crate::dtype::ElemType::I64;
        k.align(
            &stream,
            ids_i64,
            kernels::AlignArgs {
                ids: ids.data as u64,
                ws: ws as u64,
                layout,
                experts: layer.v.dims.experts,
                block_m: tile.block_m as usize,
                bad_ids: c.bad_ids.device_ptr(),
            },
        )?;
        Ok(0)
    }

    fn run(&self, layer: &Layer, p: &Prepared, io: &RunIo, stream: usize) -> Result<()> {
        run_stages(layer, p, io, stream, None)
    }

    fn run_lora(
        &self,
        layer: &Layer,
        p: &Prepared,
        io: &RunIo,
        batch: &LoraBatch,
        stream: usize,
    ) -> Result<()> {
        run_stages(layer, p, io, stream, Some(batch))
    }

    fn read_i32s(&self, layer: &Layer, src: *const u8, len: usize) -> Result<Vec<i32>> {
        let c = cuda_layer(layer);
        let mut out = vec![0i32; len];
        if len > 0 {
            c.dev
                .ctx
                .bind_to_thread()
                .map_err(|e| driver_error("plan", e))?;
            unsafe { cudarc::driver::result::memcpy_dtoh_sync(&mut out, src as u64) }
                .map_err(|e| driver_error("plan: copying the workspace to the host", e))?;
        }
        Ok(out)
    }
}
