//! Counters in pinned host memory that kernels write through its device mapping: the device
//! reports errors (ids out of range) without the hot path ever copying or synchronizing; the
//! host reads them at the next call. One slot per writing block, each written by one thread
//! with a plain store: atomics on host memory are not portable across PCIe hosts.

use super::device::{driver_error, DeviceState};
use crate::error::Result;
use cudarc::driver::sys;
use std::sync::Arc;

pub struct Counter {
    host: *mut u32,
    slots: usize,
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
    /// `slots` counters, all zero.
    pub fn new(dev: &Arc<DeviceState>, slots: usize) -> Result<Counter> {
        dev.ctx
            .bind_to_thread()
            .map_err(|e| driver_error("layer", e))?;
        let mut host: *mut std::ffi::c_void = std::ptr::null_mut();
        let flags = sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE;
        unsafe {
            check(
                sys::cuMemHostAlloc(&mut host, 4 * slots, flags),
                "pinned host memory for the device's error counters",
            )?;
            for i in 0..slots {
                (host as *mut u32).add(i).write_volatile(0);
            }
            let mut device: sys::CUdeviceptr = 0;
            if let Err(e) = check(
                sys::cuMemHostGetDevicePointer_v2(&mut device, host, 0),
                "mapping the error counters",
            ) {
                sys::cuMemFreeHost(host);
                return Err(e);
            }
            Ok(Counter {
                host: host as *mut u32,
                slots,
                device,
                _dev: dev.clone(),
            })
        }
    }

    pub fn device_ptr(&self) -> u64 {
        self.device
    }

    /// The count so far over every slot, reset to zero.
    pub fn take(&self) -> u64 {
        let mut total = 0u64;
        for i in 0..self.slots {
            unsafe {
                let slot = self.host.add(i);
                let n = slot.read_volatile();
                if n != 0 {
                    slot.write_volatile(0);
                    total += n as u64;
                }
            }
        }
        total
    }
}

impl Drop for Counter {
    fn drop(&mut self) {
        unsafe {
            sys::cuMemFreeHost(self.host as *mut std::ffi::c_void);
        }
    }
}
