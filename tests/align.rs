//! SPEC §4–5 through the C ABI: the plan's sorted routes (order, padding, capacity, tail),
//! the tile config moe_prepare picks (default rule, a table's nearest M, overrides), and
//! workspace sizing.

mod common;
use common::*;
use fusedmoe::ffi::*;
use std::ptr::null_mut;

fn plan_arrays(s: &Setup) -> (Vec<i32>, Vec<i32>, i64, moe_tile_config) {
    let mut len = 0usize;
    unsafe {
        ok(
            moe_plan_sorted_route_ids(s.plan, null_mut(), 0, &mut len),
            "sorted len",
        );
        let mut sorted = vec![0i32; len];
        ok(
            moe_plan_sorted_route_ids(s.plan, sorted.as_mut_ptr(), len, &mut len),
            "sorted",
        );
        ok(
            moe_plan_block_expert(s.plan, null_mut(), 0, &mut len),
            "blocks len",
        );
        let mut blocks = vec![0i32; len];
        ok(
            moe_plan_block_expert(s.plan, blocks.as_mut_ptr(), len, &mut len),
            "blocks",
        );
        let mut padded = 0i64;
        ok(moe_plan_num_padded(s.plan, &mut padded), "num_padded");
        let mut tile = std::mem::zeroed();
        ok(moe_plan_tile_config(s.plan, &mut tile), "tile");
        (sorted, blocks, padded, tile)
    }
}

fn capacity(numel: usize, experts: usize, bm: usize) -> usize {
    let raw = if numel < experts + 1 {
        numel * bm
    } else {
        numel + (experts + 1) * (bm - 1)
    };
    raw.div_ceil(4) * 4
}

/// Checks every clause of SPEC §4 on one prepared batch.
fn check_align_contract(s: &Setup) {
    let c = &s.case;
    let ids: Vec<i64> = s.ids.values().iter().map(|&v| v as i64).collect();
    let numel = c.tokens * c.top_k;
    let (sorted, blocks, padded, tile) = plan_arrays(s);
    let bm = tile.block_m as usize;
    let padded = padded as usize;
    assert_eq!(
        sorted.len(),
        capacity(numel, c.experts, bm),
        "capacity formula"
    );
    assert_eq!(blocks.len(), sorted.len().div_ceil(bm));
    assert_eq!(padded % bm, 0, "num_padded is a multiple of BLOCK_M");
    let mut pos = 0;
    for e in 0..c.experts {
        let routes: Vec<i32> = (0..numel)
            .filter(|&r| ids[r] == e as i64)
            .map(|r| r as i32)
            .collect();
        if routes.is_empty() {
            continue;
        }
        let len = routes.len().div_ceil(bm) * bm;
        assert_eq!(
            &sorted[pos..pos + routes.len()],
            &routes[..],
            "expert {e}: its routes in increasing order"
        );
        assert!(
            sorted[pos + routes.len()..pos + len]
                .iter()
                .all(|&v| v == numel as i32),
            "expert {e}: padded with M·K"
        );
        assert!(
            blocks[pos / bm..(pos + len) / bm]
                .iter()
                .all(|&b| b == e as i32),
            "expert {e}: its blocks"
        );
        pos += len;
    }
    assert_eq!(pos, padded, "num_padded covers exactly the used blocks");
    assert!(
        sorted[padded..].iter().all(|&v| v == numel as i32),
        "the tail holds the sentinel"
    );
    assert!(
        blocks[padded / bm..].iter().all(|&b| b == -1),
        "blocks past the used ones are -1"
    );
    assert!(
        !sorted[..padded]
            .iter()
            .any(|&r| r >= 0 && (r as usize) < numel && ids[r as usize] < 0),
        "dropped routes are absent"
    );
}

#[test]
fn align_contract_holds_across_sizes_and_drops() {
    for experts in [1, 8, 64] {
        for top_k in [1, 2, 8] {
            for tokens in [0, 1, 7, 64, 300] {
                for drop in [0.0, 0.3] {
                    let c = Case {
                        experts,
                        top_k,
                        tokens,
                        drop,
                        hidden: 8,
                        inter: 8,
                        ids_i64: tokens % 2 == 1,
                        seed: tokens as u64 + 3,
                        ..Case::default()
                    };
                    let mut s = Setup::new(&c);
                    ok(s.prepare(), "prepare");
                    check_align_contract(&s);
                }
            }
        }
    }
}

#[test]
fn the_default_rule_picks_narrow_blocks_up_to_m_equal_e() {
    for (tokens, bm, bn, bk, gm) in [(8, 16, 32, 64, 1), (9, 64, 64, 32, 8)] {
        let mut s = Setup::new(&Case {
            experts: 8,
            tokens,
            ..Case::default()
        });
        ok(s.prepare(), "prepare");
        let t = plan_arrays(&s).3;
        assert_eq!(
            (t.block_m, t.block_n, t.block_k, t.group_m),
            (bm, bn, bk, gm),
            "M = {tokens}"
        );
    }
}

