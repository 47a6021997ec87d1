//! DP-SGD helpers for materialised per-example gradients on the CPU (one row per
//! example, f32 values, f64 sums). GPU twin: `kernels/rows.cu` (the weighted sum is
//! a strict-FP32 cuBLAS GEMM there).
//!
//! Each is parallel over examples or over columns, never splitting one value's
//! sum, so results are bit-identical to the sequential loops.
use rayon::prelude::*;

use crate::dp::clip::{self, LinearShape, NormTotals};

/// Every example's bias gradient: `out[i] = Σ_t g[i, t]` (b×p) from `g` (b·t·p).
pub(super) fn sum_over_tokens(g: &[f32], s: LinearShape) -> Vec<f32> {
    let mut out = vec![0.0f32; s.b * s.p];
    if s.p == 0 {
        return out;
    }
    out.par_chunks_mut(s.p).enumerate().for_each(|(i, o)| {
        for t in 0..s.t {
            let row = &g[(i * s.t + t) * s.p..(i * s.t + t + 1) * s.p];
            for (o, &v) in o.iter_mut().zip(row) {
                *o += v;
            }
        }
    });
    out
}

/// Adds each of the `rows` rows' squared norm to `total.sq` and the bound
/// [`clip::row_gamma`]·‖row‖ on the rounding of their weighted sum to `total.bound`.
pub(super) fn add_row_sq_norms(per_example: &[f32], rows: usize, total: &mut NormTotals) {
    if rows == 0 {
        return;
    }
    let cols = per_example.len() / rows;
    // The weighted sum Σ_i c_i row_i: example i's terms carry at most
    // γ·c_i‖row_i‖ of its rounding (the norm is of the same f32 row it sums).
    let gamma = clip::row_gamma(rows.max(total.rows_cap), cols);
    total
        .sq
        .par_iter_mut()
        .zip(total.bound.par_iter_mut())
        .zip(per_example.par_chunks(cols.max(1)))
        .for_each(|((t, e), row)| {
            let sq = row
                .iter()
                .map(|&v| f64::from(v) * f64::from(v))
                .sum::<f64>();
            *t += sq;
            *e += gamma * sq.sqrt();
        });
}

/// `out (+)= Σ_i c_i row_i` over the rows with c_i ≠ 0, accumulated in f64.
pub(super) fn weighted_row_sum(
    per_example: &[f32],
    factors: &[f32],
    out: &mut [f32],
    accumulate: bool,
) {
    let cols = out.len();
    if cols == 0 {
        return;
    }
    // Columns are independent: each job sums its columns over every row, in row
    // order, exactly as one loop would.
    const COLS: usize = 1024;
    out.par_chunks_mut(COLS).enumerate().for_each(|(j, o)| {
        let c0 = j * COLS;
        // The f64 accumulators on the job's stack (8 KiB): no allocation.
        let mut acc_store = [0.0f64; COLS];
        let acc = &mut acc_store[..o.len()];
        if accumulate {
            acc.iter_mut()
                .zip(o.iter())
                .for_each(|(a, &v)| *a = f64::from(v));
        }
        // A factor-0 row is absent: skipped, not multiplied (0·NaN = NaN).
        for (c, row) in factors
            .iter()
            .zip(per_example.chunks(cols))
            .filter(|(&c, _)| c != 0.0)
        {
            for (a, &v) in acc.iter_mut().zip(&row[c0..c0 + o.len()]) {
                *a += f64::from(*c) * f64::from(v);
            }
        }
        for (o, &a) in o.iter_mut().zip(acc.iter()) {
            *o = a as f32;
        }
    });
}
