//! The CUDA hot path does not wait for the stream: work is queued behind a gate that holds
//! the stream (tests/cuda_support's Gate) and moe_prepare + moe_run must return at once; and
//! out-of-range ids are dropped and reported by the next call. In a test binary of its own:
//! while the gate holds a stream, another test's module load or cuMemFree in the same process
//! waits for the device, and a launch here can wait behind that in the driver (seen on the
//! H100: tests/cuda.rs's other tests compiling their kernels stalled this one for the gate's
//! whole 20 s). Without a GPU every test prints SKIPPED (see tests/cuda_support).

mod common;
mod cuda_support;

use common::*;
use cuda_support::*;
use cudarc::driver::{sys, CudaContext};
use fusedmoe::ffi::*;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Ids outside [−1, E) are dropped on CUDA and counted; the next call on the layer after the
/// stream has finished reports "topk_ids: ..." and writes nothing; the call after that works.
/// The bad batch's prepare and run are made behind a gate that holds the stream, which also
/// shows that neither waits for the stream (no host synchronization in the hot path; not
/// under compute-sanitizer, where the bad ids are there for memcheck).
#[test]
fn out_of_range_ids_are_dropped_and_reported_by_the_next_call() {
    let Some(ctx) = gpu("out_of_range_ids_are_dropped_and_reported_by_the_next_call") else {
        return;
    };
    // 16 tokens of top 2: 32 routes take the one-warp align step; 2048 tokens: 4096 routes take
    // the many-block align step (two chunks)
    for (ids_i64, tokens) in [
        (false, 16),
        (true, 16),
        (false, 64),
        (true, 64),
        (false, 2048),
    ] {
        let c = Case {
            tokens,
            ids_i64,
            b13: true,
            b2: true,
            drop: 0.1,
            ..base(Dt::Bf16, 7000 + ids_i64 as u64 + tokens as u64)
        };
        bad_ids_case(&ctx, &c).unwrap_or_else(|e| panic!("out-of-range ids: {c:?}\n    {e}"));
    }
}

