//! DESIGN §7 through the C ABI: each bad call returns the right status and a message naming
//! the argument, and writes nothing (the poisoned `out` stays poisoned, `hidden` unchanged).

mod common;
use common::*;
use fusedmoe::ffi::*;
use moe_status::*;
use std::ffi::CString;
use std::ptr::{null, null_mut};

const CUDA0: moe_device = moe_device {
    device_type: MOE_DEVICE_CUDA,
    device_id: 0,
};

struct Bad {
    name: &'static str,
    base: Case,
    status: moe_status,
    /// Text the message must contain: the argument's name and what is wrong.
    needle: &'static str,
    call: fn(&mut Setup) -> moe_status,
}

fn bad(
    name: &'static str,
    status: moe_status,
    needle: &'static str,
    call: fn(&mut Setup) -> moe_status,
) -> Bad {
    Bad {
        name,
        base: Case::default(),
        status,
        needle,
        call,
    }
}

fn with(base: Case, b: Bad) -> Bad {
    Bad { base, ..b }
}

fn set_option(s: &mut Setup, key: &str, value: &str) -> moe_status {
    let k = CString::new(key).unwrap();
    let v = CString::new(value).unwrap();
    unsafe { moe_config_set_option(s.config, k.as_ptr(), v.as_ptr()) }
}

/// moe_run after a successful prepare.
fn run_prepared(s: &mut Setup) -> moe_status {
    ok(s.prepare(), "prepare");
    s.run()
}

