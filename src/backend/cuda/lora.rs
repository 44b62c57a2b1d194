//! moe_run_lora on CUDA (SPEC §7): the per-stage slot tables the kernels take by value
//! (kernels/lora.cuh), the map and shrink kernels (kernels/moe_lora.cu), the expand parameters
//! of the GEMM epilogues, and the host-mapped counters through which the map kernel reports
//! bad adapter ids and segments to the next call on the layer.
//!
//! Nothing is uploaded per run: the slot table is a launch parameter, so a CUDA graph replays
//! the table as it was at capture, while the adapter map's values (device memory) are read at
//! replay [TAG_LORA_TABLE_BY_VALUE] [TAG_GRAPH_SAFE]. The rank intermediates live in the LoRA
//! scratch of the workspace, one row per route id (m·K + k), which [numel, ·] holds.

use super::device::DeviceState;
use super::kernels::Loaded;
use super::mapped::Counter;
use super::variant;
use crate::activation::GateUpLayout;
use crate::dtype::DType;
use crate::error::{unsupported, Result};
use crate::layer::Layer;
use crate::lora::{AdapterMap, LoraBatch};
use crate::plan::Prepared;
use cudarc::driver::{CudaStream, DeviceRepr};
use std::sync::Arc;

/// The most slots a LoRA wrapper over a CUDA layer takes: the slot table is a launch parameter
/// (16 bytes a slot; every LoRA launch's parameters stay within the 4 KB all drivers take)
/// and the map kernel gets the active slots as one 64-bit mask.
pub(super) const MAX_SLOTS: usize = 64;

/// moe_lora_map: threads per block, and at most this many blocks (each has its own slot in
/// the error counters).
pub(super) const MAP_THREADS: u32 = 256;
const MAP_BLOCKS: usize = 64;

/// moe_lora_shrink's SIMT path (f32 layers, and kdim or pointers unfit for 16-byte copies):
/// warps per block, rows of A per warp, and routes per warp. A warp's routes form a dependent
/// chain (loads, dot, shuffles, store per route): when a warp walked all of a block's routes,
/// the shrink took 80 µs at Qwen3 M = 64 (ncu), more than the whole LoRA budget; two routes
/// per warp spread them over the grid.
const SHRINK_WARPS: usize = 4;
const SHRINK_ROWS: usize = 4;
const SHRINK_ROUTES: usize = 2;
/// Its tensor-core path (f16/bf16): rows of A per block (the grid's y; four n8 tiles, which a
/// warp keeps in its accumulators) and the largest BLOCK_M it takes (its shared route list).
/// Per (block, slot) the block reads A[a, e] once, for all its routes of that slot (the SIMT
/// path read 1 GB from L2 per GEMM1 shrink at Qwen3 M = 1024), its four warps splitting k.
const SHRINK_MMA_ROWS: usize = 32;
const SHRINK_MAX_BLOCK_M: usize = 256;
pub(super) const SHRINK_THREADS: u32 = SHRINK_WARPS as u32 * 32;

// ---------------------------------------------------------------- the parameter structs
// Mirrors of kernels/lora.cuh and kernels/moe_lora.cu, field for field; the kernels check
// their sizes against the FM_LORA_*_BYTES defines below.

/// FmLoraSlot: one slot's weight for one stage; w = 0 where the slot gives no delta.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct SlotParams {
    w: u64,
    scaling: f32,
    shared_outer: i32,
}

/// FmLoraTable.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct Table([SlotParams; MAX_SLOTS]);

/// FmLoraMapParams.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct MapParams {
    adapter_ids: u64,
    seg_indptr: u64,
    seg_adapter: u64,
    token_slot: u64,
    bad_ids: u64,
    bad_seg_adapter: u64,
    bad_seg_indptr: u64,
    active: u64,
    tokens: i32,
    segments: i32,
    num_slots: i32,
}

/// FmLoraShrinkParams.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ShrinkParams {
    a: Table,
    x: u64,
    t: u64,
    token_slot: u64,
    sorted_route_ids: u64,
    block_expert: u64,
    num_padded: u64,
    numel: i32,
    top_k: i32,
    rows: i32,
    kdim: i32,
    block_m: i32,
    x_by_slot: i32,
    mma: i32,
    /// tensor-core path: a block per (align block, rows, slot) for the slots [0, this) (the
    /// highest active slot + 1; slot 0 alone where <= 1, as the map then gives no other): one
    /// block walking every slot of its routes in turn left the shrink latency-bound (ncu at
    /// Qwen3 M = 64, 4 slots: 111 µs, 6 % of warps active). Each block keeps only its slot's
    /// routes, compacted, so its MMAs cover those rows and not the whole BLOCK_M.
    slot_groups: i32,
}

