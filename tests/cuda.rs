//! The CUDA backend against the CPU layer (and the float64 reference of tests/common where it
//! is affordable): every dtype, activation, layout and flag, a grid of token / route / expert
//! counts, odd and model-sized shapes, CUDA graph capture and replay, out-of-range ids, tensors
//! on the wrong device, and empty batches (out-of-range ids and the no-wait check: tests/cuda_gated.rs). Each case builds the CPU `Setup`, makes a CUDA
//! layer from the same config (device set to CUDA) and the same weights and batch copied to
//! the device, poisons every output (0xFF = NaN), and compares.
//!
//! Without a GPU (or without CUDA in this build) every test prints `SKIPPED: <reason>` and
//! passes; with `FUSEDMOE_REQUIRE_GPU=1` it fails instead. `FUSEDMOE_GPU_REDUCED=1` runs a
//! small subset, for compute-sanitizer; `FUSEDMOE_GPU_SANITIZER=1` (set by check.sh under
//! compute-sanitizer) leaves out the stream gate, which a sanitizer's serialized launches
//! would deadlock on. On the GPU machine: `bash tests/gpu/check.sh` (README, "Checking the
//! CUDA backend on a GPU").

mod common;
mod cuda_support;

use common::*;
use cuda_support::*;
use cudarc::driver::{sys, CudaContext};
use fusedmoe::ffi::*;
use std::ptr::null_mut;
use std::sync::Arc;
use std::time::Instant;

const DTYPES: [Dt; 3] = [Dt::Bf16, Dt::F16, Dt::F32];

/// Non-gated cases need `gated = false` (with_activation keeps silu and gelu gated).
fn non_gated(c: Case, act: u32) -> Case {
    let mut c = c.with_activation(act);
    c.gated = false;
    c
}

/// In reduced mode, keeps the cases `keep` selects.
fn select(cases: Vec<Case>, keep: impl Fn(&Case) -> bool) -> Vec<Case> {
    if reduced() {
        cases.into_iter().filter(|c| keep(c)).collect()
    } else {
        cases
    }
}

#[test]
fn cuda_is_supported_where_a_gpu_is_present() {
    let Some(_ctx) = gpu("cuda_is_supported_where_a_gpu_is_present") else {
        return;
    };
    let count = CudaContext::device_count().expect("cuDeviceGetCount");
    assert!(
        count >= 1,
        "moe_supports(\"cuda\") is true with {count} devices"
    );
    for feature in [
        c"cuda",
        c"f32",
        c"f16",
        c"bf16",
        c"bias",
        c"no_combine",
        c"inplace",
        c"interleaved",
        c"int64_ids",
        c"router_weight_on_input",
        c"swiglu_oai",
        c"relu2",
    ] {
        assert!(
            unsafe { moe_supports(feature.as_ptr()) },
            "moe_supports({feature:?}) is false in a build that runs CUDA"
        );
    }
}

#[test]
fn every_activation_and_layout_matches_the_cpu() {
    let Some(ctx) = gpu("every_activation_and_layout_matches_the_cpu") else {
        return;
    };
    let mut cases = Vec::new();
    let mut seed = 100;
    for dt in DTYPES {
        for act in GATED {
            for layout in [MOE_GATE_UP_HALVES, MOE_GATE_UP_INTERLEAVED] {
                seed += 1;
                let bias = seed % 2 == 0;
                cases.push(
                    Case {
                        layout,
                        tokens: 64,
                        b13: bias,
                        b2: bias,
                        ..base(dt, seed)
                    }
                    .with_activation(act),
                );
            }
        }
        for act in NON_GATED {
            seed += 1;
            cases.push(non_gated(
                Case {
                    tokens: 64,
                    b13: true,
                    ..base(dt, seed)
                },
                act,
            ));
        }
    }
    // f16/bf16 GEMM1s apply the activation in their epilogue by default; the same cases
    // again with the activation in a kernel of its own
    let separate: Vec<Case> = cases
        .iter()
        .filter(|c| c.dt != Dt::F32)
        .map(|c| Case {
            options: vec![("cuda.fuse_act".to_string(), "0".to_string())],
            seed: c.seed + 1000,
            ..c.clone()
        })
        .collect();
    cases.extend(separate);
    run_cases("activations", &ctx, &select(cases, |c| c.dt == Dt::Bf16));
}

/// Each flag alone, then three mixes, per dtype; the activation rotates.
#[test]
fn every_flag_matches_the_cpu() {
    let Some(ctx) = gpu("every_flag_matches_the_cpu") else {
        return;
    };
    let flags: Vec<fn(Case) -> Case> = vec![
        |c| Case {
            b13: true,
            bias_f32: true,
            ..c
        },
        |c| Case { b13: true, ..c },
        |c| Case {
            b2: true,
            bias_f32: true,
            ..c
        },
        |c| Case { b2: true, ..c },
        |c| Case { rsf: 2.5, ..c },
        |c| Case {
            on_input: true,
            b13: true,
            ..c
        },
        |c| Case {
            no_combine: true,
            drop: 0.3,
            ..c
        },
        |c| Case {
            no_combine: true,
            keep_weight: true,
            drop: 0.3,
            ..c
        },
        |c| Case { inplace: true, ..c },
        |c| Case {
            inplace: true,
            on_input: true,
            ..c
        },
        |c| Case {
            router_in_dtype: true,
            ..c
        },
        |c| Case { ids_i64: true, ..c },
        |c| Case { drop: 0.5, ..c },
        |c| Case {
            drop: 1.0,
            b2: true,
            ..c
        },
        |c| Case {
            drop: 1.0,
            b2: true,
            no_combine: true,
            ..c
        },
        |c| Case {
            on_input: true,
            b13: true,
            b2: true,
            bias_f32: true,
            rsf: 0.75,
            drop: 0.2,
            ids_i64: true,
            ..c
        },
        |c| Case {
            no_combine: true,
            keep_weight: true,
            b13: true,
            b2: true,
            router_in_dtype: true,
            drop: 0.25,
            ..c
        },
        |c| Case {
            inplace: true,
            rsf: 2.5,
            b13: true,
            b2: true,
            drop: 0.2,
            router_in_dtype: true,
            ids_i64: true,
            ..c
        },
    ];
    let mut cases = Vec::new();
    for (d, dt) in DTYPES.into_iter().enumerate() {
        for (f, flag) in flags.iter().enumerate() {
            let seed = 1000 + (d * 100 + f) as u64;
            let act = GATED[(d + f) % GATED.len()];
            cases.push(flag(base(dt, seed)).with_activation(act));
        }
    }
    run_cases("flags", &ctx, &select(cases, |c| c.dt == Dt::Bf16));
}

