//! Version, status strings, the last error, and the capability probe.

use super::status::{guard_value, last_error_ptr, moe_status};
use crate::activation::Activation;
use crate::options;
use once_cell::sync::Lazy;
use std::collections::HashSet;
use std::ffi::{c_char, CStr};

/// The ABI version this header describes; moe_abi_version() returns the library's.
pub const MOE_ABI_VERSION: u32 = 1;

/// The library's ABI version. A host compares it with MOE_ABI_VERSION from the header it was
/// compiled with and refuses to run on a mismatch. Thread-safe; never fails.
#[no_mangle]
pub extern "C" fn moe_abi_version() -> u32 {
    MOE_ABI_VERSION
}

/// The library's version as a static NUL-terminated string ("0.1.0"); never NULL, never
/// freed by the caller. Thread-safe.
#[no_mangle]
pub extern "C" fn moe_version() -> *const c_char {
    static VERSION: &CStr =
        match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
            Ok(v) => v,
            Err(_) => c"unknown",
        };
    VERSION.as_ptr()
}

/// A static description of a status ("invalid argument"); "unknown status" for values this
/// library does not define. Never NULL; not freed by the caller. Thread-safe.
#[no_mangle]
pub extern "C" fn moe_status_string(status: u32) -> *const c_char {
    guard_value(c"internal error".as_ptr(), || {
        use moe_status::*;
        let s = [
            MOE_OK,
            MOE_ERR_INVALID_ARGUMENT,
            MOE_ERR_UNSUPPORTED,
            MOE_ERR_DEVICE,
            MOE_ERR_OUT_OF_MEMORY,
            MOE_ERR_INTERNAL,
        ]
        .into_iter()
        .find(|s| *s as u32 == status);
        s.map_or(c"unknown status".as_ptr(), |s| s.describe().as_ptr())
    })
}

/// The message of the last failed call on this thread (empty if none failed yet). Never NULL;
/// owned by the library and valid until the next failed call on the same thread: copy it
/// before calling again.
#[no_mangle]
pub extern "C" fn moe_last_error() -> *const c_char {
    guard_value(c"".as_ptr(), last_error_ptr)
}

static FEATURES: Lazy<HashSet<String>> = Lazy::new(|| {
    let mut f: HashSet<String> = [
        "cpu",
        "f32",
        "f16",
        "bf16",
        "int64_ids",
        "bias",
        "no_combine",
        "inplace",
    ]
    .into_iter()
    .chain([
        "router_weight_on_input",
        "interleaved",
        "tile_table",
        "dispatch",
    ])
    .map(String::from)
    .collect();
    f.extend(Activation::ALL.iter().map(|a| a.name().to_string()));
    // LoRA (moe_run_lora) runs on CPU and CUDA layers.
    f.insert("lora".to_string());
    // Every feature above runs on CUDA too, where CUDA runs at all.
    if crate::backend::cuda::available() {
        f.insert("cuda".to_string());
    }
    f
});

/// Whether this build, on this machine, can run `feature` (true) or not (false, also for
/// names it does not know). Features: "cpu", "cuda", "f32", "f16", "bf16", "int64_ids",
/// "bias", "no_combine", "inplace", "router_weight_on_input", "interleaved", "tile_table",
/// "lora", "dispatch", each activation by name ("silu", "swiglu_oai", ...), quantization modes
/// ("fp8_w8a8_block", ...), and "option:<key>" for a backend option key. The answer is
/// computed once. `feature` may be NULL (answer: false). Thread-safe.
///
/// # Safety
/// `feature`, if not NULL, must be a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn moe_supports(feature: *const c_char) -> bool {
    guard_value(false, || {
        if feature.is_null() {
            return false;
        }
        let Ok(name) = CStr::from_ptr(feature).to_str() else {
            return false;
        };
        match name.strip_prefix("option:") {
            Some(key) => options::is_known(key),
            None => FEATURES.contains(name),
        }
    })
}
