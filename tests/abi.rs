//! The rest of the ABI surface: config getters (also through a layer's config), clone,
//! options, the capability probe, versions, status strings, the thread-local last error, and
//! free order.

mod common;
use common::*;
use fusedmoe::ffi::*;
use std::ffi::{CStr, CString};
use std::ptr::{null, null_mut};

fn s(p: *const std::ffi::c_char) -> String {
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

#[test]
fn a_layers_config_reports_every_field_the_host_set() {
    let c = Case {
        global_experts: Some(16),
        experts: 8,
        activation: MOE_ACTIVATION_SWIGLU_OAI,
        alpha: Some(1.702),
        limit: Some(7.0),
        layout: MOE_GATE_UP_INTERLEAVED,
        rsf: 2.5,
        no_combine: true,
        keep_weight: true,
        options: vec![("tile.block_m".into(), "32".into())],
        ..Case::default()
    };
    let setup = Setup::new(&c);
    let mut cfg = null();
    unsafe {
        ok(moe_layer_config(setup.layer, &mut cfg), "layer config");
        let (mut i, mut b, mut u, mut f) = (0i64, false, 0u32, 0f32);
        ok(moe_config_get_num_experts(cfg, &mut i), "E_g");
        assert_eq!(i, 16);
        ok(moe_config_get_num_local_experts(cfg, &mut i), "E");
        assert_eq!(i, 8);
        ok(moe_config_get_top_k(cfg, &mut i), "K");
        assert_eq!(i, 2);
        ok(moe_config_get_hidden_size(cfg, &mut i), "H");
        assert_eq!(i, 40);
        ok(moe_config_get_intermediate_size(cfg, &mut i), "I");
        assert_eq!(i, 24);
        let mut dt = Dt::F32.dl();
        ok(moe_config_get_dtype(cfg, &mut dt), "dtype");
        assert_eq!(dt, Dt::Bf16.dl());
        ok(moe_config_get_activation(cfg, &mut u), "act");
        assert_eq!(u, MOE_ACTIVATION_SWIGLU_OAI);
        ok(moe_config_get_gated(cfg, &mut b), "gated");
        assert!(b);
        ok(moe_config_get_gate_up_layout(cfg, &mut u), "layout");
        assert_eq!(u, MOE_GATE_UP_INTERLEAVED);
        ok(moe_config_get_gemm1_alpha(cfg, &mut b, &mut f), "alpha");
        assert!(b && f == 1.702);
        ok(moe_config_get_gemm1_limit(cfg, &mut b, &mut f), "limit");
        assert!(b && f == 7.0);
        ok(moe_config_get_routed_scaling_factor(cfg, &mut f), "rsf");
        assert_eq!(f, 2.5);
        ok(
            moe_config_get_apply_router_weight_on_input(cfg, &mut b),
            "on input",
        );
        assert!(!b);
        ok(moe_config_get_no_combine(cfg, &mut b), "nc");
        assert!(b);
        ok(
            moe_config_get_no_combine_keep_router_weight(cfg, &mut b),
            "keep",
        );
        assert!(b);
        ok(moe_config_get_inplace(cfg, &mut b), "inplace");
        assert!(!b);
        let mut d = moe_device {
            device_type: 0,
            device_id: 9,
        };
        ok(moe_config_get_device(cfg, &mut d), "device");
        assert_eq!((d.device_type, d.device_id), (MOE_DEVICE_CPU, 0));

        let key = CString::new("tile.block_m").unwrap();
        let mut len = 0usize;
        ok(
            moe_config_get_option(cfg, key.as_ptr(), null_mut(), 0, &mut len),
            "option len",
        );
        assert_eq!(len, 2);
        let mut buf = [0 as std::ffi::c_char; 8];
        ok(
            moe_config_get_option(cfg, key.as_ptr(), buf.as_mut_ptr(), buf.len(), &mut len),
            "option",
        );
        assert_eq!(s(buf.as_ptr()), "32");
        assert_eq!(
            moe_config_get_option(cfg, key.as_ptr(), buf.as_mut_ptr(), 2, &mut len),
            moe_status::MOE_ERR_INVALID_ARGUMENT
        );
        assert!(last_error().contains("buf_size: 2 bytes"));

        // the same handle every time; freeing it is refused
        let mut again = null();
        ok(moe_layer_config(setup.layer, &mut again), "again");
        assert_eq!(cfg, again);
        moe_config_free(cfg as *mut moe_config);
        assert!(last_error().contains("belongs to a layer"));
        ok(moe_config_get_top_k(cfg, &mut i), "still alive");

        // a clone is mutable and independent
        let mut clone = null_mut();
        ok(moe_config_clone(cfg, &mut clone), "clone");
        ok(moe_config_set_top_k(clone, 4), "set on clone");
        ok(moe_config_get_top_k(cfg, &mut i), "original");
        assert_eq!(i, 2);
        moe_config_free(clone);
    }
}

#[test]
fn unset_fields_are_reported_by_name() {
    let mut c = null_mut();
    let mut v = 0i64;
    unsafe {
        ok(moe_config_create(&mut c), "create");
        assert_eq!(
            moe_config_get_hidden_size(c, &mut v),
            moe_status::MOE_ERR_INVALID_ARGUMENT
        );
        assert!(last_error().contains("hidden_size is not set"));
        assert_eq!(
            moe_config_get_top_k(c, null_mut()),
            moe_status::MOE_ERR_INVALID_ARGUMENT
        );
        assert!(last_error().contains("out: NULL"));
        moe_config_free(c);
    }
}

#[test]
fn the_capability_probe_answers_for_this_build() {
    let yes = |f: &str| unsafe { moe_supports(CString::new(f).unwrap().as_ptr()) };
    for f in [
        "cpu",
        "bf16",
        "f16",
        "f32",
        "no_combine",
        "bias",
        "swiglu_oai",
        "relu2",
        "option:tile.block_m",
        "option:cpu.num_threads",
        "dispatch",
        "lora",
    ] {
        assert!(yes(f), "{f}");
    }
    // "cuda" depends on the machine: tests/cuda.rs checks it is true on a GPU machine,
    // tests/cuda_probe.rs that it is false where NVRTC cannot load.
    for f in ["fp8_w8a8_block", "option:tile.blockm", "teleport"] {
        assert!(!yes(f), "{f}");
    }
    assert!(!unsafe { moe_supports(null()) });
}

#[test]
fn versions_and_status_strings() {
    assert_eq!(moe_abi_version(), MOE_ABI_VERSION);
    assert_eq!(s(moe_version()), env!("CARGO_PKG_VERSION"));
    assert_eq!(s(moe_status_string(0)), "ok");
    assert_eq!(
        s(moe_status_string(moe_status::MOE_ERR_UNSUPPORTED as u32)),
        "unsupported"
    );
    assert_eq!(s(moe_status_string(77)), "unknown status");
}

#[test]
fn the_last_error_belongs_to_its_thread() {
    unsafe { moe_config_set_top_k(null_mut(), 1) };
    assert!(last_error().contains("config: NULL"));
    std::thread::spawn(|| {
        assert_eq!(last_error(), "");
        unsafe { moe_config_set_num_experts(null_mut(), 1) };
        assert!(last_error().contains("config: NULL"));
    })
    .join()
    .unwrap();
    assert!(last_error().contains("config: NULL"));
}

#[test]
fn handles_free_in_any_order_and_null_frees_are_no_ops() {
    unsafe {
        moe_config_free(null_mut());
        moe_layer_free(null_mut());
        moe_plan_free(null_mut());
    }
    // layer first, then plan: the plan keeps the layer's internals alive
    let mut s = Setup::new(&Case::default());
    ok(s.prepare(), "prepare");
    unsafe {
        moe_config_free(s.config);
        moe_layer_free(s.layer);
        let mut m = 0i64;
        ok(
            moe_plan_num_tokens(s.plan, &mut m),
            "plan outlives its layer",
        );
        assert_eq!(m, 7);
        moe_plan_free(s.plan);
    }
    s.config = null_mut();
    s.layer = null_mut();
    s.plan = null_mut();
}

#[test]
fn one_layer_runs_on_many_threads_at_once() {
    let c = Case {
        tokens: 16,
        seed: 77,
        ..Case::default()
    };
    let base = Setup::new(&c);
    let want = {
        let mut s = Setup::new(&c);
        ok(s.prepare(), "prepare");
        ok(s.run(), "run");
        s.output()
    };
    let layer = base.layer as usize;
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let c = c.clone();
            std::thread::spawn(move || {
                // each thread: its own plan, workspace and output over the shared layer
                let mut s = Setup::new(&c);
                let own_layer = s.layer;
                s.layer = layer as *mut moe_layer;
                let mut plan = null_mut();
                unsafe {
                    ok(moe_plan_create(s.layer, &mut plan), "plan");
                    moe_plan_free(s.plan);
                }
                s.plan = plan;
                ok(s.prepare(), "prepare");
                ok(s.run(), "run");
                let out = s.output();
                s.layer = own_layer;
                out
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), want);
    }
}

