//! The LoRA wrapper (SPEC §7) through the C ABI against a float64 reference written here:
//! slots of mixed ranks (zero padded to r), shared-outer weights, mixed adapters in one batch
//! (−1, empty, cleared and disabled slots), per-token and segment maps, every layout and flag that
//! moves a rounding point; the config passed through by pointer; bad inputs refused by name
//! with nothing written.

mod common;
use common::lora::*;
use common::*;
use fusedmoe::ffi::*;
use moe_status::*;
use std::ptr::{null, null_mut};

/// Runs a case and checks it against the reference; returns the output.
fn check(lc: &LoraCase, what: &str) -> Vec<f64> {
    let mut ls = LoraSetup::new(lc);
    ok(ls.s.prepare(), "moe_prepare");
    ok(ls.run(), "moe_run_lora");
    let got = ls.s.output();
    let err = rel_err(&got, &ls.reference());
    assert!(
        err <= lc.base.dt.tolerance(),
        "{what}: relative error {err:e} > {:e} for {lc:?}",
        lc.base.dt.tolerance()
    );
    // The deltas matter: without them the reference is far off (where any token has one).
    if (0..lc.base.tokens).any(|m| ls.active(m).is_some()) {
        ls.token_adapter.fill(-1);
        let base_err = rel_err(&got, &ls.reference());
        assert!(
            base_err > 5.0 * lc.base.dt.tolerance(),
            "{what}: the deltas change little ({base_err:e})"
        );
    }
    got
}

const DTYPES: [Dt; 3] = [Dt::F32, Dt::F16, Dt::Bf16];

// ---------------------------------------------------------------- semantics

#[test]
fn mixed_adapters_ranks_and_maps_match_the_reference() {
    let mut seed = 0;
    for dt in DTYPES {
        for max_rank in [8, 16, 64] {
            for slots in [
                vec![slot(max_rank)],
                four_slots(max_rank),
                four_slots_cleared(max_rank),
            ] {
                for segments in [false, true] {
                    seed += 1;
                    let lc = LoraCase {
                        base: Case {
                            dt,
                            tokens: 37,
                            drop: 0.1,
                            seed,
                            ..Case::default()
                        },
                        max_rank,
                        slots: slots.clone(),
                        segments,
                    };
                    check(&lc, "mixed adapters");
                }
            }
        }
    }
}

#[test]
fn token_counts_zero_one_37_and_512() {
    for dt in DTYPES {
        for tokens in [0, 1, 37, 512] {
            for segments in [false, true] {
                let lc = LoraCase {
                    base: Case {
                        dt,
                        tokens,
                        experts: 16,
                        top_k: 4,
                        seed: 7 + tokens as u64,
                        ..Case::default()
                    },
                    max_rank: 16,
                    slots: four_slots(16),
                    segments,
                };
                let out = check(&lc, "token counts");
                assert_eq!(out.len(), tokens * 40);
            }
        }
    }
}

#[test]
fn gated_and_non_gated_in_both_layouts_with_shared_outer_weights() {
    let mut seed = 300;
    for dt in DTYPES {
        for (act, gated, layout) in [
            (MOE_ACTIVATION_SILU, true, MOE_GATE_UP_HALVES),
            (MOE_ACTIVATION_SILU, true, MOE_GATE_UP_INTERLEAVED),
            (MOE_ACTIVATION_SWIGLU_OAI, true, MOE_GATE_UP_INTERLEAVED),
            (MOE_ACTIVATION_GELU, false, MOE_GATE_UP_HALVES),
            (MOE_ACTIVATION_RELU2, false, MOE_GATE_UP_HALVES),
        ] {
            for shared in [false, true] {
                seed += 1;
                let mut base = Case {
                    dt,
                    layout,
                    b13: true,
                    b2: true,
                    seed,
                    tokens: 37,
                    ..Case::default()
                }
                .with_activation(act);
                base.gated = gated;
                let shared_slot = SlotSpec { shared, ..slot(8) };
                let lc = LoraCase {
                    base,
                    max_rank: 8,
                    slots: vec![shared_slot, slot(4), shared_slot],
                    segments: seed % 2 == 0,
                };
                check(&lc, "layouts");
            }
        }
    }
}

