//! The backends execute a validated plan. One trait keeps the CPU reference and the CUDA
//! path to the same steps; neither re-validates user input.

pub mod cpu;
pub mod cuda;

use crate::config::Validated;
use crate::error::{unsupported, Result};
use crate::layer::{Layer, Weights};
use crate::lora::LoraBatch;
use crate::options::Options;
use crate::plan::{Prepared, RunIo};
use crate::tensor::{Device, DeviceKind, Tensor};
use crate::tiles::{GpuTraits, TileConfig};
use crate::workspace::Layout;

/// What a backend keeps per layer beyond the core's fields.
pub enum LayerState {
    Cpu,
    Cuda(cuda::CudaLayer),
}

pub trait Backend: Send + Sync {
    /// The backend's per-layer state, made at layer creation.
    fn layer_state(
        &self,
        v: &Validated,
        weights: &Weights,
        options: &Options,
    ) -> Result<LayerState>;

    /// Bytes of scratch a run of `numel` routes needs after the align arrays, whose sorted
    /// route list holds `capacity` slots.
    fn scratch_bytes(&self, v: &Validated, numel: usize, capacity: usize) -> usize;

    /// Errors the device found in earlier work of this layer (ids out of range on CUDA);
    /// reporting them clears them. Called first by every moe_prepare and moe_run.
    fn take_device_errors(&self, _layer: &Layer) -> Result<()> {
        Ok(())
    }

    /// A LoRA wrapper of `num_slots` slots is being made over `layer` (moe_lora_create):
    /// refuses what this backend cannot run and readies what its LoRA runs need.
    fn attach_lora(&self, _layer: &Layer, _num_slots: usize) -> Result<()> {
        Ok(())
    }

    /// Compiles and loads everything batches of up to `max_tokens` tokens need.
    fn warmup(&self, _layer: &Layer, _max_tokens: usize) -> Result<()> {
        Ok(())
    }

    /// The align step (SPEC §4) into the workspace; checks ids where the device allows.
    /// Returns num_padded where it is known on the host (the CPU), else 0.
    #[allow(clippy::too_many_arguments)]
    fn prepare(
        &self,
        layer: &Layer,
        ids: &Tensor,
        ws: *mut u8,
        layout: &Layout,
        tile: TileConfig,
        stream: usize,
    ) -> Result<usize>;

    /// GEMM1, activation, GEMM2 and combine for a prepared, non-empty batch.
    fn run(&self, layer: &Layer, p: &Prepared, io: &RunIo, stream: usize) -> Result<()>;

    /// `run` with the LoRA deltas of SPEC §7 added (moe_run_lora); the batch is checked.
    fn run_lora(
        &self,
        _layer: &Layer,
        _p: &Prepared,
        _io: &RunIo,
        _lora: &LoraBatch,
        _stream: usize,
    ) -> Result<()> {
        Err(unsupported!("lora: this backend has no LoRA kernels yet"))
    }

    /// Copies `len` int32 values at `src` (memory of this backend's device) to the host.
    /// On CUDA this waits for the device: the host synchronizes its stream first.
    fn read_i32s(&self, layer: &Layer, src: *const u8, len: usize) -> Result<Vec<i32>>;
}

/// The backend that runs layers on `device`.
pub fn for_device(device: Device) -> Result<&'static dyn Backend> {
    match device.kind {
        DeviceKind::Cpu => Ok(&cpu::CpuBackend),
        DeviceKind::Cuda => cuda::backend(device),
    }
}

/// The device name tile tables are keyed by: "cpu", or the GPU's name as the driver reports
/// it ("NVIDIA H100 80GB HBM3"), so that a table tuned on one model of GPU is used on every
/// GPU of that model; for a GPU, also the traits a stand-in table must share (tiles.rs).
/// Callers have made the backend for `device` first.
pub fn device_identity(device: Device) -> Result<(String, Option<GpuTraits>)> {
    match device.kind {
        DeviceKind::Cpu => Ok(("cpu".to_string(), None)),
        DeviceKind::Cuda => cuda::device_identity(device.id as usize).map(|(n, t)| (n, Some(t))),
    }
}
