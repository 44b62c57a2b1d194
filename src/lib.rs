//! fusedmoe: mixture-of-experts layers behind a C ABI (see include/fusedmoe.h).
//!
//! Layers, top to bottom: `ffi` (the C ABI) → the core (config, layer, plan, align, tiles,
//! activation) → `backend` (CPU today). The semantics are ../shared/SPEC.md's.

mod error;

pub mod activation;
pub mod align;
mod backend;
pub mod config;
pub mod dispatch;
pub mod dtype;
pub mod ffi;
pub mod layer;
pub mod lora;
pub mod options;
pub mod plan;
pub mod tensor;
pub mod tiles;
pub mod workspace;

pub use error::{Error, ErrorKind, Result};
