//! Counters in pinned host memory that kernels write through its device mapping: the device
//! reports errors (ids out of range) without the hot path ever copying or synchronizing; the
//! host reads them at the next call. One slot per writing block, each written by one thread
//! with a plain store: atomics on host memory are not portable across PCIe hosts.
//!
//! The host never writes a slot after creation: it remembers what it has reported and takes
//! the difference. A reset by the host could interleave with a kernel's read-modify-write of
//! the slot and lose or double a count.

use super::device::{driver_error, DeviceState};
use crate::error::Result;
use cudarc::driver::sys;
use std::sync::{Arc, Mutex};

pub struct Counter {
    host: *mut u32,
    device: u64,
    /// One entry per slot.
    reported: Reported,
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
                device,
                reported: Reported::new(slots),
                _dev: dev.clone(),
            })
        }
    }

    pub fn device_ptr(&self) -> u64 {
        self.device
    }

    /// The count since the last take, over every slot.
    pub fn take(&self) -> u64 {
        // SAFETY: `host` holds `slots` counters for as long as self lives
        self.reported
            .take(|i| unsafe { self.host.add(i).read_volatile() })
    }
}

/// What the host has reported of each slot so far (wrapping, as the device's counts do).
struct Reported(Mutex<Vec<u32>>);

impl Reported {
    fn new(slots: usize) -> Reported {
        Reported(Mutex::new(vec![0; slots]))
    }

    /// The growth of every slot since the last take; `current(i)` reads slot i. Under the
    /// lock, so two threads taking at once report each count once.
    fn take(&self, current: impl Fn(usize) -> u32) -> u64 {
        let mut seen = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut total = 0u64;
        for (i, seen) in seen.iter_mut().enumerate() {
            let now = current(i);
            total += now.wrapping_sub(*seen) as u64;
            *seen = now;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    #[test]
    fn each_count_is_reported_once_and_counts_may_wrap() {
        let slots = RefCell::new(vec![0u32; 3]);
        let reported = Reported::new(3);
        let take = || reported.take(|i| slots.borrow()[i]);
        assert_eq!(take(), 0);
        slots.borrow_mut()[0] += 2;
        slots.borrow_mut()[2] += 5;
        assert_eq!(take(), 7);
        assert_eq!(take(), 0, "nothing new");
        slots.borrow_mut()[1] = u32::MAX;
        assert_eq!(take(), u32::MAX as u64);
        let wrapped = slots.borrow()[1].wrapping_add(3);
        slots.borrow_mut()[1] = wrapped;
        assert_eq!(take(), 3, "past u32::MAX the slot wraps");
    }
}
