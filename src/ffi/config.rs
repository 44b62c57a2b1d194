//! The runner-config entry points: create, clone, free, a setter and a getter per field of
//! SPEC §1–3, and backend options. Setters check their value at once; cross-field rules are
//! checked by moe_layer_create.

use super::handles::{free_boxed, handle_mut, handle_ref, moe_config};
use super::status::{guard, moe_status};
use super::tensor::{
    check_device, moe_device, moe_dtype, out_arg, str_arg, MOE_DEVICE_CPU, MOE_DEVICE_CUDA,
};
use crate::activation::{Activation, GateUpLayout};
use crate::config::{check_finite, check_size, Config};
use crate::dtype::ElemType;
use crate::error::{ensure, invalid, Result};
use crate::tensor::DeviceKind;
use std::ffi::c_char;

/// silu(g)·u gated; silu(x) non-gated.
pub const MOE_ACTIVATION_SILU: u32 = 0;
/// gelu_erf(g)·u gated; gelu_erf(x) non-gated.
pub const MOE_ACTIVATION_GELU: u32 = 1;
/// The tanh approximation of gelu, gated.
pub const MOE_ACTIVATION_GELU_TANH: u32 = 2;
/// gpt-oss's clamped SwiGLU, gated; needs gemm1_alpha and gemm1_limit.
pub const MOE_ACTIVATION_SWIGLU_OAI: u32 = 3;
/// min(silu(g), L)·clamp(u, −L, L), gated; needs gemm1_limit.
pub const MOE_ACTIVATION_SILU_CLAMP: u32 = 4;
/// silu(min(g, L))·clamp(u, −L, L), gated (DeepSeek-V4); needs gemm1_limit.
pub const MOE_ACTIVATION_SILU_PRECLAMP: u32 = 5;
/// max(x, 0)², non-gated.
pub const MOE_ACTIVATION_RELU2: u32 = 6;

/// Gated w13 rows [0, I) are gate, [I, 2I) are up (the default).
pub const MOE_GATE_UP_HALVES: u32 = 0;
/// Gated w13 row 2j is gate_j, row 2j+1 is up_j (gpt-oss checkpoints).
pub const MOE_GATE_UP_INTERLEAVED: u32 = 1;

fn activation_from(v: u32) -> Result<Activation> {
    Activation::ALL.get(v as usize).copied().ok_or_else(|| {
        invalid!("activation: {v} is not a MOE_ACTIVATION_* value (0..={MOE_ACTIVATION_RELU2})")
    })
}

fn activation_code(a: Activation) -> u32 {
    Activation::ALL
        .iter()
        .position(|&x| x == a)
        .expect("listed") as u32
}

/// Runs a setter on a mutable config handle.
unsafe fn set(config: *mut moe_config, f: impl FnOnce(&mut Config) -> Result<()>) -> moe_status {
    guard(|| {
        // Check through a shared reference first: a layer's config is shared across threads.
        let read_only = handle_ref(config as *const moe_config, "config")?.read_only;
        ensure!(
            !read_only,
            "config: read-only (it belongs to a layer); copy it with moe_config_clone to change it"
        );
        f(&mut handle_mut(config, "config")?.config)
    })
}

/// Runs a getter: checks the handle and the output pointer, writes only on success.
unsafe fn get<T>(
    config: *const moe_config,
    out: *mut T,
    f: impl FnOnce(&Config) -> Result<T>,
) -> moe_status {
    guard(|| {
        let h = handle_ref(config, "config")?;
        let out = out_arg(out, "out")?;
        *out = f(&h.config)?;
        Ok(())
    })
}

fn size_set(value: Option<i64>, name: &str) -> Result<i64> {
    value.ok_or_else(|| invalid!("config: {name} is not set"))
}

/// Creates an empty config: sizes and dtype unset; activation silu, gated, halves layout,
/// routed_scaling_factor 1, every flag false, device CPU. Free it with moe_config_free.
/// `out` is written only on success.
///
/// # Safety
/// `out` must be NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn moe_config_create(out: *mut *mut moe_config) -> moe_status {
    guard(|| {
        let out = out_arg(out, "out")?;
        *out = Box::into_raw(Box::new(moe_config::new(Config::default(), false)));
        Ok(())
    })
}

