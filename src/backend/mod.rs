//! The backends execute a validated plan. One trait keeps the CPU reference and the CUDA
//! path to the same steps; neither re-validates user input.

pub mod cpu;
pub mod cuda;

use crate::config::Validated;
use crate::error::Result;
use crate::layer::Layer;
use crate::plan::{Prepared, RunIo};
use crate::tensor::{Device, DeviceKind, Tensor};
use crate::tiles::TileConfig;
use crate::workspace::Layout;

pub trait Backend: Send + Sync {
    /// Bytes of scratch a run of `numel` routes needs after the align arrays.
    fn scratch_bytes(&self, v: &Validated, numel: usize) -> usize;

    /// The align step (SPEC §4) into the workspace; checks ids where the device allows.
    /// Returns num_padded where it is known on the host (the CPU), else 0.
    fn prepare(
        &self,
        layer: &Layer,
        ids: &Tensor,
        ws: *mut u8,
        layout: &Layout,
        tile: TileConfig,
    ) -> Result<usize>;

    /// GEMM1, activation, GEMM2 and combine for a prepared, non-empty batch.
    fn run(&self, layer: &Layer, p: &Prepared, io: &RunIo) -> Result<()>;
}

/// The backend that runs layers on `device`.
pub fn for_device(device: Device) -> Result<&'static dyn Backend> {
    match device.kind {
        DeviceKind::Cpu => Ok(&cpu::CpuBackend),
        DeviceKind::Cuda => cuda::backend(device),
    }
}

/// The device name tile tables are keyed by ("cpu"; the GPU's name for CUDA).
pub fn device_name(device: Device) -> String {
    match device.kind {
        DeviceKind::Cpu => "cpu".to_string(),
        DeviceKind::Cuda => format!("cuda:{}", device.id),
    }
}
