//! A Mixtral-shaped but small MoE layer (E = 8, H = 1024, I = 3584, top_k = 2, M = 64)
//! driven through the C ABI, checked against a float64 reference.
//!
//!   cargo run --release --example demo [-- --device cpu|cuda --dtype bf16|f16|f32 --tokens M]

#[path = "support/mod.rs"]
mod support;

use rayon::prelude::*;
use support::*;

struct Args {
    device: String,
    dtype: Dtype,
    tokens: usize,
}

fn parse_args() -> Args {
    let mut a = Args {
        device: "cpu".into(),
        dtype: Dtype::Bf16,
        tokens: 64,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .unwrap_or_else(|| usage(&format!("{flag} needs a value")));
        match flag.as_str() {
            "--device" if value == "cpu" || value == "cuda" => a.device = value,
            "--dtype" => {
                a.dtype =
                    Dtype::parse(&value).unwrap_or_else(|| usage("--dtype is bf16, f16 or f32"))
            }
            "--tokens" => {
                a.tokens = value
                    .parse()
                    .unwrap_or_else(|_| usage("--tokens is a count"))
            }
            _ => usage(&format!("unknown argument {flag} {value}")),
        }
    }
    a
}

fn usage(why: &str) -> ! {
    eprintln!("{why}\nusage: demo [--device cpu|cuda] [--dtype bf16|f16|f32] [--tokens M]");
    std::process::exit(2)
}

/// SPEC §2 for a gated silu layer in float64 without intermediate rounding: what the layer
/// approximates.
fn reference(
    s: Shape,
    x: &[f64],
    w13: &[f64],
    w2: &[f64],
    ids: &[i32],
    weights: &[f32],
) -> Vec<f64> {
    let (h, i, k) = (s.hidden, s.inter, s.top_k);
    let tokens = x.len() / h;
    (0..tokens)
        .into_par_iter()
        .flat_map_iter(|m| {
            let mut out = vec![0.0f64; h];
            for r in m * k..(m + 1) * k {
                let e = ids[r] as usize;
                let xm = &x[m * h..(m + 1) * h];
                let dot =
                    |row: &[f64], v: &[f64]| row.iter().zip(v).map(|(a, b)| a * b).sum::<f64>();
                let act: Vec<f64> = (0..i)
                    .map(|j| {
                        let g = dot(&w13[(e * 2 * i + j) * h..][..h], xm);
                        let u = dot(&w13[(e * 2 * i + i + j) * h..][..h], xm);
                        g / (1.0 + (-g).exp()) * u
                    })
                    .collect();
                for (c, o) in out.iter_mut().enumerate() {
                    *o += weights[r] as f64 * dot(&w2[(e * h + c) * i..][..i], &act);
                }
            }
            out
        })
        .collect()
}

fn main() {
    let args = parse_args();
    let s = Shape {
        experts: 8,
        hidden: 1024,
        inter: 3584,
        top_k: 2,
    };
    let dt = args.dtype;
    let mut rng = Rng(42);
    let mut w = Weights::random(&mut rng, dt, s);
    let mut layer = Layer::new(s, dt, &args.device, &mut w, args.tokens, &[]);
    let m = args.tokens as i64;
    let mut hidden = Buffer::from_f32(
        dt,
        &[m, s.hidden as i64],
        &rng.vec(args.tokens * s.hidden, -1.0, 1.0),
    );
    let (ids_v, weights_v) = route(&mut rng, args.tokens, s);
    let mut ids = Buffer::ids(&[m, s.top_k as i64], &ids_v);
    let f32_dt = Dtype::F32;
    let mut weights = Buffer::from_f32(f32_dt, &[m, s.top_k as i64], &weights_v);
    let mut out = Buffer::zeros(dt.dl(), &[m, s.hidden as i64]);
    if let Some(stream) = layer.stream() {
        for b in [&mut hidden, &mut ids, &mut weights, &mut out] {
            b.copy_to_device(&stream);
        }
    }

    let seconds = median_seconds(5, || {
        layer.forward(&mut hidden, &mut ids, &mut weights, &mut out)
    });
    let flops = s.flops(args.tokens * s.top_k);
    let want = reference(
        s,
        &hidden.read_f64(dt),
        &w.w13.read_f64(dt),
        &w.w2.read_f64(dt),
        &ids_v,
        &weights_v,
    );
    let got = out.read_f64(dt);
    let num: f64 = got.iter().zip(&want).map(|(a, b)| (a - b) * (a - b)).sum();
    let den: f64 = want.iter().map(|b| b * b).sum();
    let rel = if got.iter().all(|v| v.is_finite()) {
        (num / den).sqrt()
    } else {
        f64::INFINITY
    };

    println!(
        "fusedmoe {} demo: E={} H={} I={} top_k={} M={} {:?} on {}",
        unsafe { std::ffi::CStr::from_ptr(fusedmoe::ffi::moe_version()) }.to_string_lossy(),
        s.experts,
        s.hidden,
        s.inter,
        s.top_k,
        args.tokens,
        dt,
        args.device
    );
    println!(
        "time      {:.3} ms (median of 5, prepare + run)",
        seconds * 1e3
    );
    println!(
        "speed     {:.1} GFLOP/s ({:.2} GFLOP per call)",
        flops / seconds / 1e9,
        flops / 1e9
    );
    println!("rel error {rel:.3e} vs float64 (‖out − ref‖ / ‖ref‖)");
    let tolerance = match dt {
        Dtype::F32 => 1e-5,
        Dtype::F16 => 2e-3,
        Dtype::Bf16 => 1e-2,
    };
    if rel > tolerance {
        eprintln!("error above the {dt:?} tolerance {tolerance:e}");
        std::process::exit(1);
    }
}