/// M ∈ {0, 1, 3, 64, 257, 4096}, K ∈ {1, 2, 6, 8}, E ∈ {1, 8, 64, 256}: not the product, but
/// every value with small and large partners; dtypes rotate.
#[test]
fn token_route_and_expert_counts_match_the_cpu() {
    let Some(ctx) = gpu("token_route_and_expert_counts_match_the_cpu") else {
        return;
    };
    let mut grid: Vec<(usize, usize, usize)> = Vec::new(); // (M, K, E)
    for m in [0, 1, 3, 64, 257] {
        for (k, e) in [(1, 1), (2, 8), (6, 64), (8, 256)] {
            grid.push((m, k, e));
        }
    }
    grid.extend([(3, 2, 1), (64, 1, 256), (257, 8, 8)]);
    grid.extend([(4096, 2, 8), (4096, 8, 64), (4096, 6, 256), (4096, 1, 1)]);
    let reduced_grid = [
        (0, 2, 8),
        (1, 1, 1),
        (3, 2, 1),
        (3, 8, 256),
        (64, 6, 64),
        (64, 8, 256),
    ];
    let cases: Vec<Case> = grid
        .iter()
        .enumerate()
        .map(|(n, &(tokens, top_k, experts))| Case {
            tokens,
            top_k,
            experts,
            drop: 0.1,
            ..base(DTYPES[n % 3], 2000 + n as u64)
        })
        .collect();
    run_cases(
        "grid",
        &ctx,
        &select(cases, |c| {
            reduced_grid.contains(&(c.tokens, c.top_k, c.experts))
        }),
    );
}

/// H and I that are odd, not multiples of 8, larger than one tile, or I > H.
#[test]
fn odd_hidden_and_intermediate_sizes_match_the_cpu() {
    let Some(ctx) = gpu("odd_hidden_and_intermediate_sizes_match_the_cpu") else {
        return;
    };
    let mut cases = Vec::new();
    let mut seed = 3000;
    for (hidden, inter) in [(100, 36), (63, 37), (72, 200), (1030, 520), (8, 8), (2, 3)] {
        for dt in DTYPES {
            seed += 1;
            cases.push(Case {
                hidden,
                inter,
                b13: true,
                b2: true,
                drop: 0.1,
                ..base(dt, seed)
            });
        }
    }
    seed += 1;
    cases.push(
        Case {
            hidden: 63,
            inter: 37,
            layout: MOE_GATE_UP_INTERLEAVED,
            ..base(Dt::Bf16, seed)
        }
        .with_activation(MOE_ACTIVATION_SWIGLU_OAI),
    );
    seed += 1;
    cases.push(non_gated(
        Case {
            hidden: 63,
            inter: 37,
            ..base(Dt::F16, seed)
        },
        MOE_ACTIVATION_RELU2,
    ));
    run_cases(
        "odd sizes",
        &ctx,
        &select(cases, |c| {
            (c.hidden, c.inter, c.dt) == (63, 37, Dt::Bf16)
                || (c.hidden, c.inter, c.dt) == (100, 36, Dt::F16)
        }),
    );
}

/// A host's tile.block_m (the align granularity) changes nothing in the result.
#[test]
fn tile_block_m_overrides_match_the_cpu() {
    let Some(ctx) = gpu("tile_block_m_overrides_match_the_cpu") else {
        return;
    };
    let mut cases = Vec::new();
    for (n, block_m) in ["16", "32", "64", "128"].into_iter().enumerate() {
        for (tokens, experts) in [(257, 8), (5, 64)] {
            cases.push(Case {
                tokens,
                experts,
                drop: 0.1,
                options: vec![("tile.block_m".into(), block_m.into())],
                ..base(DTYPES[n % 3], 4000 + (n * 10 + tokens) as u64)
            });
        }
    }
    run_cases(
        "tile.block_m",
        &ctx,
        &select(cases, |c| c.tokens == 5 && c.options[0].1 == "16"),
    );
}

/// Tiles of wgmma's shape (BLOCK_K 64, a warpgroup of 4 warps per 64 rows, 64, 128 or 256
/// columns per warpgroup) take Hopper's wgmma main loop on sm_90a (the mma.sync one
/// elsewhere): ragged N and K tails, sparse and crowded experts, biases, the router weight on
/// either GEMM, no_combine, interleaved gate/up, and an odd H (GEMM2 stores single elements
/// where its paired stores would not be aligned).
#[test]
fn wgmma_tiles_match_the_cpu() {
    let Some(ctx) = gpu("wgmma_tiles_match_the_cpu") else {
        return;
    };
    let cases = wgmma_tile_cases(&[]);
    run_wgmma_tile_cases("wgmma tiles", &ctx, cases);
}

/// The same tiles and cases on the warp-specialised wgmma main loop (cuda.wgmma_ws=1: a
/// producer warpgroup and mbarriers instead of every warp loading). Each must keep producer
/// and consumers in step: K tails (H 200: the fourth k-tile mostly zero-filled), k loops no
/// longer than the pipeline (I 64: GEMM2's one k-tile; H 200 in 5 stages), loops that wrap
/// the slots several times (H 512), rows past N, slots without routes, idle blocks.
#[test]
fn wgmma_ws_tiles_match_the_cpu() {
    let Some(ctx) = gpu("wgmma_ws_tiles_match_the_cpu") else {
        return;
    };
    let cases = wgmma_tile_cases(&[("cuda.wgmma_ws", 1)]);
    run_wgmma_tile_cases("wgmma_ws tiles", &ctx, cases);
}

/// The same tiles and cases on the multicast wgmma main loop (cuda.wgmma_multicast=1: CTA
/// pairs on consecutive m-blocks of one expert load the W tile once by TMA into both). Each
/// must keep the pair in step and tell shared pairs from lone CTAs: experts of several
/// blocks (700 routes over 4 experts; 3000 over 6, odd block counts among them), pairs
/// straddling two experts, blocks past num_padded, rows past N in both halves of the tile,
/// K tails the tensor map zero-fills (H 200), the fused activation over the halves layout
/// (the map's paired rows) and the interleaved one.
#[test]
fn wgmma_multicast_tiles_match_the_cpu() {
    let Some(ctx) = gpu("wgmma_multicast_tiles_match_the_cpu") else {
        return;
    };
    let mut cases = wgmma_tile_cases(&[("cuda.wgmma_multicast", 1)]);
    for (n, (bm, bn, warps)) in [(128, 128, 8), (64, 256, 8), (128, 256, 8)]
        .into_iter()
        .enumerate()
    {
        let options = number_options(&[
            ("tile.block_m", bm),
            ("tile.block_n", bn),
            ("tile.block_k", 64),
            ("tile.num_warps", warps),
            ("tile.num_stages", 3),
            ("tile.group_m", 3),
            ("cuda.wgmma_multicast", 1),
        ]);
        cases.push(Case {
            tokens: 1000,
            experts: 6,
            top_k: 3,
            hidden: 320,
            inter: 200,
            drop: 0.05,
            b13: true,
            b2: true,
            options,
            ..base([Dt::Bf16, Dt::F16][n % 2], 6200 + n as u64)
        });
    }
    run_wgmma_tile_cases("wgmma_multicast tiles", &ctx, cases);
}

