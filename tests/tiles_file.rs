//! The tuner's table writer (examples/support/tile_table.rs, the code examples/tune writes its
//! table with) against the library, no GPU needed: what it writes parses with
//! `fusedmoe::tiles::parse_tables` into the same configs, a second run merges per (key, M),
//! and a CPU layer given the written file through `tile.config_file` prepares each batch
//! with the config of the nearest M key (ties to the smaller key).

mod common;
#[path = "../examples/support/tile_table.rs"]
mod tile_table;

use common::*;
use fusedmoe::dtype::DType;
use fusedmoe::ffi::*;
use fusedmoe::tiles::{parse_tables, Pdl, TableKey, TileConfig};
use std::path::PathBuf;

fn cfg(bm: u32, bn: u32, bk: u32, warps: u32, stages: u32) -> TileConfig {
    TileConfig {
        block_m: bm,
        block_n: bn,
        block_k: bk,
        group_m: if bm >= 64 { 8 } else { 1 },
        num_warps: warps,
        num_stages: stages,
        flags: 0,
    }
}

/// The key of `Case::default()`'s layer: E 8, I 24, H 40, bf16, on the CPU.
fn cpu_key() -> TableKey {
    TableKey {
        experts: 8,
        n: 24,
        k: 40,
        dtype: DType::BF16,
        quant: "none".into(),
        device: "cpu".into(),
    }
}

fn gpu_key() -> TableKey {
    TableKey {
        experts: 128,
        n: 768,
        k: 2048,
        dtype: DType::BF16,
        quant: "none".into(),
        // a name with characters JSON must escape
        device: "NVIDIA \"H100\" 80GB\\HBM3".into(),
    }
}

