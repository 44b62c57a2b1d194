//! The LoRA wrapper (SPEC §7) through the C ABI against a float64 reference written here:
//! slots of mixed ranks (zero padded to r), shared-outer weights, mixed adapters in one batch
//! (−1, empty and disabled slots), per-token and segment maps, every layout and flag that
//! moves a rounding point; the config passed through by pointer; bad inputs refused by name
//! with nothing written.

mod common;
use common::*;
use fusedmoe::ffi::*;
use moe_status::*;
use std::ptr::{null, null_mut};

// ---------------------------------------------------------------- adapters

/// One slot's adapter as the host holds it: r-padded tensors and the true rank.
struct Adapter {
    scaling: f64,
    gate_up_a: HostTensor,
    gate_up_b: HostTensor,
    down_a: HostTensor,
    down_b: HostTensor,
}

/// What a slot holds in a case: an adapter of this rank (None = never set).
#[derive(Clone, Copy, Debug)]
struct SlotSpec {
    rank: Option<usize>,
    shared: bool,
    enabled: bool,
}

const EMPTY: SlotSpec = SlotSpec {
    rank: None,
    shared: false,
    enabled: true,
};

fn slot(rank: usize) -> SlotSpec {
    SlotSpec {
        rank: Some(rank),
        ..EMPTY
    }
}

impl Adapter {
    /// Random weights of `rank`, zero padded to `max_rank`; A and B scaled so the deltas are
    /// a sizeable part of each GEMM's output.
    fn new(
        c: &Case,
        rank: usize,
        max_rank: usize,
        shared: bool,
        scaling: f64,
        rng: &mut Rng,
    ) -> Adapter {
        let (e, h, i, n1, r) = (c.experts, c.hidden, c.inter, c.n1(), max_rank);
        let outer = if shared { 1 } else { e };
        let rows = if c.gated { 2 * r } else { r };
        let mut gen = |shape: [usize; 3], live: &dyn Fn(usize, usize) -> bool, scale: f64| {
            let n = shape.iter().product::<usize>();
            let values: Vec<f64> = (0..n)
                .map(|idx| {
                    let (row, col) = ((idx / shape[2]) % shape[1], idx % shape[2]);
                    let v = rng.uniform(-1.0, 1.0) * scale;
                    if live(row, col) {
                        v
                    } else {
                        0.0
                    }
                })
                .collect();
            let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
            HostTensor::from_f64(c.dt, &dims, &values)
        };
        // A rows q of each half are live below the rank; B columns likewise.
        let a_live = |row: usize, _: usize| row % r < rank;
        let b_live = |_: usize, col: usize| col < rank;
        let gate_up_a = gen([outer, rows, h], &a_live, 1.5 / (h as f64).sqrt());
        let gate_up_b = gen([e, n1, r], &b_live, 1.5 / (rank as f64).sqrt());
        let down_a = gen([e, r, i], &a_live, 1.5 / (i as f64).sqrt());
        let down_b = gen([outer, h, r], &b_live, 1.5 / (rank as f64).sqrt());
        Adapter {
            scaling,
            gate_up_a,
            gate_up_b,
            down_a,
            down_b,
        }
    }

    fn set(&mut self, lora: *mut moe_lora, slot: i64) -> moe_status {
        let (a, b, c, d) = (
            self.gate_up_a.raw(),
            self.gate_up_b.raw(),
            self.down_a.raw(),
            self.down_b.raw(),
        );
        unsafe { moe_lora_set_slot(lora, slot, &a, &b, &c, &d, self.scaling as f32) }
    }
}

// ---------------------------------------------------------------- a LoRA case

#[derive(Clone, Debug)]
struct LoraCase {
    base: Case,
    max_rank: usize,
    slots: Vec<SlotSpec>,
    /// Give the map as segments (else per token).
    segments: bool,
}

/// A Setup with a wrapper, its adapters, a LoRA-sized workspace and a token → adapter map.
struct LoraSetup {
    s: Setup,
    lc: LoraCase,
    lora: *mut moe_lora,
    adapters: Vec<Option<Adapter>>,
    /// Each token's adapter id as the host passes it (−1 = none).
    token_adapter: Vec<i32>,
    adapter_ids: HostTensor,
    seg_indptr: HostTensor,
    seg_adapter: HostTensor,
}

