//! SPEC §6 on CUDA (issue 6): a CUDA dispatcher maps ids exactly as the CPU one does (every
//! id width, in place, −1 kept), counts ids ≥ E_g instead of reading past the table and
//! reports them at the next call, and feeds CUDA rank layers whose outputs sum to the
//! single-rank output. Without a GPU every test prints SKIPPED (see tests/cuda_support).

mod common;
mod cuda_support;

use common::*;
use cuda_support::*;
use fusedmoe::ffi::*;
use std::ptr::null_mut;

struct Disp(*mut moe_dispatcher);

impl Drop for Disp {
    fn drop(&mut self) {
        unsafe { moe_dispatcher_free(self.0) };
    }
}

fn contiguous(e_g: i64, ep_size: i64, rank: i64, shared: i64, device: moe_device) -> Disp {
    let mut d = null_mut();
    ok(
        unsafe { moe_dispatcher_create_contiguous(e_g, ep_size, rank, shared, device, &mut d) },
        "moe_dispatcher_create_contiguous",
    );
    Disp(d)
}

fn from_table(table: &[i32], local: i64, device: moe_device) -> Disp {
    let mut t = HostTensor::from_f64(
        Dt::I32,
        &[table.len() as i64],
        &table.iter().map(|&v| v as f64).collect::<Vec<_>>(),
    );
    let raw = t.raw();
    let mut d = null_mut();
    ok(
        unsafe { moe_dispatcher_create_mapping(&raw, local, device, &mut d) },
        "moe_dispatcher_create_mapping",
    );
    Disp(d)
}