#[test]
fn flags_that_move_the_router_weight_no_combine_on_input_inplace_rsf() {
    let mut seed = 500;
    for dt in DTYPES {
        for (on_input, no_combine, keep_weight, inplace, rsf) in [
            (true, false, false, false, 1.0),
            (false, true, false, false, 1.0),
            (false, true, true, false, 1.0),
            (true, true, false, false, 1.0),
            (false, false, false, true, 2.5),
            (true, false, false, true, 1.0),
        ] {
            seed += 1;
            let lc = LoraCase {
                base: Case {
                    dt,
                    on_input,
                    no_combine,
                    keep_weight,
                    inplace,
                    rsf,
                    b13: true,
                    b2: true,
                    drop: 0.2,
                    tokens: 37,
                    seed,
                    ..Case::default()
                },
                max_rank: 16,
                slots: four_slots(16),
                segments: seed % 2 == 1,
            };
            check(&lc, "flags");
        }
    }
}

#[test]
fn no_adapter_gives_exactly_the_base_layer_output() {
    for dt in DTYPES {
        let lc = LoraCase {
            base: Case {
                dt,
                tokens: 37,
                b13: true,
                b2: true,
                seed: 900,
                ..Case::default()
            },
            max_rank: 8,
            slots: four_slots(8),
            segments: false,
        };
        let mut ls = LoraSetup::new(&lc);
        // −1, the disabled slot 2 and the empty slot 3: no token gets a delta.
        let adapters: Vec<i32> = (0..37).map(|m| [-1, 2, 3][m % 3]).collect();
        ls.set_token_adapters(&adapters);
        ok(ls.s.prepare(), "prepare");
        ok(ls.run(), "moe_run_lora");
        let with_wrapper = ls.s.output();
        ls.s.out.fill_bytes(0xFF);
        ok(ls.s.run(), "moe_run");
        assert_eq!(
            with_wrapper.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            ls.s.output()
                .iter()
                .map(|v| v.to_bits())
                .collect::<Vec<_>>(),
            "{dt:?}"
        );
    }
}

#[test]
fn clearing_disabling_and_enabling_slots_changes_the_next_run() {
    let lc = LoraCase {
        base: Case {
            dt: Dt::F32,
            tokens: 37,
            seed: 950,
            ..Case::default()
        },
        max_rank: 8,
        slots: vec![slot(8), slot(8)],
        segments: true,
    };
    let mut ls = LoraSetup::new(&lc);
    ok(ls.s.prepare(), "prepare");
    let run_and_check = |ls: &mut LoraSetup, what: &str| {
        ls.s.out.fill_bytes(0xFF);
        ok(ls.run(), "moe_run_lora");
        let err = rel_err(&ls.s.output(), &ls.reference());
        assert!(err <= 1e-5, "{what}: {err:e}");
    };
    run_and_check(&mut ls, "both set");
    ok(
        unsafe { moe_lora_set_enabled(ls.lora, 0, false) },
        "disable",
    );
    ls.lc.slots[0].enabled = false;
    run_and_check(&mut ls, "slot 0 disabled");
    ok(unsafe { moe_lora_clear_slot(ls.lora, 1) }, "clear");
    ls.adapters[1] = None;
    run_and_check(&mut ls, "slot 1 cleared");
    ok(unsafe { moe_lora_set_enabled(ls.lora, 0, true) }, "enable");
    ls.lc.slots[0].enabled = true;
    run_and_check(&mut ls, "slot 0 enabled again");
}

// ---------------------------------------------------------------- the wrapper and its config

#[test]
fn runner_config_is_the_layers_own_handle_and_outlives_the_layer_handle() {
    let lc = LoraCase {
        base: Case {
            dt: Dt::Bf16,
            tokens: 37,
            global_experts: Some(16),
            seed: 1200,
            ..Case::default()
        },
        max_rank: 16,
        slots: four_slots(16),
        segments: false,
    };
    let mut ls = LoraSetup::new(&lc);
    let (mut from_layer, mut from_lora) = (null(), null());
    unsafe {
        ok(
            moe_layer_config(ls.s.layer, &mut from_layer),
            "moe_layer_config",
        );
        ok(
            moe_lora_runner_config(ls.lora, &mut from_lora),
            "moe_lora_runner_config",
        );
    }
    assert!(
        std::ptr::eq(from_layer, from_lora),
        "the very same config handle"
    );
    let read = |config: *const moe_config| unsafe {
        let (mut e, mut el, mut dtype) = (0i64, 0i64, Dt::F32.dl());
        let mut device = CPU;
        ok(moe_config_get_num_experts(config, &mut e), "num_experts");
        ok(
            moe_config_get_num_local_experts(config, &mut el),
            "num_local_experts",
        );
        ok(moe_config_get_dtype(config, &mut dtype), "dtype");
        ok(moe_config_get_device(config, &mut device), "device");
        (e, el, dtype, device)
    };
    assert_eq!(read(from_lora), (16, 8, Dt::Bf16.dl(), CPU));

    // Free the layer handle first: the wrapper, its config and runs with the plan stay valid.
    ok(ls.s.prepare(), "prepare");
    unsafe { moe_layer_free(ls.s.layer) };
    ls.s.layer = null_mut();
    assert_eq!(read(from_lora), (16, 8, Dt::Bf16.dl(), CPU));
    ok(ls.run(), "moe_run_lora after moe_layer_free");
    let err = rel_err(&ls.s.output(), &ls.reference());
    assert!(err <= Dt::Bf16.tolerance(), "{err:e}");
}