fn table() -> Vec<Bad> {
    let swiglu = Case::default().with_activation(MOE_ACTIVATION_SWIGLU_OAI);
    let inplace = Case {
        inplace: true,
        ..Case::default()
    };
    vec![
        // ---- layer creation: handles, weights, config rules
        bad(
            "null config",
            MOE_ERR_INVALID_ARGUMENT,
            "config: NULL",
            |s| {
                let (w13, w2) = (s.w13.raw(), s.w2.raw());
                let mut l = null_mut();
                unsafe { moe_layer_create(null(), &w13, &w2, null(), null(), &mut l) }
            },
        ),
        bad("null w13", MOE_ERR_INVALID_ARGUMENT, "w13: NULL", |s| {
            let w2 = s.w2.raw();
            let mut l = null_mut();
            unsafe { moe_layer_create(s.config, null(), &w2, null(), null(), &mut l) }
        }),
        bad(
            "null layer out",
            MOE_ERR_INVALID_ARGUMENT,
            "out: NULL",
            |s| {
                let (w13, w2) = (s.w13.raw(), s.w2.raw());
                unsafe { moe_layer_create(s.config, &w13, &w2, null(), null(), null_mut()) }
            },
        ),
        bad(
            "w13 wrong dtype",
            MOE_ERR_INVALID_ARGUMENT,
            "w13: dtype f16, expected bf16",
            |s| {
                s.w13.dtype = Dt::F16.dl();
                s.create_layer()
            },
        ),
        bad(
            "w13 wrong ndim",
            MOE_ERR_INVALID_ARGUMENT,
            "w13: ndim 2",
            |s| {
                s.w13.ndim_override = Some(2);
                s.create_layer()
            },
        ),
        bad(
            "w13 wrong experts",
            MOE_ERR_INVALID_ARGUMENT,
            "w13: shape [7, 48, 40], expected [8, 48, 40]",
            |s| {
                s.w13.shape[0] = 7;
                s.create_layer()
            },
        ),
        with(
            swiglu.clone(),
            bad(
                "swiglu_oai with odd N1",
                MOE_ERR_INVALID_ARGUMENT,
                "w13: dim 1 is 47 (odd N1)",
                |s| {
                    s.w13.shape[1] = 47;
                    s.create_layer()
                },
            ),
        ),
        bad(
            "w2 transposed",
            MOE_ERR_INVALID_ARGUMENT,
            "w2: shape [8, 24, 40], expected [8, 40, 24]",
            |s| {
                s.w2.shape.swap(1, 2);
                s.create_layer()
            },
        ),
        with(
            Case {
                b13: true,
                ..Case::default()
            },
            bad(
                "b13 wrong shape",
                MOE_ERR_INVALID_ARGUMENT,
                "b13: shape",
                |s| {
                    s.b13.as_mut().unwrap().shape[1] = 24;
                    s.create_layer()
                },
            ),
        ),
        with(
            Case {
                b2: true,
                ..Case::default()
            },
            bad(
                "b2 int32",
                MOE_ERR_INVALID_ARGUMENT,
                "b2: dtype int32, expected f32 or bf16",
                |s| {
                    s.b2.as_mut().unwrap().dtype = Dt::I32.dl();
                    s.create_layer()
                },
            ),
        ),
        bad(
            "w13 on CUDA for a CPU layer",
            MOE_ERR_INVALID_ARGUMENT,
            "w13: on cuda:0, expected cpu",
            |s| {
                s.w13.device = CUDA0;
                s.create_layer()
            },
        ),
        bad(
            "swiglu_oai without alpha",
            MOE_ERR_INVALID_ARGUMENT,
            "gemm1_alpha: activation swiglu_oai needs alpha",
            |s| {
                let c = Case {
                    alpha: None,
                    ..Case::default().with_activation(MOE_ACTIVATION_SWIGLU_OAI)
                };
                unsafe { moe_config_free(s.config) };
                s.config = c.config();
                s.create_layer()
            },
        ),
        bad(
            "alpha without limit",
            MOE_ERR_INVALID_ARGUMENT,
            "gemm1_alpha: activation silu takes no alpha",
            |s| {
                ok(
                    unsafe { moe_config_set_gemm1_alpha(s.config, 1.0) },
                    "alpha",
                );
                s.create_layer()
            },
        ),
        bad(
            "relu2 gated",
            MOE_ERR_INVALID_ARGUMENT,
            "activation: relu2 is non-gated only",
            |s| {
                ok(
                    unsafe { moe_config_set_activation(s.config, MOE_ACTIVATION_RELU2) },
                    "act",
                );
                s.create_layer()
            },
        ),
        bad(
            "no_combine with inplace",
            MOE_ERR_INVALID_ARGUMENT,
            "inplace: contradicts no_combine",
            |s| {
                unsafe {
                    ok(moe_config_set_no_combine(s.config, true), "nc");
                    ok(moe_config_set_inplace(s.config, true), "inplace");
                }
                s.create_layer()
            },
        ),
        bad(
            "keep weight without no_combine",
            MOE_ERR_INVALID_ARGUMENT,
            "no_combine_keep_router_weight: needs no_combine",
            |s| {
                ok(
                    unsafe { moe_config_set_no_combine_keep_router_weight(s.config, true) },
                    "keep",
                );
                s.create_layer()
            },
        ),
        bad(
            "missing hidden size",
            MOE_ERR_INVALID_ARGUMENT,
            "hidden_size is not set",
            |s| {
                let mut c = null_mut();
                unsafe {
                    ok(moe_config_create(&mut c), "create");
                    ok(moe_config_set_num_experts(c, 8), "e");
                    ok(moe_config_set_top_k(c, 2), "k");
                    moe_config_free(s.config);
                }
                s.config = c;
                s.create_layer()
            },
        ),
        bad(
            "weights in CUDA managed memory",
            MOE_ERR_INVALID_ARGUMENT,
            "w2: device type 13 is not supported",
            |s| {
                s.w2.device = moe_device {
                    device_type: 13,
                    device_id: 0,
                };
                s.create_layer()
            },
        ),
        // ---- setters refuse bad values at once
        bad(
            "NaN routed_scaling_factor",
            MOE_ERR_INVALID_ARGUMENT,
            "factor: NaN is not finite",
            |s| unsafe { moe_config_set_routed_scaling_factor(s.config, f32::NAN) },
        ),
        bad(
            "inf routed_scaling_factor",
            MOE_ERR_INVALID_ARGUMENT,
            "factor: inf is not finite",
            |s| unsafe { moe_config_set_routed_scaling_factor(s.config, f32::INFINITY) },
        ),
        bad(
            "unknown option key",
            MOE_ERR_INVALID_ARGUMENT,
            "key: unknown option \"tile.blockm\"",
            |s| set_option(s, "tile.blockm", "64"),
        ),
        bad(
            "option value not a power of two",
            MOE_ERR_INVALID_ARGUMENT,
            "value: option \"tile.block_m\" = 48",
            |s| set_option(s, "tile.block_m", "48"),
        ),
        bad(
            "option value not an integer",
            MOE_ERR_INVALID_ARGUMENT,
            "\"cpu.num_threads\" = \"many\" is not an integer",
            |s| set_option(s, "cpu.num_threads", "many"),
        ),
        bad(
            "unknown activation",
            MOE_ERR_INVALID_ARGUMENT,
            "activation: 99",
            |s| unsafe { moe_config_set_activation(s.config, 99) },
        ),
        bad(
            "int32 layer dtype",
            MOE_ERR_INVALID_ARGUMENT,
            "dtype: int32",
            |s| unsafe { moe_config_set_dtype(s.config, Dt::I32.dl()) },
        ),
        bad(
            "zero experts",
            MOE_ERR_INVALID_ARGUMENT,
            "num_experts: 0",
            |s| unsafe { moe_config_set_num_experts(s.config, 0) },
        ),
        bad(
            "setter on a layer's config",
            MOE_ERR_INVALID_ARGUMENT,
            "config: read-only",
            |s| unsafe {
                let mut c = null();
                ok(moe_layer_config(s.layer, &mut c), "layer config");
                moe_config_set_top_k(c as *mut moe_config, 4)
            },
        ),
        bad(
            "a layer passed as a config",
            MOE_ERR_INVALID_ARGUMENT,
            "config: ",
            |s| unsafe { moe_config_set_top_k(s.layer as *mut moe_config, 4) },
        ),
        // ---- prepare
        bad(
            "expert id = E",
            MOE_ERR_INVALID_ARGUMENT,
            "topk_ids[3, 1] = 8, expected an expert id in [-1, 8)",
            |s| {
                s.ids.set(7, 8.0);
                s.prepare()
            },
        ),
        bad(
            "expert id = -2",
            MOE_ERR_INVALID_ARGUMENT,
            "topk_ids[0, 0] = -2",
            |s| {
                s.ids.set(0, -2.0);
                s.prepare()
            },
        ),
        bad(
            "ids in f32",
            MOE_ERR_INVALID_ARGUMENT,
            "topk_ids: dtype f32, expected int32 or int64",
            |s| {
                s.ids.dtype = Dt::F32.dl();
                s.prepare()
            },
        ),
        bad(
            "ids with the wrong K",
            MOE_ERR_INVALID_ARGUMENT,
            "topk_ids: shape [14, 1], expected [14, 2]",
            |s| {
                s.ids.shape = vec![14, 1];
                s.prepare()
            },
        ),
        bad(
            "ids of ndim 3",
            MOE_ERR_INVALID_ARGUMENT,
            "topk_ids: ndim 3",
            |s| {
                s.ids.shape = vec![7, 2, 1];
                s.prepare()
            },
        ),
        bad(
            "ids transposed strides",
            MOE_ERR_INVALID_ARGUMENT,
            "topk_ids: strides [1, 7] are not row-major contiguous",
            |s| {
                s.ids.strides = Some(vec![1, 7]);
                s.prepare()
            },
        ),
        bad(
            "ids on CUDA",
            MOE_ERR_INVALID_ARGUMENT,
            "topk_ids: on cuda:0, expected cpu",
            |s| {
                s.ids.device = CUDA0;
                s.prepare()
            },
        ),
        bad(
            "short workspace",
            MOE_ERR_INVALID_ARGUMENT,
            "workspace: 64 bytes, expected at least",
            |s| {
                s.workspace.shape = vec![64];
                s.prepare()
            },
        ),
        bad(
            "workspace of floats",
            MOE_ERR_INVALID_ARGUMENT,
            "workspace: dtype f32",
            |s| {
                s.workspace.dtype = Dt::F32.dl();
                s.prepare()
            },
        ),
        bad(
            "misaligned workspace",
            MOE_ERR_INVALID_ARGUMENT,
            "workspace: address",
            |s| {
                s.workspace.byte_offset = 4;
                s.workspace.shape[0] -= 64;
                s.prepare()
            },
        ),
        bad(
            "stream on a CPU layer",
            MOE_ERR_INVALID_ARGUMENT,
            "stream: 0x10, expected NULL",
            |s| {
                let (ids, ws) = (s.ids.raw(), s.workspace.raw());
                unsafe { moe_prepare(s.layer, &ids, &ws, s.plan, 0x10 as *mut _) }
            },
        ),
        bad("null plan", MOE_ERR_INVALID_ARGUMENT, "plan: NULL", |s| {
            let (ids, ws) = (s.ids.raw(), s.workspace.raw());
            unsafe { moe_prepare(s.layer, &ids, &ws, null_mut(), null_mut()) }
        }),
        bad(
            "plan of another layer",
            MOE_ERR_INVALID_ARGUMENT,
            "plan: created for another layer",
            |s| {
                let (ids, ws) = (s.ids.raw(), s.workspace.raw());
                let other = Setup::new(&Case::default());
                unsafe { moe_prepare(s.layer, &ids, &ws, other.plan, null_mut()) }
            },
        ),
        // ---- run
        bad(
            "run before prepare",
            MOE_ERR_INVALID_ARGUMENT,
            "plan: not prepared",
            |s| s.run(),
        ),
        bad(
            "hidden in f16",
            MOE_ERR_INVALID_ARGUMENT,
            "hidden: dtype f16, expected bf16 like the layer",
            |s| {
                s.hidden.dtype = Dt::F16.dl();
                run_prepared(s)
            },
        ),
        bad(
            "hidden with another M",
            MOE_ERR_INVALID_ARGUMENT,
            "hidden: shape [6, 40], expected [7, 40]",
            |s| {
                s.hidden.shape[0] = 6;
                run_prepared(s)
            },
        ),
        bad(
            "weights with another M",
            MOE_ERR_INVALID_ARGUMENT,
            "topk_weights: shape [6, 2], expected [7, 2]",
            |s| {
                s.router.shape[0] = 6;
                run_prepared(s)
            },
        ),
        bad(
            "weights in int32",
            MOE_ERR_INVALID_ARGUMENT,
            "topk_weights: dtype int32, expected f32 or bf16",
            |s| {
                s.router.dtype = Dt::I32.dl();
                run_prepared(s)
            },
        ),
        bad(
            "hidden non-contiguous",
            MOE_ERR_INVALID_ARGUMENT,
            "hidden: strides [80, 2]",
            |s| {
                s.hidden.strides = Some(vec![80, 2]);
                run_prepared(s)
            },
        ),
        bad(
            "hidden on CUDA",
            MOE_ERR_INVALID_ARGUMENT,
            "hidden: on cuda:0, expected cpu",
            |s| {
                s.hidden.device = CUDA0;
                run_prepared(s)
            },
        ),
        bad(
            "hidden of ndim 5",
            MOE_ERR_INVALID_ARGUMENT,
            "hidden: ndim 5, expected at most 4",
            |s| {
                s.hidden.shape = vec![7, 40, 1, 1, 1];
                run_prepared(s)
            },
        ),
        bad(
            "hidden with 2 lanes",
            MOE_ERR_INVALID_ARGUMENT,
            "hidden: dtype has 2 lanes",
            |s| {
                s.hidden.dtype.lanes = 2;
                run_prepared(s)
            },
        ),
        bad(
            "hidden with a negative size",
            MOE_ERR_INVALID_ARGUMENT,
            "hidden: shape [-7, 40] has a negative size",
            |s| {
                s.hidden.shape[0] = -7;
                run_prepared(s)
            },
        ),
        bad(
            "out of no_combine shape",
            MOE_ERR_INVALID_ARGUMENT,
            "out: shape [7, 2, 40], expected [7, 40]",
            |s| {
                s.out.shape = vec![7, 2, 40];
                run_prepared(s)
            },
        ),
        bad(
            "out overlapping hidden",
            MOE_ERR_INVALID_ARGUMENT,
            "out: overlaps hidden, but the layer is not inplace",
            |s| {
                ok(s.prepare(), "prepare");
                let (hidden, router) = (s.hidden.raw(), s.router.raw());
                let mut out = s.out.raw();
                out.data = s.hidden.ptr().wrapping_add(16) as *mut _;
                unsafe { moe_run(s.layer, null(), s.plan, &hidden, &router, &out, null_mut()) }
            },
        ),
        bad(
            "out overlapping topk_weights",
            MOE_ERR_INVALID_ARGUMENT,
            "out: overlaps topk_weights",
            |s| {
                ok(s.prepare(), "prepare");
                // both in one allocation of out's size: out at topk_weights' address would
                // also reach whatever the allocator put after topk_weights (hidden, at times)
                let both = HostTensor::zeros(s.out.dt, &s.out.shape);
                let (hidden, mut router, mut out) = (s.hidden.raw(), s.router.raw(), s.out.raw());
                router.data = both.ptr() as *mut _;
                out.data = both.ptr() as *mut _;
                unsafe { moe_run(s.layer, null(), s.plan, &hidden, &router, &out, null_mut()) }
            },
        ),
        bad(
            "hidden inside the workspace",
            MOE_ERR_INVALID_ARGUMENT,
            "hidden: overlaps the workspace",
            |s| {
                ok(s.prepare(), "prepare");
                s.hidden.data_override = Some(s.workspace.ptr() as *mut _);
                s.run()
            },
        ),
        bad(
            "out NULL without inplace",
            MOE_ERR_INVALID_ARGUMENT,
            "out: NULL, but the layer is not inplace",
            |s| {
                ok(s.prepare(), "prepare");
                let (hidden, router) = (s.hidden.raw(), s.router.raw());
                unsafe {
                    moe_run(
                        s.layer,
                        null(),
                        s.plan,
                        &hidden,
                        &router,
                        null(),
                        null_mut(),
                    )
                }
            },
        ),
        bad(
            "out data NULL",
            MOE_ERR_INVALID_ARGUMENT,
            "out: data is NULL but the tensor has 280 elements",
            |s| {
                s.out.data_override = Some(null_mut());
                run_prepared(s)
            },
        ),
        with(
            inplace,
            bad(
                "inplace with a separate out",
                MOE_ERR_INVALID_ARGUMENT,
                "out: must be NULL or hidden itself",
                |s| {
                    ok(s.prepare(), "prepare");
                    let (hidden, router, out) = (s.hidden.raw(), s.router.raw(), s.out.raw());
                    unsafe { moe_run(s.layer, null(), s.plan, &hidden, &router, &out, null_mut()) }
                },
            ),
        ),
        bad(
            "a LoRA handle passed to moe_run (LoRA runs go through moe_run_lora)",
            MOE_ERR_INVALID_ARGUMENT,
            "lora: must be NULL for moe_run",
            |s| {
                ok(s.prepare(), "prepare");
                let (hidden, router, out) = (s.hidden.raw(), s.router.raw(), s.out.raw());
                let fake = 0x40 as *const moe_lora;
                unsafe { moe_run(s.layer, fake, s.plan, &hidden, &router, &out, null_mut()) }
            },
        ),
        bad(
            "null layer to run",
            MOE_ERR_INVALID_ARGUMENT,
            "layer: NULL",
            |s| {
                ok(s.prepare(), "prepare");
                let (hidden, router, out) = (s.hidden.raw(), s.router.raw(), s.out.raw());
                unsafe { moe_run(null(), null(), s.plan, &hidden, &router, &out, null_mut()) }
            },
        ),
    ]
}