/// FmLoraExpand: what an FM_LORA GEMM's epilogue gets as its second argument.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ExpandParams {
    b: Table,
    token_slot: u64,
    t: u64,
    top_k: i32,
    n: i32,
    rank: i32,
    t_stride: i32,
    split: i32,
    half: i32,
}

unsafe impl DeviceRepr for MapParams {}
unsafe impl DeviceRepr for ShrinkParams {}
unsafe impl DeviceRepr for ExpandParams {}

/// FM_LORA_SPLIT_* of kernels/lora.cuh.
const SPLIT_NONE: i32 = 0;
const SPLIT_HALVES: i32 = 1;
const SPLIT_INTERLEAVED: i32 = 2;

fn bytes<T>() -> i64 {
    std::mem::size_of::<T>() as i64
}

/// The defines an FM_LORA GEMM variant adds.
pub fn expand_defines() -> Vec<(&'static str, i64)> {
    vec![
        ("FM_LORA", 1),
        ("FM_LORA_SLOTS", MAX_SLOTS as i64),
        ("FM_LORA_EXPAND_BYTES", bytes::<ExpandParams>()),
    ]
}

pub fn map_defines() -> Vec<(&'static str, i64)> {
    vec![
        ("FM_LORA_SLOTS", MAX_SLOTS as i64),
        ("FM_LORA_MAP_BYTES", bytes::<MapParams>()),
    ]
}

pub fn shrink_defines() -> Vec<(&'static str, i64)> {
    vec![
        ("FM_LORA_SLOTS", MAX_SLOTS as i64),
        ("FM_LORA_MAP_BYTES", bytes::<MapParams>()),
        ("FM_LORA_SHRINK_BYTES", bytes::<ShrinkParams>()),
        ("FM_SHRINK_WARPS", SHRINK_WARPS as i64),
        ("FM_SHRINK_ROWS", SHRINK_ROWS as i64),
        ("FM_SHRINK_ROUTES", SHRINK_ROUTES as i64),
        ("FM_SHRINK_MMA_ROWS", SHRINK_MMA_ROWS as i64),
        ("FM_SHRINK_MAX_BLOCK_M", SHRINK_MAX_BLOCK_M as i64),
    ]
}

// ---------------------------------------------------------------- errors the device finds

/// The map kernel's counts of bad map values, in host memory mapped for the device (a slot
/// per block): the next moe_prepare / moe_run / moe_run_lora on the layer reports them.
pub struct Errors {
    ids: Counter,
    seg_adapter: Counter,
    seg_indptr: Counter,
}

impl Errors {
    pub fn new(dev: &Arc<DeviceState>) -> Result<Errors> {
        Ok(Errors {
            ids: Counter::new(dev, MAP_BLOCKS)?,
            seg_adapter: Counter::new(dev, MAP_BLOCKS)?,
            seg_indptr: Counter::new(dev, MAP_BLOCKS)?,
        })
    }

    /// What the device found since the last call, one message per argument (then cleared).
    pub fn take(&self) -> Vec<String> {
        let mut found = Vec::new();
        let no_delta =
            "the device gave those tokens no LoRA delta, so their outputs lack their adapter";
        let ids = self.ids.take();
        if ids > 0 {
            found.push(format!(
                "adapter_ids: an earlier moe_run_lora on this layer held {ids} adapter id(s) outside [-1, num_slots); {no_delta}"
            ));
        }
        let segs = self.seg_adapter.take();
        if segs > 0 {
            found.push(format!(
                "seg_adapter: an earlier moe_run_lora on this layer held {segs} segment adapter(s) outside [-1, num_slots); {no_delta}"
            ));
        }
        let indptr = self.seg_indptr.take();
        if indptr > 0 {
            found.push(format!(
                "seg_indptr: an earlier moe_run_lora on this layer held {indptr} entr{} breaking 0 = seg_indptr[0] <= ... <= seg_indptr[S] = M; {no_delta} where a segment misplaced them",
                if indptr == 1 { "y" } else { "ies" }
            ));
        }
        found
    }
}

// ---------------------------------------------------------------- one run

/// The align step's arrays a shrink walks, as the GEMMs do.
pub struct Align {
    pub sorted_route_ids: u64,
    pub block_expert: u64,
    pub num_padded: u64,
    pub max_blocks: usize,
    pub block_m: usize,
}

