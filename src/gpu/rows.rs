//! Launchers for `kernels/rows.cu`: DP-SGD helpers for materialised per-example
//! gradients (one row per example). CPU twin: `src/backend/cpu/rows.rs`.
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};

use super::grid::{elementwise, i32_of, per_row};
use super::kernels::rows as K;
use super::{dptr, dptr_mut, Gpu};
use crate::dp::clip::LinearShape;
use crate::Result;

/// Every example's bias gradient `out[i] = Σ_t g[i, t]` (b×p) from `g` (b·t·p).
///
/// # Safety
/// `g` passes [`crate::backend::check::per_example_bias_grads`] and `out` holds b·p
/// values.
pub unsafe fn sum_over_tokens(
    gpu: &Gpu,
    out: &mut CudaViewMut<'_, f32>,
    g: &CudaView<'_, f32>,
    s: LinearShape,
) -> Result<()> {
    let st = gpu.stream();
    let p = [dptr_mut(out, st), dptr(g, st)];
    let dims = [
        i32_of(s.b, "batch")?,
        i32_of(s.t, "tokens")?,
        i32_of(s.p, "p")?,
    ];
    // SAFETY: the argument list of sum_over_tokens_f32; one item per value of `out`.
    unsafe {
        elementwise(
            gpu,
            K::SUM_OVER_TOKENS_F32,
            s.b * s.p,
            &[&p[0], &p[1], &dims[0], &dims[1], &dims[2]],
        )
    }
}

/// `total[r] += ‖row r‖²` and `bound[r] += gamma·‖row r‖` for the `rows` rows of
/// `per_example`, in f64.
///
/// # Safety
/// The lengths pass [`crate::backend::check::add_row_sq_norms`], and `total` and
/// `bound` hold at least `rows` values.
pub unsafe fn add_row_sq_norms(
    gpu: &Gpu,
    per_example: &CudaView<'_, f32>,
    rows: usize,
    gamma: f64,
    total: &mut CudaSlice<f64>,
    bound: &mut CudaSlice<f64>,
) -> Result<()> {
    if rows == 0 || per_example.is_empty() {
        return Ok(());
    }
    let cols = (per_example.len() / rows) as i64;
    let st = gpu.stream();
    let pp = dptr(per_example, st);
    let tp = dptr_mut(total, st);
    let bp = dptr_mut(bound, st);
    // SAFETY: the argument list of add_row_sq_norms_f32; one block per row.
    unsafe {
        per_row(
            gpu,
            K::ADD_ROW_SQ_NORMS_F32,
            rows,
            &[&pp, &cols, &gamma, &tp, &bp],
        )
    }
}