/// cuda.wgmma_multicast where the wgmma loop does not run, or beside cuda.wgmma_ws, is refused
/// at layer creation, naming the option.
#[test]
fn wgmma_multicast_without_the_wgmma_loop_is_refused_by_name() {
    let Some(ctx) = gpu("wgmma_multicast_without_the_wgmma_loop_is_refused_by_name") else {
        return;
    };
    let mut refused = vec![vec![("cuda.wgmma_multicast", 1), ("cuda.wgmma", 0)]];
    if has_clusters(&ctx) {
        refused.push(vec![("cuda.wgmma_multicast", 1), ("cuda.wgmma_ws", 1)]);
    }
    for options in refused {
        assert_layer_refused(&ctx, &options, 6300, "cuda.wgmma_multicast");
    }
}

/// run_cases over wgmma_tile_cases (and more): in reduced mode, M = 37 at 128 columns.
fn run_wgmma_tile_cases(label: &str, ctx: &Arc<CudaContext>, cases: Vec<Case>) {
    run_cases(
        label,
        ctx,
        &select(cases, |c| c.tokens == 37 && c.options[1].1 == "128"),
    );
}

/// A layer with `options` is refused at creation with MOE_ERR_UNSUPPORTED naming `key`.
fn assert_layer_refused(ctx: &Arc<CudaContext>, options: &[(&str, u32)], seed: u64, key: &str) {
    let case = Case {
        options: number_options(options),
        ..base(Dt::Bf16, seed)
    };
    let s = Setup::new(&case);
    let stream = ctx.new_stream().unwrap();
    match CudaLayer::new(&s, &stream) {
        Ok(_) => panic!("a layer with {options:?} was created"),
        Err(e) => assert!(e.contains("MOE_ERR_UNSUPPORTED") && e.contains(key), "{e}"),
    }
}

/// The cases of the wgmma tests, with `extra` options after the tile's.
fn wgmma_tile_cases(extra: &[(&str, u32)]) -> Vec<Case> {
    // (BLOCK_M, BLOCK_N, warps, stages)
    let tiles = [
        (64, 64, 4, 3),
        (64, 128, 4, 4),
        (64, 256, 8, 3),
        (128, 64, 8, 5),
        (128, 128, 8, 4),
        (128, 256, 8, 3),
    ];
    let mut cases = Vec::new();
    for (n, (bm, bn, warps, stages)) in tiles.into_iter().enumerate() {
        let mut options = number_options(&[
            ("tile.block_m", bm),
            ("tile.block_n", bn),
            ("tile.block_k", 64),
            ("tile.num_warps", warps),
            ("tile.num_stages", stages),
        ]);
        options.extend(number_options(extra));
        let dt = [Dt::Bf16, Dt::F16][n % 2];
        let seed = 4600 + 10 * n as u64;
        cases.push(Case {
            tokens: 300,
            hidden: 200,
            inter: 136,
            drop: 0.1,
            b13: true,
            b2: true,
            options: options.clone(),
            ..base(dt, seed)
        });
        cases.push(Case {
            tokens: 37,
            experts: 16,
            top_k: 4,
            hidden: 203,
            inter: 64,
            on_input: true,
            options: options.clone(),
            ..base(dt, seed + 1)
        });
        cases.push(Case {
            tokens: 700,
            experts: 4,
            hidden: 512,
            inter: 320,
            layout: MOE_GATE_UP_INTERLEAVED,
            no_combine: true,
            keep_weight: true,
            options,
            ..base(dt, seed + 2)
        });
    }
    cases
}

/// cuda.wgmma_ws where the wgmma loop does not run (cuda.wgmma=0, or a GPU without sm_90a) is
/// refused at layer creation, naming the option, instead of running the mma.sync loop.
#[test]
fn wgmma_ws_without_the_wgmma_loop_is_refused_by_name() {
    let Some(ctx) = gpu("wgmma_ws_without_the_wgmma_loop_is_refused_by_name") else {
        return;
    };
    let mut options = vec![("cuda.wgmma_ws", 1)];
    if has_clusters(&ctx) {
        options.push(("cuda.wgmma", 0)); // on sm_90a, only turning wgmma off leaves it alone
    }
    assert_layer_refused(&ctx, &options, 6100, "cuda.wgmma_ws");
}

/// Split-K (sm_90 clusters; elsewhere refused by name): each GEMM's k loop over 2..8 CTAs
/// whose partial tiles meet in the first one. k-tiles that do not divide by the split
/// (H 1030 in tiles of 64: 17), fewer k-tiles than CTAs (H 100: 2 tiles for 4), tails of K
/// that are not multiples of 8 (element loads), the fused activation and both layouts, the
/// router weight on either GEMM, biases and no_combine.
#[test]
fn split_k_tiles_match_the_cpu() {
    let Some(ctx) = gpu("split_k_tiles_match_the_cpu") else {
        return;
    };
    if !clusters_for_split_k(&ctx) {
        return;
    }
    // (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, split of GEMM1, split of GEMM2)
    let tiles = [
        (16, 64, 64, 4, 3, 4, 1),
        (16, 32, 128, 4, 3, 3, 2),
        (32, 64, 64, 8, 4, 8, 4),
        (64, 64, 64, 4, 3, 2, 8),
    ];
    let mut cases = Vec::new();
    for (n, (bm, bn, bk, warps, stages, s1, s2)) in tiles.into_iter().enumerate() {
        let options = number_options(&[
            ("tile.block_m", bm),
            ("tile.block_n", bn),
            ("tile.block_k", bk),
            ("tile.num_warps", warps),
            ("tile.num_stages", stages),
            ("tile.split_k", s1),
            ("tile.split_k_down", s2),
        ]);
        let dt = [Dt::Bf16, Dt::F16][n % 2];
        let seed = 4800 + 10 * n as u64;
        cases.push(Case {
            tokens: 1,
            experts: 8,
            top_k: 2,
            hidden: 1030,
            inter: 520,
            b13: true,
            b2: true,
            options: options.clone(),
            ..base(dt, seed)
        });
        cases.push(Case {
            tokens: 37,
            experts: 16,
            top_k: 4,
            hidden: 100,
            inter: 36,
            on_input: true,
            drop: 0.1,
            options: options.clone(),
            ..base(dt, seed + 1)
        });
        cases.push(
            Case {
                tokens: 300,
                experts: 4,
                hidden: 512,
                inter: 320,
                layout: MOE_GATE_UP_INTERLEAVED,
                no_combine: true,
                keep_weight: true,
                options,
                ..base(dt, seed + 2)
            }
            .with_activation(MOE_ACTIVATION_SWIGLU_OAI),
        );
    }
    run_cases(
        "split-K tiles",
        &ctx,
        &select(cases, |c| c.tokens == 1 || c.tokens == 37 && c.seed < 4810),
    );
}