#[test]
fn an_empty_batch_may_have_null_data_everywhere() {
    let mut s = Setup::new(&Case {
        tokens: 0,
        ..Case::default()
    });
    for t in [&mut s.ids, &mut s.hidden, &mut s.router, &mut s.out] {
        t.data_override = Some(null_mut());
    }
    // NumPy 2 reports strides of 0 for every empty array: they address nothing.
    s.ids.strides = Some(vec![0, 0]);
    s.hidden.strides = Some(vec![0, 0]);
    ok(s.prepare(), "prepare an empty batch");
    ok(s.run(), "run an empty batch");
    let mut padded = -1i64;
    ok(
        unsafe { moe_plan_num_padded(s.plan, &mut padded) },
        "num_padded",
    );
    assert_eq!(padded, 0);
}

#[test]
fn a_workspace_beyond_the_address_space_is_refused() {
    // 2^24 tokens × top_k 2^24 × H 2^24: the scratch alone would be 2^74 bytes.
    let c = Case {
        top_k: 1 << 24,
        hidden: 1 << 24,
        inter: 1,
        experts: 1,
        tokens: 0,
        ..Case::default()
    };
    let config = c.config();
    let (mut w13, mut w2) = (
        HostTensor::zeros(Dt::Bf16, &[1, 2, 1 << 24]),
        HostTensor::zeros(Dt::Bf16, &[1, 1 << 24, 1]),
    );
    let (w13, w2) = (w13.raw(), w2.raw());
    let mut layer = null_mut();
    let mut bytes = 0usize;
    unsafe {
        ok(
            moe_layer_create(config, &w13, &w2, null(), null(), &mut layer),
            "layer",
        );
        assert_eq!(
            moe_workspace_size(layer, 1 << 24, &mut bytes),
            moe_status::MOE_ERR_INVALID_ARGUMENT
        );
        assert!(
            last_error().contains("beyond what this machine can address"),
            "{}",
            last_error()
        );
        ok(
            moe_workspace_size(layer, 1, &mut bytes),
            "one token still fits",
        );
        moe_layer_free(layer);
        moe_config_free(config);
    }
}

