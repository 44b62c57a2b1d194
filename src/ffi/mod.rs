//! The C ABI: `extern "C"` entry points, opaque handles, statuses and the last error. No MoE
//! logic lives here: arguments are checked and turned into core types, then the core runs.
#![allow(non_camel_case_types)]

pub mod config;
pub mod dispatch;
pub mod handles;
pub mod info;
pub mod layer;
pub mod lora;
pub mod run;
pub mod status;
pub mod tensor;

pub use config::*;
pub use dispatch::*;
pub use handles::{moe_config, moe_dispatcher, moe_layer, moe_lora, moe_plan};
pub use info::*;
pub use layer::*;
pub use lora::*;
pub use run::*;
pub use status::moe_status;
pub use tensor::{moe_device, moe_dtype, moe_tensor, MOE_DEVICE_CPU, MOE_DEVICE_CUDA};
pub use tensor::{
    MOE_DTYPE_CODE_BFLOAT, MOE_DTYPE_CODE_FLOAT, MOE_DTYPE_CODE_INT, MOE_DTYPE_CODE_UINT,
};
