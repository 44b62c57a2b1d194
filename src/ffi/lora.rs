//! The LoRA wrapper's entry points (SPEC §7): create over a layer, set / clear / enable slots,
//! the passed-through runner config, the workspace size and moe_run_lora.

use super::handles::{free_boxed, handle_ref, moe_config, moe_layer, moe_lora, moe_plan};
use super::status::{guard, moe_status};
use super::tensor::{moe_tensor, optional_tensor_arg, out_arg, tensor_arg};
use crate::lora::{self, AdapterMap, Lora, SlotWeights};
use std::ffi::c_void;
use std::sync::Arc;

/// Creates a LoRA wrapper over `layer` with `num_slots` adapter slots (L ≥ 1; at most 64 over
/// a CUDA layer, UNSUPPORTED above) of rank at most `max_rank` (r ≥ 1); every slot starts
/// empty (no delta) and enabled. On a CUDA layer, moe_warmup of the layer from then on also
/// compiles the LoRA kernels. The wrapper keeps the layer's internals and its config handle
/// alive: the layer handle may be freed first, and the wrapper (its config, its slots,
/// moe_run_lora with plans of the layer) stays valid (moe_prepare still needs the layer
/// handle). `out` is written only on success; free it with moe_lora_free. The slot functions
/// may be called from any thread, also while other threads run the wrapper: a run sees each
/// slot as it was before or after a change.
///
/// # Safety
/// `layer` must be NULL or a layer made by the library and not yet freed; its weights must stay
/// valid until the wrapper is freed too, also when the layer handle is freed first. `out` must
/// be NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn moe_lora_create(
    layer: *const moe_layer,
    num_slots: i64,
    max_rank: i64,
    out: *mut *mut moe_lora,
) -> moe_status {
    guard(|| {
        let l = handle_ref(layer, "layer")?;
        let lora = Lora::new(l.layer.clone(), num_slots, max_rank)?;
        let out = out_arg(out, "out")?;
        *out = Box::into_raw(Box::new(moe_lora::new(lora, l.config.clone())));
        Ok(())
    })
}

/// Frees a LoRA wrapper (and, if the layer handle was freed already, the layer's internals
/// once no plan holds them). NULL is a no-op.
///
/// # Safety
/// `lora` must be NULL or a LoRA wrapper made by the library and not yet freed; must not be
/// called twice, nor while another thread uses the wrapper.
#[no_mangle]
pub unsafe extern "C" fn moe_lora_free(lora: *mut moe_lora) {
    let _ = guard(|| free_boxed(lora));
}

/// Sets slot `slot` (0 ≤ slot < L) to an adapter: gate_up_a [E or 1, 2r, H] (gated: rows
/// [0, r) gate, [r, 2r) up) or [E or 1, r, H] (non-gated); gate_up_b [E, N1, r] (gate/up rows
/// in w13's layout); down_a [E, r, I]; down_b [E or 1, H, r]. E is the layer's local expert
/// count; an expert dimension of 1 (gate_up_a, down_b) is shared by all experts. r is the
/// wrapper's max_rank: a smaller rank is zero padded to r. Dtype: the layer's; device: the
/// layer's. `scaling` (alpha / rank, finite) multiplies B's products; pass 1.0 when it is
/// folded into B. The memory is borrowed, not copied. Replaces the slot's previous adapter;
/// keeps its enabled flag. On failure the slot is unchanged.
///
/// # Safety
/// `lora` must be NULL or a LoRA wrapper made by the library and not yet freed; `gate_up_a`,
/// `gate_up_b`, `down_a` and `down_b` must each be NULL or point to a valid `moe_tensor` (see
/// moe_tensor), and their memory must stay valid and unchanged until the slot is set again or
/// cleared, or the wrapper is freed.
#[no_mangle]
pub unsafe extern "C" fn moe_lora_set_slot(
    lora: *mut moe_lora,
    slot: i64,
    gate_up_a: *const moe_tensor,
    gate_up_b: *const moe_tensor,
    down_a: *const moe_tensor,
    down_b: *const moe_tensor,
    scaling: f32,
) -> moe_status {
    guard(|| {
        let h = handle_ref(lora, "lora")?;
        let weights = SlotWeights {
            gate_up_a: tensor_arg(gate_up_a, "gate_up_a")?,
            gate_up_b: tensor_arg(gate_up_b, "gate_up_b")?,
            down_a: tensor_arg(down_a, "down_a")?,
            down_b: tensor_arg(down_b, "down_b")?,
            scaling,
        };
        h.lora.set_slot(slot, weights)
    })
}

/// Empties slot `slot`: tokens mapped to it get no delta until it is set again. The library
/// no longer reads the slot's memory once this returns. Keeps the slot's enabled flag.
///
/// # Safety
/// `lora` must be NULL or a LoRA wrapper made by the library and not yet freed.
#[no_mangle]
pub unsafe extern "C" fn moe_lora_clear_slot(lora: *mut moe_lora, slot: i64) -> moe_status {
    guard(|| handle_ref(lora, "lora")?.lora.clear_slot(slot))
}

