//! moe_run_lora on CUDA layers (SPEC §7) against the CPU LoRA layer and the float64 reference
//! of tests/common/lora.rs: slots of mixed ranks (zero padded to r), −1, disabled and cleared
//! slots in one batch, per-token and segment maps, gated and non-gated layers in both layouts,
//! shared-outer weights, the flags that move a rounding point, M ∈ {0, 1, 37, 512}; bad map
//! values dropped on the device and reported by the next call; a captured graph replaying new
//! map values and the slots as captured; no compilation inside a capture; the 64-slot cap.
//! Each case builds the CPU `LoraSetup`, makes the CUDA twin (same config, weights, batch,
//! adapters and map copied to the device), poisons every output (0xFF = NaN) and compares
//! with tests/cuda.rs's tolerances.
//!
//! Without a GPU (or without CUDA in this build) every test prints `SKIPPED: <reason>` and
//! passes; with `FUSEDMOE_REQUIRE_GPU=1` it fails instead. `FUSEDMOE_GPU_REDUCED=1` runs a
//! small subset (compute-sanitizer). On the GPU machine: `bash tests/gpu/check.sh test-cuda_lora`.

mod common;
mod cuda_support;

use common::lora::*;
use common::*;
use cuda_support::*;
use cudarc::driver::{sys, CudaContext, CudaStream};
use fusedmoe::ffi::*;
use std::ffi::c_void;
use std::ptr::{null, null_mut};
use std::sync::Arc;

const DTYPES: [Dt; 3] = [Dt::Bf16, Dt::F16, Dt::F32];

// ---------------------------------------------------------------- the CUDA twin of a LoraSetup

/// A CUDA layer, batch and LoRA wrapper made from a `LoraSetup`: the same adapters (set,
/// disabled and cleared the same way) and map, copied to the device; a LoRA-sized workspace.
struct CudaLora {
    lora: *mut moe_lora,
    /// Device copies of each slot's gate_up A and B, down A and B; dropped after the wrapper.
    adapters: Vec<Option<[DeviceTensor; 4]>>,
    adapter_ids: DeviceTensor,
    seg_indptr: DeviceTensor,
    seg_adapter: DeviceTensor,
    segments: bool,
    d: DeviceBatch,
    layer: CudaLayer,
}

impl Drop for CudaLora {
    fn drop(&mut self) {
        unsafe { moe_lora_free(self.lora) };
    }
}

impl CudaLora {
    fn new(ls: &LoraSetup, stream: &Arc<CudaStream>) -> Result<CudaLora, String> {
        let layer = CudaLayer::new(&ls.s, stream)?;
        let d = DeviceBatch::new(&ls.s, &layer, stream)?;
        let lc = &ls.lc;
        let mut lora = null_mut();
        let (slots, rank) = (lc.slots.len() as i64, lc.max_rank as i64);
        status(
            unsafe { moe_lora_create(layer.layer, slots, rank, &mut lora) },
            "moe_lora_create",
        )?;
        let mut g = CudaLora {
            lora,
            adapters: Vec::new(),
            adapter_ids: DeviceTensor::upload(stream, &ls.adapter_ids),
            seg_indptr: DeviceTensor::upload(stream, &ls.seg_indptr),
            seg_adapter: DeviceTensor::upload(stream, &ls.seg_adapter),
            segments: lc.segments,
            d,
            layer,
        };
        for (i, (spec, adapter)) in lc.slots.iter().zip(&ls.adapters).enumerate() {
            let device = adapter.as_ref().map(|a| {
                [&a.gate_up_a, &a.gate_up_b, &a.down_a, &a.down_b]
                    .map(|t| DeviceTensor::upload(stream, t))
            });
            g.adapters.push(device);
            let slot = i as i64;
            if let (Some(a), Some(w)) = (adapter, g.adapters[i].as_mut()) {
                let [ga, gb, da, db] = w.each_mut().map(|t| t.raw());
                let scaling = a.scaling as f32;
                let set = unsafe { moe_lora_set_slot(lora, slot, &ga, &gb, &da, &db, scaling) };
                status(set, "moe_lora_set_slot")?;
            }
            if spec.cleared {
                status(unsafe { moe_lora_clear_slot(lora, slot) }, "clear_slot")?;
            }
            if !spec.enabled {
                status(
                    unsafe { moe_lora_set_enabled(lora, slot, false) },
                    "set_enabled",
                )?;
            }
        }
        let mut bytes = 0usize;
        let tokens = ls.s.case.tokens as i64;
        status(
            unsafe { moe_lora_workspace_size(lora, tokens, &mut bytes) },
            "moe_lora_workspace_size",
        )?;
        g.d.ws = DeviceTensor::poisoned(stream, Dt::U8, &[bytes as i64]);
        Ok(g)
    }