#[test]
fn every_bad_call_is_refused_by_name_and_writes_nothing() {
    let table = table();
    assert!(table.len() >= 30);
    let mut failures = Vec::new();
    for b in table {
        let mut s = Setup::new(&b.base);
        let status = (b.call)(&mut s);
        let msg = last_error();
        if status != b.status || !msg.contains(b.needle) {
            failures.push(format!(
                "{}: got {status:?} \"{msg}\", expected {:?} containing \"{}\"",
                b.name, b.status, b.needle
            ));
        }
        if !s.out.bytes().iter().all(|&x| x == 0xFF) {
            failures.push(format!("{}: out was written", b.name));
        }
        if s.hidden.values() != s.hidden_in {
            failures.push(format!("{}: hidden was written", b.name));
        }
    }
    assert!(
        failures.is_empty(),
        "{} bad calls misbehaved:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn failed_creates_leave_their_output_pointer_alone() {
    let s = Setup::new(&Case::default());
    let sentinel = 0x1234 as *mut moe_layer;
    let mut l = sentinel;
    let (mut w13, mut w2) = (
        HostTensor::zeros(Dt::F16, &[8, 48, 40]),
        HostTensor::zeros(Dt::Bf16, &[8, 40, 24]),
    );
    let (w13, w2) = (w13.raw(), w2.raw());
    assert_eq!(
        unsafe { moe_layer_create(s.config, &w13, &w2, null(), null(), &mut l) },
        MOE_ERR_INVALID_ARGUMENT
    );
    assert_eq!(l, sentinel);
    let mut p = 0x5678 as *mut moe_plan;
    assert_eq!(
        unsafe { moe_plan_create(null(), &mut p) },
        MOE_ERR_INVALID_ARGUMENT
    );
    assert_eq!(p, 0x5678 as *mut moe_plan);
}

#[test]
fn a_refused_prepare_keeps_the_previous_plan() {
    let mut s = Setup::new(&Case::default());
    ok(s.prepare(), "prepare");
    let mut before = 0i64;
    ok(
        unsafe { moe_plan_num_padded(s.plan, &mut before) },
        "num_padded",
    );
    s.ids.set(0, 99.0);
    assert_eq!(s.prepare(), MOE_ERR_INVALID_ARGUMENT);
    let mut after = 0i64;
    ok(
        unsafe { moe_plan_num_padded(s.plan, &mut after) },
        "num_padded",
    );
    assert_eq!(before, after);
}