/// A plan whose workspace another plan has prepared since would run on that plan's arrays:
/// moe_run and the array getters refuse it, and preparing it again makes it valid.
#[test]
fn a_plan_whose_workspace_was_prepared_by_another_plan_is_refused() {
    let mut s = Setup::new(&Case::default());
    let mut other = null_mut();
    unsafe {
        ok(moe_plan_create(s.layer, &mut other), "moe_plan_create");
        ok(s.prepare(), "prepare A");
        let (ids, ws) = (s.ids.raw(), s.workspace.raw());
        ok(
            moe_prepare(s.layer, &ids, &ws, other, null_mut()),
            "prepare B into A's workspace",
        );
        s.out.fill_bytes(0xFF);
        let status = s.run();
        let message = last_error();
        assert_eq!(status, moe_status::MOE_ERR_INVALID_ARGUMENT, "{message}");
        assert!(
            message.starts_with("plan: its workspace was prepared by another plan"),
            "{message}"
        );
        assert!(s.out.bytes().iter().all(|&b| b == 0xFF), "nothing written");
        let mut padded = 0i64;
        assert_eq!(
            moe_plan_num_padded(s.plan, &mut padded),
            moe_status::MOE_ERR_INVALID_ARGUMENT
        );
        // B owns the workspace now; freeing it releases nothing A could use, A prepares again
        moe_plan_free(other);
        ok(s.prepare(), "prepare A again");
        ok(s.run(), "run A");
        let err = rel_err(&s.output(), &s.reference());
        assert!(err <= s.case.dt.tolerance(), "{err:e}");
    }
}