    /// Copies the setup's map in the case's form over the device's, in stream order; its
    /// shapes must be those the device map was made with.
    fn write_map(&mut self, ls: &LoraSetup) {
        let mut pairs = vec![(&mut self.adapter_ids, &ls.adapter_ids)];
        if self.segments {
            pairs.push((&mut self.seg_indptr, &ls.seg_indptr));
            pairs.push((&mut self.seg_adapter, &ls.seg_adapter));
        }
        for (device, host) in pairs {
            assert_eq!(device.shape, host.shape, "the map keeps its shape");
            device.write(host);
        }
    }

    fn stream(&self) -> *mut c_void {
        cu(&self.d.stream)
    }

    fn prepare(&mut self) -> moe_status {
        let (ids, ws) = (self.d.ids.raw(), self.d.ws.raw());
        self.layer.prepare_raw(&ids, &ws, self.stream())
    }

    /// moe_run_lora on the prepared plan. An inplace layer gets `out` = NULL on even seeds and
    /// `out` = hidden on odd ones.
    fn run(&mut self, c: &Case) -> moe_status {
        let stream = self.stream();
        let (hidden, router, out) = (self.d.hidden.raw(), self.d.router.raw(), self.d.out.raw());
        let out: *const moe_tensor = match (c.inplace, c.seed % 2) {
            (false, _) => &out,
            (true, 0) => null(),
            (true, _) => &hidden,
        };
        let (ids, indptr, segs) = (
            self.adapter_ids.raw(),
            self.seg_indptr.raw(),
            self.seg_adapter.raw(),
        );
        let (ids, indptr, segs): (*const moe_tensor, *const moe_tensor, *const moe_tensor) =
            if self.segments {
                (null(), &indptr, &segs)
            } else {
                (&ids, null(), null())
            };
        let (lora, plan) = (self.lora, self.layer.plan);
        unsafe { moe_run_lora(lora, plan, &hidden, &router, ids, indptr, segs, out, stream) }
    }

    /// moe_prepare + moe_run_lora (asynchronous).
    fn launch(&mut self, c: &Case) -> Result<(), String> {
        status(self.prepare(), "moe_prepare")?;
        status(self.run(c), "moe_run_lora")
    }
}

/// The CPU LoRA layer's result and the float64 reference for the setup as it is now.
fn cpu_and_reference(ls: &mut LoraSetup) -> Result<(Vec<f64>, Vec<f64>), String> {
    ls.s.out.fill_bytes(POISON);
    if ls.s.case.inplace {
        let restored = HostTensor::from_f64(ls.s.hidden.dt, &ls.s.hidden.shape, &ls.s.hidden_in);
        ls.s.hidden = restored;
    }
    status(ls.s.prepare(), "CPU moe_prepare")?;
    status(ls.run(), "CPU moe_run_lora")?;
    Ok((ls.s.output(), ls.reference()))
}

/// Holds the CUDA result of `ls`'s batch to the CPU layer's and to float64.
fn compare_lora(ls: &mut LoraSetup, got: &[f64]) -> Result<String, String> {
    let (cpu, reference) = cpu_and_reference(ls)?;
    compare(&ls.s.case, got, &cpu, Some(&reference), &ls.s.ids.values())
}

/// One LoRA case on CUDA against the CPU and float64 (M = 0: nothing written).
fn check_lora_case(ctx: &Arc<CudaContext>, lc: &LoraCase) -> Result<String, String> {
    check_lora_setup(ctx, LoraSetup::new(lc))
}

