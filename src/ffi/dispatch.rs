//! The dispatcher entry points (SPEC §6): create from a contiguous partition or an explicit
//! table, read its mapping and mask, and map global expert ids to local ones.

use super::handles::{free_boxed, handle_ref, moe_dispatcher};
use super::status::{guard, moe_status};
use super::tensor::{check_device, copy_i32_out, moe_device, moe_tensor, out_arg, tensor_arg};
use crate::dispatch::Dispatcher;
use crate::dtype::ElemType;
use crate::error::ensure;
use std::ffi::c_void;

fn boxed(d: Dispatcher, out: &mut *mut moe_dispatcher) {
    *out = Box::into_raw(Box::new(moe_dispatcher::new(d)));
}

/// Creates the contiguous partition of SPEC §6 for rank `ep_rank` of `ep_size`: with S =
/// `num_shared_experts` (the last S global ids, replicated on every rank) and R = (E_g − S) /
/// ep_size, global ids [ep_rank·R, (ep_rank+1)·R) become local 0..R and the shared ones R..R+S;
/// every other id maps to −1. E_g − S must be a multiple of ep_size. `device` is where
/// moe_dispatch runs: MOE_DEVICE_CPU, or MOE_DEVICE_CUDA (the mapping is copied to that
/// device once, here; the kernels compile here too). `out` is written only on success; free it with
/// moe_dispatcher_free. The dispatcher is immutable and may be used from any thread.
///
/// # Safety
/// `out` must be NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn moe_dispatcher_create_contiguous(
    num_experts: i64,
    ep_size: i64,
    ep_rank: i64,
    num_shared_experts: i64,
    device: moe_device,
    out: *mut *mut moe_dispatcher,
) -> moe_status {
    guard(|| {
        let device = check_device("device", device)?;
        let out = out_arg(out, "out")?;
        boxed(
            Dispatcher::contiguous(num_experts, ep_size, ep_rank, num_shared_experts, device)?,
            out,
        );
        Ok(())
    })
}

/// Creates a dispatcher from an explicit table (EPLB-style placements): `mapping` is a host
/// int32 tensor [E_g] of local ids in [−1, E_local), −1 for experts stored elsewhere, no local
/// id twice. The table is copied. Otherwise as moe_dispatcher_create_contiguous.
///
/// # Safety
/// `mapping` must be NULL or point to a valid `moe_tensor` (see moe_tensor); `out` must be NULL
/// or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn moe_dispatcher_create_mapping(
    mapping: *const moe_tensor,
    num_local_experts: i64,
    device: moe_device,
    out: *mut *mut moe_dispatcher,
) -> moe_status {
    guard(|| {
        let table = tensor_arg(mapping, "mapping")?;
        ensure!(
            table.elem == ElemType::I32 && table.ndim == 1,
            "mapping: dtype {} with ndim {}, expected a 1-D int32 table [E_g]",
            table.elem.name(),
            table.ndim
        );
        ensure!(
            table.device == crate::tensor::Device::CPU,
            "mapping: on {}, expected a host (cpu) table",
            table.device
        );
        let device = check_device("device", device)?;
        let out = out_arg(out, "out")?;
        boxed(
            Dispatcher::from_mapping(table.host_slice::<i32>(), num_local_experts, device)?,
            out,
        );
        Ok(())
    })
}

/// Frees a dispatcher. NULL is a no-op.
///
/// # Safety
/// `dispatcher` must be NULL or a dispatcher made by the library and not yet freed; must not be
/// called twice, nor while another thread uses the dispatcher.
#[no_mangle]
pub unsafe extern "C" fn moe_dispatcher_free(dispatcher: *mut moe_dispatcher) {
    let _ = guard(|| free_boxed(dispatcher));
}

/// Writes E_g, the global expert count. Thread-safe.
///
/// # Safety
/// `dispatcher` must be NULL or a dispatcher made by the library and not yet freed; `out` must
/// be NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn moe_dispatcher_num_experts(
    dispatcher: *const moe_dispatcher,
    out: *mut i64,
) -> moe_status {
    guard(|| {
        let d = &handle_ref(dispatcher, "dispatcher")?.dispatcher;
        *out_arg(out, "out")? = d.global_experts() as i64;
        Ok(())
    })
}

