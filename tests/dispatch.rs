//! SPEC §6 through the C ABI: dispatchers (contiguous and explicit tables), their masks,
//! moe_dispatch, and expert parallelism end to end: the sum of every rank's output equals the
//! single-rank output (how a rank's layer is cut: tests/common/ep.rs).

mod common;
use common::*;
use fusedmoe::ffi::*;
use std::ptr::null_mut;

const CPU_DEV: moe_device = moe_device {
    device_type: MOE_DEVICE_CPU,
    device_id: 0,
};

struct Disp(*mut moe_dispatcher);

impl Drop for Disp {
    fn drop(&mut self) {
        unsafe { moe_dispatcher_free(self.0) };
    }
}

fn contiguous(e_g: i64, ep_size: i64, rank: i64, shared: i64) -> Disp {
    let mut d = null_mut();
    ok(
        unsafe { moe_dispatcher_create_contiguous(e_g, ep_size, rank, shared, CPU_DEV, &mut d) },
        "contiguous",
    );
    Disp(d)
}

fn from_table(table: &[i32], local: i64) -> Result<Disp, (moe_status, String)> {
    let mut t = HostTensor::from_f64(
        Dt::I32,
        &[table.len() as i64],
        &table.iter().map(|&v| v as f64).collect::<Vec<_>>(),
    );
    let raw = t.raw();
    let mut d = null_mut();
    match unsafe { moe_dispatcher_create_mapping(&raw, local, CPU_DEV, &mut d) } {
        moe_status::MOE_OK => Ok(Disp(d)),
        s => Err((s, last_error())),
    }
}

fn table_of(d: &Disp, mask: bool) -> Vec<i32> {
    let mut len = 0usize;
    let f = if mask {
        moe_dispatcher_expert_mask
    } else {
        moe_dispatcher_mapping
    };
    unsafe {
        ok(f(d.0, null_mut(), 0, &mut len), "len");
        let mut v = vec![0i32; len];
        ok(f(d.0, v.as_mut_ptr(), len, &mut len), "table");
        v
    }
}

fn local_experts(d: &Disp) -> usize {
    let mut n = 0i64;
    ok(
        unsafe { moe_dispatcher_num_local_experts(d.0, &mut n) },
        "E_local",
    );
    n as usize
}

fn dispatch(d: &Disp, ids: &[f64], shape: &[i64]) -> Vec<f64> {
    let mut input = HostTensor::from_f64(Dt::I32, shape, ids);
    let mut out = HostTensor::zeros(Dt::I32, shape);
    let (i, o) = (input.raw(), out.raw());
    ok(
        unsafe { moe_dispatch(d.0, &i, &o, null_mut()) },
        "moe_dispatch",
    );
    out.values()
}

/// Runs the rank's layer (tests/common/ep.rs) on the ids the rank's dispatcher maps.
fn run_rank(full: &Setup, d: &Disp, rank: usize, ep_size: usize, shared: usize) -> Vec<f64> {
    let c = &full.case;
    let mut s = ep::rank_setup(
        full,
        &table_of(d, false),
        local_experts(d),
        rank,
        ep_size,
        shared,
    );
    let shape = [c.tokens as i64, c.top_k as i64];
    let local_ids = dispatch(d, &full.ids.values(), &shape);
    s.ids = HostTensor::from_f64(Dt::I32, &shape, &local_ids);
    ok(s.prepare(), "rank prepare");
    ok(s.run(), "rank run");
    s.output()
}

fn single_rank(c: &Case) -> (Setup, Vec<f64>) {
    let mut s = Setup::new(c);
    ok(s.prepare(), "prepare");
    ok(s.run(), "run");
    let out = s.output();
    (s, out)
}

#[test]
fn the_ranks_outputs_sum_to_the_single_rank_output() {
    for dt in [Dt::F32, Dt::Bf16] {
        for ep_size in [1usize, 2, 4, 8] {
            for shared in [0usize, 1] {
                let c = ep::problem(dt, ep_size, shared);
                let e_g = c.experts;
                let (full, want) = single_rank(&c);
                let mut sum = vec![0.0; want.len()];
                for rank in 0..ep_size {
                    let d = contiguous(e_g as i64, ep_size as i64, rank as i64, shared as i64);
                    for (acc, v) in sum
                        .iter_mut()
                        .zip(run_rank(&full, &d, rank, ep_size, shared))
                    {
                        *acc += v;
                    }
                }
                let err = rel_err(&sum, &want);
                assert!(
                    err <= dt.tolerance(),
                    "{dt:?} ep_size {ep_size} S {shared}: relative error {err:e}"
                );
            }
        }
    }
}