/// `check_lora_case` for a setup whose adapters the caller may have set.
fn check_lora_setup(ctx: &Arc<CudaContext>, mut ls: LoraSetup) -> Result<String, String> {
    let base = ls.lc.base.clone();
    let c = &base;
    let stream = stream_for(ctx, c.seed);
    let mut g = CudaLora::new(&ls, &stream)?;
    g.launch(c)?;
    let (cpu, reference) = cpu_and_reference(&mut ls)?;
    sync(&stream);
    let got = g.d.output(c);
    let line = compare(c, &got, &cpu, Some(&reference), &ls.s.ids.values())?;
    if c.tokens == 0 {
        for (name, t) in [("out", &g.d.out), ("hidden", &g.d.hidden)] {
            if !t.poisoned_from(0) {
                return Err(format!("M = 0: {name} was written"));
            }
        }
    }
    Ok(line)
}

fn run_lora_cases(test: &str, ctx: &Arc<CudaContext>, cases: Vec<LoraCase>) {
    let cases: Vec<LoraCase> = if reduced() {
        cases.into_iter().step_by(6).collect()
    } else {
        cases
    };
    run_each(test, &cases, |lc| check_lora_case(ctx, lc));
}

/// A LoRA case on tests/cuda.rs's base shape (H 200, I 72: not multiples of 64).
fn lora_case(base: Case, max_rank: usize, slots: Vec<SlotSpec>, segments: bool) -> LoraCase {
    LoraCase {
        base,
        max_rank,
        slots,
        segments,
    }
}

// ---------------------------------------------------------------- semantics

/// r ∈ {8, 16, 64}, L ∈ {1, 4} (full, half rank, disabled, cleared), both map forms, every
/// dtype; the map also gives −1.
#[test]
fn mixed_adapters_ranks_and_maps_match_the_cpu() {
    let Some(ctx) = gpu("mixed_adapters_ranks_and_maps_match_the_cpu") else {
        return;
    };
    let mut cases = Vec::new();
    let mut seed = 100;
    for dt in DTYPES {
        for max_rank in [8, 16, 64] {
            for slots in [vec![slot(max_rank)], four_slots_cleared(max_rank)] {
                for segments in [false, true] {
                    seed += 1;
                    let base = Case {
                        tokens: 37,
                        drop: 0.1,
                        ..base(dt, seed)
                    };
                    cases.push(lora_case(base, max_rank, slots.clone(), segments));
                }
            }
        }
    }
    run_lora_cases("mixed adapters", &ctx, cases);
}

/// Gated (halves, interleaved, swiglu_oai) and non-gated layers with biases, shared-outer
/// gate_up A and down B; and odd sizes (H 63, I 37, r 6 and 5) that take the kernels' narrow
/// loads.
#[test]
fn layouts_shared_outer_weights_and_odd_sizes_match_the_cpu() {
    let Some(ctx) = gpu("layouts_shared_outer_weights_and_odd_sizes_match_the_cpu") else {
        return;
    };
    let mut cases = Vec::new();
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
                    layout,
                    b13: true,
                    b2: true,
                    tokens: 37,
                    ..base(dt, seed)
                }
                .with_activation(act);
                base.gated = gated;
                let shared_slot = SlotSpec { shared, ..slot(8) };
                let slots = vec![shared_slot, slot(4), shared_slot];
                cases.push(lora_case(base, 8, slots, seed % 2 == 0));
            }
        }
        // r 5: odd, so the expand takes its 16-bit loads of B and t's element path
        for (layout, segments, rank) in [
            (MOE_GATE_UP_HALVES, false, 6),
            (MOE_GATE_UP_INTERLEAVED, true, 6),
            (MOE_GATE_UP_HALVES, true, 5),
        ] {
            seed += 1;
            let base = Case {
                hidden: 63,
                inter: 37,
                layout,
                b13: true,
                drop: 0.1,
                tokens: 37,
                ..base(dt, seed)
            };
            cases.push(lora_case(base, rank, four_slots_cleared(rank), segments));
        }
    }
    run_lora_cases("layouts", &ctx, cases);
}

