//! LoRA cases in tests (SPEC §7): adapters of a given rank zero padded to r, slot states
//! (set, empty, disabled, cleared), a `Setup` with a wrapper and a token → adapter map in both
//! forms, and a float64 reference of SPEC §2–3 with §7's deltas, written apart from the
//! library's code. tests/lora.rs holds the CPU layer to it; tests/cuda_lora.rs the CUDA one.

use super::*;
use std::ptr::{null, null_mut};

// ---------------------------------------------------------------- adapters

/// One slot's adapter as the host holds it: r-padded tensors and the true rank.
pub struct Adapter {
    pub scaling: f64,
    pub gate_up_a: HostTensor,
    pub gate_up_b: HostTensor,
    pub down_a: HostTensor,
    pub down_b: HostTensor,
}

/// What a slot holds in a case: an adapter of this rank (None = never set), with gate_up A
/// and down B shared by all experts, enabled or not, or set and then cleared.
#[derive(Clone, Copy, Debug)]
pub struct SlotSpec {
    pub rank: Option<usize>,
    pub shared: bool,
    pub enabled: bool,
    pub cleared: bool,
}

pub const EMPTY: SlotSpec = SlotSpec {
    rank: None,
    shared: false,
    enabled: true,
    cleared: false,
};

pub fn slot(rank: usize) -> SlotSpec {
    SlotSpec {
        rank: Some(rank),
        ..EMPTY
    }
}

impl Adapter {
    /// Random weights of `rank`, zero padded to `max_rank`; A and B scaled so the deltas are
    /// a sizeable part of each GEMM's output.
    pub fn new(
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

    pub fn set(&mut self, lora: *mut moe_lora, slot: i64) -> moe_status {
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
pub struct LoraCase {
    pub base: Case,
    pub max_rank: usize,
    pub slots: Vec<SlotSpec>,
    /// Give the map as segments (else per token).
    pub segments: bool,
}

/// A Setup with a wrapper, its adapters, a LoRA-sized workspace and a token → adapter map.
pub struct LoraSetup {
    pub s: Setup,
    pub lc: LoraCase,
    pub lora: *mut moe_lora,
    /// The adapters set (a cleared slot keeps its adapter here: a CUDA twin sets and clears it
    /// too).
    pub adapters: Vec<Option<Adapter>>,
    /// Each token's adapter id as the host passes it (−1 = none).
    pub token_adapter: Vec<i32>,
    pub adapter_ids: HostTensor,
    pub seg_indptr: HostTensor,
    pub seg_adapter: HostTensor,
}

impl LoraSetup {
    pub fn new(lc: &LoraCase) -> LoraSetup {
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
            if spec.cleared {
                ok(
                    unsafe { moe_lora_clear_slot(lora, i as i64) },
                    "moe_lora_clear_slot",
                );
            }
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
    pub fn set_token_adapters(&mut self, adapters: &[i32]) {
        let m = adapters.len() as i64;
        let ids: Vec<f64> = adapters.iter().map(|&a| a as f64).collect();
        let indptr: Vec<f64> = (0..=m).map(|i| i as f64).collect();
        self.adapter_ids = HostTensor::from_f64(Dt::I32, &[m], &ids);
        self.seg_indptr = HostTensor::from_f64(Dt::I32, &[m + 1], &indptr);
        self.seg_adapter = HostTensor::from_f64(Dt::I32, &[m], &ids);
        self.token_adapter = adapters.to_vec();
    }

    /// Sets the adapters of the segments as they are (same seg_indptr; the per-token map
    /// follows), so that a captured map of S segments can take new values.
    pub fn set_segment_adapters(&mut self, adapters: &[i32]) {
        let indptr: Vec<usize> = self
            .seg_indptr
            .values()
            .iter()
            .map(|&v| v as usize)
            .collect();
        assert_eq!(adapters.len() + 1, indptr.len(), "one adapter per segment");
        for (s, &a) in adapters.iter().enumerate() {
            self.seg_adapter.set(s, a as f64);
            for m in indptr[s]..indptr[s + 1] {
                self.token_adapter[m] = a;
                self.adapter_ids.set(m, a as f64);
            }
        }
    }

    /// moe_run_lora with the case's map form.
    pub fn run(&mut self) -> moe_status {
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

    /// The adapter token m gets: None for −1, an empty slot, a cleared or a disabled one.
    pub fn active(&self, m: usize) -> Option<&Adapter> {
        let a = self.token_adapter[m];
        if a < 0 || !self.lc.slots[a as usize].enabled || self.lc.slots[a as usize].cleared {
            return None;
        }
        self.adapters[a as usize].as_ref()
    }

    /// SPEC §2–3 and §7 in float64, rounding where the SPEC rounds (the base part follows
    /// tests/common's reference line by line).
    pub fn reference(&self) -> Vec<f64> {
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

/// Four slots of mixed ranks: full rank, a smaller one zero padded, a disabled one, and one
/// never set; tokens map to each of them and to −1.
pub fn four_slots(max_rank: usize) -> Vec<SlotSpec> {
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

/// `four_slots` with the last slot set and then cleared rather than never set.
pub fn four_slots_cleared(max_rank: usize) -> Vec<SlotSpec> {
    let mut slots = four_slots(max_rank);
    slots[3] = SlotSpec {
        cleared: true,
        ..slot(max_rank)
    };
    slots
}