/// Enables or disables slot `slot`; tokens mapped to a disabled slot get no delta. Slots
/// start enabled; the flag survives moe_lora_set_slot and moe_lora_clear_slot.
///
/// # Safety
/// `lora` must be NULL or a LoRA wrapper made by the library and not yet freed.
#[no_mangle]
pub unsafe extern "C" fn moe_lora_set_enabled(
    lora: *mut moe_lora,
    slot: i64,
    enabled: bool,
) -> moe_status {
    guard(|| handle_ref(lora, "lora")?.lora.set_enabled(slot, enabled))
}

/// Writes the wrapped layer's own config handle: the very pointer moe_layer_config returns
/// for the layer, so every moe_config_get_* reads the same through the wrapper (E_local,
/// dtype, device, ...). Read-only, owned by the layer and the wrapper (do not free it); valid
/// while the wrapper lives, also after the layer handle was freed. Thread-safe.
///
/// # Safety
/// `lora` must be NULL or a LoRA wrapper made by the library and not yet freed; `out` must be
/// NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn moe_lora_runner_config(
    lora: *const moe_lora,
    out: *mut *const moe_config,
) -> moe_status {
    guard(|| {
        let h = handle_ref(lora, "lora")?;
        let out = out_arg(out, "out")?;
        *out = Arc::as_ptr(&h.config);
        Ok(())
    })
}

/// Writes the bytes of workspace a moe_run_lora of up to `max_tokens` tokens needs: the
/// layer's (moe_workspace_size) plus the LoRA intermediates. Prepare the plan into a
/// workspace of this size. Thread-safe.
///
/// # Safety
/// `lora` must be NULL or a LoRA wrapper made by the library and not yet freed; `bytes` must be
/// NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn moe_lora_workspace_size(
    lora: *const moe_lora,
    max_tokens: i64,
    bytes: *mut usize,
) -> moe_status {
    guard(|| {
        let h = handle_ref(lora, "lora")?;
        let bytes = out_arg(bytes, "bytes")?;
        *bytes = h.lora.workspace_size(max_tokens)?;
        Ok(())
    })
}

/// moe_run with the LoRA deltas of SPEC §7: the wrapped layer on a batch prepared by
/// moe_prepare (the plan must be the wrapped layer's; its workspace at least
/// moe_lora_workspace_size(lora, M) bytes), with each token's adapter given by exactly one
/// map: `adapter_ids` [M] int32, or `seg_indptr` [S+1] int32 (0 = first ≤ … ≤ last = M) with
/// `seg_adapter` [S] int32 (tokens [seg_indptr[s], seg_indptr[s+1]) use seg_adapter[s]); the
/// other form's arguments are NULL. Adapter ids are in [−1, L); −1, an empty slot or a
/// disabled one means no delta. hidden, topk_weights, out and `stream`: as moe_run. Every
/// argument is checked before anything is written. Thread-safe for distinct plans and
/// outputs.
///
/// On a CUDA layer the map is device memory and the call only launches kernels on `stream`
/// (no allocation, copy or sync: capturable in a CUDA graph, after moe_warmup of the layer
/// made after moe_lora_create; a run whose kernels are not compiled is INVALID_ARGUMENT
/// naming `stream` while the stream captures). The map's values are checked on the device:
/// an adapter id outside [−1, L) counts as −1 (no delta), segments that break 0 = first ≤ …
/// ≤ last = M give the tokens they misplace no delta, and the first moe_prepare, moe_run or
/// moe_run_lora on the layer made after the device ran that batch returns INVALID_ARGUMENT
/// naming adapter_ids, seg_adapter or seg_indptr and writes nothing. The slots travel to the
/// kernels by value, inside the launch: a captured graph replays the slots (weights,
/// scaling, enabled, cleared) as they were at capture, so capture again after
/// moe_lora_set_slot, moe_lora_clear_slot or moe_lora_set_enabled; the map's values are
/// read at each replay.
///
/// # Safety
/// `lora` must be NULL or a LoRA wrapper made by the library and not yet freed; `plan` must be
/// NULL or a plan made by the library and not yet freed, not being prepared by another thread,
/// and the workspace it was prepared into must still be valid. `hidden`, `topk_weights`,
/// `adapter_ids`, `seg_indptr`, `seg_adapter` and `out` must each be NULL or point to a valid
/// `moe_tensor` (see moe_tensor). For a CUDA layer, `stream` must be NULL or a CUDA stream of
/// its device.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn moe_run_lora(
    lora: *const moe_lora,
    plan: *const moe_plan,
    hidden: *const moe_tensor,
    topk_weights: *const moe_tensor,
    adapter_ids: *const moe_tensor,
    seg_indptr: *const moe_tensor,
    seg_adapter: *const moe_tensor,
    out: *const moe_tensor,
    stream: *mut c_void,
) -> moe_status {
    guard(|| {
        let h = handle_ref(lora, "lora")?;
        let p = handle_ref(plan, "plan")?;
        let hidden = tensor_arg(hidden, "hidden")?;
        let weights = tensor_arg(topk_weights, "topk_weights")?;
        let map = AdapterMap::from_args(
            optional_tensor_arg(adapter_ids, "adapter_ids")?,
            optional_tensor_arg(seg_indptr, "seg_indptr")?,
            optional_tensor_arg(seg_adapter, "seg_adapter")?,
        )?;
        let out = optional_tensor_arg(out, "out")?;
        lora::run(
            &h.lora,
            &p.plan,
            &hidden,
            &weights,
            &map,
            out.as_ref(),
            stream as usize,
        )
    })
}
