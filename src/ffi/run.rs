//! The hot path and the plan: moe_plan_create/free, moe_prepare, moe_run, and read access to
//! a plan's contents for tests and tools.

use super::handles::{free_boxed, handle_mut, handle_ref, moe_layer, moe_lora, moe_plan};
use super::status::{guard, moe_status};
use super::tensor::{copy_i32_out, moe_tensor, optional_tensor_arg, out_arg, tensor_arg};
use crate::error::{invalid, Result};
use crate::plan::{self, Plan, Prepared};
use crate::workspace::Section;
use std::ffi::c_void;

/// A tile config (SPEC §5): the kernel's block sizes, launch shape and variant flags.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct moe_tile_config {
    /// Rows (routes) per block; the align step's padding granularity.
    pub block_m: u32,
    /// Output columns per block (GEMM1's; GEMM2's where flags give it none of its own).
    pub block_n: u32,
    /// Reduction step.
    pub block_k: u32,
    /// Blocks of M grouped for L2 reuse.
    pub group_m: u32,
    /// Warps per block.
    pub num_warps: u32,
    /// Pipeline stages.
    pub num_stages: u32,
    /// Variant flags: bits 0-3 GEMM1's split-K (CTAs, one thread-block cluster, sharing a
    /// tile's k loop; 0 = none), bits 4-7 GEMM2's; bit 8: moe_run's kernels launch as
    /// programmatic dependents (the table's PDL key or option tile.pdl), bit 9:
    /// with GEMM2 let in at GEMM1's start (PDL 2); bits 12-14: GEMM2's own output columns
    /// per block as log2(columns) - 3 (the table's BLOCK_N_DOWN or option
    /// tile.block_n_down; 0 = block_n); the other bits are 0.
    pub flags: u32,
}

impl From<crate::tiles::TileConfig> for moe_tile_config {
    fn from(t: crate::tiles::TileConfig) -> moe_tile_config {
        moe_tile_config {
            block_m: t.block_m,
            block_n: t.block_n,
            block_k: t.block_k,
            group_m: t.group_m,
            num_warps: t.num_warps,
            num_stages: t.num_stages,
            flags: t.flags,
        }
    }
}

/// The library's own type for a host's config (Rust hosts: bench, tune), whose `split_k`
/// reads the flags.
impl From<moe_tile_config> for crate::tiles::TileConfig {
    fn from(t: moe_tile_config) -> crate::tiles::TileConfig {
        crate::tiles::TileConfig {
            block_m: t.block_m,
            block_n: t.block_n,
            block_k: t.block_k,
            group_m: t.group_m,
            num_warps: t.num_warps,
            num_stages: t.num_stages,
            flags: t.flags,
        }
    }
}

/// Creates an empty plan for `layer` (it keeps the layer's internals alive). Fill it with
/// moe_prepare. A plan is used by one stream (one thread) at a time. `out` is written only on
/// success; free it with moe_plan_free.
///
/// # Safety
/// `layer` must be NULL or a layer made by the library and not yet freed; `out` must be NULL or
/// valid for writes.
#[no_mangle]
pub unsafe extern "C" fn moe_plan_create(
    layer: *const moe_layer,
    out: *mut *mut moe_plan,
) -> moe_status {
    guard(|| {
        let h = handle_ref(layer, "layer")?;
        let out = out_arg(out, "out")?;
        *out = Box::into_raw(Box::new(moe_plan::new(Plan::new(h.layer.clone()))));
        Ok(())
    })
}

/// Frees a plan. NULL is a no-op.
///
/// # Safety
/// `plan` must be NULL or a plan made by the library and not yet freed; must not be called
/// twice, nor while another thread uses the plan.
#[no_mangle]
pub unsafe extern "C" fn moe_plan_free(plan: *mut moe_plan) {
    let _ = guard(|| free_boxed(plan));
}