impl LoraSetup {
    fn new(lc: &LoraCase) -> LoraSetup {
        let mut s = Setup::new(&lc.base);
        let c = lc.base.clone();
        let mut rng = Rng::new(c.seed ^ 0x5107);
        let mut lora = null_mut();
        ok(
            unsafe {
                moe_lora_create(
                    s.layer,
                    lc.slots.len() as i64,
                    lc.max_rank as i64,
                    &mut lora,
                )
            },
            "moe_lora_create",
        );
        let mut adapters = Vec::new();
        for (i, spec) in lc.slots.iter().enumerate() {
            let adapter = spec.rank.map(|rank| {
                let scaling = 0.5 + 0.25 * i as f64;
                let mut a = Adapter::new(&c, rank, lc.max_rank, spec.shared, scaling, &mut rng);
                ok(a.set(lora, i as i64), "moe_lora_set_slot");
                a
            });
            if !spec.enabled {
                ok(
                    unsafe { moe_lora_set_enabled(lora, i as i64, false) },
                    "set_enabled",
                );
            }
            adapters.push(adapter);
        }
        let mut bytes = 0usize;
        ok(
            unsafe { moe_lora_workspace_size(lora, c.tokens as i64, &mut bytes) },
            "moe_lora_workspace_size",
        );
        s.workspace = HostTensor::zeros(Dt::U8, &[bytes as i64]);

        // Segments of 1..=5 tokens, each with a random adapter in [−1, L) (per token: the
        // same, flattened), so both maps describe one assignment.
        let num_slots = lc.slots.len();
        let (mut indptr, mut seg_adapter, mut token_adapter) = (vec![0.0], vec![], vec![]);
        while token_adapter.len() < c.tokens {
            let len = (1 + rng.below(5)).min(c.tokens - token_adapter.len());
            let a = rng.below(num_slots + 1) as i32 - 1;
            token_adapter.extend(std::iter::repeat(a).take(len));
            seg_adapter.push(a as f64);
            indptr.push(token_adapter.len() as f64);
        }
        let ids: Vec<f64> = token_adapter.iter().map(|&a| a as f64).collect();
        LoraSetup {
            adapter_ids: HostTensor::from_f64(Dt::I32, &[c.tokens as i64], &ids),
            seg_indptr: HostTensor::from_f64(Dt::I32, &[indptr.len() as i64], &indptr),
            seg_adapter: HostTensor::from_f64(Dt::I32, &[seg_adapter.len() as i64], &seg_adapter),
            s,
            lc: lc.clone(),
            lora,
            adapters,
            token_adapter,
        }
    }

    /// Sets every token's adapter (both map forms: one segment per token).
    fn set_token_adapters(&mut self, adapters: &[i32]) {
        let m = adapters.len() as i64;
        let ids: Vec<f64> = adapters.iter().map(|&a| a as f64).collect();
        let indptr: Vec<f64> = (0..=m).map(|i| i as f64).collect();
        self.adapter_ids = HostTensor::from_f64(Dt::I32, &[m], &ids);
        self.seg_indptr = HostTensor::from_f64(Dt::I32, &[m + 1], &indptr);
        self.seg_adapter = HostTensor::from_f64(Dt::I32, &[m], &ids);
        self.token_adapter = adapters.to_vec();
    }

    /// moe_run_lora with the case's map form.
    fn run(&mut self) -> moe_status {
        let (hidden, router, out) = (self.s.hidden.raw(), self.s.router.raw(), self.s.out.raw());
        let out_ptr: *const moe_tensor = if self.s.case.inplace { null() } else { &out };
        let (ids, indptr, segs) = (
            self.adapter_ids.raw(),
            self.seg_indptr.raw(),
            self.seg_adapter.raw(),
        );
        let (ids, indptr, segs): (*const moe_tensor, *const moe_tensor, *const moe_tensor) =
            if self.lc.segments {
                (null(), &indptr, &segs)
            } else {
                (&ids, null(), null())
            };
        unsafe {
            moe_run_lora(
                self.lora,
                self.s.plan,
                &hidden,
                &router,
                ids,
                indptr,
                segs,
                out_ptr,
                null_mut(),
            )
        }
    }

    /// The adapter token m gets: None for −1, an empty slot or a disabled one.
    fn active(&self, m: usize) -> Option<&Adapter> {
        let a = self.token_adapter[m];
        if a < 0 || !self.lc.slots[a as usize].enabled {
            return None;
        }
        self.adapters[a as usize].as_ref()
    }