/// Copies any config (also a layer's read-only one) into a new mutable config the caller
/// frees with moe_config_free. `out` is written only on success. Thread-safe for a
/// read-only source.
///
/// # Safety
/// `config` must be NULL or a config made by the library and not yet freed, not being changed
/// by another thread; `out` must be NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn moe_config_clone(
    config: *const moe_config,
    out: *mut *mut moe_config,
) -> moe_status {
    guard(|| {
        let h = handle_ref(config, "config")?;
        let out = out_arg(out, "out")?;
        *out = Box::into_raw(Box::new(moe_config::new(h.config.clone(), false)));
        Ok(())
    })
}

/// Frees a config made by moe_config_create or moe_config_clone. NULL is a no-op. A config
/// returned by moe_layer_config is refused and stays as it is (the layer owns that one). Layers
/// made from the config keep their own copy.
///
/// # Safety
/// `config` must be NULL or a config made by the library and not yet freed; must not be called
/// twice, nor while another thread uses the config.
#[no_mangle]
pub unsafe extern "C" fn moe_config_free(config: *mut moe_config) {
    let _ = guard(|| {
        if !config.is_null() {
            let h = handle_ref(config, "config")?;
            ensure!(
                !h.read_only,
                "config: belongs to a layer; free the layer instead"
            );
        }
        free_boxed(config)
    });
}

/// Sets E_g, the number of experts in the whole model (≥ 1). Every setter refuses a layer's
/// read-only config (from moe_layer_config).
///
/// # Safety
/// `config` must be NULL or a config made by the library and not yet freed; no other thread may
/// use it during the call, unless it is a layer's (read-only) config.
#[no_mangle]
pub unsafe extern "C" fn moe_config_set_num_experts(
    config: *mut moe_config,
    num_experts: i64,
) -> moe_status {
    set(config, |c| {
        check_size("num_experts", num_experts)?;
        c.num_experts = Some(num_experts);
        Ok(())
    })
}

/// Sets E, the experts stored in this layer (1 ≤ E ≤ E_g; defaults to E_g). Expert ids given
/// to moe_prepare are local: in [−1, E).
///
/// # Safety
/// `config` must be NULL or a config made by the library and not yet freed; no other thread may
/// use it during the call, unless it is a layer's (read-only) config.
#[no_mangle]
pub unsafe extern "C" fn moe_config_set_num_local_experts(
    config: *mut moe_config,
    num_local_experts: i64,
) -> moe_status {
    set(config, |c| {
        check_size("num_local_experts", num_local_experts)?;
        c.num_local_experts = Some(num_local_experts);
        Ok(())
    })
}

/// Sets K, the routes per token (≥ 1).
///
/// # Safety
/// `config` must be NULL or a config made by the library and not yet freed; no other thread may
/// use it during the call, unless it is a layer's (read-only) config.
#[no_mangle]
pub unsafe extern "C" fn moe_config_set_top_k(config: *mut moe_config, top_k: i64) -> moe_status {
    set(config, |c| {
        check_size("top_k", top_k)?;
        c.top_k = Some(top_k);
        Ok(())
    })
}

/// Sets H, the hidden size (≥ 1).
///
/// # Safety
/// `config` must be NULL or a config made by the library and not yet freed; no other thread may
/// use it during the call, unless it is a layer's (read-only) config.
#[no_mangle]
pub unsafe extern "C" fn moe_config_set_hidden_size(
    config: *mut moe_config,
    hidden_size: i64,
) -> moe_status {
    set(config, |c| {
        check_size("hidden_size", hidden_size)?;
        c.hidden_size = Some(hidden_size);
        Ok(())
    })
}

/// Sets I, the intermediate size of one expert (per tensor-parallel shard, ≥ 1).
///
/// # Safety
/// `config` must be NULL or a config made by the library and not yet freed; no other thread may
/// use it during the call, unless it is a layer's (read-only) config.
#[no_mangle]
pub unsafe extern "C" fn moe_config_set_intermediate_size(
    config: *mut moe_config,
    intermediate_size: i64,
) -> moe_status {
    set(config, |c| {
        check_size("intermediate_size", intermediate_size)?;
        c.intermediate_size = Some(intermediate_size);
        Ok(())
    })
}