/// The align step (SPEC §4) and the tile choice (SPEC §5) for one batch: reads topk_ids
/// [M, K] (int32 or int64, local expert ids in [−1, E); −1 drops a route), writes the sorted
/// routes into `workspace` (1-D uint8, at least moe_workspace_size(layer, M) bytes) and
/// records the batch in `plan`. M = 0 is valid. On the CPU an id out of range is
/// INVALID_ARGUMENT and nothing is written. On CUDA the call only launches the align kernel
/// on `stream` (no allocation, copy or sync: capturable in a CUDA graph); there an id out of
/// range is treated as −1 and counted, and the first moe_prepare or moe_run of this layer made
/// after the device ran that batch returns INVALID_ARGUMENT naming topk_ids and writes
/// nothing (it may be the batch's own moe_run, if the device was quick). `stream` is the CUDA
/// stream for CUDA layers (NULL: the legacy default stream) and must be NULL for CPU layers.
/// The plan refers to the workspace: run it before preparing another plan into the same
/// workspace (moe_run and the plan's array getters refuse a plan whose workspace another plan
/// has prepared since, with INVALID_ARGUMENT naming `plan`).
///
/// # Safety
/// `layer` must be NULL or a layer made by the library and not yet freed; `plan` must be NULL
/// or a plan made by the library and not yet freed, not used by another thread during the call.
/// `topk_ids` and `workspace` must each be NULL or point to a valid `moe_tensor` (see
/// moe_tensor). For a CUDA layer, `stream` must be NULL or a CUDA stream of its device.
#[no_mangle]
pub unsafe extern "C" fn moe_prepare(
    layer: *const moe_layer,
    topk_ids: *const moe_tensor,
    workspace: *const moe_tensor,
    plan: *mut moe_plan,
    stream: *mut c_void,
) -> moe_status {
    guard(|| {
        let l = handle_ref(layer, "layer")?;
        let ids = tensor_arg(topk_ids, "topk_ids")?;
        let ws = tensor_arg(workspace, "workspace")?;
        let p = handle_mut(plan, "plan")?;
        plan::prepare(&mut p.plan, &l.layer, &ids, &ws, stream as usize)
    })
}

/// Runs the layer on a prepared batch (SPEC §2): GEMM1, activation, GEMM2, combine. hidden
/// [M, H] in the layer dtype; topk_weights [M, K] in f32 or the layer dtype; out [M, H], or
/// [M, K, H] with no_combine, in the layer dtype, not overlapping any input; for an inplace
/// layer `out` must be NULL or hidden, and the result replaces hidden. M must be the plan's.
/// `lora` must be NULL: a LoRA run needs its token → adapter map, so it goes through
/// moe_run_lora (a non-NULL `lora` is INVALID_ARGUMENT). Every argument is
/// checked before anything is written; on failure out (and hidden) are untouched. `stream`:
/// as moe_prepare. Thread-safe for distinct plans and outputs.
///
/// # Safety
/// `layer` must be NULL or a layer made by the library and not yet freed; `plan` must be NULL
/// or a plan made by the library and not yet freed, not being prepared by another thread, and
/// the workspace it was prepared into must still be valid. `hidden`, `topk_weights` and `out`
/// must each be NULL or point to a valid `moe_tensor` (see moe_tensor). For a CUDA layer,
/// `stream` must be NULL or a CUDA stream of its device.
#[no_mangle]
pub unsafe extern "C" fn moe_run(
    layer: *const moe_layer,
    lora: *const moe_lora,
    plan: *const moe_plan,
    hidden: *const moe_tensor,
    topk_weights: *const moe_tensor,
    out: *const moe_tensor,
    stream: *mut c_void,
) -> moe_status {
    guard(|| {
        let l = handle_ref(layer, "layer")?;
        if !lora.is_null() {
            return Err(invalid!(
                "lora: must be NULL for moe_run; run a LoRA wrapper with moe_run_lora, which \
                 takes the token → adapter map"
            ));
        }
        let p = handle_ref(plan, "plan")?;
        let hidden = tensor_arg(hidden, "hidden")?;
        let weights = tensor_arg(topk_weights, "topk_weights")?;
        let out = optional_tensor_arg(out, "out")?;
        plan::run(
            &p.plan,
            &l.layer,
            &hidden,
            &weights,
            out.as_ref(),
            stream as usize,
        )
    })
}

