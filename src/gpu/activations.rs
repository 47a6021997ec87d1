//! Launchers for `kernels/activations.cu`: quick-GELU, GELU (tanh), the exact (erf)
//! GELU and SwiGLU with their backwards, elementwise over the output's length. CPU twin:
//! `src/backend/cpu/activations.rs`.
use cudarc::driver::{CudaView, CudaViewMut};

use super::grid::{elementwise, i64_of};
use super::kernels::activations as K;
use super::{dptr, dptr_mut, Gpu, Kernel};
use crate::Result;

/// `out = f(x)` for a one-input activation kernel.
///
/// # Safety
/// `x` is as long as `out`.
unsafe fn unary(
    gpu: &Gpu,
    k: Kernel,
    out: &mut CudaViewMut<'_, f32>,
    x: &CudaView<'_, f32>,
) -> Result<()> {
    let n = out.len();
    let st = gpu.stream();
    let p = [dptr_mut(out, st), dptr(x, st)];
    // SAFETY: the argument list of the unary kernels; n items of both buffers.
    unsafe { elementwise(gpu, k, n, &[&p[0], &p[1], &i64_of(n)]) }
}

/// `dx = dout · f'(x)` for a one-input activation's backward kernel.
///
/// # Safety
/// `dout` and `x` are as long as `dx`.
unsafe fn unary_bwd(
    gpu: &Gpu,
    k: Kernel,
    dx: &mut CudaViewMut<'_, f32>,
    dout: &CudaView<'_, f32>,
    x: &CudaView<'_, f32>,
) -> Result<()> {
    let n = dx.len();
    let st = gpu.stream();
    let p = [dptr_mut(dx, st), dptr(dout, st), dptr(x, st)];
    // SAFETY: the argument list of the unary backward kernels; n items of every buffer.
    unsafe { elementwise(gpu, k, n, &[&p[0], &p[1], &p[2], &i64_of(n)]) }
}

/// CLIP's quick-GELU, `out = x · σ(1.702 x)`.
///
/// # Safety
/// The lengths pass [`crate::backend::check::unary`].
pub unsafe fn quick_gelu_fwd(
    gpu: &Gpu,
    out: &mut CudaViewMut<'_, f32>,
    x: &CudaView<'_, f32>,
) -> Result<()> {
    // SAFETY: forwarded to the caller.
    unsafe { unary(gpu, K::QUICK_GELU_FWD_F32, out, x) }
}

/// GELU, tanh approximation.
///
/// # Safety
/// The lengths pass [`crate::backend::check::unary`].
pub unsafe fn gelu_fwd(
    gpu: &Gpu,
    out: &mut CudaViewMut<'_, f32>,
    x: &CudaView<'_, f32>,
) -> Result<()> {
    // SAFETY: forwarded to the caller.
    unsafe { unary(gpu, K::GELU_FWD_F32, out, x) }
}

/// GELU backward: overwrites `dx`.
///
/// # Safety
/// The lengths pass [`crate::backend::check::gelu_bwd`].
pub unsafe fn gelu_bwd(
    gpu: &Gpu,
    dx: &mut CudaViewMut<'_, f32>,
    dout: &CudaView<'_, f32>,
    x: &CudaView<'_, f32>,
) -> Result<()> {
    // SAFETY: forwarded to the caller.
    unsafe { unary_bwd(gpu, K::GELU_BWD_F32, dx, dout, x) }
}

/// The exact GELU `x·Φ(x)`, computed in double and rounded once.
///
/// # Safety
/// The lengths pass [`crate::backend::check::unary`].
pub unsafe fn gelu_erf_fwd(
    gpu: &Gpu,
    out: &mut CudaViewMut<'_, f32>,
    x: &CudaView<'_, f32>,
) -> Result<()> {
    // SAFETY: forwarded to the caller.
    unsafe { unary(gpu, K::GELU_ERF_FWD_F32, out, x) }
}

/// Exact-GELU backward, `dx = dout · (Φ(x) + x·φ(x))`: overwrites `dx`.
///
/// # Safety
/// The lengths pass [`crate::backend::check::gelu_erf_bwd`].
pub unsafe fn gelu_erf_bwd(
    gpu: &Gpu,
    dx: &mut CudaViewMut<'_, f32>,
    dout: &CudaView<'_, f32>,
    x: &CudaView<'_, f32>,
) -> Result<()> {
    // SAFETY: forwarded to the caller.
    unsafe { unary_bwd(gpu, K::GELU_ERF_BWD_F32, dx, dout, x) }
}

/// SwiGLU, `out = silu(gate) · up`.
///
/// # Safety
/// The lengths pass [`crate::backend::check::swiglu_fwd`].
pub unsafe fn swiglu_fwd(
    gpu: &Gpu,
    out: &mut CudaViewMut<'_, f32>,
    gate: &CudaView<'_, f32>,
    up: &CudaView<'_, f32>,
) -> Result<()> {
    let n = out.len();
    let st = gpu.stream();
    let p = [dptr_mut(out, st), dptr(gate, st), dptr(up, st)];
    // SAFETY: the argument list of swiglu_fwd_f32; n items of every buffer.
    unsafe {
        elementwise(
            gpu,
            K::SWIGLU_FWD_F32,
            n,
            &[&p[0], &p[1], &p[2], &i64_of(n)],
        )
    }
}

/// SwiGLU backward: overwrites `dgate` and `dup`.
///
/// # Safety
/// The lengths pass [`crate::backend::check::swiglu_bwd`].
pub unsafe fn swiglu_bwd(
    gpu: &Gpu,
    dgate: &mut CudaViewMut<'_, f32>,
    dup: &mut CudaViewMut<'_, f32>,
    dout: &CudaView<'_, f32>,
    gate: &CudaView<'_, f32>,
    up: &CudaView<'_, f32>,
) -> Result<()> {
    let n = dout.len();
    let st = gpu.stream();
    let p = [
        dptr_mut(dgate, st),
        dptr_mut(dup, st),
        dptr(dout, st),
        dptr(gate, st),
        dptr(up, st),
    ];
    // SAFETY: the argument list of swiglu_bwd_f32; n items of every buffer.
    unsafe {
        elementwise(
            gpu,
            K::SWIGLU_BWD_F32,
            n,
            &[&p[0], &p[1], &p[2], &p[3], &p[4], &i64_of(n)],
        )
    }
}