/// Sets the layer dtype: {MOE_DTYPE_CODE_FLOAT, 32, 1} f32, {MOE_DTYPE_CODE_FLOAT, 16, 1}
/// f16 or {MOE_DTYPE_CODE_BFLOAT, 16, 1} bf16.
///
/// # Safety
/// `config` must be NULL or a config made by the library and not yet freed; no other thread may
/// use it during the call, unless it is a layer's (read-only) config.
#[no_mangle]
pub unsafe extern "C" fn moe_config_set_dtype(
    config: *mut moe_config,
    dtype: moe_dtype,
) -> moe_status {
    set(config, |c| {
        let e = ElemType::new(dtype.code, dtype.bits);
        let d = e.as_dtype().filter(|_| dtype.lanes == 1).ok_or_else(|| {
            invalid!(
                "dtype: {} with {} lanes, expected f32, f16 or bf16 with 1 lane",
                e.name(),
                dtype.lanes
            )
        })?;
        c.dtype = Some(d);
        Ok(())
    })
}

/// Sets the activation: one of MOE_ACTIVATION_*. Whether it fits `gated` is checked by
/// moe_layer_create.
///
/// # Safety
/// `config` must be NULL or a config made by the library and not yet freed; no other thread may
/// use it during the call, unless it is a layer's (read-only) config.
#[no_mangle]
pub unsafe extern "C" fn moe_config_set_activation(
    config: *mut moe_config,
    activation: u32,
) -> moe_status {
    set(config, |c| {
        c.activation = activation_from(activation)?;
        Ok(())
    })
}

/// Sets whether w13 holds gate and up (true, N1 = 2I; the default) or one projection (N1 = I).
///
/// # Safety
/// `config` must be NULL or a config made by the library and not yet freed; no other thread may
/// use it during the call, unless it is a layer's (read-only) config.
#[no_mangle]
pub unsafe extern "C" fn moe_config_set_gated(config: *mut moe_config, gated: bool) -> moe_status {
    set(config, |c| {
        c.gated = gated;
        Ok(())
    })
}

/// Sets the gate/up layout of gated w13: MOE_GATE_UP_HALVES or MOE_GATE_UP_INTERLEAVED.
///
/// # Safety
/// `config` must be NULL or a config made by the library and not yet freed; no other thread may
/// use it during the call, unless it is a layer's (read-only) config.
#[no_mangle]
pub unsafe extern "C" fn moe_config_set_gate_up_layout(
    config: *mut moe_config,
    layout: u32,
) -> moe_status {
    set(config, |c| {
        c.gate_up_layout = match layout {
            MOE_GATE_UP_HALVES => GateUpLayout::Halves,
            MOE_GATE_UP_INTERLEAVED => GateUpLayout::Interleaved,
            v => {
                return Err(invalid!(
                    "layout: {v} is not a MOE_GATE_UP_* value (0 or 1)"
                ))
            }
        };
        Ok(())
    })
}

/// Sets alpha of swiglu_oai (gpt-oss: 1.702); finite. Other activations refuse it.
///
/// # Safety
/// `config` must be NULL or a config made by the library and not yet freed; no other thread may
/// use it during the call, unless it is a layer's (read-only) config.
#[no_mangle]
pub unsafe extern "C" fn moe_config_set_gemm1_alpha(
    config: *mut moe_config,
    alpha: f32,
) -> moe_status {
    set(config, |c| {
        check_finite("alpha", alpha)?;
        c.gemm1_alpha = Some(alpha);
        Ok(())
    })
}

/// Sets the clamp limit L of swiglu_oai, silu_clamp and silu_preclamp; finite, ≥ 0.
///
/// # Safety
/// `config` must be NULL or a config made by the library and not yet freed; no other thread may
/// use it during the call, unless it is a layer's (read-only) config.
#[no_mangle]
pub unsafe extern "C" fn moe_config_set_gemm1_limit(
    config: *mut moe_config,
    limit: f32,
) -> moe_status {
    set(config, |c| {
        check_finite("limit", limit)?;
        ensure!(limit >= 0.0, "limit: {limit} is negative");
        c.gemm1_limit = Some(limit);
        Ok(())
    })
}

/// Sets the routed scaling factor applied once to the fp32 sum over k (default 1); finite.
///
/// # Safety
/// `config` must be NULL or a config made by the library and not yet freed; no other thread may
/// use it during the call, unless it is a layer's (read-only) config.
#[no_mangle]
pub unsafe extern "C" fn moe_config_set_routed_scaling_factor(
    config: *mut moe_config,
    factor: f32,
) -> moe_status {
    set(config, |c| {
        check_finite("factor", factor)?;
        c.routed_scaling_factor = factor;
        Ok(())
    })
}