/// Programmatic dependent launches (tile.pdl, sm_90): every kernel after the align step may
/// start before the one before it ends, and GEMM2 loads its first weight stages before it
/// waits for GEMM1. Each path whose kernels wait differently: mma.sync with split-K, the
/// activation as a kernel of its own, the SIMT loop (f32), no_combine's zeroing, the wgmma
/// loop; GEMM2 let in at GEMM1's start (tile.pdl 2); then graph capture and replay.
#[test]
fn programmatic_dependent_launches_match_the_cpu() {
    let Some(ctx) = gpu("programmatic_dependent_launches_match_the_cpu") else {
        return;
    };
    if !has_clusters(&ctx) {
        println!("SKIPPED: programmatic dependent launch needs compute capability 9.0");
        return;
    }
    let pdl = |extra: &[(&str, u32)]| {
        let mut o = number_options(extra);
        o.push(("tile.pdl".into(), "1".into()));
        o
    };
    let split_k = [
        ("tile.block_m", 16),
        ("tile.block_n", 32),
        ("tile.block_k", 128),
        ("tile.num_warps", 4),
        ("tile.num_stages", 3),
        ("tile.split_k", 3),
        ("tile.split_k_down", 2),
    ];
    let wgmma = [
        ("tile.block_m", 64),
        ("tile.block_n", 128),
        ("tile.block_k", 64),
        ("tile.num_warps", 4),
        ("tile.num_stages", 4),
    ];
    let cases = vec![
        Case {
            tokens: 1,
            hidden: 1030,
            inter: 520,
            b13: true,
            b2: true,
            options: pdl(&split_k),
            ..base(Dt::Bf16, 7001)
        },
        Case {
            tokens: 4,
            experts: 128,
            top_k: 8,
            hidden: 256,
            inter: 96,
            options: pdl(&[]),
            ..base(Dt::Bf16, 7002)
        },
        Case {
            tokens: 37,
            experts: 16,
            top_k: 4,
            on_input: true,
            drop: 0.1,
            options: pdl(&[("cuda.fuse_act", 0)]),
            ..base(Dt::F16, 7003)
        },
        Case {
            tokens: 5,
            b2: true,
            options: pdl(&[]),
            ..base(Dt::F32, 7004)
        },
        Case {
            tokens: 300,
            experts: 4,
            hidden: 512,
            inter: 320,
            layout: MOE_GATE_UP_INTERLEAVED,
            no_combine: true,
            keep_weight: true,
            drop: 0.2,
            options: pdl(&[]),
            ..base(Dt::Bf16, 7005)
        }
        .with_activation(MOE_ACTIVATION_SWIGLU_OAI),
        Case {
            tokens: 256,
            experts: 8,
            hidden: 512,
            inter: 256,
            b13: true,
            options: pdl(&wgmma),
            ..base(Dt::Bf16, 7006)
        },
    ];
    run_cases("programmatic dependent launches", &ctx, &cases);

    // GEMM2 let in at GEMM1's start
    let early = Case {
        tokens: 3,
        experts: 16,
        top_k: 4,
        hidden: 1030,
        inter: 520,
        b13: true,
        b2: true,
        options: number_options(&[("tile.pdl", 2)]),
        ..base(Dt::Bf16, 7008)
    };
    let early_cases = vec![
        Case {
            options: number_options(&[("tile.pdl", 2), ("tile.split_k", 2)]),
            ..early.clone()
        },
        Case {
            tokens: 50,
            ..early.clone()
        },
        Case {
            tokens: 50,
            options: number_options(&[("tile.pdl", 2), ("cuda.fuse_act", 0)]),
            ..early
        },
    ];
    run_cases(
        "programmatic dependent launches, GEMM2 early",
        &ctx,
        &early_cases,
    );

    replays_in_a_graph(&ctx, number_options(&[("tile.pdl", 2)]), 7007);
}