#[test]
fn lora_is_a_supported_feature_and_its_handles_check_their_magic() {
    assert!(unsafe { moe_supports(c"lora".as_ptr()) });
    let s = Setup::new(&Case::default());
    let mut lora = null_mut();
    ok(
        unsafe { moe_lora_create(s.layer, 2, 8, &mut lora) },
        "create",
    );
    let mut config = null();
    let fake = s.layer as *const moe_lora; // a layer is not a LoRA wrapper
    assert_eq!(
        unsafe { moe_lora_runner_config(fake, &mut config) },
        MOE_ERR_INVALID_ARGUMENT
    );
    assert!(last_error().contains("lora: ") && last_error().contains("not a moe_lora"));
    assert!(config.is_null(), "nothing written on failure");
    unsafe {
        moe_lora_free(lora);
        moe_lora_free(null_mut());
    }
}

// ---------------------------------------------------------------- bad input

/// A bad call: the status, a needle the message must hold, and the call on a fresh setup.
struct Bad {
    name: &'static str,
    status: moe_status,
    needle: &'static str,
    call: fn(&mut LoraSetup) -> moe_status,
}

fn bad(name: &'static str, needle: &'static str, call: fn(&mut LoraSetup) -> moe_status) -> Bad {
    Bad {
        name,
        status: MOE_ERR_INVALID_ARGUMENT,
        needle,
        call,
    }
}

/// Sets slot 1 from a fresh rank-8 adapter bent by `bend`.
fn set_bent(ls: &mut LoraSetup, bend: fn(&mut Adapter)) -> moe_status {
    let mut rng = Rng::new(77);
    let mut a = Adapter::new(&ls.s.case, 8, 8, false, 1.0, &mut rng);
    bend(&mut a);
    a.set(ls.lora, 1)
}

fn run_prepared(ls: &mut LoraSetup) -> moe_status {
    ok(ls.s.prepare(), "prepare");
    ls.run()
}