/// The LoRA side of one moe_run_lora: the slot tables of the four stages (taken under the
/// wrapper's read lock, so a run sees each slot before or after a change), the map and the
/// scratch.
pub struct Run {
    map: MapParams,
    gate_up_a: Table,
    gate_up_b: Table,
    down_a: Table,
    down_b: Table,
    token_slot: u64,
    t_gate_up: u64,
    t_down: u64,
    rank: usize,
    gate_up_rows: usize,
    numel: usize,
    top_k: usize,
    hidden: usize,
    inter: usize,
    n1: usize,
    split: i32,
    dtype: DType,
}

/// A slot's weight tensor as a table entry.
fn entry(t: &crate::tensor::Tensor, scaling: f32, shared_outer: bool) -> SlotParams {
    SlotParams {
        w: t.data as u64,
        scaling,
        shared_outer: shared_outer as i32,
    }
}

impl Run {
    pub fn new(layer: &Layer, p: &Prepared, batch: &LoraBatch, errors: &Errors) -> Result<Run> {
        let slots = batch.slots;
        if slots.len() > MAX_SLOTS {
            // moe_lora_create refuses these already (Backend::attach_lora)
            return Err(unsupported!(
                "num_slots: {}; a LoRA wrapper over a CUDA layer takes at most {MAX_SLOTS} slots",
                slots.len()
            ));
        }
        let empty = Table([SlotParams::default(); MAX_SLOTS]);
        let (mut gate_up_a, mut gate_up_b, mut down_a, mut down_b) = (empty, empty, empty, empty);
        let mut active = 0u64;
        for (a, slot) in slots.iter().enumerate() {
            let Some(w) = slot.active() else { continue };
            active |= 1 << a;
            let s = w.scaling;
            gate_up_a.0[a] = entry(&w.gate_up_a, s, w.gate_up_a.shape()[0] == 1);
            gate_up_b.0[a] = entry(&w.gate_up_b, s, false);
            down_a.0[a] = entry(&w.down_a, s, false);
            down_b.0[a] = entry(&w.down_b, s, w.down_b.shape()[0] == 1);
        }
        let v = &layer.v;
        let (adapter_ids, seg_indptr, seg_adapter, segments) = match batch.map {
            AdapterMap::PerToken(ids) => (ids.data as u64, 0, 0, 0),
            AdapterMap::Segments { indptr, adapter } => (
                0,
                indptr.data as u64,
                adapter.data as u64,
                indptr.numel() - 1,
            ),
        };
        if segments > i32::MAX as usize {
            return Err(crate::error::invalid!(
                "seg_indptr: {} segments, expected at most {} on CUDA",
                segments,
                i32::MAX
            ));
        }
        let s = batch.scratch;
        Ok(Run {
            map: MapParams {
                adapter_ids,
                seg_indptr,
                seg_adapter,
                token_slot: s.token_slot as u64,
                bad_ids: errors.ids.device_ptr(),
                bad_seg_adapter: errors.seg_adapter.device_ptr(),
                bad_seg_indptr: errors.seg_indptr.device_ptr(),
                active,
                tokens: p.num_tokens as i32,
                segments: segments as i32,
                num_slots: slots.len() as i32,
            },
            gate_up_a,
            gate_up_b,
            down_a,
            down_b,
            token_slot: s.token_slot as u64,
            t_gate_up: s.gate_up as u64,
            t_down: s.down as u64,
            rank: batch.max_rank,
            gate_up_rows: if v.gated {
                2 * batch.max_rank
            } else {
                batch.max_rank
            },
            numel: p.numel,
            top_k: v.dims.top_k,
            hidden: v.dims.hidden,
            inter: v.dims.inter,
            n1: v.dims.n1,
            split: match (v.gated, v.layout) {
                (false, _) => SPLIT_NONE,
                (true, GateUpLayout::Halves) => SPLIT_HALVES,
                (true, GateUpLayout::Interleaved) => SPLIT_INTERLEAVED,
            },
            dtype: v.dtype,
        })
    }

    fn shrink(&self, al: &Align, a: Table, x: u64, t: u64, rows: usize, kdim: usize) -> Shrink {
        // the tensor-core path copies 16 bytes at a time from x and every slot's A
        let aligned = |p: u64| p % 16 == 0;
        let mma = self.dtype != DType::F32
            && kdim % 8 == 0
            && aligned(x)
            && a.0.iter().all(|s| aligned(s.w))
            && al.block_m % 16 == 0
            && al.block_m <= SHRINK_MAX_BLOCK_M;
        Shrink {
            params: ShrinkParams {
                a,
                x,
                t,
                token_slot: self.token_slot,
                sorted_route_ids: al.sorted_route_ids,
                block_expert: al.block_expert,
                num_padded: al.num_padded,
                numel: self.numel as i32,
                top_k: self.top_k as i32,
                rows: rows as i32,
                kdim: kdim as i32,
                block_m: al.block_m as i32,
                x_by_slot: 0,
                mma: mma as i32,
                slot_groups: if mma {
                    64 - self.map.active.leading_zeros() as i32
                } else {
                    1
                },
            },
            blocks: al.max_blocks,
        }
    }