/// GEMM2 doing the combine (cuda.fuse_combine): dropped routes and tokens with none live
/// (GEMM1 writes their zero rows), inplace, rsf, biases, on-input weights, split-K GEMMs,
/// GEMM2 let in at GEMM1's start, f32 (which keeps moe_combine), past the option's token
/// count, and graph replays (GEMM1 zeroes the counts of each).
#[test]
fn gemm2_combining_matches_the_cpu() {
    let Some(ctx) = gpu("gemm2_combining_matches_the_cpu") else {
        return;
    };
    let fused =
        |tile: &[(&str, u32)]| number_options(&[tile, &[("cuda.fuse_combine", 256)]].concat());
    let decode = [
        ("tile.block_m", 16),
        ("tile.block_n", 32),
        ("tile.block_k", 128),
        ("tile.num_warps", 4),
        ("tile.num_stages", 3),
    ];
    let split = [
        ("tile.block_m", 16),
        ("tile.block_n", 32),
        ("tile.block_k", 64),
        ("tile.num_warps", 4),
        ("tile.num_stages", 3),
        ("tile.split_k", 2),
        ("tile.split_k_down", 2),
    ];
    let mut cases = Vec::new();
    for (i, dt) in DTYPES.into_iter().enumerate() {
        let seed = 7400 + 20 * i as u64;
        cases.extend([
            Case {
                tokens: 1,
                b13: true,
                b2: true,
                options: fused(&decode),
                ..base(dt, seed)
            },
            Case {
                tokens: 3,
                experts: 16,
                top_k: 8,
                drop: 0.3,
                rsf: 2.5,
                options: fused(&decode),
                ..base(dt, seed + 1)
            },
            Case {
                tokens: 37,
                drop: 1.0,
                b2: true,
                options: fused(&[]),
                ..base(dt, seed + 2)
            },
            Case {
                tokens: 37,
                inplace: true,
                on_input: true,
                b13: true,
                drop: 0.2,
                options: fused(&decode),
                ..base(dt, seed + 3)
            }
            .with_activation(MOE_ACTIVATION_GELU),
            Case {
                tokens: 5,
                hidden: 1030,
                inter: 520,
                b2: true,
                rsf: 0.75,
                router_in_dtype: true,
                // split-K is the tensor-core path's; f32 layers take the tile without it
                options: fused(&split[..split.len() - 2 * (dt == Dt::F32) as usize]),
                ..base(dt, seed + 4)
            },
            Case {
                tokens: 256,
                experts: 8,
                drop: 0.1,
                options: fused(&[]),
                ..base(dt, seed + 5)
            },
            Case {
                tokens: 300,
                options: fused(&[]),
                ..base(dt, seed + 6)
            },
            Case {
                tokens: 16,
                layout: MOE_GATE_UP_INTERLEAVED,
                b13: true,
                b2: true,
                options: fused(&decode),
                ..base(dt, seed + 7)
            }
            .with_activation(MOE_ACTIVATION_SWIGLU_OAI),
            non_gated(
                Case {
                    tokens: 9,
                    drop: 0.2,
                    options: fused(&decode),
                    ..base(dt, seed + 8)
                },
                MOE_ACTIVATION_RELU2,
            ),
        ]);
        if has_clusters(&ctx) {
            cases.push(Case {
                tokens: 4,
                drop: 0.2,
                b2: true,
                options: fused(&[&decode[..], &[("tile.pdl", 2)]].concat()),
                ..base(dt, seed + 9)
            });
        }
    }
    run_cases(
        "GEMM2 combining",
        &ctx,
        &select(cases, |c| c.dt == Dt::Bf16),
    );

    replays_in_a_graph(&ctx, fused(&decode), 7490);
}

/// GEMM2 at its own BLOCK_N (tile.block_n_down; SPEC §5: it shares BLOCK_M only): its grid,
/// its n-tiles in the fused combine's counts, and its weight map where a 256-wide GEMM2
/// takes the multicast while GEMM1 does not. Decode tiles narrow and wide, the f32 loop,
/// the fused activation and combine, split-K on GEMM2, and wgmma-shaped prefill tiles.
#[test]
fn gemm2_at_its_own_block_n_matches_the_cpu() {
    let Some(ctx) = gpu("gemm2_at_its_own_block_n_matches_the_cpu") else {
        return;
    };
    let tile = |bm: u32, bn: u32, bk: u32, warps: u32, down: u32| {
        vec![
            ("tile.block_m", bm),
            ("tile.block_n", bn),
            ("tile.block_k", bk),
            ("tile.num_warps", warps),
            ("tile.num_stages", 3),
            ("tile.block_n_down", down),
        ]
    };
    let mut cases = Vec::new();
    for (i, dt) in DTYPES.into_iter().enumerate() {
        let seed = 7600 + 20 * i as u64;
        cases.extend([
            Case {
                tokens: 1,
                hidden: 1030,
                inter: 520,
                b13: true,
                b2: true,
                options: number_options(&tile(16, 32, 128, 4, 128)),
                ..base(dt, seed)
            },
            Case {
                tokens: 5,
                experts: 16,
                top_k: 8,
                drop: 0.3,
                rsf: 2.5,
                options: number_options(
                    &[&tile(16, 32, 64, 4, 256)[..], &[("cuda.fuse_combine", 64)]].concat(),
                ),
                ..base(dt, seed + 1)
            },
            Case {
                tokens: 37,
                inplace: true,
                on_input: true,
                drop: 0.2,
                options: number_options(&tile(32, 64, 64, 4, 16)),
                ..base(dt, seed + 2)
            },
            Case {
                tokens: 16,
                layout: MOE_GATE_UP_INTERLEAVED,
                b13: true,
                b2: true,
                options: number_options(&tile(16, 64, 64, 4, 256)),
                ..base(dt, seed + 3)
            }
            .with_activation(MOE_ACTIVATION_SWIGLU_OAI),
            Case {
                tokens: 300,
                experts: 4,
                hidden: 520,
                inter: 320,
                b2: true,
                drop: 0.1,
                // f32's loop takes at most 64 outputs per thread: 128 columns at 256 threads
                options: number_options(&tile(
                    128,
                    128,
                    64,
                    8,
                    if dt == Dt::F32 { 128 } else { 256 },
                )),
                ..base(dt, seed + 4)
            },
            Case {
                tokens: 300,
                experts: 4,
                hidden: 130,
                inter: 200,
                no_combine: true,
                options: number_options(&tile(64, 128, 64, 4, 64)),
                ..base(dt, seed + 5)
            },
        ]);
        if has_clusters(&ctx) && dt != Dt::F32 {
            cases.push(Case {
                tokens: 4,
                hidden: 1030,
                inter: 520,
                b2: true,
                options: number_options(
                    &[
                        &tile(16, 32, 64, 4, 128)[..],
                        &[("tile.split_k_down", 2), ("tile.pdl", 2)],
                    ]
                    .concat(),
                ),
                ..base(dt, seed + 6)
            });
        }
    }
    run_cases(
        "GEMM2 at its own BLOCK_N",
        &ctx,
        &select(cases, |c| c.dt == Dt::Bf16 && c.tokens <= 16),
    );
}

