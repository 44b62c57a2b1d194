//! Expert parallelism simulated on one machine (SPEC §6): four ranks, each with a contiguous
//! dispatcher and a layer holding its quarter of the same experts. The four outputs, summed
//! as the host's all-reduce would, match the one-rank layer.
//!
//!   cargo run --release --example expert_parallel

#[path = "support/mod.rs"]
mod support;

use fusedmoe::ffi::*;
use std::ptr::null_mut;
use support::*;

const EP_SIZE: usize = 4;

fn main() {
    let s = Shape {
        experts: 16,
        hidden: 256,
        inter: 512,
        top_k: 4,
    };
    let (dt, tokens) = (Dtype::F32, 32usize);
    let mut rng = Rng(3);
    let mut full_weights = Weights::random(&mut rng, dt, s);
    let x = rng.vec(tokens * s.hidden, -1.0, 1.0);
    let (ids, router) = route(&mut rng, tokens, s);
    let (m, h, k) = (tokens as i64, s.hidden as i64, s.top_k as i64);
    let mut weights = Buffer::from_f32(Dtype::F32, &[m, k], &router);

    let mut one_rank = Layer::new(s, dt, "cpu", &mut full_weights, tokens, &[]);
    let mut want = Buffer::zeros(dt.dl(), &[m, h]);
    one_rank.forward(
        &mut Buffer::from_f32(dt, &[m, h], &x),
        &mut Buffer::ids(&[m, k], &ids),
        &mut weights,
        &mut want,
    );

    let w13 = full_weights.w13.read_f64(dt);
    let w2 = full_weights.w2.read_f64(dt);
    let per_expert = (2 * s.inter * s.hidden, s.hidden * s.inter);
    let mut sum = vec![0.0f64; tokens * s.hidden];
    for rank in 0..EP_SIZE {
        let mut dispatcher = null_mut();
        let cpu = moe_device {
            device_type: MOE_DEVICE_CPU,
            device_id: 0,
        };
        check(
            unsafe {
                moe_dispatcher_create_contiguous(
                    s.experts as i64,
                    EP_SIZE as i64,
                    rank as i64,
                    0,
                    cpu,
                    &mut dispatcher,
                )
            },
            "dispatcher",
        );
        // This rank's experts: the global ones its mapping sends to a local id.
        let mut mapping = vec![0i32; s.experts];
        let mut len = 0usize;
        check(
            unsafe {
                moe_dispatcher_mapping(dispatcher, mapping.as_mut_ptr(), mapping.len(), &mut len)
            },
            "mapping",
        );
        let local = Shape {
            experts: s.experts / EP_SIZE,
            ..s
        };
        let (mut lw13, mut lw2) = (
            vec![0f32; local.experts * per_expert.0],
            vec![0f32; local.experts * per_expert.1],
        );
        for (g, &l) in mapping.iter().enumerate().filter(|(_, &l)| l >= 0) {
            let (g, l) = (g, l as usize);
            for (dst, src) in lw13[l * per_expert.0..][..per_expert.0]
                .iter_mut()
                .zip(&w13[g * per_expert.0..])
            {
                *dst = *src as f32;
            }
            for (dst, src) in lw2[l * per_expert.1..][..per_expert.1]
                .iter_mut()
                .zip(&w2[g * per_expert.1..])
            {
                *dst = *src as f32;
            }
        }
        let (le, i2, hh, ii) = (local.experts as i64, 2 * s.inter as i64, h, s.inter as i64);
        let mut rank_weights = Weights {
            w13: Buffer::from_f32(dt, &[le, i2, hh], &lw13),
            w2: Buffer::from_f32(dt, &[le, hh, ii], &lw2),
        };
        let global = (s.experts as i64).to_string();
        let mut layer = Layer::new(local, dt, "cpu", &mut rank_weights, tokens, &[]);
        let _ = global;
        // Global ids → this rank's local ids (−1 for other ranks' experts), then the layer.
        let mut global_ids = Buffer::ids(&[m, k], &ids);
        let mut local_ids = Buffer::ids(&[m, k], &ids);
        let (g, l) = (global_ids.tensor(), local_ids.tensor());
        check(
            unsafe { moe_dispatch(dispatcher, &g, &l, null_mut()) },
            "moe_dispatch",
        );
        let mut out = Buffer::zeros(dt.dl(), &[m, h]);
        let seconds = median_seconds(3, || {
            layer.forward(
                &mut Buffer::from_f32(dt, &[m, h], &x),
                &mut local_ids,
                &mut weights,
                &mut out,
            )
        });
        for (acc, v) in sum.iter_mut().zip(out.read_f64(dt)) {
            *acc += v;
        }
        let kept = local_ids.read_i32().iter().filter(|&&v| v >= 0).count();
        println!(
            "rank {rank}: experts {:?}, {kept} of {} routes, {:.2} ms",
            mapping
                .iter()
                .enumerate()
                .filter(|(_, &l)| l >= 0)
                .map(|(g, _)| g)
                .collect::<Vec<_>>(),
            tokens * s.top_k,
            seconds * 1e3
        );
        unsafe { moe_dispatcher_free(dispatcher) };
    }
    let want = want.read_f64(dt);
    let num: f64 = sum.iter().zip(&want).map(|(a, b)| (a - b) * (a - b)).sum();
    let den: f64 = want.iter().map(|b| b * b).sum();
    let rel = (num / den).sqrt();
    println!("sum over {EP_SIZE} ranks vs one rank: relative error {rel:.2e}");
    if rel.is_nan() || rel > 1e-5 {
        eprintln!("error above the f32 tolerance 1e-5");
        std::process::exit(1);
    }
}
