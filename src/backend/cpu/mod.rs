//! The native CPU backend, and the reference every other backend is tested against.
//! Stages (SPEC §2), each parallel with rayon, each writing its own workspace section:
//! gather → GEMM1 (+ b13, × on-input weight, round) → activation (round) → GEMM2 (+ b2,
//! × router weight, round) → combine (Σ_k in order, × rsf, one rounding) or no_combine rows.

mod lora;
mod panel;
mod stages;

use super::{Backend, LayerState};
use crate::config::Validated;
use crate::error::Result;
use crate::layer::{Layer, Weights};
use crate::lora::LoraBatch;
use crate::plan::{Prepared, RunIo};
use crate::tensor::Tensor;
use crate::tiles::TileConfig;
use crate::workspace::Layout;

pub struct CpuBackend;

impl Backend for CpuBackend {
    fn layer_state(
        &self,
        _v: &Validated,
        _weights: &Weights,
        _options: &crate::options::Options,
    ) -> Result<LayerState> {
        Ok(LayerState::Cpu)
    }

    /// f32 rows per kept route: x (reused for y) [H], GEMM1 out [N1], activation out [I].
    fn scratch_bytes(&self, v: &Validated, numel: usize, _capacity: usize) -> usize {
        let d = v.dims;
        numel * (d.hidden + d.n1 + d.inter) * 4
    }

    fn prepare(
        &self,
        layer: &Layer,
        ids: &Tensor,
        ws: *mut u8,
        layout: &Layout,
        tile: TileConfig,
        _stream: usize,
    ) -> Result<usize> {
        unsafe { crate::plan::align_on_host(layer, ids, ws, layout, tile.block_m as usize) }
    }

    fn run(&self, layer: &Layer, p: &Prepared, io: &RunIo, _stream: usize) -> Result<()> {
        let job = || unsafe { stages::run_all(layer, p, io, None) };
        match &layer.pool {
            Some(pool) => pool.install(job),
            None => job(),
        }
        Ok(())
    }

    fn run_lora(
        &self,
        layer: &Layer,
        p: &Prepared,
        io: &RunIo,
        lora: &LoraBatch,
        _stream: usize,
    ) -> Result<()> {
        let job = || unsafe { stages::run_all(layer, p, io, Some(lora)) };
        match &layer.pool {
            Some(pool) => pool.install(job),
            None => job(),
        }
        Ok(())
    }

    fn read_i32s(&self, _layer: &Layer, src: *const u8, len: usize) -> Result<Vec<i32>> {
        Ok(unsafe { std::slice::from_raw_parts(src as *const i32, len) }.to_vec())
    }
}