/// With the same BLOCK_M, the CUDA align step gives the CPU's plan (SPEC §4 fixes the order).
#[test]
fn cuda_plan_arrays_equal_the_cpu_plan() {
    let Some(ctx) = gpu("cuda_plan_arrays_equal_the_cpu_plan") else {
        return;
    };
    // (tokens, experts, top_k, BLOCK_M): up to 32 routes the align step runs in one warp
    // (the first five: one route per expert, several, two experts' blocks, int64 ids); above,
    // the align kernel cuts the routes into one piece per warp up to E = 744 and fewer above
    // (4 at E = 4096), so both sides of that are here; from 4096 routes the align step runs
    // over many blocks (18, 11 and 16 chunks below).
    let shapes = [
        (1, 257, 9, "16"),
        (4, 8, 8, "16"),
        (4, 2, 8, "16"),
        (3, 128, 8, "64"),
        (2, 64, 8, "16"),
        (100, 16, 4, "16"),
        (100, 16, 4, "64"),
        (257, 257, 9, "16"),
        (4096, 257, 9, "64"),
        (3000, 1024, 8, "32"),
        (600, 4096, 8, "16"),
        (16384, 8, 2, "128"),
    ];
    for (n, (tokens, experts, top_k, block_m)) in shapes.into_iter().enumerate() {
        let c = Case {
            tokens,
            experts,
            top_k,
            hidden: 8,
            inter: 8,
            drop: 0.2,
            ids_i64: n == 4,
            options: vec![("tile.block_m".into(), block_m.into())],
            ..base(Dt::Bf16, 4500 + n as u64)
        };
        let mut s = Setup::new(&c);
        let stream = ctx.new_stream().unwrap();
        let layer = CudaLayer::new(&s, &stream).unwrap_or_else(|e| panic!("{c:?}: {e}"));
        let mut d = DeviceBatch::new(&s, &layer, &stream).unwrap();
        let (ids, ws) = (d.ids.raw(), d.ws.raw());
        status(layer.prepare_raw(&ids, &ws, cu(&stream)), "moe_prepare")
            .unwrap_or_else(|e| panic!("{c:?}: {e}"));
        sync(&stream);
        ok(s.prepare(), "CPU moe_prepare");
        let (cpu, gpu) = (plan_arrays(s.plan), plan_arrays(layer.plan));
        match gpu {
            Ok(gpu) => assert_eq!(
                gpu,
                cpu.unwrap(),
                "plan arrays (num_padded, sorted route ids, block experts) of {c:?}"
            ),
            Err(e) => println!("NOTE: plan getters on a CUDA plan: {e}"),
        }
    }
}

type PlanArrays = (i64, Vec<i32>, Vec<i32>);

fn plan_arrays(plan: *mut moe_plan) -> Result<PlanArrays, String> {
    let mut padded = 0i64;
    let (mut n_sorted, mut n_blocks) = (0usize, 0usize);
    unsafe {
        status(
            moe_plan_num_padded(plan, &mut padded),
            "moe_plan_num_padded",
        )?;
        status(
            moe_plan_sorted_route_ids(plan, null_mut(), 0, &mut n_sorted),
            "moe_plan_sorted_route_ids",
        )?;
        status(
            moe_plan_block_expert(plan, null_mut(), 0, &mut n_blocks),
            "moe_plan_block_expert",
        )?;
        let (mut sorted, mut blocks) = (vec![0i32; n_sorted], vec![0i32; n_blocks]);
        let mut len = 0usize;
        status(
            moe_plan_sorted_route_ids(plan, sorted.as_mut_ptr(), n_sorted, &mut len),
            "moe_plan_sorted_route_ids",
        )?;
        status(
            moe_plan_block_expert(plan, blocks.as_mut_ptr(), n_blocks, &mut len),
            "moe_plan_block_expert",
        )?;
        Ok((padded, sorted, blocks))
    }
}