    /// Before GEMM1: t_gate_up[route] = round(A_gate_up[a, e] · hidden[m]).
    pub fn shrink_gate_up(&self, al: &Align, hidden: u64) -> Shrink {
        let (rows, h) = (self.gate_up_rows, self.hidden);
        self.shrink(al, self.gate_up_a, hidden, self.t_gate_up, rows, h)
    }

    /// Before GEMM2: t_down[route] = round(A_down[a, e] · act[slot]); the activation rows sit
    /// at the routes' sorted slots.
    pub fn shrink_down(&self, al: &Align, act: u64) -> Shrink {
        let mut s = self.shrink(al, self.down_a, act, self.t_down, self.rank, self.inter);
        s.params.x_by_slot = 1;
        s
    }

    fn expand(&self, b: Table, t: u64, n: usize, t_stride: usize, split: i32) -> ExpandParams {
        ExpandParams {
            b,
            token_slot: self.token_slot,
            t,
            top_k: self.top_k as i32,
            n: n as i32,
            rank: self.rank as i32,
            t_stride: t_stride as i32,
            split,
            half: self.inter as i32,
        }
    }

    /// GEMM1's epilogue: s_a · B_gate_up[a, e] · t_gate_up, gate rows on the gate half.
    pub fn expand_gate_up(&self) -> ExpandParams {
        let (n1, rows) = (self.n1, self.gate_up_rows);
        self.expand(self.gate_up_b, self.t_gate_up, n1, rows, self.split)
    }

    /// GEMM2's epilogue: s_a · B_down[a, e] · t_down.
    pub fn expand_down(&self) -> ExpandParams {
        self.expand(self.down_b, self.t_down, self.hidden, self.rank, SPLIT_NONE)
    }
}

/// One shrink launch: its parameters and the align step's blocks (the grid's x).
pub struct Shrink {
    params: ShrinkParams,
    blocks: usize,
}

// ---------------------------------------------------------------- the kernels

/// The map and shrink kernels of a layer's dtype, loaded.
pub struct Kernels {
    map: Loaded,
    shrink: Loaded,
}

impl Kernels {
    pub fn load(dev: &DeviceState, dtype: DType) -> Result<Kernels> {
        Ok(Kernels {
            map: Loaded::new(dev, variant::lora_map())?,
            shrink: Loaded::new(dev, variant::lora_shrink(dtype))?,
        })
    }

    /// moe_lora_map: token_slot [M] and the checks of the map's values.
    pub fn map(&self, stream: &Arc<CudaStream>, run: &Run) -> Result<()> {
        let m = &run.map;
        let items = m.tokens.max(m.segments) as usize;
        let blocks = items.div_ceil(MAP_THREADS as usize).clamp(1, MAP_BLOCKS);
        self.map.launch_2d(stream, (blocks, 1), m)
    }

    /// moe_lora_shrink over the align step's blocks (x) and, along y, the blocks of
    /// SHRINK_MMA_ROWS rows of A (tensor-core path) or the groups of rows of A times the
    /// chunks of each block's routes (SIMT path); kernels/moe_lora.cu splits blockIdx.y so.
    pub fn shrink(&self, stream: &Arc<CudaStream>, s: &Shrink) -> Result<()> {
        let (rows, block_m) = (s.params.rows as usize, s.params.block_m as usize);
        let y = if s.params.mma != 0 {
            rows.div_ceil(SHRINK_MMA_ROWS) * s.params.slot_groups.max(1) as usize
        } else {
            rows.div_ceil(SHRINK_WARPS * SHRINK_ROWS) * block_m.div_ceil(SHRINK_ROUTES)
        };
        self.shrink.launch_2d(stream, (s.blocks, y), &s.params)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every LoRA launch's parameters fit the 4 KB a kernel's parameters may take on any
    /// driver (the GEMM's own struct comes on top of the expand's).
    #[test]
    fn lora_launch_parameters_fit_4_kb() {
        assert_eq!(std::mem::size_of::<SlotParams>(), 16);
        for size in [
            bytes::<MapParams>(),
            bytes::<ShrinkParams>(),
            bytes::<ExpandParams>() + 256,
        ] {
            assert!(size <= 4096, "{size} bytes");
        }
    }
}