/// Split-K GEMMs (sm_90 clusters): the delta is added once, after the partial tiles meet.
#[test]
fn split_k_gemms_match_the_cpu() {
    let Some(ctx) = gpu("split_k_gemms_match_the_cpu") else {
        return;
    };
    if !clusters_for_split_k(&ctx) {
        return;
    }
    let split = |s1: u32, s2: u32| -> Vec<(String, String)> {
        number_options(&[
            ("tile.block_m", 16),
            ("tile.block_n", 32),
            ("tile.block_k", 64),
            ("tile.split_k", s1),
            ("tile.split_k_down", s2),
        ])
    };
    let mut cases = Vec::new();
    for (n, (dt, layout, tokens)) in [
        (Dt::Bf16, MOE_GATE_UP_HALVES, 1),
        (Dt::F16, MOE_GATE_UP_INTERLEAVED, 37),
        (Dt::Bf16, MOE_GATE_UP_INTERLEAVED, 37),
    ]
    .into_iter()
    .enumerate()
    {
        let base = Case {
            layout,
            b13: true,
            b2: true,
            tokens,
            hidden: 520,
            options: split(3 + n as u32, 2),
            ..base(dt, 700 + n as u64)
        };
        let shared_slot = SlotSpec {
            shared: n == 2,
            ..slot(16)
        };
        cases.push(lora_case(
            base,
            16,
            vec![shared_slot, slot(8), shared_slot],
            n == 1,
        ));
    }
    run_lora_cases("split-K", &ctx, cases);
}

/// GEMM2 at its own BLOCK_N (tile.block_n_down): its epilogue's expand over the wider
/// tile's column fragments, at decode (mma.sync) and at a wgmma tile.
#[test]
fn gemm2_at_its_own_block_n_matches_the_cpu() {
    let Some(ctx) = gpu("gemm2_at_its_own_block_n_matches_the_cpu") else {
        return;
    };
    let tile = |bm: u32, bn: u32, warps: u32, down: u32| -> Vec<(String, String)> {
        number_options(&[
            ("tile.block_m", bm),
            ("tile.block_n", bn),
            ("tile.block_k", 64),
            ("tile.num_warps", warps),
            ("tile.block_n_down", down),
        ])
    };
    let mut cases = Vec::new();
    for (n, dt) in DTYPES.into_iter().enumerate() {
        let decode = Case {
            b13: true,
            b2: true,
            tokens: 5,
            hidden: 520,
            options: tile(16, 32, 4, 128),
            ..base(dt, 760 + 2 * n as u64)
        };
        cases.push(lora_case(decode, 16, vec![slot(16), slot(8)], false));
        let prefill = Case {
            layout: MOE_GATE_UP_INTERLEAVED,
            tokens: 512,
            drop: 0.1,
            options: tile(64, 64, 4, 128),
            ..base(dt, 761 + 2 * n as u64)
        };
        cases.push(lora_case(prefill, 16, four_slots_cleared(16), true));
    }
    run_lora_cases("GEMM2 at its own BLOCK_N", &ctx, cases);
}

/// The flags that move the router weight or a rounding point: on-input, no_combine (with and
/// without the router weight), inplace, rsf; with biases and dropped routes.
#[test]
fn flags_match_the_cpu() {
    let Some(ctx) = gpu("flags_match_the_cpu") else {
        return;
    };
    let mut cases = Vec::new();
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
            let base = Case {
                on_input,
                no_combine,
                keep_weight,
                inplace,
                rsf,
                b13: true,
                b2: true,
                drop: 0.2,
                tokens: 37,
                ..base(dt, seed)
            };
            cases.push(lora_case(base, 16, four_slots_cleared(16), seed % 2 == 1));
        }
    }
    run_lora_cases("flags", &ctx, cases);
}