fn table() -> Vec<Bad> {
    vec![
        bad("null layer", "layer: NULL", |_| {
            let mut l = null_mut();
            unsafe { moe_lora_create(null(), 1, 8, &mut l) }
        }),
        bad("no slots", "num_slots: 0", |ls| {
            let mut l = null_mut();
            unsafe { moe_lora_create(ls.s.layer, 0, 8, &mut l) }
        }),
        bad("rank 0", "max_rank: 0", |ls| {
            let mut l = null_mut();
            unsafe { moe_lora_create(ls.s.layer, 1, 0, &mut l) }
        }),
        bad("null out", "out: NULL", |ls| unsafe {
            moe_lora_create(ls.s.layer, 1, 8, null_mut())
        }),
        bad("slot out of range", "slot: 4, expected 0..4", |ls| {
            let mut rng = Rng::new(1);
            let mut a = Adapter::new(&ls.s.case, 8, 8, false, 1.0, &mut rng);
            a.set(ls.lora, 4)
        }),
        bad("negative slot", "slot: -1", |ls| unsafe {
            moe_lora_clear_slot(ls.lora, -1)
        }),
        bad("enable slot out of range", "slot: 9", |ls| unsafe {
            moe_lora_set_enabled(ls.lora, 9, true)
        }),
        bad("null gate_up_b", "gate_up_b: NULL", |ls| {
            let mut rng = Rng::new(1);
            let mut a = Adapter::new(&ls.s.case, 8, 8, false, 1.0, &mut rng);
            let (ga, da, db) = (a.gate_up_a.raw(), a.down_a.raw(), a.down_b.raw());
            unsafe { moe_lora_set_slot(ls.lora, 0, &ga, null(), &da, &db, 1.0) }
        }),
        bad(
            "rank above max_rank",
            "gate_up_b: shape [8, 48, 16], expected [8, 48, 8] ([E, N1, r], r = max_rank 8",
            |ls| {
                set_bent(ls, |a| {
                    a.gate_up_b = HostTensor::zeros(Dt::Bf16, &[8, 48, 16])
                })
            },
        ),
        bad(
            "gate_up_a with the wrong rows",
            "gate_up_a: shape [8, 8, 40], expected [8, 16, 40] or [1, 16, 40]",
            |ls| {
                set_bent(ls, |a| {
                    a.gate_up_a = HostTensor::zeros(Dt::Bf16, &[8, 8, 40])
                })
            },
        ),
        bad(
            "down_a shared (only gate_up_a and down_b may be)",
            "down_a: shape [1, 8, 24], expected [8, 8, 24]",
            |ls| set_bent(ls, |a| a.down_a = HostTensor::zeros(Dt::Bf16, &[1, 8, 24])),
        ),
        bad(
            "down_b of another expert count",
            "down_b: shape [3, 40, 8], expected [8, 40, 8] or [1, 40, 8]",
            |ls| set_bent(ls, |a| a.down_b = HostTensor::zeros(Dt::Bf16, &[3, 40, 8])),
        ),
        bad(
            "down_b of ndim 2",
            "down_b: shape [40, 8], expected",
            |ls| set_bent(ls, |a| a.down_b = HostTensor::zeros(Dt::Bf16, &[40, 8])),
        ),
        bad(
            "weights of another dtype",
            "down_a: dtype f32, expected bf16 like the layer",
            |ls| set_bent(ls, |a| a.down_a = HostTensor::zeros(Dt::F32, &[8, 8, 24])),
        ),
        bad("non-finite scaling", "scaling: NaN", |ls| {
            let mut rng = Rng::new(1);
            let mut a = Adapter::new(&ls.s.case, 8, 8, false, f64::NAN, &mut rng);
            a.set(ls.lora, 0)
        }),
        bad(
            "both maps",
            "adapter_ids: given together with segments",
            |ls| {
                ok(ls.s.prepare(), "prepare");
                let (h, w, o) = (ls.s.hidden.raw(), ls.s.router.raw(), ls.s.out.raw());
                let (ids, ip, sa) = (
                    ls.adapter_ids.raw(),
                    ls.seg_indptr.raw(),
                    ls.seg_adapter.raw(),
                );
                unsafe { moe_run_lora(ls.lora, ls.s.plan, &h, &w, &ids, &ip, &sa, &o, null_mut()) }
            },
        ),
        bad("neither map", "adapter_ids: NULL, and no segments", |ls| {
            ok(ls.s.prepare(), "prepare");
            let (h, w, o) = (ls.s.hidden.raw(), ls.s.router.raw(), ls.s.out.raw());
            unsafe {
                moe_run_lora(
                    ls.lora,
                    ls.s.plan,
                    &h,
                    &w,
                    null(),
                    null(),
                    null(),
                    &o,
                    null_mut(),
                )
            }
        }),
        bad(
            "indptr without adapters",
            "seg_adapter: NULL, but seg_indptr is given",
            |ls| {
                ok(ls.s.prepare(), "prepare");
                let (h, w, o) = (ls.s.hidden.raw(), ls.s.router.raw(), ls.s.out.raw());
                let ip = ls.seg_indptr.raw();
                unsafe {
                    moe_run_lora(
                        ls.lora,
                        ls.s.plan,
                        &h,
                        &w,
                        null(),
                        &ip,
                        null(),
                        &o,
                        null_mut(),
                    )
                }
            },
        ),
        bad(
            "adapter id = L",
            "adapter_ids: adapter 4 at index 5 is out of range [-1, 4)",
            |ls| {
                ls.adapter_ids.set(5, 4.0);
                run_prepared(ls)
            },
        ),
        bad(
            "adapter id below -1",
            "adapter_ids: adapter -2 at index 0",
            |ls| {
                ls.adapter_ids.set(0, -2.0);
                run_prepared(ls)
            },
        ),
        bad(
            "adapter ids of another length",
            "adapter_ids: shape [6], expected [7]",
            |ls| {
                ls.adapter_ids.shape[0] = 6;
                run_prepared(ls)
            },
        ),
        bad(
            "adapter ids int64",
            "adapter_ids: dtype int64, expected int32",
            |ls| {
                ls.adapter_ids = HostTensor::zeros(Dt::I64, &[7]);
                run_prepared(ls)
            },
        ),
        bad(
            "segment adapter = L",
            "seg_adapter: adapter 4 at index 0",
            |ls| {
                ls.lc.segments = true;
                ls.seg_adapter.set(0, 4.0);
                run_prepared(ls)
            },
        ),
        bad(
            "segments not covering M",
            "seg_indptr: runs from 0 to 8, expected from 0 to M = 7",
            |ls| {
                ls.lc.segments = true;
                let last = ls.seg_indptr.numel() - 1;
                ls.seg_indptr.set(last, 8.0);
                run_prepared(ls)
            },
        ),
        bad(
            "segments decreasing",
            "seg_indptr: decreases at index 2",
            |ls| {
                ls.lc.segments = true;
                ls.seg_indptr = HostTensor::from_f64(Dt::I32, &[4], &[0.0, 5.0, 2.0, 7.0]);
                ls.seg_adapter = HostTensor::from_f64(Dt::I32, &[3], &[0.0, 1.0, -1.0]);
                run_prepared(ls)
            },
        ),
        bad(
            "segment adapters of the wrong length",
            "seg_adapter: shape [2], expected [3]",
            |ls| {
                ls.lc.segments = true;
                ls.seg_indptr = HostTensor::from_f64(Dt::I32, &[4], &[0.0, 2.0, 5.0, 7.0]);
                ls.seg_adapter = HostTensor::from_f64(Dt::I32, &[2], &[0.0, 1.0]);
                run_prepared(ls)
            },
        ),
        bad(
            "workspace sized for the layer only",
            "(size it with moe_lora_workspace_size)",
            |ls| {
                // A wrapper of a large rank, whose intermediates cannot fit the layer's slack.
                let mut bytes = 0usize;
                ok(
                    unsafe { moe_workspace_size(ls.s.layer, 7, &mut bytes) },
                    "size",
                );
                ls.s.workspace = HostTensor::zeros(Dt::U8, &[bytes as i64]);
                let mut wide = null_mut();
                ok(
                    unsafe { moe_lora_create(ls.s.layer, 4, 4096, &mut wide) },
                    "create",
                );
                std::mem::swap(&mut ls.lora, &mut wide);
                let status = run_prepared(ls);
                std::mem::swap(&mut ls.lora, &mut wide);
                unsafe { moe_lora_free(wide) };
                status
            },
        ),
        bad(
            "plan of another layer",
            "plan: created for another layer",
            |ls| {
                let mut other = Setup::new(&ls.s.case);
                ok(other.prepare(), "prepare");
                let (h, w, o) = (ls.s.hidden.raw(), ls.s.router.raw(), ls.s.out.raw());
                let ids = ls.adapter_ids.raw();
                unsafe {
                    moe_run_lora(
                        ls.lora,
                        other.plan,
                        &h,
                        &w,
                        &ids,
                        null(),
                        null(),
                        &o,
                        null_mut(),
                    )
                }
            },
        ),
        bad(
            "a LoRA handle passed to moe_run",
            "lora: must be NULL for moe_run; run a LoRA wrapper with moe_run_lora",
            |ls| {
                ok(ls.s.prepare(), "prepare");
                let (h, w, o) = (ls.s.hidden.raw(), ls.s.router.raw(), ls.s.out.raw());
                unsafe { moe_run(ls.s.layer, ls.lora, ls.s.plan, &h, &w, &o, null_mut()) }
            },
        ),
        bad("hidden of the wrong shape", "hidden: shape [7, 41]", |ls| {
            ls.s.hidden.shape[1] = 41;
            run_prepared(ls)
        }),
        bad(
            "out over the adapter ids",
            "out: overlaps adapter_ids",
            |ls| {
                ls.adapter_ids.data_override = Some(ls.s.out.ptr() as *mut _);
                run_prepared(ls)
            },
        ),
    ]
}

#[test]
fn bad_inputs_are_refused_by_name_and_write_nothing() {
    for b in table() {
        let lc = LoraCase {
            base: Case {
                tokens: 7,
                ..Case::default()
            },
            max_rank: 8,
            slots: four_slots(8),
            segments: false,
        };
        let mut ls = LoraSetup::new(&lc);
        // Valid maps of 7 tokens, so each entry bends one thing only.
        ls.set_token_adapters(&[0, 1, -1, 2, 3, 0, 1]);
        let before = ls.s.out.bytes().to_vec();
        let status = (b.call)(&mut ls);
        let message = last_error();
        assert_eq!(status, b.status, "{}: {message}", b.name);
        assert!(
            message.contains(b.needle),
            "{}: message {message:?} lacks {:?}",
            b.name,
            b.needle
        );
        assert_eq!(ls.s.out.bytes(), &before[..], "{}: out was written", b.name);
    }
}
