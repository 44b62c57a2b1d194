//! A CUDA layer on a machine that cannot run one fails with MOE_ERR_DEVICE naming what is
//! missing (DESIGN §4); FUSEDMOE_NVRTC_PATH is honoured and a bad one is named. Its own test
//! binary: the probe runs once per process, after this test sets the variable.

mod common;
use common::*;
use fusedmoe::ffi::*;
use std::ptr::{null, null_mut};

#[test]
fn a_cuda_layer_names_the_missing_library_or_is_unsupported() {
    std::env::set_var("FUSEDMOE_NVRTC_PATH", "/nonexistent/libnvrtc.so.13");
    let c = Case::default();
    let config = c.config();
    let cuda0 = moe_device {
        device_type: MOE_DEVICE_CUDA,
        device_id: 0,
    };
    let (mut w13, mut w2) = (
        HostTensor::zeros(Dt::Bf16, &[8, 48, 40]),
        HostTensor::zeros(Dt::Bf16, &[8, 40, 24]),
    );
    w13.device = cuda0;
    w2.device = cuda0;
    let (w13, w2) = (w13.raw(), w2.raw());
    let mut layer = null_mut();
    unsafe {
        ok(moe_config_set_device(config, cuda0), "device");
        let status = moe_layer_create(config, &w13, &w2, null(), null(), &mut layer);
        let message = last_error();
        // the named NVRTC cannot load anywhere: the error says so, and names the variable
        assert_eq!(status, moe_status::MOE_ERR_DEVICE, "{message}");
        assert!(message.starts_with("device: cuda:0: "), "{message}");
        assert!(
            message.contains("FUSEDMOE_NVRTC_PATH=/nonexistent/libnvrtc.so.13: cannot load it"),
            "{message}"
        );
        // the driver library wherever the loader finds it (GPU machines keep it in many places)
        let driver_here = !libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_NOW).is_null();
        if !driver_here {
            assert!(
                message.contains("libcuda.so (the NVIDIA driver library) was not found"),
                "{message}"
            );
        }
        assert!(layer.is_null());
        assert!(!moe_supports(c"cuda".as_ptr()));
        moe_config_free(config);
    }
}