fn mapping_of(d: &Disp) -> Vec<i32> {
    let mut len = 0usize;
    unsafe {
        ok(moe_dispatcher_mapping(d.0, null_mut(), 0, &mut len), "len");
        let mut v = vec![0i32; len];
        ok(
            moe_dispatcher_mapping(d.0, v.as_mut_ptr(), len, &mut len),
            "mapping",
        );
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

/// Random ids in [−1, E_g), a few −1 among them.
fn random_ids(rng: &mut Rng, n: usize, e_g: usize) -> Vec<f64> {
    (0..n)
        .map(|_| {
            if rng.below(8) == 0 {
                -1.0
            } else {
                rng.below(e_g) as f64
            }
        })
        .collect()
}

/// What SPEC §6 says the dispatch gives.
fn expected(mapping: &[i32], ids: &[f64]) -> Vec<f64> {
    ids.iter()
        .map(|&i| {
            if i < 0.0 {
                -1.0
            } else {
                mapping[i as usize] as f64
            }
        })
        .collect()
}

/// Dispatches `ids` on the device into a poisoned output (or in place) and returns the result.
fn dispatch_on_device(
    d: &Disp,
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    ids: &[f64],
    shape: &[i64],
    (in_dt, out_dt): (Dt, Dt),
    in_place: bool,
) -> Result<Vec<f64>, String> {
    let mut input = DeviceTensor::upload(stream, &HostTensor::from_f64(in_dt, shape, ids));
    let raw_in = input.raw();
    if in_place {
        status(
            unsafe { moe_dispatch(d.0, &raw_in, &raw_in, cu(stream)) },
            "moe_dispatch in place",
        )?;
        return Ok(input.values());
    }
    let mut out = DeviceTensor::poisoned(stream, out_dt, shape);
    let raw_out = out.raw();
    status(
        unsafe { moe_dispatch(d.0, &raw_in, &raw_out, cu(stream)) },
        "moe_dispatch",
    )?;
    Ok(out.values())
}

#[test]
fn cuda_dispatch_maps_like_spec_6_for_every_partition_and_id_width() {
    let Some(ctx) = gpu("cuda_dispatch_maps_like_spec_6_for_every_partition_and_id_width") else {
        return;
    };
    let mut rng = Rng::new(61);
    let mut dispatchers = Vec::new();
    for ep_size in [1i64, 2, 4, 8] {
        for shared in [0i64, 1] {
            let e_g = 16 + shared;
            for rank in 0..ep_size {
                dispatchers.push((
                    format!("contiguous E_g {e_g} ep {ep_size} rank {rank} S {shared}"),
                    contiguous(e_g, ep_size, rank, shared, CUDA0),
                ));
            }
        }
    }
    // an EPLB-style table: a permutation with holes, and a local id that no global id uses
    let table = [3, -1, 0, -1, 5, 1, -1, 2, -1, 4];
    dispatchers.push(("table".into(), from_table(&table, 7, CUDA0)));
    let widths = [
        (Dt::I32, Dt::I32),
        (Dt::I32, Dt::I64),
        (Dt::I64, Dt::I32),
        (Dt::I64, Dt::I64),
    ];
    for (name, d) in &dispatchers {
        let mapping = mapping_of(d);
        for (n, m) in [0usize, 1, 37, 4096].into_iter().enumerate() {
            let k = 9;
            let ids = random_ids(&mut rng, m * k, mapping.len());
            let want = expected(&mapping, &ids);
            let stream = stream_for(&ctx, n as u64);
            let shape = [m as i64, k as i64];
            for (w, &width) in widths.iter().enumerate() {
                let in_place = w % 3 == 0 && width.0 == width.1;
                let got = dispatch_on_device(d, &stream, &ids, &shape, width, in_place)
                    .unwrap_or_else(|e| panic!("{name} M {m} {width:?}: {e}"));
                assert_eq!(got, want, "{name} M {m} {width:?} in place {in_place}");
            }
        }
    }
}

#[test]
fn ids_past_the_global_count_become_minus_one_and_the_next_dispatch_reports_them() {
    let Some(ctx) = gpu("ids_past_the_global_count_become_minus_one") else {
        return;
    };
    let d = contiguous(17, 4, 1, 1, CUDA0);
    let mapping = mapping_of(&d);
    let stream = ctx.new_stream().unwrap();
    let ids = [2.0, 17.0, -1.0, 1000.0, 16.0, 5.0];
    let got = dispatch_on_device(&d, &stream, &ids, &[2, 3], (Dt::I32, Dt::I32), false)
        .expect("the bad batch's own dispatch is accepted: the device finds the ids");
    let want = expected(&mapping, &[2.0, -1.0, -1.0, -1.0, 16.0, 5.0]);
    assert_eq!(got, want, "ids ≥ E_g map to −1");
    sync(&stream);
    // the next call reports the two bad ids and writes nothing
    let mut input = DeviceTensor::upload(
        &stream,
        &HostTensor::from_f64(Dt::I32, &[1, 3], &[1.0, 2.0, 3.0]),
    );
    let mut out = DeviceTensor::poisoned(&stream, Dt::I32, &[1, 3]);
    let (raw_in, raw_out) = (input.raw(), out.raw());
    let s = unsafe { moe_dispatch(d.0, &raw_in, &raw_out, cu(&stream)) };
    let message = last_error();
    assert_eq!(s, moe_status::MOE_ERR_INVALID_ARGUMENT, "{message}");
    assert!(
        message.starts_with("topk_ids:") && message.contains("2 id(s)"),
        "{message}"
    );
    assert!(out.poisoned_from(0), "the reporting call wrote nothing");
    // reported once: the call after works
    ok(
        unsafe { moe_dispatch(d.0, &raw_in, &raw_out, cu(&stream)) },
        "moe_dispatch after the report",
    );
    assert_eq!(out.values(), expected(&mapping, &[1.0, 2.0, 3.0]));
}

#[test]
fn cuda_ranks_fed_by_cuda_dispatchers_sum_to_the_single_rank_output() {
    let Some(ctx) = gpu("cuda_ranks_fed_by_cuda_dispatchers_sum_to_the_single_rank_output") else {
        return;
    };
    for dt in [Dt::Bf16, Dt::F32] {
        for ep_size in [1usize, 2, 4, 8] {
            for shared in [0usize, 1] {
                let c = ep::problem(dt, ep_size, shared);
                let e_g = c.experts;
                let mut full = Setup::new(&c);
                ok(full.prepare(), "prepare");
                ok(full.run(), "run");
                let want = full.output();
                let stream = ctx.new_stream().unwrap();
                let mut sum = vec![0.0; want.len()];
                for rank in 0..ep_size {
                    let d = contiguous(
                        e_g as i64,
                        ep_size as i64,
                        rank as i64,
                        shared as i64,
                        CUDA0,
                    );
                    let s = ep::rank_setup(
                        &full,
                        &mapping_of(&d),
                        local_experts(&d),
                        rank,
                        ep_size,
                        shared,
                    );
                    let what = format!("{dt:?} ep_size {ep_size} S {shared} rank {rank}");
                    let layer =
                        CudaLayer::new(&s, &stream).unwrap_or_else(|e| panic!("{what}: {e}"));
                    // the batch holds the global ids; the dispatcher maps them in place
                    let mut batch = DeviceBatch::new(&s, &layer, &stream)
                        .unwrap_or_else(|e| panic!("{what}: {e}"));
                    let ids = batch.ids.raw();
                    ok(
                        unsafe { moe_dispatch(d.0, &ids, &ids, cu(&stream)) },
                        "moe_dispatch",
                    );
                    batch
                        .launch(&layer, &s.case)
                        .unwrap_or_else(|e| panic!("{what}: {e}"));
                    for (acc, v) in sum.iter_mut().zip(batch.output(&s.case)) {
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