/// Sets whether the router weight multiplies GEMM1's output (after its bias) instead of
/// GEMM2's.
///
/// # Safety
/// `config` must be NULL or a config made by the library and not yet freed; no other thread may
/// use it during the call, unless it is a layer's (read-only) config.
#[no_mangle]
pub unsafe extern "C" fn moe_config_set_apply_router_weight_on_input(
    config: *mut moe_config,
    enabled: bool,
) -> moe_status {
    set(config, |c| {
        c.apply_router_weight_on_input = enabled;
        Ok(())
    })
}

/// Sets no_combine: out is [M, K, H], one row per route, without router weight and scaling.
///
/// # Safety
/// `config` must be NULL or a config made by the library and not yet freed; no other thread may
/// use it during the call, unless it is a layer's (read-only) config.
#[no_mangle]
pub unsafe extern "C" fn moe_config_set_no_combine(
    config: *mut moe_config,
    enabled: bool,
) -> moe_status {
    set(config, |c| {
        c.no_combine = enabled;
        Ok(())
    })
}

/// With no_combine, multiplies each route's row by its router weight.
///
/// # Safety
/// `config` must be NULL or a config made by the library and not yet freed; no other thread may
/// use it during the call, unless it is a layer's (read-only) config.
#[no_mangle]
pub unsafe extern "C" fn moe_config_set_no_combine_keep_router_weight(
    config: *mut moe_config,
    enabled: bool,
) -> moe_status {
    set(config, |c| {
        c.no_combine_keep_router_weight = enabled;
        Ok(())
    })
}

/// Sets inplace: the result is written into hidden (out must then be NULL or hidden).
///
/// # Safety
/// `config` must be NULL or a config made by the library and not yet freed; no other thread may
/// use it during the call, unless it is a layer's (read-only) config.
#[no_mangle]
pub unsafe extern "C" fn moe_config_set_inplace(
    config: *mut moe_config,
    enabled: bool,
) -> moe_status {
    set(config, |c| {
        c.inplace = enabled;
        Ok(())
    })
}

/// Sets where the layer runs: {MOE_DEVICE_CPU, 0} (default) or {MOE_DEVICE_CUDA, ordinal}.
///
/// # Safety
/// `config` must be NULL or a config made by the library and not yet freed; no other thread may
/// use it during the call, unless it is a layer's (read-only) config.
#[no_mangle]
pub unsafe extern "C" fn moe_config_set_device(
    config: *mut moe_config,
    device: moe_device,
) -> moe_status {
    set(config, |c| {
        c.device = check_device("device", device)?;
        Ok(())
    })
}

/// Sets a backend option (SPEC §8), e.g. ("tile.block_m", "64"), ("cpu.num_threads", "8").
/// Unknown keys and bad values are refused, naming the key; moe_supports("option:<key>")
/// probes a key. Setting a key again replaces its value.
///
/// # Safety
/// `config` must be NULL or a config made by the library and not yet freed; no other thread may
/// use it during the call, unless it is a layer's (read-only) config. `key` and `value` must
/// each be NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn moe_config_set_option(
    config: *mut moe_config,
    key: *const c_char,
    value: *const c_char,
) -> moe_status {
    set(config, |c| {
        let key = str_arg(key, "key")?;
        let value = str_arg(value, "value")?;
        c.options.set(key, value)
    })
}