/// Writes E_local, the experts this rank stores (what its layer's num_local_experts must be).
///
/// # Safety
/// `dispatcher` must be NULL or a dispatcher made by the library and not yet freed; `out` must
/// be NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn moe_dispatcher_num_local_experts(
    dispatcher: *const moe_dispatcher,
    out: *mut i64,
) -> moe_status {
    guard(|| {
        let d = &handle_ref(dispatcher, "dispatcher")?.dispatcher;
        *out_arg(out, "out")? = d.local_experts as i64;
        Ok(())
    })
}

/// Copies the mapping [E_g] (local id or −1 per global expert) into `dst` (`dst_len`
/// entries) and writes E_g to `*len`; with `dst` NULL and `dst_len` 0 only `*len` is written.
///
/// # Safety
/// `dispatcher` must be NULL or a dispatcher made by the library and not yet freed. `dst` must
/// be NULL or hold `dst_len` writable int32 entries; `len` must be NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn moe_dispatcher_mapping(
    dispatcher: *const moe_dispatcher,
    dst: *mut i32,
    dst_len: usize,
    len: *mut usize,
) -> moe_status {
    guard(|| {
        copy_i32_out(
            &handle_ref(dispatcher, "dispatcher")?.dispatcher.mapping,
            dst,
            dst_len,
            len,
        )
    })
}

/// Copies the expert mask [E_g] (1 where the global expert is stored here, else 0), like
/// moe_dispatcher_mapping.
///
/// # Safety
/// `dispatcher` must be NULL or a dispatcher made by the library and not yet freed. `dst` must
/// be NULL or hold `dst_len` writable int32 entries; `len` must be NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn moe_dispatcher_expert_mask(
    dispatcher: *const moe_dispatcher,
    dst: *mut i32,
    dst_len: usize,
    len: *mut usize,
) -> moe_status {
    guard(|| {
        copy_i32_out(
            &handle_ref(dispatcher, "dispatcher")?
                .dispatcher
                .expert_mask(),
            dst,
            dst_len,
            len,
        )
    })
}

/// Maps global expert ids to this rank's local ids (SPEC §6): local_topk_ids = topk_ids < 0 ?
/// −1 : mapping[topk_ids]. Both are int32 or int64 with the same shape (e.g. [M, K]);
/// `local_topk_ids` may be `topk_ids` itself (same dtype), but may not overlap it otherwise.
/// Negative ids stay −1. On the CPU an id ≥ E_g is INVALID_ARGUMENT and nothing is written.
/// On CUDA the call is one kernel launch on `stream` (capturable in a CUDA graph): an id ≥
/// E_g is mapped to −1 (never used as an index) and counted, and the next moe_dispatch on this
/// dispatcher after that work finished returns INVALID_ARGUMENT naming topk_ids. `stream` must
/// be NULL for a CPU dispatcher. Thread-safe for distinct outputs.
///
/// # Safety
/// `dispatcher` must be NULL or a dispatcher made by the library and not yet freed; `topk_ids`
/// and `local_topk_ids` must each be NULL or point to a valid `moe_tensor` (see moe_tensor).
/// For a CUDA dispatcher, `stream` must be NULL or a CUDA stream of its device.
#[no_mangle]
pub unsafe extern "C" fn moe_dispatch(
    dispatcher: *const moe_dispatcher,
    topk_ids: *const moe_tensor,
    local_topk_ids: *const moe_tensor,
    stream: *mut c_void,
) -> moe_status {
    guard(|| {
        let d = &handle_ref(dispatcher, "dispatcher")?.dispatcher;
        let ids = tensor_arg(topk_ids, "topk_ids")?;
        let out = tensor_arg(local_topk_ids, "local_topk_ids")?;
        d.dispatch(&ids, &out, stream as usize)
    })
}
