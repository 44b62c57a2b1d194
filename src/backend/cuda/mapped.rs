//! A counter in pinned host memory that kernels write through its device mapping: the device
//! reports errors (ids out of range) without the hot path ever copying or synchronizing; the
//! host reads the counter at the next moe_prepare or moe_run.

use super::device::{driver_error, DeviceState};
use crate::error::Result;
use cudarc::driver::sys;
use std::sync::Arc;

pub struct Counter {
    host: *mut u32,
    device: u64,
    /// Keeps the context (and so the allocation's owner) alive.
    _dev: Arc<DeviceState>,
}

unsafe impl Send for Counter {}
unsafe impl Sync for Counter {}

fn check(r: sys::CUresult, what: &str) -> Result<()> {
    r.result().map_err(|e| driver_error(what, e))
}

impl Counter {
    pub fn new(dev: &Arc<DeviceState>) -> Result<Counter> {
        dev.ctx
            .bind_to_thread()
            .map_err(|e| driver_error("layer", e))?;
        let mut host: *mut std::ffi::c_void = std::ptr::null_mut();
        let flags = sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE;
        unsafe {
            check(
                sys::cuMemHostAlloc(&mut host, 4, flags),
                "layer: pinned host memory for the device's error counter",
            )?;
            (host as *mut u32).write_volatile(0);
            let mut device: sys::CUdeviceptr = 0;
            if let Err(e) = check(
                sys::cuMemHostGetDevicePointer_v2(&mut device, host, 0),
                "layer: mapping the error counter",
            ) {
                sys::cuMemFreeHost(host);
                return Err(e);
            }
            Ok(Counter {
                host: host as *mut u32,
                device,
                _dev: dev.clone(),
            })
        }
    }

    pub fn device_ptr(&self) -> u64 {
        self.device
    }

    /// The count so far, reset to zero.
    pub fn take(&self) -> u32 {
        unsafe {
            let n = self.host.read_volatile();
            if n != 0 {
                self.host.write_volatile(0);
            }
            n
        }
    }
}

impl Drop for Counter {
    fn drop(&mut self) {
        unsafe {
            sys::cuMemFreeHost(self.host as *mut std::ffi::c_void);
        }
    }
}
