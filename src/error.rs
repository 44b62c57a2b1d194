//! The one error type of the core: a status class and a message that names the argument.

use std::fmt;

/// What kind of failure an [`Error`] is; the ABI maps each to a `moe_status` value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    InvalidArgument,
    Unsupported,
    Device,
    OutOfMemory,
    Internal,
}

/// A failure with a message that reads "hidden: dtype int64, expected bf16 like the layer".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

/// `invalid!("hidden: ...", args)`: an INVALID_ARGUMENT error with a formatted message.
macro_rules! invalid {
    ($($arg:tt)*) => {
        $crate::error::Error::new($crate::error::ErrorKind::InvalidArgument, format!($($arg)*))
    };
}

/// `unsupported!(...)`: the input is well formed but this build or machine cannot run it.
macro_rules! unsupported {
    ($($arg:tt)*) => {
        $crate::error::Error::new($crate::error::ErrorKind::Unsupported, format!($($arg)*))
    };
}

/// `ensure!(cond, "message", args)`: return INVALID_ARGUMENT unless `cond` holds.
macro_rules! ensure {
    ($cond:expr, $($arg:tt)*) => {{
        // `ensure!(x >= 0.0, ..)` must refuse a NaN too, which `!(x >= 0.0)` does
        #[allow(clippy::neg_cmp_op_on_partial_ord)]
        let failed = !$cond;
        if failed {
            return Err($crate::error::invalid!($($arg)*));
        }
    }};
}

pub(crate) use {ensure, invalid, unsupported};