    /// SPEC §2–3 and §7 in float64, rounding where the SPEC rounds (the base part follows
    /// tests/common's reference line by line).
    fn reference(&self) -> Vec<f64> {
        let c = &self.s.case;
        let (k, h, i, m, n1, r) = (
            c.top_k,
            c.hidden,
            c.inter,
            c.tokens,
            c.n1(),
            self.lc.max_rank,
        );
        let (w13, w2) = (self.s.w13.values(), self.s.w2.values());
        let b13 = self.s.b13.as_ref().map(|t| t.values());
        let b2 = self.s.b2.as_ref().map(|t| t.values());
        let (ids, router) = (self.s.ids.values(), self.s.router.values());
        let x = &self.s.hidden_in;
        let rnd = |v: f64| c.dt.round(v);
        let rows = if c.no_combine { m * k } else { m };
        let mut out = vec![0.0; rows * h];
        for t in 0..m {
            let adapter = self.active(t).map(|a| {
                (
                    a,
                    a.gate_up_a.values(),
                    a.gate_up_b.values(),
                    a.down_a.values(),
                    a.down_b.values(),
                )
            });
            let mut sum = vec![0.0f64; h];
            for kk in 0..k {
                let route = t * k + kk;
                if ids[route] < 0.0 {
                    continue;
                }
                let e = ids[route] as usize;
                let w = router[route];
                let v = if c.on_input { w } else { 1.0 };
                // LoRA on GEMM1: rank intermediate (rounded), then s · B · it per row.
                let mut delta1 = vec![0.0; n1];
                if let Some((a, ga, gb, _, _)) = &adapter {
                    let r1 = if c.gated { 2 * r } else { r };
                    let ea = if a.gate_up_a.shape[0] == 1 { 0 } else { e };
                    let it: Vec<f64> = (0..r1)
                        .map(|q| {
                            rnd((0..h)
                                .map(|j| ga[(ea * r1 + q) * h + j] * x[t * h + j])
                                .sum())
                        })
                        .collect();
                    for (n, d) in delta1.iter_mut().enumerate() {
                        let up = c.gated
                            && if c.layout == MOE_GATE_UP_INTERLEAVED {
                                n % 2 == 1
                            } else {
                                n >= i
                            };
                        let off = if up { r } else { 0 };
                        *d = a.scaling
                            * (0..r)
                                .map(|q| gb[(e * n1 + n) * r + q] * it[off + q])
                                .sum::<f64>();
                    }
                }
                let g1: Vec<f64> = (0..n1)
                    .map(|n| {
                        let dot: f64 = (0..h)
                            .map(|j| x[t * h + j] * w13[(e * n1 + n) * h + j])
                            .sum();
                        let bias = b13.as_ref().map_or(0.0, |b| b[e * n1 + n]);
                        rnd(v * (dot + delta1[n] + bias))
                    })
                    .collect();
                let act: Vec<f64> = (0..i)
                    .map(|j| {
                        rnd(if c.gated {
                            let (gi, ui) = if c.layout == MOE_GATE_UP_INTERLEAVED {
                                (2 * j, 2 * j + 1)
                            } else {
                                (j, i + j)
                            };
                            ref_gated(c, g1[gi], g1[ui])
                        } else {
                            ref_single(c.activation, g1[j])
                        })
                    })
                    .collect();
                // LoRA on GEMM2.
                let mut delta2 = vec![0.0; h];
                if let Some((a, _, _, da, db)) = &adapter {
                    let eb = if a.down_b.shape[0] == 1 { 0 } else { e };
                    let it: Vec<f64> = (0..r)
                        .map(|q| rnd((0..i).map(|j| da[(e * r + q) * i + j] * act[j]).sum()))
                        .collect();
                    for (hh, d) in delta2.iter_mut().enumerate() {
                        *d = a.scaling
                            * (0..r)
                                .map(|q| db[(eb * h + hh) * r + q] * it[q])
                                .sum::<f64>();
                    }
                }
                let w_after = if !c.on_input && (!c.no_combine || c.keep_weight) {
                    w
                } else {
                    1.0
                };
                for hh in 0..h {
                    let dot: f64 = (0..i).map(|j| act[j] * w2[(e * h + hh) * i + j]).sum();
                    let bias = b2.as_ref().map_or(0.0, |b| b[e * h + hh]);
                    let y = rnd((dot + delta2[hh] + bias) * w_after);
                    if c.no_combine {
                        out[route * h + hh] = y;
                    } else {
                        sum[hh] += y;
                    }
                }
            }
            if !c.no_combine {
                for hh in 0..h {
                    out[t * h + hh] = rnd(c.rsf as f64 * sum[hh]);
                }
            }
        }
        out
    }
}

impl Drop for LoraSetup {
    fn drop(&mut self) {
        unsafe { moe_lora_free(self.lora) };
    }
}

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

/// Four slots of mixed ranks: full rank, a smaller one zero padded, a disabled one, and one
/// never set; tokens map to each of them and to −1.
fn four_slots(max_rank: usize) -> Vec<SlotSpec> {
    vec![
        slot(max_rank),
        slot((max_rank / 2).max(1)),
        SlotSpec {
            enabled: false,
            ..slot(max_rank)
        },
        EMPTY,
    ]
}

// ---------------------------------------------------------------- semantics

#[test]
fn mixed_adapters_ranks_and_maps_match_the_reference() {
    let mut seed = 0;
    for dt in DTYPES {
        for max_rank in [8, 16, 64] {
            for slots in [vec![slot(max_rank)], four_slots(max_rank)] {
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
