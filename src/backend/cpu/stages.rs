//! The CPU stages over one prepared batch. Routes are processed in the align step's compact
//! order: expert e's kept routes are rows [offsets[e], offsets[e+1]) of every scratch matrix.

use super::lora::Stage as LoraStage;
use super::panel::{matmul_panel, panel_rows};
use crate::dtype::DType;
use crate::layer::{Bias, Layer};
use crate::lora::LoraBatch;
use crate::plan::{Prepared, RunIo};
use crate::workspace::section_mut;
use rayon::prelude::*;

/// A raw pointer the stages share across threads; each task writes rows no other task does.
#[derive(Clone, Copy)]
pub(super) struct Shared<T>(pub(super) *mut T);
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}

impl<T> Shared<T> {
    #[inline(always)]
    pub(super) unsafe fn at(self, i: usize) -> *mut T {
        self.0.add(i)
    }
}

/// Columns of the combine's f32 accumulator kept on the stack.
const COMBINE_CHUNK: usize = 256;

#[inline(always)]
unsafe fn bias_at(b: &Option<Bias>, index: usize) -> f32 {
    match b {
        Some(b) => b.dtype.read(b.data, index),
        None => 0.0,
    }
}

/// `dst[c, :] = lhs[c, :] · W[e]ᵀ` for every kept route c of every expert e, where W[e] is
/// expert e's [n_total, k] weight matrix, lhs rows are `k` long and dst rows `n_total` long.
/// Parallel over (expert, panel of weight rows); `epilogue(e, c, n0, row)` then finishes each
/// row piece `dst[c, n0..n0 + row.len()]` while it is still in cache.
#[allow(clippy::too_many_arguments)]
unsafe fn expert_products(
    offsets: &[i32],
    experts: usize,
    n_total: usize,
    k: usize,
    lhs: Shared<f32>,
    weights: Shared<u8>,
    dtype: DType,
    dst: Shared<f32>,
    epilogue: impl Fn(usize, usize, usize, &mut [f32]) + Sync,
) {
    let nb = panel_rows(k, n_total);
    let panels = n_total.div_ceil(nb);
    (0..experts * panels).into_par_iter().for_each(|t| {
        let (e, n0) = (t / panels, (t % panels) * nb);
        let (start, end) = (offsets[e] as usize, offsets[e + 1] as usize);
        if start == end {
            return;
        }
        let n = nb.min(n_total - n0);
        let w = weights.at((e * n_total + n0) * k * dtype.size());
        matmul_panel(
            end - start,
            n,
            k,
            lhs.at(start * k),
            w,
            dtype,
            dst.at(start * n_total + n0),
            n_total,
        );
        for c in start..end {
            epilogue(
                e,
                c,
                n0,
                std::slice::from_raw_parts_mut(dst.at(c * n_total + n0), n),
            );
        }
    });
}

