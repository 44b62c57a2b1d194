//! The CUDA backend (issue 4). Today: finding out whether CUDA can run here. Kernels, NVRTC
//! compilation and the launchers come next; until then a CUDA layer is UNSUPPORTED on a
//! machine that has CUDA, and a DEVICE error naming what is missing on one that does not.

// Compiled in CI's tests today; the launchers that load the CUBINs come next.
#[cfg_attr(not(test), allow(dead_code))]
pub mod compile;
pub mod probe;

use super::Backend;
use crate::error::{Error, ErrorKind, Result};
use crate::tensor::Device;

/// The backend for a layer on `device`, after checking the libraries and the ordinal.
pub fn backend(device: Device) -> Result<&'static dyn Backend> {
    let a = &*probe::AVAILABILITY;
    if let Some(missing) = a.missing() {
        return Err(Error::new(
            ErrorKind::Device,
            format!("device: {device}: {missing}"),
        ));
    }
    let count = *a.devices.as_ref().expect("checked by missing()");
    if device.id >= count {
        return Err(crate::error::invalid!(
            "device: {device}, but this machine has {count} CUDA device(s)"
        ));
    }
    Err(crate::error::unsupported!("device: {device}: the CUDA kernels are not in this build yet (moe_supports(\"cuda\") is false)"))
}