/// Mixtral, Qwen3-30B-A3B, DeepSeek-V3 (TP8: 256 routed + 1 shared expert) and gpt-oss-120b
/// (swiglu_oai with biases, interleaved) in bf16, at M = 1, 64 and 257 on one set of weights.
#[test]
fn model_shapes_match_the_cpu() {
    let Some(ctx) = gpu("model_shapes_match_the_cpu") else {
        return;
    };
    if reduced() {
        println!("SKIPPED: model shapes in FUSEDMOE_GPU_REDUCED mode");
        return;
    }
    let model = |name, hidden, inter, experts, top_k| {
        (
            name,
            Case {
                dt: Dt::Bf16,
                hidden,
                inter,
                experts,
                top_k,
                tokens: 257,
                seed: 5000 + experts as u64,
                ..Case::default()
            },
        )
    };
    let models = [
        (model("mixtral-8x7b", 4096, 14336, 8, 2), false),
        (model("qwen3-30b-a3b", 2048, 768, 128, 8), false),
        (
            (
                "deepseek-v3-tp8",
                Case {
                    rsf: 2.5,
                    ..model("", 7168, 256, 257, 8).1
                },
            ),
            true,
        ),
        (
            (
                "gpt-oss-120b",
                Case {
                    layout: MOE_GATE_UP_INTERLEAVED,
                    b13: true,
                    b2: true,
                    alpha: Some(1.702),
                    limit: Some(7.0),
                    activation: MOE_ACTIVATION_SWIGLU_OAI,
                    ..model("", 2880, 2880, 128, 4).1
                },
            ),
            false,
        ),
    ];
    let mut failures = Vec::new();
    for ((name, c), shared) in models {
        let start = Instant::now();
        let mut s = big_setup(&c, shared);
        let stream = ctx.new_stream().unwrap();
        let layer = match CudaLayer::new(&s, &stream) {
            Ok(l) => l,
            Err(e) => {
                failures.push(format!("{name} {c:?}\n    {e}"));
                continue;
            }
        };
        let mut d = DeviceBatch::new(&s, &layer, &stream).unwrap();
        println!("{name}: set up in {:.1} s", start.elapsed().as_secs_f64());
        for m in [1, 64, 257] {
            let result = (|| {
                d.rows(m);
                d.out.fill(POISON);
                d.launch(&layer, &c)?;
                cpu_rows(&mut s, m);
                s.out.fill_bytes(POISON);
                status(s.prepare(), "CPU moe_prepare")?;
                status(s.run(), "CPU moe_run")?;
                let n = m * c.hidden;
                let cpu = &s.output()[..n];
                let reference = (reference_cost(&s.case) <= 400_000_000).then(|| s.reference());
                sync(&stream);
                let got = &d.out.values()[..n];
                let ids = &s.ids.values()[..m * c.top_k];
                let line = compare(&s.case, got, cpu, reference.as_deref(), ids)?;
                if !d.out.poisoned_from(n * c.dt.size()) {
                    return Err(format!("rows past M = {m} of out were written"));
                }
                Ok::<_, String>(line)
            })();
            match result {
                Ok(line) => println!("ok   {name} M={m}: {line}"),
                Err(e) => {
                    println!("FAIL {name} M={m}: {e}");
                    failures.push(format!("{name} M={m} {:?}\n    {e}", s.case));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "model shapes failed:\n{}",
        failures.join("\n")
    );
}

/// Captured once at M = 64 after moe_warmup (no eager run first), the graph replays: the
/// captured batch, a new batch written into the same buffers, and a batch whose tokens from
/// 40 on are padding (ids −1, hidden NaN) that must give the first 40 tokens' result and
/// zeros. Replays are bitwise repeatable.
#[test]
fn a_captured_graph_replays_new_batches_and_fewer_tokens() {
    let Some(ctx) = gpu("a_captured_graph_replays_new_batches_and_fewer_tokens") else {
        return;
    };
    let mut cases = vec![Case {
        tokens: 64,
        b13: true,
        b2: true,
        drop: 0.1,
        ..base(Dt::Bf16, 6001)
    }];
    if !reduced() {
        cases.push(Case {
            tokens: 64,
            no_combine: true,
            keep_weight: true,
            b2: true,
            drop: 0.1,
            ids_i64: true,
            ..base(Dt::F16, 6002)
        });
        cases.push(Case {
            tokens: 64,
            inplace: true,
            rsf: 2.5,
            b13: true,
            experts: 64,
            top_k: 6,
            ..base(Dt::F32, 6003)
        });
    }
    for c in cases {
        graph_case(&ctx, &c).unwrap_or_else(|e| panic!("graph capture: {c:?}\n    {e}"));
    }
}

/// A bf16 batch of 64 tokens with biases and dropped routes, under `options`, through
/// graph_case: captured, then replayed with new batches and fewer tokens.
fn replays_in_a_graph(ctx: &Arc<CudaContext>, options: Vec<(String, String)>, seed: u64) {
    let graph = Case {
        tokens: 64,
        b13: true,
        b2: true,
        drop: 0.1,
        options,
        ..base(Dt::Bf16, seed)
    };
    graph_case(ctx, &graph).unwrap_or_else(|e| panic!("graph capture: {graph:?}\n    {e}"));
}

fn graph_case(ctx: &Arc<CudaContext>, c: &Case) -> Result<(), String> {
    const VALID: usize = 40;
    let mut s = Setup::new(c);
    let stream = ctx.new_stream().unwrap();
    let layer = CudaLayer::new(&s, &stream)?;
    let mut d = DeviceBatch::new(&s, &layer, &stream)?;
    status(layer.warmup(c.tokens, &stream), "moe_warmup")?;
    sync(&stream);

    stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .map_err(|e| format!("cuStreamBeginCapture: {e:?}"))?;
    let launched = d.launch(&layer, c);
    // end the capture whatever happened, so the stream is usable again
    let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
    launched.map_err(|e| format!("during capture: {e}"))?;
    let graph = graph
        .map_err(|e| format!("cuStreamEndCapture / instantiate: {e:?}"))?
        .ok_or("the capture recorded an empty graph")?;

    let rows_per_token = if c.no_combine { c.top_k } else { 1 };
    let replay = |d: &mut DeviceBatch, s: &Setup| {
        // inplace replays overwrite hidden: write it again every time
        d.hidden.write(&HostTensor::from_f64(
            s.hidden.dt,
            &s.hidden.shape,
            &s.hidden_in,
        ));
        d.out.fill(POISON);
        graph.launch().expect("cuGraphLaunch");
        sync(&stream);
        d.output(c)
    };

    // 1. the captured batch
    let got = replay(&mut d, &s);
    status(s.prepare(), "CPU moe_prepare")?;
    status(s.run(), "CPU moe_run")?;
    compare(c, &got, &s.output(), Some(&s.reference()), &s.ids.values())
        .map_err(|e| format!("replay of the captured batch: {e}"))?;

    // 2. a new batch in the same buffers, replayed twice
    refill_batch(&mut s, c.tokens, c.seed + 1);
    d.ids.write(&s.ids);
    d.router.write(&s.router);
    let got = replay(&mut d, &s);
    let again = replay(&mut d, &s);
    if got
        .iter()
        .zip(&again)
        .any(|(a, b)| a.to_bits() != b.to_bits())
    {
        return Err("two replays of the same batch differ".into());
    }
    status(s.prepare(), "CPU moe_prepare")?;
    status(s.run(), "CPU moe_run")?;
    compare(c, &got, &s.output(), Some(&s.reference()), &s.ids.values())
        .map_err(|e| format!("replay of a new batch: {e}"))?;

    // 3. fewer tokens than captured: tokens ≥ VALID are padding
    refill_batch(&mut s, VALID, c.seed + 2);
    d.ids.write(&s.ids);
    d.router.write(&s.router);
    let got = replay(&mut d, &s);
    cpu_rows(&mut s, VALID);
    status(s.prepare(), "CPU moe_prepare (first 40 tokens)")?;
    status(s.run(), "CPU moe_run (first 40 tokens)")?;
    let n = VALID * rows_per_token * c.hidden;
    let ids = s.ids.values();
    compare(
        &s.case,
        &got[..n],
        &s.output()[..n],
        Some(&s.reference()),
        &ids,
    )
    .map_err(|e| format!("replay with tokens ≥ {VALID} padded, first {VALID} tokens: {e}"))?;
    if let Some(i) = got[n..].iter().position(|&v| v != 0.0) {
        return Err(format!(
            "replay with tokens ≥ {VALID} padded: output {} past the valid rows is {}, expected 0",
            n + i,
            got[n + i]
        ));
    }
    Ok(())
}

/// A moe_prepare whose kernels moe_warmup did not compile is refused inside a capture, naming
/// the stream and moe_warmup, before it launches anything (compiling there would break the
/// host's capture); the capture ends cleanly, and outside it the same calls compile and run.
#[test]
fn kernels_are_not_compiled_inside_a_capture() {
    let Some(ctx) = gpu("kernels_are_not_compiled_inside_a_capture") else {
        return;
    };
    let c = Case {
        tokens: 16,
        ..base(Dt::Bf16, 6100)
    };
    let mut s = Setup::new(&c);
    let stream = ctx.new_stream().unwrap();
    let layer = CudaLayer::new(&s, &stream).unwrap_or_else(|e| panic!("{e}"));
    let mut d = DeviceBatch::new(&s, &layer, &stream).unwrap_or_else(|e| panic!("{e}"));
    let (ids, ws) = (d.ids.raw(), d.ws.raw());

    assert_refused_inside_capture(&stream, || {
        vec![("moe_prepare", layer.prepare_raw(&ids, &ws, cu(&stream)))]
    });

    d.out.fill(POISON);
    d.launch(&layer, &c).unwrap_or_else(|e| panic!("{e}"));
    sync(&stream);
    status(s.prepare(), "CPU moe_prepare").unwrap();
    status(s.run(), "CPU moe_run").unwrap();
    compare(
        &c,
        &d.output(&c),
        &s.output(),
        Some(&s.reference()),
        &s.ids.values(),
    )
    .unwrap_or_else(|e| panic!("after the capture: {e}"));
}

/// Host tensors, or tensors on device ordinal 1, given to a CUDA layer are refused by name;
/// nothing is written.
#[test]
fn tensors_on_the_wrong_device_are_refused_by_name() {
    let Some(ctx) = gpu("tensors_on_the_wrong_device_are_refused_by_name") else {
        return;
    };
    let c = Case {
        tokens: 16,
        b13: true,
        b2: true,
        ..base(Dt::Bf16, 8000)
    };
    let mut s = Setup::new(&c);
    let stream = ctx.new_stream().unwrap();
    let st = cu(&stream);
    let mut layer = CudaLayer::new(&s, &stream).unwrap_or_else(|e| panic!("{c:?}: {e}"));
    let mut d = DeviceBatch::new(&s, &layer, &stream).unwrap();
    let refused = |status: moe_status, name: &str, how: &str| {
        let message = last_error();
        assert_eq!(
            status,
            moe_status::MOE_ERR_INVALID_ARGUMENT,
            "{name} {how}: \"{message}\""
        );
        assert!(
            message.starts_with(&format!("{name}:")),
            "{name} {how}: the message does not name it: \"{message}\""
        );
    };
    let on_device_1 = |mut t: moe_tensor| {
        t.device.device_id = 1;
        t
    };

    // moe_prepare: ids and workspace
    let (ids, ws) = (d.ids.raw(), d.ws.raw());
    let (host_ids, host_ws) = (s.ids.raw(), s.workspace.raw());
    refused(
        layer.prepare_raw(&host_ids, &ws, st),
        "topk_ids",
        "in host memory",
    );
    refused(
        layer.prepare_raw(&ids, &host_ws, st),
        "workspace",
        "in host memory",
    );
    refused(
        layer.prepare_raw(&on_device_1(ids), &ws, st),
        "topk_ids",
        "on cuda:1",
    );
    refused(
        layer.prepare_raw(&ids, &on_device_1(ws), st),
        "workspace",
        "on cuda:1",
    );

    // moe_run: hidden, router weights, out
    ok(layer.prepare_raw(&ids, &ws, st), "moe_prepare");
    let (hidden, router, out) = (d.hidden.raw(), d.router.raw(), d.out.raw());
    let (host_hidden, host_router, host_out) = (s.hidden.raw(), s.router.raw(), s.out.raw());
    refused(
        layer.run_raw(&host_hidden, &router, Some(&out), st),
        "hidden",
        "in host memory",
    );
    refused(
        layer.run_raw(&hidden, &host_router, Some(&out), st),
        "topk_weights",
        "in host memory",
    );
    refused(
        layer.run_raw(&hidden, &router, Some(&host_out), st),
        "out",
        "in host memory",
    );
    refused(
        layer.run_raw(&on_device_1(hidden), &router, Some(&out), st),
        "hidden",
        "on cuda:1",
    );
    refused(
        layer.run_raw(&hidden, &on_device_1(router), Some(&out), st),
        "topk_weights",
        "on cuda:1",
    );
    refused(
        layer.run_raw(&hidden, &router, Some(&on_device_1(out)), st),
        "out",
        "on cuda:1",
    );
    sync(&stream);
    assert!(d.out.poisoned_from(0), "a refused moe_run wrote out");
    assert!(
        s.out.bytes().iter().all(|&b| b == POISON),
        "a refused moe_run wrote the host out"
    );
    // the same tensors on the right device run
    ok(layer.run_raw(&hidden, &router, Some(&out), st), "moe_run");
    sync(&stream);

    // moe_layer_create: weights in host memory or on cuda:1
    let host_w13 = s.w13.raw();
    let saved = layer.w13.device;
    layer.w13.device.device_id = 1;
    refused(layer.create(), "w13", "on cuda:1");
    layer.w13.device = saved;
    let mut b2 = layer.b2.take().unwrap();
    b2.device.device_id = 1;
    layer.b2 = Some(b2);
    refused(layer.create(), "b2", "on cuda:1");
    let w2 = layer.w2.raw();
    let mut created = null_mut();
    refused(
        unsafe {
            moe_layer_create(
                layer.config,
                &host_w13,
                &w2,
                std::ptr::null(),
                std::ptr::null(),
                &mut created,
            )
        },
        "w13",
        "in host memory",
    );
    assert!(created.is_null());
    // a layer on an ordinal that does not exist fails at creation, naming the device
    if CudaContext::device_count().unwrap() == 1 {
        let cuda1 = moe_device {
            device_type: MOE_DEVICE_CUDA,
            device_id: 1,
        };
        let (w13, w2) = (on_device_1(layer.w13.raw()), on_device_1(layer.w2.raw()));
        unsafe {
            ok(
                moe_config_set_device(layer.config, cuda1),
                "moe_config_set_device",
            );
            let st = moe_layer_create(
                layer.config,
                &w13,
                &w2,
                std::ptr::null(),
                std::ptr::null(),
                &mut created,
            );
            let message = last_error();
            assert_ne!(
                st,
                moe_status::MOE_OK,
                "a layer on cuda:1 of a one-GPU machine"
            );
            assert!(created.is_null());
            assert!(
                message.contains("device"),
                "a layer on cuda:1: \"{message}\""
            );
        }
    }
}

/// M = 0 writes nothing: out and hidden (inplace) stay poisoned. (moe_prepare still records
/// the empty plan in the workspace, num_padded 0 and the expert offsets, as the CPU does.)
#[test]
fn an_empty_batch_writes_nothing() {
    let Some(ctx) = gpu("an_empty_batch_writes_nothing") else {
        return;
    };
    for (n, (no_combine, inplace)) in [(false, false), (true, false), (false, true)]
        .into_iter()
        .enumerate()
    {
        let c = Case {
            tokens: 0,
            no_combine,
            inplace,
            b13: true,
            b2: true,
            ..base(Dt::Bf16, 9000 + n as u64)
        };
        let s = Setup::new(&c);
        let stream = ctx.new_stream().unwrap();
        let layer = CudaLayer::new(&s, &stream).unwrap_or_else(|e| panic!("{c:?}: {e}"));
        let mut d = DeviceBatch::new(&s, &layer, &stream).unwrap();
        d.launch(&layer, &c)
            .unwrap_or_else(|e| panic!("{c:?}: {e}"));
        sync(&stream);
        for (name, t) in [("out", &d.out), ("hidden", &d.hidden)] {
            let bytes = t.read_bytes();
            if let Some(at) = bytes.iter().position(|&b| b != POISON) {
                let written = bytes.iter().filter(|&&b| b != POISON).count();
                panic!(
                    "M = 0 wrote {name}: {written} of {} bytes changed, the first at byte {at}: {c:?}",
                    bytes.len()
                );
            }
        }
    }
}
