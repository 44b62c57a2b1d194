//! The CPU path's speed next to the GEMM crate's own on the same matrix shapes, in one run.
//!
//!   cargo run --release --example bench_cpu [-- --quick]
//!
//! For each layer shape and token count M, with softmax top-k routing: ours = moe_prepare +
//! moe_run through the C ABI (bf16 and f32 layers); baseline = `gemm::gemm` on exactly the
//! per-expert products the layer computes (rows routed to expert e times its w13ᵀ, then times
//! its w2ᵀ), with f32 operands already in memory and the crate's own rayon parallelism. The
//! ratio is ours / baseline in GFLOP/s: what gather, widening bf16, activation, rounding and
//! combine cost on top of the bare GEMMs.

#[path = "support/mod.rs"]
mod support;

use support::*;

/// The baseline: the layer's GEMMs as the gemm crate runs them on ready f32 operands.
struct GemmBaseline {
    shape: Shape,
    /// Routes per expert.
    counts: Vec<usize>,
    x: Vec<f32>,
    w13: Vec<f32>,
    w2: Vec<f32>,
    g1: Vec<f32>,
    act: Vec<f32>,
    y: Vec<f32>,
}

impl GemmBaseline {
    fn new(s: Shape, ids: &[i32], w: &mut Weights, dt: Dtype) -> Self {
        let mut counts = vec![0; s.experts];
        for &e in ids {
            counts[e as usize] += 1;
        }
        let routes = ids.len();
        let mut rng = Rng(7);
        GemmBaseline {
            shape: s,
            counts,
            x: rng.vec(routes * s.hidden, -1.0, 1.0),
            w13: w.w13.read_f64(dt).iter().map(|&v| v as f32).collect(),
            w2: w.w2.read_f64(dt).iter().map(|&v| v as f32).collect(),
            g1: vec![0.0; routes * 2 * s.inter],
            act: rng.vec(routes * s.inter, -1.0, 1.0),
            y: vec![0.0; routes * s.hidden],
        }
    }

    /// dst[rows, n] = lhs[rows, k] · w[n, k]ᵀ with the crate's own threads.
    unsafe fn product(
        rows: usize,
        n: usize,
        k: usize,
        lhs: *const f32,
        w: *const f32,
        dst: *mut f32,
    ) {
        gemm::gemm(
            rows,
            n,
            k,
            dst,
            1,
            n as isize,
            false,
            lhs,
            1,
            k as isize,
            w,
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        );
    }

    fn run(&mut self) {
        let s = self.shape;
        let (h, i) = (s.hidden, s.inter);
        let mut row = 0;
        for (e, &n) in self.counts.iter().enumerate() {
            if n == 0 {
                continue;
            }
            unsafe {
                Self::product(
                    n,
                    2 * i,
                    h,
                    self.x[row * h..].as_ptr(),
                    self.w13[e * 2 * i * h..].as_ptr(),
                    self.g1[row * 2 * i..].as_mut_ptr(),
                );
                Self::product(
                    n,
                    h,
                    i,
                    self.act[row * i..].as_ptr(),
                    self.w2[e * h * i..].as_ptr(),
                    self.y[row * h..].as_mut_ptr(),
                );
            }
            row += n;
        }
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let shapes = [
        (
            "mixtral-small",
            Shape {
                experts: 8,
                hidden: 1024,
                inter: 3584,
                top_k: 2,
            },
        ),
        (
            "many-experts",
            Shape {
                experts: 64,
                hidden: 1024,
                inter: 512,
                top_k: 8,
            },
        ),
    ];
    let token_counts: &[usize] = if quick {
        &[1, 64]
    } else {
        &[1, 16, 64, 256, 1024]
    };
    println!(
        "threads: {}; median of {} runs; GFLOP/s counts 2·routes·(N1·H + H·I)",
        rayon::current_num_threads(),
        if quick { 3 } else { 5 }
    );
    println!("| shape | M | ours bf16 ms | ours bf16 GFLOP/s | ours f32 GFLOP/s | gemm f32 GFLOP/s | bf16 / gemm | f32 / gemm |");
    println!("|---|---|---|---|---|---|---|---|");
    for (name, s) in shapes {
        let mut rng = Rng(1);
        let mut w_bf16 = Weights::random(&mut rng, Dtype::Bf16, s);
        let mut rng = Rng(1);
        let mut w_f32 = Weights::random(&mut rng, Dtype::F32, s);
        let max_tokens = *token_counts.last().unwrap();
        let mut layer_bf16 = Layer::new(s, Dtype::Bf16, "cpu", &mut w_bf16, max_tokens, &[]);
        let mut layer_f32 = Layer::new(s, Dtype::F32, "cpu", &mut w_f32, max_tokens, &[]);
        for &m in token_counts {
            let mut rng = Rng(100 + m as u64);
            let (ids_v, weights_v) = route(&mut rng, m, s);
            let x = rng.vec(m * s.hidden, -1.0, 1.0);
            let (mi, hi, ki) = (m as i64, s.hidden as i64, s.top_k as i64);
            let mut ids = Buffer::ids(&[mi, ki], &ids_v);
            let mut weights = Buffer::from_f32(Dtype::F32, &[mi, ki], &weights_v);
            let reps = if quick { 3 } else { 5 };
            let flops = s.flops(m * s.top_k);

            let mut hidden = Buffer::from_f32(Dtype::Bf16, &[mi, hi], &x);
            let mut out = Buffer::zeros(Dtype::Bf16.dl(), &[mi, hi]);
            let t_bf16 = median_seconds(reps, || {
                layer_bf16.forward(&mut hidden, &mut ids, &mut weights, &mut out)
            });
            let mut hidden = Buffer::from_f32(Dtype::F32, &[mi, hi], &x);
            let mut out = Buffer::zeros(Dtype::F32.dl(), &[mi, hi]);
            let t_f32 = median_seconds(reps, || {
                layer_f32.forward(&mut hidden, &mut ids, &mut weights, &mut out)
            });
            let mut base = GemmBaseline::new(s, &ids_v, &mut w_f32, Dtype::F32);
            let t_gemm = median_seconds(reps, || base.run());

            let gf = |t: f64| flops / t / 1e9;
            println!(
                "| {name} | {m} | {:.2} | {:.1} | {:.1} | {:.1} | {:.0} % | {:.0} % |",
                t_bf16 * 1e3,
                gf(t_bf16),
                gf(t_f32),
                gf(t_gemm),
                100.0 * t_gemm / t_bf16,
                100.0 * t_gemm / t_f32
            );
        }
    }
}
