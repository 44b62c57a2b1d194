//! Whether CUDA can run here, found out once: the driver library, NVRTC, and a device.
//! cudarc panics when a library it needs is missing, so nothing calls into it before this
//! probe says the library is there.

use once_cell::sync::Lazy;
use std::ffi::CString;

/// Names a library by full path for NVRTC, loaded before cudarc looks for libnvrtc.so.13.
pub const ENV_NVRTC_PATH: &str = "FUSEDMOE_NVRTC_PATH";

/// What the probe found; an Err holds a message naming the missing piece and how to add it.
#[derive(Debug)]
pub struct Availability {
    pub driver: Result<(), String>,
    pub nvrtc: Result<(), String>,
    pub devices: Result<i32, String>,
}

impl Availability {
    /// Every missing piece, joined, as the message of a MOE_ERR_DEVICE; None when all is there.
    pub fn missing(&self) -> Option<String> {
        let errors: Vec<&str> = [
            self.driver.as_ref().err(),
            self.nvrtc.as_ref().err(),
            self.devices.as_ref().err(),
        ]
        .into_iter()
        .flatten()
        .map(String::as_str)
        .collect();
        (!errors.is_empty()).then(|| errors.join("; "))
    }
}

pub static AVAILABILITY: Lazy<Availability> = Lazy::new(probe);

fn probe() -> Availability {
    let driver = if unsafe { cudarc::driver::sys::is_culib_present() } {
        Ok(())
    } else {
        Err("libcuda.so (the NVIDIA driver library) was not found: install the NVIDIA driver or add the folder holding libcuda.so.1 to LD_LIBRARY_PATH".to_string())
    };
    let nvrtc = preload_nvrtc().and_then(|()| {
        if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            Ok(())
        } else {
            Err(format!(
                "libnvrtc.so.13 (NVIDIA's runtime compiler) was not found: `pip install nvidia-cuda-nvrtc` (PyTorch's CUDA 13 wheels bring it too) and set {ENV_NVRTC_PATH} to the library's full path, or add its folder to LD_LIBRARY_PATH"
            ))
        }
    });
    let devices = match &driver {
        Ok(()) => count_devices(),
        Err(_) => Ok(0),
    };
    Availability {
        driver,
        nvrtc,
        devices,
    }
}

/// dlopens FUSEDMOE_NVRTC_PATH with RTLD_GLOBAL, so that cudarc's later dlopen of the
/// soname finds the library already loaded.
fn preload_nvrtc() -> Result<(), String> {
    let Some(path) = std::env::var_os(ENV_NVRTC_PATH) else {
        return Ok(());
    };
    let c_path = CString::new(path.to_string_lossy().as_bytes())
        .map_err(|_| format!("{ENV_NVRTC_PATH}: contains a NUL byte"))?;
    let handle = unsafe { libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if handle.is_null() {
        let why = unsafe { std::ffi::CStr::from_ptr(libc::dlerror()) }
            .to_string_lossy()
            .into_owned();
        return Err(format!(
            "{ENV_NVRTC_PATH}={}: cannot load it: {why}",
            path.to_string_lossy()
        ));
    }
    Ok(())
}

fn count_devices() -> Result<i32, String> {
    cudarc::driver::result::init()
        .map_err(|e| format!("the CUDA driver failed to initialise: {e:?}"))?;
    cudarc::driver::result::device::get_count()
        .map_err(|e| format!("the CUDA driver could not count devices: {e:?}"))
}