fn bad_ids_case(ctx: &Arc<CudaContext>, c: &Case) -> Result<(), String> {
    let mut s = Setup::new(c);
    let e = c.experts as f64;
    let mut bad: Vec<(usize, f64)> = vec![(3, e), (10, 1000.0), (17, -5.0), (40, e + 1.0)];
    if c.ids_i64 {
        // wrong if narrowed to 32 bits: 2^32 + 1 → 1, −2^32 + 2 → 2
        bad.extend([(51, 4294967297.0), (77, -4294967294.0)]);
    } else {
        bad.extend([(51, i32::MAX as f64), (77, i32::MIN as f64)]);
    }
    // fewer routes than that: the same ids at other routes (32 routes: 3, 10, 17, 8, 19, 13)
    let numel = c.tokens * c.top_k;
    let bad: Vec<(usize, f64)> = bad.into_iter().map(|(r, v)| (r % numel, v)).collect();
    for &(r, v) in &bad {
        s.ids.set(r, v);
    }
    let stream = ctx.new_stream().unwrap();
    let st = cu(&stream);
    let layer = CudaLayer::new(&s, &stream)?;
    let mut d = DeviceBatch::new(&s, &layer, &stream)?; // the bad ids
    for &(r, _) in &bad {
        s.ids.set(r, -1.0);
    }
    let mut good = DeviceTensor::upload(&stream, &s.ids); // the same batch, bad ids as −1
    status(s.prepare(), "CPU moe_prepare")?;
    status(s.run(), "CPU moe_run")?;
    let (cpu, reference, ids) = (s.output(), s.reference(), s.ids.values());
    status(layer.warmup(c.tokens, &stream), "moe_warmup")?;
    sync(&stream);
    let (bad_ids, good_ids, ws) = (d.ids.raw(), good.raw(), d.ws.raw());
    let (hidden, router, out) = (d.hidden.raw(), d.router.raw(), d.out.raw());
    let run = || layer.run_raw(&hidden, &router, Some(&out), st);

    // 1. the bad batch runs, queued behind a closed gate (so that its own moe_run cannot have
    //    seen the count yet); neither call waits for the stream. Not under compute-sanitizer,
    //    which serializes launches: a launch behind the gate would wait for it.
    if !sanitizer() {
        let gate = Gate::close(&stream);
        let start = Instant::now();
        let launched = status(layer.prepare_raw(&bad_ids, &ws, st), "moe_prepare")
            .and_then(|()| status(run(), "moe_run"));
        let waited = start.elapsed();
        gate.open();
        sync(&stream);
        if waited > GATE_LIMIT / 2 {
            return Err(format!(
                "moe_prepare + moe_run took {waited:?} with the stream held: they wait for the \
                 stream (a host synchronization, or compiling / loading a kernel that \
                 moe_warmup did not); their result: {launched:?}"
            ));
        }
        launched.map_err(|e| format!("the bad batch itself must run (in {waited:?}): {e}"))?;
        compare(c, &d.output(c), &cpu, Some(&reference), &ids)
            .map_err(|e| format!("the bad batch's valid routes: {e}"))?;
    } else {
        status(
            layer.prepare_raw(&bad_ids, &ws, st),
            "moe_prepare of the bad batch",
        )?;
        sync(&stream);
    }

    // 2. the next call, a moe_prepare, reports it and writes nothing; the call after works
    let ws_before = d.ws.read_bytes();
    expect_topk_ids_error(layer.prepare_raw(&good_ids, &ws, st), "moe_prepare")?;
    if d.ws.read_bytes() != ws_before {
        return Err("the refused moe_prepare wrote the workspace".into());
    }
    status(
        layer.prepare_raw(&good_ids, &ws, st),
        "moe_prepare after the report",
    )?;
    d.out.fill(POISON);
    status(run(), "moe_run after the report")?;
    sync(&stream);
    compare(c, &d.out.values(), &cpu, Some(&reference), &ids)
        .map_err(|e| format!("the batch after the report: {e}"))?;

    // 3. again, reported by a moe_run this time: it writes nothing; the run after it computes
    //    the bad batch (its plan) with the bad ids dropped
    status(
        layer.prepare_raw(&bad_ids, &ws, st),
        "moe_prepare of the second bad batch",
    )?;
    sync(&stream);
    d.out.fill(POISON);
    expect_topk_ids_error(run(), "moe_run")?;
    sync(&stream);
    if !d.out.poisoned_from(0) {
        return Err("the refused moe_run wrote out".into());
    }
    status(run(), "moe_run after the report")?;
    sync(&stream);
    compare(c, &d.out.values(), &cpu, Some(&reference), &ids)
        .map_err(|e| format!("the run after the report: {e}"))?;
    Ok(())
}

fn expect_topk_ids_error(s: moe_status, what: &str) -> Result<(), String> {
    let message = last_error();
    if s != moe_status::MOE_ERR_INVALID_ARGUMENT || !message.starts_with("topk_ids:") {
        return Err(format!(
            "{what} after a batch with out-of-range ids: {s:?} \"{message}\", expected \
             MOE_ERR_INVALID_ARGUMENT with a message starting \"topk_ids:\""
        ));
    }
    Ok(())
}

/// The timing in this file needs the gate to hold: a sanity check of the harness.
#[test]
fn the_stream_gate_holds_queued_work() {
    let Some(ctx) = gpu("the_stream_gate_holds_queued_work") else {
        return;
    };
    if sanitizer() {
        println!("SKIPPED: the stream gate under compute-sanitizer (launches are serialized)");
        return;
    }
    let stream = ctx.new_stream().unwrap();
    let mut t = DeviceTensor::poisoned(&stream, Dt::U8, &[64]);
    let gate = Gate::close(&stream);
    t.fill(0);
    std::thread::sleep(Duration::from_millis(50));
    let done = unsafe { sys::cuStreamQuery(stream.cu_stream()) };
    gate.open();
    sync(&stream);
    assert_eq!(
        done,
        sys::CUresult::CUDA_ERROR_NOT_READY,
        "the gate did not hold the stream"
    );
    assert!(t.read_bytes().iter().all(|&b| b == 0));
}