/// Reads a backend option's value as a NUL-terminated string into `buf` (`buf_size` bytes)
/// and its length without the NUL into `*len`. With `buf` NULL and `buf_size` 0 only `*len`
/// is written (to size a buffer). A key that is not set, or a buffer too small for the value
/// and its NUL, is INVALID_ARGUMENT, and then nothing is written, `*len` included.
///
/// # Safety
/// `config` must be NULL or a config made by the library and not yet freed, not being changed
/// by another thread; `key` must be NULL or a NUL-terminated string; `buf` must be NULL or hold
/// `buf_size` writable bytes; `len` must be NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn moe_config_get_option(
    config: *const moe_config,
    key: *const c_char,
    buf: *mut c_char,
    buf_size: usize,
    len: *mut usize,
) -> moe_status {
    guard(|| {
        let h = handle_ref(config, "config")?;
        let key = str_arg(key, "key")?;
        ensure!(
            !buf.is_null() || buf_size == 0,
            "buf: NULL with buf_size {buf_size}"
        );
        let len = out_arg(len, "len")?;
        let value = h
            .config
            .options
            .get(key)
            .ok_or_else(|| invalid!("key: option \"{key}\" is not set"))?;
        if !buf.is_null() {
            ensure!(
                buf_size > value.len(),
                "buf_size: {buf_size} bytes, the value of \"{key}\" needs {}",
                value.len() + 1
            );
            std::ptr::copy_nonoverlapping(value.as_ptr(), buf as *mut u8, value.len());
            *buf.add(value.len()) = 0;
        }
        *len = value.len();
        Ok(())
    })
}

/// Reads E_g (INVALID_ARGUMENT when it was never set). Thread-safe, as every getter, also on
/// a layer's config.
///
/// # Safety
/// `config` must be NULL or a config made by the library and not yet freed, not being changed
/// by another thread; `out` must be NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn moe_config_get_num_experts(
    config: *const moe_config,
    out: *mut i64,
) -> moe_status {
    get(config, out, |c| size_set(c.num_experts, "num_experts"))
}

/// Reads E (local experts); E_g when it was not set.
///
/// # Safety
/// `config` must be NULL or a config made by the library and not yet freed, not being changed
/// by another thread; `out` must be NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn moe_config_get_num_local_experts(
    config: *const moe_config,
    out: *mut i64,
) -> moe_status {
    get(config, out, |c| {
        c.num_local_experts
            .map_or_else(|| size_set(c.num_experts, "num_experts"), Ok)
    })
}

/// Reads K (INVALID_ARGUMENT when it was never set).
///
/// # Safety
/// `config` must be NULL or a config made by the library and not yet freed, not being changed
/// by another thread; `out` must be NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn moe_config_get_top_k(
    config: *const moe_config,
    out: *mut i64,
) -> moe_status {
    get(config, out, |c| size_set(c.top_k, "top_k"))
}

/// Reads H (INVALID_ARGUMENT when it was never set).
///
/// # Safety
/// `config` must be NULL or a config made by the library and not yet freed, not being changed
/// by another thread; `out` must be NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn moe_config_get_hidden_size(
    config: *const moe_config,
    out: *mut i64,
) -> moe_status {
    get(config, out, |c| size_set(c.hidden_size, "hidden_size"))
}

/// Reads I (INVALID_ARGUMENT when it was never set).
///
/// # Safety
/// `config` must be NULL or a config made by the library and not yet freed, not being changed
/// by another thread; `out` must be NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn moe_config_get_intermediate_size(
    config: *const moe_config,
    out: *mut i64,
) -> moe_status {
    get(config, out, |c| {
        size_set(c.intermediate_size, "intermediate_size")
    })
}

/// Reads the layer dtype (INVALID_ARGUMENT when not set).
///
/// # Safety
/// `config` must be NULL or a config made by the library and not yet freed, not being changed
/// by another thread; `out` must be NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn moe_config_get_dtype(
    config: *const moe_config,
    out: *mut moe_dtype,
) -> moe_status {
    get(config, out, |c| {
        let d = c
            .dtype
            .ok_or_else(|| invalid!("config: dtype is not set"))?;
        let e = d.elem();
        Ok(moe_dtype {
            code: e.code,
            bits: e.bits,
            lanes: 1,
        })
    })
}

/// Reads the activation (a MOE_ACTIVATION_* value).
///
/// # Safety
/// `config` must be NULL or a config made by the library and not yet freed, not being changed
/// by another thread; `out` must be NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn moe_config_get_activation(
    config: *const moe_config,
    out: *mut u32,
) -> moe_status {
    get(config, out, |c| Ok(activation_code(c.activation)))
}

/// Reads gated.
///
/// # Safety
/// `config` must be NULL or a config made by the library and not yet freed, not being changed
/// by another thread; `out` must be NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn moe_config_get_gated(
    config: *const moe_config,
    out: *mut bool,
) -> moe_status {
    get(config, out, |c| Ok(c.gated))
}