fn temp_file(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fusedmoe-tiles-file-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn what_the_tuner_writes_parses_back_to_the_same_tables() {
    let split = cfg(128, 256, 64, 8, 3)
        .with_split_k(1, 4)
        .with_split_k(2, 2);
    let tables = vec![
        tile_table::table(
            cpu_key(),
            &[
                (100, cfg(128, 128, 32, 8, 4)),
                (2, cfg(16, 32, 64, 4, 3)),
                (10, cfg(32, 64, 128, 4, 2)),
            ],
        ),
        tile_table::table(
            gpu_key(),
            &[
                (1, cfg(16, 64, 128, 4, 4).with_pdl(Pdl::AtGemm1Start)),
                (4, cfg(16, 32, 128, 4, 3).with_block_n_down(128)),
                (16384, split),
            ],
        ),
    ];
    let text = tile_table::render(&tables);
    let parsed =
        parse_tables(&text, "rendered").unwrap_or_else(|e| panic!("{}\n{text}", e.message));
    assert_eq!(parsed, tables, "{text}");
    // keys in increasing M, one config a line
    let one = text.find("\"2\": {").unwrap();
    let ten = text.find("\"10\": {").unwrap();
    let hundred = text.find("\"100\": {").unwrap();
    assert!(one < ten && ten < hundred, "{text}");
    // split-K only where it is not 1, under its own keys
    assert!(
        text.contains("\"SPLIT_K\": 4, \"SPLIT_K_DOWN\": 2"),
        "{text}"
    );
    assert_eq!(text.matches("SPLIT_K\"").count(), 1, "{text}");
    // GEMM2's own width only where it has one
    assert!(
        text.contains("\"BLOCK_N\": 32, \"BLOCK_K\": 128, \"GROUP_M\": 1, \"num_warps\": 4, \"num_stages\": 3, \"BLOCK_N_DOWN\": 128}"),
        "{text}"
    );
    assert_eq!(text.matches("BLOCK_N_DOWN").count(), 1, "{text}");
    // the launch mode only where set (the tuner picks it for decode points)
    assert_eq!(text.matches("\"PDL\": 2").count(), 1, "{text}");
    assert_eq!(text.matches("PDL").count(), 1, "{text}");

    let path = temp_file("roundtrip.json");
    tile_table::write(&path, &tables).unwrap();
    assert_eq!(tile_table::read(&path).unwrap(), tables);
    let file = std::fs::read_to_string(&path).unwrap();
    assert_eq!(parse_tables(&file, "file").unwrap(), tables);
    assert_eq!(tile_table::read(&temp_file("absent.json")).unwrap(), vec![]);
}

#[test]
fn a_second_run_replaces_its_m_keys_and_keeps_the_rest() {
    let path = temp_file("merge.json");
    let first = vec![
        tile_table::table(
            cpu_key(),
            &[(2, cfg(16, 32, 64, 4, 3)), (50, cfg(64, 64, 32, 4, 3))],
        ),
        tile_table::table(gpu_key(), &[(1, cfg(16, 64, 128, 4, 4))]),
    ];
    tile_table::write(&path, &first).unwrap();
    let second = tile_table::table(
        cpu_key(),
        &[(2, cfg(16, 128, 128, 4, 4)), (10, cfg(32, 64, 64, 4, 3))],
    );
    let merged = tile_table::merge(tile_table::read(&path).unwrap(), &second);
    tile_table::write(&path, &merged).unwrap();
    let back = tile_table::read(&path).unwrap();
    assert_eq!(back.len(), 2);
    assert_eq!(back[0].key, cpu_key());
    assert_eq!(
        back[0].entries,
        vec![
            (2, cfg(16, 128, 128, 4, 4)),
            (10, cfg(32, 64, 64, 4, 3)),
            (50, cfg(64, 64, 32, 4, 3)),
        ]
    );
    assert_eq!(back[1], first[1]);
    // a table of a new key is added
    let third = tile_table::table(
        TableKey {
            experts: 16,
            ..cpu_key()
        },
        &[(1, cfg(16, 32, 64, 4, 3))],
    );
    assert_eq!(tile_table::merge(back, &third).len(), 3);
}

#[test]
fn a_layer_given_the_written_file_takes_the_nearest_m_config() {
    let path = temp_file("layer.json");
    let (small, mid, large) = (
        cfg(16, 32, 128, 4, 4),
        cfg(32, 64, 64, 8, 3),
        cfg(128, 128, 32, 8, 2),
    );
    let table = tile_table::table(cpu_key(), &[(2, small), (10, mid), (100, large)]);
    // another device's table for the same shape is not this layer's
    let other = tile_table::table(
        TableKey {
            device: "NVIDIA H100 80GB HBM3".into(),
            ..cpu_key()
        },
        &[(1, cfg(64, 256, 64, 8, 4))],
    );
    tile_table::write(&path, &[other, table]).unwrap();
    let opt = (
        "tile.config_file".to_string(),
        path.to_str().unwrap().to_string(),
    );
    // |6 − 2| = 4 = |6 − 10| and |55 − 10| = 45 = |55 − 100|: ties go to the smaller key
    for (tokens, want) in [
        (1, small),
        (6, small),
        (7, mid),
        (55, mid),
        (56, large),
        (300, large),
    ] {
        let c = Case {
            tokens,
            options: vec![opt.clone()],
            ..Case::default()
        };
        let mut s = Setup::new(&c);
        ok(s.prepare(), "prepare");
        let mut t: moe_tile_config = unsafe { std::mem::zeroed() };
        ok(unsafe { moe_plan_tile_config(s.plan, &mut t) }, "tile");
        let got = TileConfig {
            block_m: t.block_m as u32,
            block_n: t.block_n as u32,
            block_k: t.block_k as u32,
            group_m: t.group_m as u32,
            num_warps: t.num_warps as u32,
            num_stages: t.num_stages as u32,
            flags: t.flags as u32,
        };
        assert_eq!(got, want, "M = {tokens}");
        // the batch runs with it, and matches the float64 reference
        ok(s.run(), "run");
        let err = rel_err(&s.output(), &s.reference());
        assert!(err <= Dt::Bf16.tolerance(), "M = {tokens}: error {err}");
    }
}
