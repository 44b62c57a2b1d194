//! moe_dispatch on CUDA: the mapping lives on the device (copied once at creation), the four
//! id-width variants are loaded at creation, and ids >= E_g are counted into host-mapped
//! memory (a slot per block) that the next moe_dispatch reports. A launch is the whole hot
//! path: up to 64 blocks striding the routes, so that M = 4096 × K = 9 ids take two or three
//! rounds of dependent loads per thread rather than 36 in one block.

use super::device::{self, driver_error, DeviceState};
use super::mapped;
use super::variant;
use crate::error::{invalid, Result};
use cudarc::driver::{CudaFunction, CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};
use std::sync::Arc;

/// Blocks of one launch (each has its own error-count slot); 256 threads each.
const MAX_BLOCKS: usize = 64;
const THREADS: usize = 256;

pub struct CudaDispatch {
    dev: Arc<DeviceState>,
    mapping: CudaSlice<i32>,
    bad_ids: mapped::Counter,
    /// Indexed by (ids int64, out int64).
    kernels: [[CudaFunction; 2]; 2],
}

impl CudaDispatch {
    pub fn new(ordinal: usize, mapping: &[i32]) -> Result<CudaDispatch> {
        let dev = device::device(ordinal)?;
        let what = "dispatcher: copying the mapping to the device";
        let stream = dev.ctx.default_stream();
        let slice = stream
            .clone_htod(mapping)
            .map_err(|e| driver_error(what, e))?;
        stream.synchronize().map_err(|e| driver_error(what, e))?;
        let load = |a, b| dev.function(&variant::dispatch(a, b));
        let kernels = [
            [load(false, false)?, load(false, true)?],
            [load(true, false)?, load(true, true)?],
        ];
        Ok(CudaDispatch {
            bad_ids: mapped::Counter::new(&dev, MAX_BLOCKS)?,
            mapping: slice,
            kernels,
            dev,
        })
    }

    /// Reports ids >= E_g an earlier launch found (then clears the count).
    pub fn take_errors(&self, global: usize) -> Result<()> {
        let bad = self.bad_ids.take();
        if bad > 0 {
            return Err(invalid!(
                "topk_ids: an earlier moe_dispatch on this dispatcher held {bad} id(s) >= {global} (num_experts); the device mapped them to -1"
            ));
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub fn launch(
        &self,
        ids: u64,
        ids_i64: bool,
        out: u64,
        out_i64: bool,
        n: usize,
        global: usize,
        stream: usize,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let stream = unsafe { self.dev.ctx.wrap_borrowed_stream(stream as _) };
        let f = &self.kernels[ids_i64 as usize][out_i64 as usize];
        let (mapping, _guard) = self.mapping.device_ptr(&stream);
        let (n, global, bad) = (n as i32, global as i32, self.bad_ids.device_ptr());
        let blocks = (n as usize).div_ceil(THREADS).min(MAX_BLOCKS);
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = stream.launch_builder(f);
        b.arg(&ids)
            .arg(&out)
            .arg(&mapping)
            .arg(&n)
            .arg(&global)
            .arg(&bad);
        unsafe { b.launch(cfg) }
            .map(|_| ())
            .map_err(|e| driver_error("moe_dispatch", e))
    }
}