/// Runs every stage, with the LoRA deltas where `lora` is given. `p` is non-empty and checked
/// against `layer`, `io` and `lora`.
pub unsafe fn run_all(layer: &Layer, p: &Prepared, io: &RunIo, lora: Option<&LoraBatch>) {
    let v = &layer.v;
    let d = v.dims;
    let (k_top, h, n1, inter) = (d.top_k, d.hidden, d.n1, d.inter);
    let ws = p.workspace;
    let offsets: &[i32] = section_mut(ws, p.layout.expert_offsets);
    let compact: &[i32] = section_mut(ws, p.layout.compact_routes);
    let slots: &[i32] = section_mut(ws, p.layout.route_slot);
    let kept = offsets[d.experts] as usize;

    let scratch = ws.add(p.layout.scratch.offset) as *mut f32;
    let xy = Shared(scratch); // [numel, H]: gathered x, later GEMM2's y
    let g1 = Shared(scratch.add(p.numel * h)); // [numel, N1]
    let act = Shared(scratch.add(p.numel * (h + n1))); // [numel, I]
    let dtype = v.dtype;
    let hidden = Shared(io.hidden.data);
    let router = Shared(io.router_weights.data);
    let router_weight = |route: usize| io.router_dtype.read(router.at(0), route);

    // Gather: x rows in compact order, widened to f32. Reads all of hidden before any write
    // to out (the inplace case).
    (0..kept).into_par_iter().with_min_len(16).for_each(|c| {
        let m = compact[c] as usize / k_top;
        let dst = std::slice::from_raw_parts_mut(xy.at(c * h), h);
        dtype.load(hidden.at(m * h * dtype.size()), dst);
    });
    let lora = lora.map(|batch| LoraStage::new(layer, batch, p.num_tokens, compact, offsets));
    if let Some(l) = &lora {
        l.shrink_gate_up(xy, kept);
    }

    // GEMM1; epilogue: g1 = round(v · (x·w13ᵀ + LoRA delta + b13)).
    let w13 = Shared(layer.weights.w13.data);
    expert_products(
        offsets,
        d.experts,
        n1,
        h,
        xy,
        w13,
        dtype,
        g1,
        |e, c, n0, row| {
            if let Some(l) = &lora {
                l.expand_gate_up(e, c, n0, row);
            }
            let scale = if v.weight_on_input {
                router_weight(compact[c] as usize)
            } else {
                1.0
            };
            for (j, x) in row.iter_mut().enumerate() {
                *x = dtype.round(scale * (*x + bias_at(&layer.b13, e * n1 + n0 + j)));
            }
        },
    );

    // Activation per kept route: a = round(act(g1)).
    (0..kept).into_par_iter().with_min_len(8).for_each(|c| {
        let g = std::slice::from_raw_parts(g1.at(c * n1), n1);
        let a = std::slice::from_raw_parts_mut(act.at(c * inter), inter);
        if v.gated {
            for (j, out) in a.iter_mut().enumerate() {
                let (gi, ui) = v.layout.gate_up(j, inter);
                *out = dtype.round(v.act.gated(g[gi], g[ui]));
            }
        } else {
            for (out, &x) in a.iter_mut().zip(g) {
                *out = dtype.round(v.act.single(x));
            }
        }
    });

    if let Some(l) = &lora {
        l.shrink_down(act, kept);
    }

    // GEMM2; epilogue: y = round((a·w2ᵀ + LoRA delta + b2) · w').
    let w2 = Shared(layer.weights.w2.data);
    let weight_after = v.weight_after_gemm2();
    expert_products(
        offsets,
        d.experts,
        h,
        inter,
        act,
        w2,
        dtype,
        xy,
        |e, c, h0, row| {
            if let Some(l) = &lora {
                l.expand_down(e, c, h0, row);
            }
            let scale = if weight_after {
                router_weight(compact[c] as usize)
            } else {
                1.0
            };
            for (j, y) in row.iter_mut().enumerate() {
                *y = dtype.round((*y + bias_at(&layer.b2, e * h + h0 + j)) * scale);
            }
        },
    );

    let out = Shared(io.out.data);
    let esize = dtype.size();
    if v.no_combine {
        // Row (m, k) is y_mk, or zeros for a dropped route.
        (0..p.numel).into_par_iter().with_min_len(8).for_each(|r| {
            let dst = out.at(r * h * esize);
            match slots[r] {
                s if s >= 0 => {
                    dtype.store(std::slice::from_raw_parts(xy.at(s as usize * h), h), dst)
                }
                _ => std::ptr::write_bytes(dst, 0, h * esize),
            }
        });
        return;
    }
    // Combine: out_m = round(rsf · Σ_k y_mk), the sum in k order, dropped routes adding 0.
    (0..p.num_tokens)
        .into_par_iter()
        .with_min_len(4)
        .for_each(|m| {
            let mut acc = [0f32; COMBINE_CHUNK];
            for c0 in (0..h).step_by(COMBINE_CHUNK) {
                let w = COMBINE_CHUNK.min(h - c0);
                let acc = &mut acc[..w];
                acc.fill(0.0);
                for k in 0..k_top {
                    let s = slots[m * k_top + k];
                    if s >= 0 {
                        let y = std::slice::from_raw_parts(xy.at(s as usize * h + c0), w);
                        for (a, &y) in acc.iter_mut().zip(y) {
                            *a += y;
                        }
                    }
                }
                for a in acc.iter_mut() {
                    *a *= v.rsf;
                }
                dtype.store(acc, out.at((m * h + c0) * esize));
            }
        });
}
