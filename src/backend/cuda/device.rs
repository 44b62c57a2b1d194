//! One CUDA device as the backend uses it: the device's primary context (the one PyTorch and
//! the runtime API use), its architecture, and the kernels loaded into it, compiled on first
//! use (or at moe_warmup) and cached in memory and on disk.

use super::variant::Variant;
use super::{cache, compile};
use crate::error::{Error, ErrorKind, Result};
use crate::tiles::GpuTraits;
use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{CudaContext, CudaFunction, DriverError};
use once_cell::sync::{Lazy, OnceCell};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub struct DeviceState {
    pub ordinal: usize,
    pub ctx: Arc<CudaContext>,
    /// NVRTC's --gpu-architecture: sm_90a on Hopper (wgmma needs the "a"), else sm_XY.
    pub arch: String,
    pub name: String,
    /// Compute capability and multiprocessor count: what a sibling GPU's tile table must share.
    pub traits: GpuTraits,
    max_shared_optin: usize,
    nvrtc: (i32, i32),
    functions: OnceMap<CudaFunction>,
}

/// Values made once per name, however many threads ask at once: the first asker makes it,
/// the others wait for its result instead of making it again (moe_warmup loads kernel sets
/// in parallel, and they share kernels). A failure leaves the name to the next asker. The
/// map's lock is held only to find a name's cell, never while a value is made.
pub struct OnceMap<V> {
    cells: Mutex<HashMap<String, Arc<OnceCell<V>>>>,
}

impl<V: Clone> OnceMap<V> {
    pub fn new() -> OnceMap<V> {
        OnceMap {
            cells: Mutex::new(HashMap::new()),
        }
    }

    pub fn get_or_try_make<E>(
        &self,
        name: &str,
        make: impl FnOnce() -> std::result::Result<V, E>,
    ) -> std::result::Result<V, E> {
        let cell = {
            let mut cells = self.cells.lock().unwrap_or_else(|p| p.into_inner());
            cells.entry(name.to_string()).or_default().clone()
        };
        cell.get_or_try_init(make).cloned()
    }
}

/// A driver error as a DEVICE error that says what was being done.
pub fn driver_error(what: &str, e: DriverError) -> Error {
    Error::new(
        ErrorKind::Device,
        format!("{what}: CUDA driver error {e:?}"),
    )
}

static DEVICES: Lazy<Mutex<HashMap<usize, Arc<DeviceState>>>> =
    Lazy::new(|| Mutex::new(HashMap::new()));

/// The state of device `ordinal`, set up on first use. Callers have checked the probe.
pub fn device(ordinal: usize) -> Result<Arc<DeviceState>> {
    let mut devices = DEVICES.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(d) = devices.get(&ordinal) {
        return Ok(d.clone());
    }
    let what = format!("device: cuda:{ordinal}");
    let ctx = CudaContext::new(ordinal).map_err(|e| driver_error(&what, e))?;
    // Host memory is raw pointers to the kernels; cudarc's stream events would only add syncs.
    unsafe { ctx.disable_event_tracking() };
    let (major, minor) = ctx
        .compute_capability()
        .map_err(|e| driver_error(&what, e))?;
    if major < 8 {
        return Err(crate::error::unsupported!(
            "{what}: compute capability {major}.{minor}; the CUDA kernels need 8.0 or newer (mma.sync bf16, cp.async)"
        ));
    }
    let arch = if major == 9 && minor == 0 {
        "sm_90a".to_string()
    } else {
        format!("sm_{major}{minor}")
    };
    let name = ctx.name().map_err(|e| driver_error(&what, e))?;
    let max_shared_optin = ctx
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        .map_err(|e| driver_error(&what, e))? as usize;
    let sm_count = ctx
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map_err(|e| driver_error(&what, e))? as u32;
    let traits = GpuTraits {
        compute_capability: (major as u32, minor as u32),
        sm_count,
    };
    let nvrtc = unsafe { compile::version() }
        .map_err(|e| Error::new(ErrorKind::Device, format!("{what}: {e}")))?;
    let d = Arc::new(DeviceState {
        ordinal,
        ctx,
        arch,
        name,
        traits,
        max_shared_optin,
        nvrtc,
        functions: OnceMap::new(),
    });
    devices.insert(ordinal, d.clone());
    Ok(d)
}

impl DeviceState {
    /// The loaded kernel of a variant: from memory, else from the disk cache, else compiled.
    /// Compiling holds no lock that launches of loaded kernels need, and a kernel that
    /// another thread is compiling is waited for, not compiled twice.
    pub fn function(&self, v: &Variant) -> Result<CudaFunction> {
        self.functions.get_or_try_make(&v.name, || self.load(v))
    }

    fn load(&self, v: &Variant) -> Result<CudaFunction> {
        if v.shared_bytes > self.max_shared_optin {
            return Err(crate::error::unsupported!(
                "tile config: kernel {} needs {} bytes of shared memory; {} ({}) allows {} per block (lower tile.num_stages or the block sizes)",
                v.name,
                v.shared_bytes,
                self.name,
                self.arch,
                self.max_shared_optin
            ));
        }
        let file = cache::key(v, &self.arch, self.nvrtc);
        let cubin = match cache::load(&file) {
            Some(c) => c,
            None => {
                let c = unsafe { compile::compile_cubin(v.source(), &self.arch, &v.options()) }
                    .map_err(|e| {
                        Error::new(
                            ErrorKind::Internal,
                            format!("kernel {}: NVRTC failed: {e}", v.name),
                        )
                    })?;
                cache::store(&file, &c);
                c
            }
        };
        let what = format!("kernel {} on cuda:{}", v.name, self.ordinal);
        let module = self
            .ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(cubin))
            .map_err(|e| driver_error(&what, e))?;
        let f = module
            .load_function(v.entry)
            .map_err(|e| driver_error(&what, e))?;
        if v.shared_bytes > 48 * 1024 {
            f.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                v.shared_bytes as i32,
            )
            .map_err(|e| driver_error(&what, e))?;
        }
        Ok(f)
    }
}

#[cfg(test)]
mod tests {
    use super::OnceMap;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[test]
    fn a_name_asked_for_by_many_threads_at_once_is_made_once() {
        let map = OnceMap::new();
        let made = AtomicUsize::new(0);
        let got: Vec<u32> = std::thread::scope(|s| {
            let askers: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        map.get_or_try_make("kernel", || {
                            made.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(Duration::from_millis(50));
                            Ok::<u32, String>(7)
                        })
                    })
                })
                .collect();
            askers
                .into_iter()
                .map(|a| a.join().unwrap().unwrap())
                .collect()
        });
        assert_eq!(got, vec![7; 8]);
        assert_eq!(made.load(Ordering::SeqCst), 1);
        // other names are made apart
        assert_eq!(map.get_or_try_make("other", || Ok::<u32, String>(9)), Ok(9));
        assert_eq!(
            map.get_or_try_make("kernel", || Ok::<u32, String>(0)),
            Ok(7)
        );
    }

    #[test]
    fn a_failure_leaves_the_name_to_the_next_asker() {
        let map = OnceMap::new();
        assert_eq!(
            map.get_or_try_make("kernel", || Err::<u32, _>("NVRTC failed".to_string())),
            Err("NVRTC failed".to_string())
        );
        assert_eq!(
            map.get_or_try_make("kernel", || Ok::<u32, String>(3)),
            Ok(3)
        );
    }
}
