//! Statuses, this thread's last error message, and the panic boundary every entry point
//! runs inside (DESIGN §7).

use crate::error::{Error, ErrorKind};
use std::cell::RefCell;
use std::ffi::{c_char, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// What every fallible function returns. Values are fixed; a retired value is never reused.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum moe_status {
    /// Success.
    MOE_OK = 0,
    /// An argument is wrong: NULL, dtype, shape, device, range, aliasing, a bad option.
    MOE_ERR_INVALID_ARGUMENT = 1,
    /// Well formed, but this build or machine cannot run it (e.g. CUDA without a driver).
    MOE_ERR_UNSUPPORTED = 2,
    /// The device or its driver failed.
    MOE_ERR_DEVICE = 3,
    /// Memory or threads could not be had.
    MOE_ERR_OUT_OF_MEMORY = 4,
    /// A bug in fusedmoe (a caught panic); the message says where.
    MOE_ERR_INTERNAL = 5,
}

impl From<ErrorKind> for moe_status {
    fn from(k: ErrorKind) -> Self {
        match k {
            ErrorKind::InvalidArgument => moe_status::MOE_ERR_INVALID_ARGUMENT,
            ErrorKind::Unsupported => moe_status::MOE_ERR_UNSUPPORTED,
            ErrorKind::Device => moe_status::MOE_ERR_DEVICE,
            ErrorKind::OutOfMemory => moe_status::MOE_ERR_OUT_OF_MEMORY,
            ErrorKind::Internal => moe_status::MOE_ERR_INTERNAL,
        }
    }
}

impl moe_status {
    pub(crate) fn describe(self) -> &'static std::ffi::CStr {
        match self {
            moe_status::MOE_OK => c"ok",
            moe_status::MOE_ERR_INVALID_ARGUMENT => c"invalid argument",
            moe_status::MOE_ERR_UNSUPPORTED => c"unsupported",
            moe_status::MOE_ERR_DEVICE => c"device error",
            moe_status::MOE_ERR_OUT_OF_MEMORY => c"out of memory",
            moe_status::MOE_ERR_INTERNAL => c"internal error",
        }
    }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

pub(crate) fn set_last_error(message: &str) {
    let c = CString::new(message.replace('\0', "\\0")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// A pointer to this thread's last message, valid until the next failing call on this thread.
pub(crate) fn last_error_ptr() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_string()
    }
}

/// Runs an entry point's body: an error becomes its status and this thread's last message;
/// a panic becomes MOE_ERR_INTERNAL, never an unwind across the C boundary.
pub(crate) fn guard(body: impl FnOnce() -> Result<(), Error>) -> moe_status {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => moe_status::MOE_OK,
        Ok(Err(e)) => {
            set_last_error(&e.message);
            e.kind.into()
        }
        Err(payload) => {
            set_last_error(&format!(
                "internal error (a bug in fusedmoe): {}",
                panic_message(&*payload)
            ));
            moe_status::MOE_ERR_INTERNAL
        }
    }
}

/// For entry points that return a value instead of a status: `fallback` after a panic.
pub(crate) fn guard_value<T>(fallback: T, body: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or_else(|payload| {
        set_last_error(&format!(
            "internal error (a bug in fusedmoe): {}",
            panic_message(&*payload)
        ));
        fallback
    })
}