#[test]
fn explicit_tables_with_holes_and_permutations_match_too() {
    // 12 global experts over 3 ranks in a scrambled placement; global 11 is placed nowhere
    // (a hole: its routes contribute nothing on any rank).
    let placement: [[i32; 12]; 3] = [
        [-1, 2, -1, -1, 0, -1, -1, 3, -1, 1, -1, -1],
        [1, -1, -1, 0, -1, -1, 2, -1, -1, -1, 3, -1],
        [-1, -1, 3, -1, -1, 1, -1, -1, 0, -1, -1, -1],
    ];
    let c = Case {
        dt: Dt::F32,
        experts: 12,
        top_k: 3,
        tokens: 20,
        b2: true,
        seed: 5,
        ..Case::default()
    };
    let (full, _) = single_rank(&c);
    // the reference without expert 11: drop its routes in the single-rank run
    let ids: Vec<f64> = full
        .ids
        .values()
        .iter()
        .map(|&e| if e == 11.0 { -1.0 } else { e })
        .collect();
    let mut no_hole = Setup::new(&c);
    no_hole.ids = HostTensor::from_f64(Dt::I32, &[20, 3], &ids);
    ok(no_hole.prepare(), "prepare");
    ok(no_hole.run(), "run");
    let want = no_hole.output();
    let mut sum = vec![0.0; want.len()];
    for (rank, table) in placement.iter().enumerate() {
        let d = from_table(table, 4).unwrap();
        for (acc, v) in sum.iter_mut().zip(run_rank(&full, &d, rank, 3, 0)) {
            *acc += v;
        }
    }
    assert!(rel_err(&sum, &want) <= 1e-5);
}

#[test]
fn the_mask_is_the_mappings_definition_and_negative_ids_stay_negative() {
    for (e_g, ep, shared) in [(8, 4, 0), (9, 4, 1), (257, 8, 1), (64, 1, 0)] {
        for rank in 0..ep {
            let d = contiguous(e_g, ep, rank, shared);
            let (mapping, mask) = (table_of(&d, false), table_of(&d, true));
            let local = local_experts(&d) as i32;
            assert_eq!(local as i64, (e_g - shared) / ep + shared);
            for (m, k) in mapping.iter().zip(&mask) {
                assert_eq!(*k, (*m >= 0 && *m < local) as i32);
            }
            let ids: Vec<f64> = (0..e_g).map(|g| g as f64).chain([-1.0, -1.0]).collect();
            let out = dispatch(&d, &ids, &[ids.len() as i64]);
            for (g, o) in out.iter().enumerate() {
                let want = if g < e_g as usize {
                    mapping[g] as f64
                } else {
                    -1.0
                };
                assert_eq!(*o, want, "global {g}");
            }
        }
    }
}

#[test]
fn dispatch_works_in_place_and_refuses_ids_past_the_global_count() {
    let d = contiguous(8, 2, 1, 0); // rank 1 owns 4..8 as 0..4
    let mut t = HostTensor::from_f64(Dt::I64, &[2, 2], &[4.0, 0.0, -1.0, 7.0]);
    let raw = t.raw();
    ok(
        unsafe { moe_dispatch(d.0, &raw, &raw, null_mut()) },
        "in place",
    );
    assert_eq!(t.values(), vec![0.0, -1.0, -1.0, 3.0]);
    let mut bad = HostTensor::from_f64(Dt::I32, &[2], &[1.0, 8.0]);
    let mut out = HostTensor::from_f64(Dt::I32, &[2], &[5.0, 5.0]);
    let (b, o) = (bad.raw(), out.raw());
    assert_eq!(
        unsafe { moe_dispatch(d.0, &b, &o, null_mut()) },
        moe_status::MOE_ERR_INVALID_ARGUMENT
    );
    assert!(
        last_error().contains("topk_ids: element 1 = 8"),
        "{}",
        last_error()
    );
    assert_eq!(out.values(), vec![5.0, 5.0], "nothing written");
}

#[test]
fn bad_tables_and_partitions_are_refused_by_name() {
    let err = |r: Result<Disp, (moe_status, String)>| r.err().expect("refused");
    let (s, m) = err(from_table(&[0, 1, 0, -1], 2));
    assert_eq!(s, moe_status::MOE_ERR_INVALID_ARGUMENT);
    assert!(m.contains("mapping: local id 0 is used twice"), "{m}");
    assert!(err(from_table(&[0, 2], 2))
        .1
        .contains("mapping: mapping[1] = 2, expected a local id in [-1, 2)"));
    assert!(err(from_table(&[0, -2], 2)).1.contains("mapping[1] = -2"));
    assert!(err(from_table(&[0, 1], 3))
        .1
        .contains("num_local_experts: 3 is more than the 2 global experts"));
    let mut d = null_mut();
    let s = unsafe { moe_dispatcher_create_contiguous(10, 4, 0, 0, CPU_DEV, &mut d) };
    assert_eq!(s, moe_status::MOE_ERR_INVALID_ARGUMENT);
    assert!(last_error().contains("ep_size: 4 does not divide the 10 routed experts"));
    let mut wide = HostTensor::from_f64(Dt::I32, &[2, 2], &[0.0, 1.0, 2.0, 3.0]);
    let raw = wide.raw();
    assert_eq!(
        unsafe { moe_dispatcher_create_mapping(&raw, 4, CPU_DEV, &mut d) },
        moe_status::MOE_ERR_INVALID_ARGUMENT
    );
    assert!(last_error().contains("mapping: dtype int32 with ndim 2, expected a 1-D int32 table"));
    assert!(d.is_null());
}