/// M ∈ {0, 1, 37, 512} in both map forms (E 16, K 4); M = 0 writes nothing.
#[test]
fn token_counts_0_1_37_and_512_match_the_cpu() {
    let Some(ctx) = gpu("token_counts_0_1_37_and_512_match_the_cpu") else {
        return;
    };
    let mut cases = Vec::new();
    for (n, dt) in DTYPES.into_iter().enumerate() {
        for tokens in [0, 1, 37, 512] {
            for segments in [false, true] {
                let base = Case {
                    tokens,
                    experts: 16,
                    top_k: 4,
                    drop: 0.05,
                    ..base(dt, 700 + (n * 1000 + tokens) as u64)
                };
                cases.push(lora_case(base, 16, four_slots_cleared(16), segments));
            }
        }
    }
    run_lora_cases("token counts", &ctx, cases);
}

/// The tensor-core shrink takes, per block and slot, only the block's routes of that slot,
/// compacted in order: at BLOCK_M 64, 128 and 256 (the last compacts in two rounds of 128),
/// an expert's first block holds up to 3 m16 tiles (BLOCK_M 64) or more than a pass of 64
/// (128, 256) of slot 0's routes, slot 1's routes only at its end (their tokens come last),
/// and −1, disabled and cleared slots between them; E 4, K 2.
#[test]
fn shrink_blocks_with_many_or_late_routes_of_a_slot_match_the_cpu() {
    let Some(ctx) = gpu("shrink_blocks_with_many_or_late_routes_of_a_slot_match_the_cpu") else {
        return;
    };
    // (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, M): an expert gets about M / 2 routes, so
    // its first block ends about 2 · BLOCK_M tokens in
    let tiles = [
        (64, 64, 64, 4, 3, 160),
        (128, 64, 64, 8, 5, 300),
        (256, 64, 32, 8, 3, 600),
    ];
    let mut cases = Vec::new();
    for (n, dt) in [Dt::Bf16, Dt::F16].into_iter().enumerate() {
        for (t, (bm, bn, bk, warps, stages, tokens)) in tiles.into_iter().enumerate() {
            let base = Case {
                tokens,
                experts: 4,
                top_k: 2,
                drop: 0.05,
                options: number_options(&[
                    ("tile.block_m", bm),
                    ("tile.block_n", bn),
                    ("tile.block_k", bk),
                    ("tile.num_warps", warps),
                    ("tile.num_stages", stages),
                ]),
                ..base(dt, 1400 + (10 * n + t) as u64)
            };
            let segments = (n + t) % 2 == 1;
            cases.push(lora_case(base, 16, four_slots_cleared(16), segments));
        }
    }
    run_each("shrink compaction", &cases, |lc| {
        let tokens = lc.base.tokens;
        let mut ls = LoraSetup::new(lc);
        // slot 0 (with −1 and the disabled slot 2) over the first 70 % of the tokens, slot 1
        // (with 0, −1 and the cleared slot 3) after them
        let late = tokens * 7 / 10;
        let adapters: Vec<i32> = (0..tokens)
            .map(|m| {
                if m < late {
                    [0, 0, 0, -1, 0, 2, 0][m % 7]
                } else {
                    [1, 1, 0, -1, 1, 3][m % 6]
                }
            })
            .collect();
        ls.set_token_adapters(&adapters);
        check_lora_setup(&ctx, ls)
    });
}

/// Tokens mapped to −1, a disabled and a cleared slot only: moe_run_lora gives what moe_run
/// gives, value for value (the LoRA GEMMs add exact zeros to the same accumulators).
#[test]
fn no_active_adapter_gives_the_base_layer_output() {
    let Some(ctx) = gpu("no_active_adapter_gives_the_base_layer_output") else {
        return;
    };
    for (n, dt) in DTYPES.into_iter().enumerate() {
        let base = Case {
            tokens: 37,
            b13: true,
            b2: true,
            ..base(dt, 900 + n as u64)
        };
        let lc = lora_case(base, 8, four_slots_cleared(8), n % 2 == 1);
        let c = lc.base.clone();
        let mut ls = LoraSetup::new(&lc);
        let adapters: Vec<i32> = (0..c.tokens).map(|m| [-1, 2, 3][m % 3]).collect();
        ls.set_token_adapters(&adapters);
        let stream = ctx.new_stream().unwrap();
        let mut g = CudaLora::new(&ls, &stream).unwrap_or_else(|e| panic!("{c:?}: {e}"));
        g.launch(&c).unwrap_or_else(|e| panic!("{c:?}: {e}"));
        let with_lora = g.d.out.values();
        g.d.out.fill(POISON);
        let (hidden, router, out) = (g.d.hidden.raw(), g.d.router.raw(), g.d.out.raw());
        ok(
            g.layer.run_raw(&hidden, &router, Some(&out), cu(&stream)),
            "moe_run",
        );
        let base_out = g.d.out.values();
        assert!(
            with_lora == base_out,
            "{dt:?}: moe_run_lora without active adapters differs from moe_run"
        );
        compare_lora(&mut ls, &with_lora).unwrap_or_else(|e| panic!("{c:?}: {e}"));
    }
}

