//! The layer entry points: create (config + borrowed weights), free, its config, and the
//! workspace size.

use super::handles::{free_boxed, handle_ref, moe_config, moe_layer};
use super::status::{guard, moe_status};
use super::tensor::{moe_tensor, optional_tensor_arg, out_arg, tensor_arg};
use crate::layer::{Layer, Weights};
use std::ffi::c_void;
use std::sync::Arc;

/// Creates a layer from `config` (copied: the caller may change or free it afterwards) and
/// the weights w13 [E, N1, H], w2 [E, H, I] in the layer dtype, and optional biases
/// b13 [E, N1] and b2 [E, H] (f32 or the layer dtype; NULL = none). The weights' memory is
/// borrowed, not copied. Every config rule and weight shape is checked here; an unsupported
/// feature (e.g. a CUDA device in a build without CUDA) is UNSUPPORTED. `out` is written only
/// on success; free the layer with moe_layer_free. The layer is immutable and may be used from
/// any thread.
///
/// # Safety
/// `config` must be NULL or a config made by the library and not yet freed, not being changed
/// by another thread. `w13`, `w2`, `b13` and `b2` must each be NULL or point to a valid
/// `moe_tensor` (see moe_tensor); the weights' memory must stay valid and unchanged while the
/// layer is in use (and, after moe_lora_create, until the wrapper is freed too). `out` must be
/// NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn moe_layer_create(
    config: *const moe_config,
    w13: *const moe_tensor,
    w2: *const moe_tensor,
    b13: *const moe_tensor,
    b2: *const moe_tensor,
    out: *mut *mut moe_layer,
) -> moe_status {
    guard(|| {
        let cfg = handle_ref(config, "config")?;
        let weights = Weights {
            w13: tensor_arg(w13, "w13")?,
            w2: tensor_arg(w2, "w2")?,
            b13: optional_tensor_arg(b13, "b13")?,
            b2: optional_tensor_arg(b2, "b2")?,
        };
        let out = out_arg(out, "out")?;
        let layer = Layer::new(&cfg.config, weights)?;
        *out = Box::into_raw(Box::new(moe_layer::new(layer)));
        Ok(())
    })
}

/// Frees a layer. NULL is a no-op. Plans and LoRA wrappers made for the layer may be freed
/// before or after it (they keep the layer's internals alive); the config from moe_layer_config
/// dies with the layer and its LoRA wrappers.
///
/// # Safety
/// `layer` must be NULL or a layer made by the library and not yet freed; must not be called
/// twice, nor while another thread uses the layer.
#[no_mangle]
pub unsafe extern "C" fn moe_layer_free(layer: *mut moe_layer) {
    let _ = guard(|| free_boxed(layer));
}

/// Returns the layer's own, read-only config handle: every moe_config_get_* works on it; it is
/// owned by the layer (do not free it) and valid while the layer or a LoRA wrapper over it
/// lives (moe_lora_runner_config returns the same pointer). Thread-safe.
///
/// # Safety
/// `layer` must be NULL or a layer made by the library and not yet freed; `out` must be NULL or
/// valid for writes.
#[no_mangle]
pub unsafe extern "C" fn moe_layer_config(
    layer: *const moe_layer,
    out: *mut *const moe_config,
) -> moe_status {
    guard(|| {
        let h = handle_ref(layer, "layer")?;
        let out = out_arg(out, "out")?;
        *out = Arc::as_ptr(&h.config);
        Ok(())
    })
}

/// Writes the bytes of workspace that any batch of up to `max_tokens` tokens needs (the host
/// allocates it once, on the layer's device, as a 1-D uint8 tensor at a 16-byte aligned
/// address). Thread-safe.
///
/// # Safety
/// `layer` must be NULL or a layer made by the library and not yet freed; `bytes` must be NULL
/// or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn moe_workspace_size(
    layer: *const moe_layer,
    max_tokens: i64,
    bytes: *mut usize,
) -> moe_status {
    guard(|| {
        let h = handle_ref(layer, "layer")?;
        let bytes = out_arg(bytes, "bytes")?;
        *bytes = h.layer.workspace_size(max_tokens)?;
        Ok(())
    })
}

/// Compiles and loads every kernel variant the layer may use for batches of up to
/// `max_tokens` tokens (NVRTC runs here, not in the first moe_prepare/moe_run, on as many
/// threads as the machine has cores; compiled kernels are also cached on disk under
/// FUSEDMOE_CACHE_DIR), those of moe_run_lora too once
/// a LoRA wrapper was made over the layer. Call it before capturing moe_prepare and moe_run
/// (or moe_run_lora) into a CUDA graph. `stream`: as moe_prepare (nothing is launched on
/// it). A CPU layer has nothing to compile: MOE_OK. Thread-safe.
///
/// # Safety
/// `layer` must be NULL or a layer made by the library and not yet freed.
#[no_mangle]
pub unsafe extern "C" fn moe_warmup(
    layer: *const moe_layer,
    max_tokens: i64,
    stream: *mut c_void,
) -> moe_status {
    guard(|| {
        let h = handle_ref(layer, "layer")?;
        crate::plan::warmup(&h.layer, max_tokens, stream as usize)
    })
}