/// Reads the gate/up layout (a MOE_GATE_UP_* value).
///
/// # Safety
/// `config` must be NULL or a config made by the library and not yet freed, not being changed
/// by another thread; `out` must be NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn moe_config_get_gate_up_layout(
    config: *const moe_config,
    out: *mut u32,
) -> moe_status {
    get(config, out, |c| {
        Ok(match c.gate_up_layout {
            GateUpLayout::Halves => MOE_GATE_UP_HALVES,
            GateUpLayout::Interleaved => MOE_GATE_UP_INTERLEAVED,
        })
    })
}

/// Reads alpha: `*is_set` says whether it was set; `*out` is its value (0 when unset).
///
/// # Safety
/// `config` must be NULL or a config made by the library and not yet freed, not being changed
/// by another thread; `is_set` and `out` must each be NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn moe_config_get_gemm1_alpha(
    config: *const moe_config,
    is_set: *mut bool,
    out: *mut f32,
) -> moe_status {
    guard(|| {
        let h = handle_ref(config, "config")?;
        let is_set = out_arg(is_set, "is_set")?;
        let out = out_arg(out, "out")?;
        *is_set = h.config.gemm1_alpha.is_some();
        *out = h.config.gemm1_alpha.unwrap_or(0.0);
        Ok(())
    })
}

/// Reads the limit: `*is_set` says whether it was set; `*out` is its value (0 when unset).
///
/// # Safety
/// `config` must be NULL or a config made by the library and not yet freed, not being changed
/// by another thread; `is_set` and `out` must each be NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn moe_config_get_gemm1_limit(
    config: *const moe_config,
    is_set: *mut bool,
    out: *mut f32,
) -> moe_status {
    guard(|| {
        let h = handle_ref(config, "config")?;
        let is_set = out_arg(is_set, "is_set")?;
        let out = out_arg(out, "out")?;
        *is_set = h.config.gemm1_limit.is_some();
        *out = h.config.gemm1_limit.unwrap_or(0.0);
        Ok(())
    })
}

/// Reads the routed scaling factor.
///
/// # Safety
/// `config` must be NULL or a config made by the library and not yet freed, not being changed
/// by another thread; `out` must be NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn moe_config_get_routed_scaling_factor(
    config: *const moe_config,
    out: *mut f32,
) -> moe_status {
    get(config, out, |c| Ok(c.routed_scaling_factor))
}

/// Reads apply_router_weight_on_input.
///
/// # Safety
/// `config` must be NULL or a config made by the library and not yet freed, not being changed
/// by another thread; `out` must be NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn moe_config_get_apply_router_weight_on_input(
    config: *const moe_config,
    out: *mut bool,
) -> moe_status {
    get(config, out, |c| Ok(c.apply_router_weight_on_input))
}

/// Reads no_combine.
///
/// # Safety
/// `config` must be NULL or a config made by the library and not yet freed, not being changed
/// by another thread; `out` must be NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn moe_config_get_no_combine(
    config: *const moe_config,
    out: *mut bool,
) -> moe_status {
    get(config, out, |c| Ok(c.no_combine))
}

/// Reads no_combine_keep_router_weight.
///
/// # Safety
/// `config` must be NULL or a config made by the library and not yet freed, not being changed
/// by another thread; `out` must be NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn moe_config_get_no_combine_keep_router_weight(
    config: *const moe_config,
    out: *mut bool,
) -> moe_status {
    get(config, out, |c| Ok(c.no_combine_keep_router_weight))
}

/// Reads inplace.
///
/// # Safety
/// `config` must be NULL or a config made by the library and not yet freed, not being changed
/// by another thread; `out` must be NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn moe_config_get_inplace(
    config: *const moe_config,
    out: *mut bool,
) -> moe_status {
    get(config, out, |c| Ok(c.inplace))
}

/// Reads the device.
///
/// # Safety
/// `config` must be NULL or a config made by the library and not yet freed, not being changed
/// by another thread; `out` must be NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn moe_config_get_device(
    config: *const moe_config,
    out: *mut moe_device,
) -> moe_status {
    get(config, out, |c| {
        Ok(match c.device.kind {
            DeviceKind::Cpu => moe_device {
                device_type: MOE_DEVICE_CPU,
                device_id: 0,
            },
            DeviceKind::Cuda => moe_device {
                device_type: MOE_DEVICE_CUDA,
                device_id: c.device.id,
            },
        })
    })
}