fn prepared(p: &moe_plan) -> Result<&Prepared> {
    p.plan
        .prepared
        .as_ref()
        .ok_or_else(|| invalid!("plan: not prepared (call moe_prepare first)"))
}

/// Writes the plan's token count M.
///
/// # Safety
/// `plan` must be NULL or a plan made by the library and not yet freed, not being prepared by
/// another thread; `out` must be NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn moe_plan_num_tokens(plan: *const moe_plan, out: *mut i64) -> moe_status {
    guard(|| {
        let p = prepared(handle_ref(plan, "plan")?)?;
        *out_arg(out, "out")? = p.num_tokens as i64;
        Ok(())
    })
}

/// Writes num_padded: the used entries of sorted_route_ids (a multiple of BLOCK_M). For a
/// CUDA layer it is read from the workspace on the device: synchronize the plan's stream
/// first.
///
/// # Safety
/// `plan` must be NULL or a plan made by the library and not yet freed, not being prepared by
/// another thread, and the workspace it was prepared into must still be valid; `out` must be
/// NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn moe_plan_num_padded(plan: *const moe_plan, out: *mut i64) -> moe_status {
    guard(|| {
        let h = handle_ref(plan, "plan")?;
        let p = h.plan.prepared()?;
        let out = out_arg(out, "out")?;
        let layer = &h.plan.layer;
        let at = p.workspace.add(p.layout.num_padded.offset);
        *out = layer.backend.read_i32s(layer, at, 1)?[0] as i64;
        Ok(())
    })
}

/// Writes the tile config moe_prepare chose for the batch.
///
/// # Safety
/// `plan` must be NULL or a plan made by the library and not yet freed, not being prepared by
/// another thread; `out` must be NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn moe_plan_tile_config(
    plan: *const moe_plan,
    out: *mut moe_tile_config,
) -> moe_status {
    guard(|| {
        let p = prepared(handle_ref(plan, "plan")?)?;
        *out_arg(out, "out")? = p.tile.into();
        Ok(())
    })
}

/// Copies a workspace section of a prepared plan into `dst` (see moe_plan_sorted_route_ids).
unsafe fn copy_section(
    plan: *const moe_plan,
    pick: fn(&Prepared) -> Section,
    dst: *mut i32,
    dst_len: usize,
    len: *mut usize,
) -> moe_status {
    guard(|| {
        let h = handle_ref(plan, "plan")?;
        let p = h.plan.prepared()?;
        let section = pick(p);
        let layer = &h.plan.layer;
        let values =
            layer
                .backend
                .read_i32s(layer, p.workspace.add(section.offset), section.len)?;
        copy_i32_out(&values, dst, dst_len, len)
    })
}

/// Copies sorted_route_ids (the whole capacity: used entries, padding M·K, then the tail
/// also M·K) into `dst` (`dst_len` entries) and writes the count to `*len`. With `dst` NULL
/// and `dst_len` 0 only `*len` is written. Reads the workspace the plan was prepared in (for
/// a CUDA layer, a copy from the device: synchronize the plan's stream first).
///
/// # Safety
/// `plan` must be NULL or a plan made by the library and not yet freed, not being prepared by
/// another thread, and the workspace it was prepared into must still be valid. `dst` must be
/// NULL or hold `dst_len` writable int32 entries; `len` must be NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn moe_plan_sorted_route_ids(
    plan: *const moe_plan,
    dst: *mut i32,
    dst_len: usize,
    len: *mut usize,
) -> moe_status {
    copy_section(plan, |p| p.layout.sorted_route_ids, dst, dst_len, len)
}

/// Copies block_expert (one expert id per BLOCK_M entries of the capacity; −1 past the used
/// blocks) into `dst`, like moe_plan_sorted_route_ids.
///
/// # Safety
/// `plan` must be NULL or a plan made by the library and not yet freed, not being prepared by
/// another thread, and the workspace it was prepared into must still be valid. `dst` must be
/// NULL or hold `dst_len` writable int32 entries; `len` must be NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn moe_plan_block_expert(
    plan: *const moe_plan,
    dst: *mut i32,
    dst_len: usize,
    len: *mut usize,
) -> moe_status {
    copy_section(plan, |p| p.layout.block_expert, dst, dst_len, len)
}
