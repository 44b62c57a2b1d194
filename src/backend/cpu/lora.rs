//! The LoRA stage of the CPU backend (SPEC §7), hooked into the stages of stages.rs:
//! shrink (the rank-r intermediate per kept route, rounded to the layer dtype) before each
//! GEMM, and expand (s_a · B · intermediate) in each GEMM's epilogue, added to the f32
//! accumulator before the bias, the router weight and the rounding.

use super::stages::Shared;
use crate::activation::GateUpLayout;
use crate::dtype::DType;
use crate::layer::Layer;
use crate::lora::{LoraBatch, SlotWeights};
use rayon::prelude::*;

/// One LoRA run over a prepared batch: which slot each kept route uses and where the
/// intermediates go. Kept routes are indexed c in the align step's compact order.
pub struct Stage<'a> {
    batch: &'a LoraBatch<'a>,
    dtype: DType,
    layout: GateUpLayout,
    gated: bool,
    hidden: usize,
    inter: usize,
    n1: usize,
    /// r and the rows of gate_up A (2r gated, r otherwise).
    rank: usize,
    rows: usize,
    top_k: usize,
    compact: &'a [i32],
    offsets: &'a [i32],
    token_slot: &'a [i32],
    gate_up: Shared<f32>,
    down: Shared<f32>,
}

impl<'a> Stage<'a> {
    /// Resolves each token's slot (−1 where the adapter is −1, cleared or disabled).
    ///
    /// # Safety
    /// The batch's scratch must hold its sections for `num_tokens` tokens and the map must be
    /// host memory; `compact` and `offsets` are the plan's.
    pub unsafe fn new(
        layer: &Layer,
        batch: &'a LoraBatch<'a>,
        num_tokens: usize,
        compact: &'a [i32],
        offsets: &'a [i32],
    ) -> Stage<'a> {
        let v = &layer.v;
        let token_slot = std::slice::from_raw_parts_mut(batch.scratch.token_slot, num_tokens);
        batch.map.per_token(token_slot);
        for a in token_slot.iter_mut() {
            if *a >= 0 && batch.slots[*a as usize].active().is_none() {
                *a = -1;
            }
        }
        let rank = batch.max_rank;
        Stage {
            batch,
            dtype: v.dtype,
            layout: v.layout,
            gated: v.gated,
            hidden: v.dims.hidden,
            inter: v.dims.inter,
            n1: v.dims.n1,
            rank,
            rows: if v.gated { 2 * rank } else { rank },
            top_k: v.dims.top_k,
            compact,
            offsets,
            token_slot,
            gate_up: Shared(batch.scratch.gate_up),
            down: Shared(batch.scratch.down),
        }
    }

    /// The weights kept route c uses, if any.
    fn weights(&self, c: usize) -> Option<&SlotWeights> {
        let m = self.compact[c] as usize / self.top_k;
        match self.token_slot[m] {
            a if a >= 0 => self.batch.slots[a as usize].active(),
            _ => None,
        }
    }

    /// The expert of kept route c.
    fn expert(&self, c: usize) -> usize {
        self.offsets.partition_point(|&o| o as usize <= c) - 1
    }

    /// dst[q] = round(Σ_j W[q, j] · src[j]) for the `dst.len()` rows of W at `w` (row length
    /// src.len()).
    unsafe fn shrink_rows(&self, w: *const u8, src: &[f32], dst: &mut [f32]) {
        for (q, out) in dst.iter_mut().enumerate() {
            let base = q * src.len();
            let dot: f32 = src
                .iter()
                .enumerate()
                .map(|(j, &x)| self.dtype.read(w, base + j) * x)
                .sum();
            *out = self.dtype.round(dot);
        }
    }

    /// Σ_q W[n, q] · t[q] over the r columns of row n of W at `w`.
    #[inline]
    unsafe fn dot_rank(&self, w: *const u8, n: usize, t: &[f32]) -> f32 {
        let base = n * self.rank;
        t.iter()
            .enumerate()
            .map(|(q, &x)| self.dtype.read(w, base + q) * x)
            .sum()
    }

    /// Before GEMM1: gate_up[c] = round(A_gate_up[a, e] · x_c) for every kept route with an
    /// adapter. `x` holds the gathered rows [kept, H].
    pub unsafe fn shrink_gate_up(&self, x: Shared<f32>, kept: usize) {
        let (h, rows) = (self.hidden, self.rows);
        (0..kept).into_par_iter().with_min_len(4).for_each(|c| {
            let Some(w) = self.weights(c) else { return };
            let e = w.gate_up_a_expert(self.expert(c));
            let a = w.gate_up_a.data.add(e * rows * h * self.dtype.size());
            let src = std::slice::from_raw_parts(x.at(c * h), h);
            let dst = std::slice::from_raw_parts_mut(self.gate_up.at(c * rows), rows);
            self.shrink_rows(a, src, dst);
        });
    }

    /// GEMM1's epilogue: row piece g1[c, n0..] += s_a · B_gate_up[a, e] · gate_up[c] (the
    /// gate half of the intermediate for gate rows, the up half for up rows).
    pub unsafe fn expand_gate_up(&self, e: usize, c: usize, n0: usize, row: &mut [f32]) {
        let Some(w) = self.weights(c) else { return };
        let b = w
            .gate_up_b
            .data
            .add(e * self.n1 * self.rank * self.dtype.size());
        let t = std::slice::from_raw_parts(self.gate_up.at(c * self.rows), self.rows);
        let (gate, up) = t.split_at(self.rank);
        for (j, x) in row.iter_mut().enumerate() {
            let n = n0 + j;
            let is_up = self.gated
                && match self.layout {
                    GateUpLayout::Halves => n >= self.inter,
                    GateUpLayout::Interleaved => n % 2 == 1,
                };
            *x += w.scaling * self.dot_rank(b, n, if is_up { up } else { gate });
        }
    }

    /// Before GEMM2: down[c] = round(A_down[a, e] · act_c). `act` holds [kept, I].
    pub unsafe fn shrink_down(&self, act: Shared<f32>, kept: usize) {
        let (i, r) = (self.inter, self.rank);
        (0..kept).into_par_iter().with_min_len(4).for_each(|c| {
            let Some(w) = self.weights(c) else { return };
            let a = w
                .down_a
                .data
                .add(self.expert(c) * r * i * self.dtype.size());
            let src = std::slice::from_raw_parts(act.at(c * i), i);
            let dst = std::slice::from_raw_parts_mut(self.down.at(c * r), r);
            self.shrink_rows(a, src, dst);
        });
    }

    /// GEMM2's epilogue: row piece y[c, h0..] += s_a · B_down[a, e] · down[c].
    pub unsafe fn expand_down(&self, e: usize, c: usize, h0: usize, row: &mut [f32]) {
        let Some(w) = self.weights(c) else { return };
        let b = w
            .down_b
            .data
            .add(w.down_b_expert(e) * self.hidden * self.rank * self.dtype.size());
        let t = std::slice::from_raw_parts(self.down.at(c * self.rank), self.rank);
        for (j, y) in row.iter_mut().enumerate() {
            *y += w.scaling * self.dot_rank(b, h0 + j, t);
        }
    }
}
