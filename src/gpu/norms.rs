//! Launchers for `kernels/norms.cu`: LayerNorm and RMSNorm, forward and backward.
//! CPU twin: `src/backend/cpu/norms.rs`. One block per row; weight gradients
//! accumulate, input gradients are overwritten.
#![allow(clippy::too_many_arguments)]
use cudarc::driver::{CudaView, CudaViewMut};

use super::grid::{i32_of, per_row};
use super::kernels::norms as K;
use super::{dptr, dptr_mut, Gpu};
use crate::backend::RowShape;
use crate::Result;

/// LayerNorm forward over `s.rows` rows of `s.dim` values, see
/// [`crate::backend::Backend::layernorm_fwd`].
///
/// # Safety
/// The lengths pass [`crate::backend::check::layernorm_fwd`] for `s`.
pub unsafe fn layernorm_fwd(
    gpu: &Gpu,
    out: &mut CudaViewMut<'_, f32>,
    mean: &mut CudaViewMut<'_, f32>,
    rstd: &mut CudaViewMut<'_, f32>,
    x: &CudaView<'_, f32>,
    w: &CudaView<'_, f32>,
    b: &CudaView<'_, f32>,
    s: RowShape,
    eps: f32,
) -> Result<()> {
    if s.dim == 0 {
        return Ok(());
    }
    let st = gpu.stream();
    let p = [
        dptr_mut(out, st),
        dptr_mut(mean, st),
        dptr_mut(rstd, st),
        dptr(x, st),
        dptr(w, st),
        dptr(b, st),
    ];
    let dim = i32_of(s.dim, "layernorm dim")?;
    // SAFETY: the argument list of layernorm_fwd_f32; lengths from the caller.
    unsafe {
        per_row(
            gpu,
            K::LAYERNORM_FWD_F32,
            s.rows,
            &[&p[0], &p[1], &p[2], &p[3], &p[4], &p[5], &dim, &eps],
        )
    }
}

/// LayerNorm backward: overwrites `dx`, accumulates `dw` and `db`.
///
/// # Safety
/// The lengths pass [`crate::backend::check::layernorm_bwd`] for `s`.
pub unsafe fn layernorm_bwd(
    gpu: &Gpu,
    dx: &mut CudaViewMut<'_, f32>,
    dw: &mut CudaViewMut<'_, f32>,
    db: &mut CudaViewMut<'_, f32>,
    dout: &CudaView<'_, f32>,
    x: &CudaView<'_, f32>,
    w: &CudaView<'_, f32>,
    mean: &CudaView<'_, f32>,
    rstd: &CudaView<'_, f32>,
    s: RowShape,
) -> Result<()> {
    if s.dim == 0 {
        return Ok(());
    }
    let st = gpu.stream();
    let p = [
        dptr_mut(dx, st),
        dptr_mut(dw, st),
        dptr_mut(db, st),
        dptr(dout, st),
        dptr(x, st),
        dptr(w, st),
        dptr(mean, st),
        dptr(rstd, st),
    ];
    let dim = i32_of(s.dim, "layernorm dim")?;
    // SAFETY: the argument list of layernorm_bwd_f32; lengths from the caller.
    unsafe {
        per_row(
            gpu,
            K::LAYERNORM_BWD_F32,
            s.rows,
            &[&p[0], &p[1], &p[2], &p[3], &p[4], &p[5], &p[6], &p[7], &dim],
        )
    }
}

/// RMSNorm forward, see [`crate::backend::Backend::rmsnorm_fwd`].
///
/// # Safety
/// The lengths pass [`crate::backend::check::rmsnorm_fwd`] for `s`.
pub unsafe fn rmsnorm_fwd(
    gpu: &Gpu,
    out: &mut CudaViewMut<'_, f32>,
    rstd: &mut CudaViewMut<'_, f32>,
    x: &CudaView<'_, f32>,
    w: &CudaView<'_, f32>,
    s: RowShape,
    eps: f32,
) -> Result<()> {
    if s.dim == 0 {
        return Ok(());
    }
    let st = gpu.stream();
    let p = [
        dptr_mut(out, st),
        dptr_mut(rstd, st),
        dptr(x, st),
        dptr(w, st),
    ];
    let dim = i32_of(s.dim, "rmsnorm dim")?;
    // SAFETY: the argument list of rmsnorm_fwd_f32; lengths from the caller.
    unsafe {
        per_row(
            gpu,
            K::RMSNORM_FWD_F32,
            s.rows,
            &[&p[0], &p[1], &p[2], &p[3], &dim, &eps],
        )
    }
}

/// RMSNorm backward: overwrites `dx`, accumulates `dw`.
///
/// # Safety
/// The lengths pass [`crate::backend::check::rmsnorm_bwd`] for `s`.
pub unsafe fn rmsnorm_bwd(
    gpu: &Gpu,
    dx: &mut CudaViewMut<'_, f32>,
    dw: &mut CudaViewMut<'_, f32>,
    dout: &CudaView<'_, f32>,
    x: &CudaView<'_, f32>,
    w: &CudaView<'_, f32>,
    rstd: &CudaView<'_, f32>,
    s: RowShape,
) -> Result<()> {
    if s.dim == 0 {
        return Ok(());
    }
    let st = gpu.stream();
    let p = [
        dptr_mut(dx, st),
        dptr_mut(dw, st),
        dptr(dout, st),
        dptr(x, st),
        dptr(w, st),
        dptr(rstd, st),
    ];
    let dim = i32_of(s.dim, "rmsnorm dim")?;
    // SAFETY: the argument list of rmsnorm_bwd_f32; lengths from the caller.
    unsafe {
        per_row(
            gpu,
            K::RMSNORM_BWD_F32,
            s.rows,
            &[&p[0], &p[1], &p[2], &p[3], &p[4], &p[5], &dim],
        )
    }
}