#[test]
fn a_tuned_table_is_looked_up_by_nearest_m_and_options_override_it() {
    let dir = std::env::temp_dir().join(format!("fusedmoe-align-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tiles.json");
    let cfg = |bm: u32, bn: u32| {
        format!(
            r#"{{"BLOCK_M": {bm}, "BLOCK_N": {bn}, "BLOCK_K": 64, "GROUP_M": 1, "num_warps": 4, "num_stages": 2}}"#
        )
    };
    std::fs::write(
        &path,
        format!(
            r#"{{"format": "fusedmoe-tiles/1", "tables": [{{"E": 8, "N": 24, "K": 40, "dtype": "bf16", "quant": "none", "device": "cpu",
               "configs": {{"2": {}, "10": {}, "100": {}}}}}]}}"#,
            cfg(16, 16),
            cfg(32, 32),
            cfg(128, 128)
        ),
    )
    .unwrap();
    let opt = (
        "tile.config_file".to_string(),
        path.to_str().unwrap().to_string(),
    );
    for (tokens, bm) in [(1, 16), (6, 16), (7, 32), (55, 32), (56, 128), (300, 128)] {
        let c = Case {
            tokens,
            options: vec![opt.clone()],
            ..Case::default()
        };
        let mut s = Setup::new(&c);
        ok(s.prepare(), "prepare");
        assert_eq!(plan_arrays(&s).3.block_m, bm, "M = {tokens}");
        check_align_contract(&s);
    }
    let c = Case {
        tokens: 300,
        options: vec![opt, ("tile.block_n".into(), "256".into())],
        ..Case::default()
    };
    let mut s = Setup::new(&c);
    ok(s.prepare(), "prepare");
    let t = plan_arrays(&s).3;
    assert_eq!((t.block_m, t.block_n, t.num_stages), (128, 256, 2));
}

#[test]
fn a_broken_table_file_fails_layer_creation_by_name() {
    let dir = std::env::temp_dir().join(format!("fusedmoe-align-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tiles.json");
    std::fs::write(
        &path,
        r#"{"format": "fusedmoe-tiles/1", "tables": [{"E": 8}]}"#,
    )
    .unwrap();
    let c = Case::default();
    let config = c.config();
    let key = std::ffi::CString::new("tile.config_file").unwrap();
    let val = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    let (mut w13, mut w2) = (
        HostTensor::zeros(Dt::Bf16, &[8, 48, 40]),
        HostTensor::zeros(Dt::Bf16, &[8, 40, 24]),
    );
    let (w13, w2) = (w13.raw(), w2.raw());
    let mut layer = null_mut();
    unsafe {
        ok(
            moe_config_set_option(config, key.as_ptr(), val.as_ptr()),
            "option",
        );
        let s = moe_layer_create(
            config,
            &w13,
            &w2,
            std::ptr::null(),
            std::ptr::null(),
            &mut layer,
        );
        assert_eq!(s, moe_status::MOE_ERR_INVALID_ARGUMENT);
        assert!(
            last_error().contains("tile.config_file") && last_error().contains("tables[0]: \"N\""),
            "{}",
            last_error()
        );
        moe_config_free(config);
    }
}

#[test]
fn the_workspace_for_max_tokens_fits_every_smaller_batch() {
    let c = Case {
        tokens: 1,
        experts: 8,
        top_k: 8,
        ..Case::default()
    };
    let s = Setup::new(&c);
    let mut max_bytes = 0usize;
    ok(
        unsafe { moe_workspace_size(s.layer, 300, &mut max_bytes) },
        "size",
    );
    let mut prev = 0usize;
    for tokens in [0i64, 1, 5, 8, 9, 100, 300] {
        let mut b = 0usize;
        ok(
            unsafe { moe_workspace_size(s.layer, tokens, &mut b) },
            "size",
        );
        assert!(
            b >= prev && b <= max_bytes,
            "monotone and bounded by the max"
        );
        prev = b;
        // a batch of `tokens` prepares in the workspace sized for 300
        let mut t = Setup::new(&Case {
            tokens: tokens as usize,
            ..c.clone()
        });
        t.workspace = HostTensor::zeros(Dt::U8, &[max_bytes as i64]);
        ok(t.prepare(), "prepare in the max workspace");
    }
    assert_eq!(
        unsafe { moe_workspace_size(s.layer, -1, &mut max_bytes) },
        moe_status::MOE_ERR_INVALID_ARGUMENT
    );
    assert!(last_error().contains("max_tokens: -1"));
}
