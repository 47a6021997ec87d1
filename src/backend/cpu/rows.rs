//! DP-SGD helpers for materialised per-example gradients on the CPU (one row per
//! example, f32 values, f64 sums). GPU twin: `kernels/rows.cu` (the weighted sum is
//! a strict-FP32 cuBLAS GEMM there).
//!
//! Each is parallel over examples or over columns, never splitting one value's
//! sum across threads, so results do not depend on the thread count. The bias
//! and weighted sums add in the plain loops' order (bit-identical to them); a
//! squared norm adds in eight partial sums (equal to f64 rounding, γ_cols).
use rayon::prelude::*;

use super::math::{simd_fn, sum8};

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
    // γ_{cols+2} of the norm's own f64 error holds for any summation order.
    let gamma = clip::row_gamma(rows.max(total.rows_cap), cols);
    total
        .sq
        .par_iter_mut()
        .zip(total.bound.par_iter_mut())
        .zip(per_example.par_chunks(cols.max(1)))
        .for_each(|((t, e), row)| {
            let sq = sq_norm(row);
            *t += sq;
            *e += gamma * sq.sqrt();
        });
}

simd_fn! {
    /// Σ_j row_j² in f64 ([`sum8`]: eight partial sums, not one dependent chain,
    /// which held a 1024-value row to 4 cycles per value).
    fn sq_norm(row: &[f32]) -> f64 {
        sum8(row.len(), |j| f64::from(row[j]) * f64::from(row[j]))
    }
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
    // order, exactly as one loop would. A LoRA factor has ~1024 columns, so the
    // jobs are a few per thread rather than a fixed width (one 1024-column job
    // left the op serial).
    let per_job = cols
        .div_ceil(4 * rayon::current_num_threads())
        .next_multiple_of(BLOCK)
        .max(4 * BLOCK);
    out.par_chunks_mut(per_job).enumerate().for_each(|(j, o)| {
        weighted_columns(per_example, factors, cols, j * per_job, o, accumulate)
    });
}

/// Columns per job are a multiple of this (whole 64-byte lines of `out`).
const BLOCK: usize = 16;

simd_fn! {
    /// `o[k] (+)= Σ_i c_i · rows[i][c0 + k]`, each column's sum in row order. Rows
    /// are read contiguously and the f64 sums stay in L1 (16 columns at a time down
    /// all rows strides 4 KiB per row, which aliases in L1: slower, measured).
    fn weighted_columns(per_example: &[f32], factors: &[f32], cols: usize, c0: usize, o: &mut [f32], accumulate: bool) {
        // The f64 accumulators on the job's stack (8 KiB at most): no allocation.
        let mut store = [0.0f64; PASS_COLS];
        for (o, c) in o.chunks_mut(PASS_COLS).zip((c0..).step_by(PASS_COLS)) {
            let acc = &mut store[..o.len()];
            if accumulate {
                acc.iter_mut().zip(o.iter()).for_each(|(a, &v)| *a = f64::from(v));
            } else {
                acc.fill(0.0);
            }
            // A factor-0 row is absent: skipped, not multiplied (0·NaN = NaN).
            for (f, row) in factors
                .iter()
                .zip(per_example.chunks_exact(cols))
                .filter(|(&f, _)| f != 0.0)
            {
                let f = f64::from(*f);
                for (a, &v) in acc.iter_mut().zip(&row[c..c + o.len()]) {
                    *a += f * f64::from(v);
                }
            }
            for (o, &a) in o.iter_mut().zip(acc.iter()) {
                *o = a as f32;
            }
        }
    }
}

/// Most columns one pass of [`weighted_columns`] sums (its f64 sums: 8 KiB).
const PASS_COLS: usize = 1024;