// ---------------------------------------------------------------- bad maps on the device

/// Adapter ids outside [−1, L) in the device map count as −1 and are reported by the next call
/// on the layer (it writes nothing); the call after works. Per-token ids, segment adapters,
/// and a seg_indptr that does not end at M.
#[test]
fn bad_map_values_are_dropped_and_reported_by_the_next_call() {
    let Some(ctx) = gpu("bad_map_values_are_dropped_and_reported_by_the_next_call") else {
        return;
    };
    for (n, bad) in [BadMap::Ids, BadMap::SegmentAdapters, BadMap::Indptr]
        .into_iter()
        .enumerate()
    {
        let base = Case {
            tokens: 37,
            b13: true,
            drop: 0.1,
            ..base(DTYPES[n], 1100 + n as u64)
        };
        let lc = lora_case(base, 8, four_slots_cleared(8), bad != BadMap::Ids);
        bad_map_case(&ctx, &lc, bad).unwrap_or_else(|e| panic!("{bad:?}: {lc:?}\n    {e}"));
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BadMap {
    Ids,
    SegmentAdapters,
    Indptr,
}

fn bad_map_case(ctx: &Arc<CudaContext>, lc: &LoraCase, bad: BadMap) -> Result<(), String> {
    let c = &lc.base;
    let mut ls = LoraSetup::new(lc);
    let stream = ctx.new_stream().unwrap();
    // The device gets the bad map; the CPU (which refuses one) the same map with each bad
    // adapter as −1: what the device must compute.
    let mut fixed: Vec<i32> = match bad {
        BadMap::Ids => ls.token_adapter.clone(),
        _ => ls.seg_adapter.values().iter().map(|&a| a as i32).collect(),
    };
    for (i, v) in [4.0, -2.0, 1000.0, i32::MIN as f64].into_iter().enumerate() {
        let at = (i * 7 + 3) % fixed.len();
        match bad {
            BadMap::Ids => ls.adapter_ids.set(at, v),
            BadMap::SegmentAdapters => ls.seg_adapter.set(at, v),
            BadMap::Indptr => continue,
        }
        fixed[at] = -1;
    }
    let last = ls.seg_indptr.numel() - 1;
    if bad == BadMap::Indptr {
        ls.seg_indptr.set(last, (c.tokens + 3) as f64); // ends past M
    }
    let mut g = CudaLora::new(&ls, &stream)?;
    match bad {
        BadMap::Ids => ls.set_token_adapters(&fixed),
        BadMap::SegmentAdapters => ls.set_segment_adapters(&fixed),
        BadMap::Indptr => ls.seg_indptr.set(last, c.tokens as f64),
    }
    let name = bad_name(bad);
    status(g.layer.warmup(c.tokens, &stream), "moe_warmup")?;

    // 1. the bad batch runs; its tokens with bad adapters get no delta (a seg_indptr that ends
    //    past M still places every token)
    g.launch(c)?;
    sync(&stream);
    compare_lora(&mut ls, &g.d.output(c)).map_err(|e| format!("the bad batch: {e}"))?;

    // 2. the next call reports it by name and writes nothing
    g.d.out.fill(POISON);
    sync(&stream);
    let s = g.run(c);
    let message = last_error();
    if s != moe_status::MOE_ERR_INVALID_ARGUMENT || !message.starts_with(&format!("{name}:")) {
        return Err(format!(
            "the call after a bad map: {s:?} \"{message}\", expected MOE_ERR_INVALID_ARGUMENT \
             starting \"{name}:\""
        ));
    }
    sync(&stream);
    if !g.d.out.poisoned_from(0) {
        return Err("the refused moe_run_lora wrote out".into());
    }

    // 3. with the good map, the call after works
    g.write_map(&ls);
    g.launch(c)?;
    sync(&stream);
    compare_lora(&mut ls, &g.d.output(c)).map_err(|e| format!("the run after the report: {e}"))?;
    Ok(())
}

fn bad_name(bad: BadMap) -> &'static str {
    match bad {
        BadMap::Ids => "adapter_ids",
        BadMap::SegmentAdapters => "seg_adapter",
        BadMap::Indptr => "seg_indptr",
    }
}

// ---------------------------------------------------------------- CUDA graphs

/// moe_prepare + moe_run_lora captured once after moe_warmup: replays read new map values
/// written into the same buffers, replay the slot table as captured (a slot disabled after
/// the capture still gives its delta there, and none in an eager run), and are repeatable.
#[test]
fn a_captured_lora_graph_replays_new_maps_and_the_slots_as_captured() {
    let Some(ctx) = gpu("a_captured_lora_graph_replays_new_maps_and_the_slots_as_captured") else {
        return;
    };
    let mut cases = vec![lora_case(
        Case {
            tokens: 64,
            b13: true,
            b2: true,
            drop: 0.1,
            ..base(Dt::Bf16, 1300)
        },
        16,
        four_slots_cleared(16),
        false,
    )];
    if !reduced() {
        cases.push(lora_case(
            Case {
                tokens: 64,
                no_combine: true,
                drop: 0.1,
                ..base(Dt::F16, 1301)
            }
            .with_activation(MOE_ACTIVATION_GELU),
            8,
            vec![slot(8), slot(4)],
            true,
        ));
    }
    for lc in cases {
        graph_case(&ctx, &lc).unwrap_or_else(|e| panic!("graph capture: {lc:?}\n    {e}"));
    }
}

fn graph_case(ctx: &Arc<CudaContext>, lc: &LoraCase) -> Result<(), String> {
    let c = &lc.base;
    let mut ls = LoraSetup::new(lc);
    let stream = ctx.new_stream().unwrap();
    let mut g = CudaLora::new(&ls, &stream)?;
    // after moe_lora_create: moe_warmup compiles the LoRA kernels too
    status(g.layer.warmup(c.tokens, &stream), "moe_warmup")?;
    sync(&stream);

    stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .map_err(|e| format!("cuStreamBeginCapture: {e:?}"))?;
    let launched = g.launch(c);
    let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
    launched.map_err(|e| format!("during capture: {e}"))?;
    let graph = graph
        .map_err(|e| format!("cuStreamEndCapture / instantiate: {e:?}"))?
        .ok_or("the capture recorded an empty graph")?;
    let replay = |g: &mut CudaLora| {
        g.d.out.fill(POISON);
        graph.launch().expect("cuGraphLaunch");
        sync(&stream);
        g.d.output(c)
    };

    // 1. the captured map
    let got = replay(&mut g);
    compare_lora(&mut ls, &got).map_err(|e| format!("replay of the captured map: {e}"))?;

    // 2. new adapters in the same map buffers, replayed twice
    let mut rng = Rng::new(c.seed + 1);
    let slots = lc.slots.len();
    if lc.segments {
        let n = ls.seg_adapter.numel();
        let new: Vec<i32> = (0..n).map(|_| rng.below(slots + 1) as i32 - 1).collect();
        ls.set_segment_adapters(&new);
    } else {
        let new: Vec<i32> = (0..c.tokens)
            .map(|_| rng.below(slots + 1) as i32 - 1)
            .collect();
        ls.set_token_adapters(&new);
    }
    g.write_map(&ls);
    let got = replay(&mut g);
    let again = replay(&mut g);
    if got
        .iter()
        .zip(&again)
        .any(|(a, b)| a.to_bits() != b.to_bits())
    {
        return Err("two replays of the same batch differ".into());
    }
    compare_lora(&mut ls, &got).map_err(|e| format!("replay of a new map: {e}"))?;

    // 3. slot 0 disabled after the capture: the replay keeps the captured table, an eager run
    //    sees the change
    let mostly_slot_0: Vec<i32> = (0..c.tokens).map(|m| [0, 0, 1, -1][m % 4]).collect();
    if lc.segments {
        let n = ls.seg_adapter.numel();
        ls.set_segment_adapters(&mostly_slot_0[..n]);
    } else {
        ls.set_token_adapters(&mostly_slot_0);
    }
    g.write_map(&ls);
    ok(unsafe { moe_lora_set_enabled(g.lora, 0, false) }, "disable");
    let got = replay(&mut g);
    compare_lora(&mut ls, &got).map_err(|e| format!("replay after a slot change: {e}"))?;
    g.d.out.fill(POISON);
    g.launch(c)?;
    sync(&stream);
    ok(
        unsafe { moe_lora_set_enabled(ls.lora, 0, false) },
        "disable (CPU)",
    );
    ls.lc.slots[0].enabled = false;
    compare_lora(&mut ls, &g.d.output(c)).map_err(|e| format!("eager run after it: {e}"))?;
    Ok(())
}

/// A LoRA run whose kernels moe_warmup did not compile is refused inside a capture, naming the
/// stream, before it launches anything; outside the capture it compiles and runs.
#[test]
fn lora_kernels_are_not_compiled_inside_a_capture() {
    let Some(ctx) = gpu("lora_kernels_are_not_compiled_inside_a_capture") else {
        return;
    };
    let lc = lora_case(
        Case {
            tokens: 16,
            ..base(Dt::Bf16, 1500)
        },
        8,
        vec![slot(8), slot(8)],
        false,
    );
    let c = lc.base.clone();
    let mut ls = LoraSetup::new(&lc);
    let stream = ctx.new_stream().unwrap();
    let mut g = CudaLora::new(&ls, &stream).unwrap_or_else(|e| panic!("{e}"));
    // the base path's kernels, eagerly (moe_run compiles on first use)
    let (hidden, router, out) = (g.d.hidden.raw(), g.d.router.raw(), g.d.out.raw());
    ok(g.prepare(), "moe_prepare");
    ok(
        g.layer.run_raw(&hidden, &router, Some(&out), cu(&stream)),
        "moe_run",
    );
    sync(&stream);

    assert_refused_inside_capture(&stream, || {
        vec![("moe_prepare", g.prepare()), ("moe_run_lora", g.run(&c))]
    });

    g.d.out.fill(POISON);
    g.launch(&c).unwrap_or_else(|e| panic!("{e}"));
    sync(&stream);
    compare_lora(&mut ls, &g.d.output(&c)).unwrap_or_else(|e| panic!("{e}"));
}

/// A wrapper over a CUDA layer takes at most 64 slots (its table is a launch parameter):
/// more are refused at creation, naming num_slots.
#[test]
fn more_than_64_slots_are_refused_on_a_cuda_layer() {
    let Some(ctx) = gpu("more_than_64_slots_are_refused_on_a_cuda_layer") else {
        return;
    };
    assert!(unsafe { moe_supports(c"lora".as_ptr()) });
    let s = Setup::new(&base(Dt::Bf16, 1600));
    let stream = ctx.new_stream().unwrap();
    let layer = CudaLayer::new(&s, &stream).unwrap_or_else(|e| panic!("{e}"));
    let mut lora = null_mut();
    let refused = unsafe { moe_lora_create(layer.layer, 65, 8, &mut lora) };
    let message = last_error();
    assert_eq!(refused, moe_status::MOE_ERR_UNSUPPORTED, "{message}");
    assert!(
        message.starts_with("num_slots: 65") && message.contains("64"),
        "{message}"
    );
    assert!(lora.is_null(), "nothing written on failure");
    ok(
        unsafe { moe_lora_create(layer.layer, 64, 8, &mut lora) },
        "64 slots",
    );
    unsafe { moe_lora_free(lora) };
}
