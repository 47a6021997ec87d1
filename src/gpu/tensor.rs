//! Launchers for `kernels/tensor.cu`: bias, axpy, scale, strided block copies and
//! patch extraction (GEMMs go to cuBLAS, [`super::blas`]). CPU twin:
//! `src/backend/cpu/tensor.rs`.
use cudarc::driver::{CudaView, CudaViewMut};

use super::grid::{elementwise, i32_of, i64_of};
use super::kernels::tensor as K;
use super::{dptr, dptr_mut, Gpu};
use crate::backend::{Blocks, PatchShape, RowShape};
use crate::Result;

/// `y[r, j] += bias[j]`.
///
/// # Safety
/// The lengths pass [`crate::backend::check::add_bias`] for `s`.
pub unsafe fn add_bias(
    gpu: &Gpu,
    y: &mut CudaViewMut<'_, f32>,
    bias: &CudaView<'_, f32>,
    s: RowShape,
) -> Result<()> {
    let n = y.len();
    let st = gpu.stream();
    let (yp, bp) = (dptr_mut(y, st), dptr(bias, st));
    // SAFETY: the argument list of add_bias_f32; one item per value of `y`.
    unsafe {
        elementwise(
            gpu,
            K::ADD_BIAS_F32,
            n,
            &[&yp, &bp, &i64_of(s.rows), &i64_of(s.dim)],
        )
    }
}

/// `y += alpha · x`.
///
/// # Safety
/// The lengths pass [`crate::backend::check::axpy`].
pub unsafe fn axpy(
    gpu: &Gpu,
    y: &mut CudaViewMut<'_, f32>,
    alpha: f32,
    x: &CudaView<'_, f32>,
) -> Result<()> {
    let n = y.len();
    let st = gpu.stream();
    let (yp, xp) = (dptr_mut(y, st), dptr(x, st));
    // SAFETY: the argument list of axpy_f32; n items of both buffers.
    unsafe { elementwise(gpu, K::AXPY_F32, n, &[&yp, &alpha, &xp, &i64_of(n)]) }
}

/// `c *= beta` over all of `c`.
pub fn scale(gpu: &Gpu, c: &mut CudaViewMut<'_, f32>, beta: f32) -> Result<()> {
    let n = c.len();
    let cp = dptr_mut(c, gpu.stream());
    // SAFETY: the argument list of scale_f32; n items of `c`, its own length.
    unsafe { elementwise(gpu, K::SCALE_F32, n, &[&cp, &beta, &i64_of(n)]) }
}

/// Strided block copy, see [`Blocks`].
///
/// # Safety
/// The lengths pass [`crate::backend::check::copy_blocks`] for `b`.
pub unsafe fn copy_blocks(
    gpu: &Gpu,
    dst: &mut CudaViewMut<'_, f32>,
    src: &CudaView<'_, f32>,
    b: Blocks,
) -> Result<()> {
    if b.count == 0 || b.len == 0 {
        return Ok(());
    }
    let st = gpu.stream();
    let (d, s) = (dptr_mut(dst, st), dptr(src, st));
    // SAFETY: the argument list of copy_blocks_f32; every block in range (caller).
    unsafe {
        elementwise(
            gpu,
            K::COPY_BLOCKS_F32,
            b.count * b.len,
            &[
                &d,
                &s,
                &i64_of(b.count),
                &i64_of(b.len),
                &i64_of(b.src_off),
                &i64_of(b.src_stride),
                &i64_of(b.dst_off),
                &i64_of(b.dst_stride),
            ],
        )
    }
}

/// Images to flattened patches, see [`PatchShape`].
///
/// # Safety
/// The lengths pass [`crate::backend::check::patchify`] for `s`.
pub unsafe fn patchify(
    gpu: &Gpu,
    out: &mut CudaViewMut<'_, f32>,
    images: &CudaView<'_, f32>,
    s: PatchShape,
) -> Result<()> {
    let n = out.len();
    let st = gpu.stream();
    let p = [dptr_mut(out, st), dptr(images, st)];
    let dims = [
        i32_of(s.b, "batch")?,
        i32_of(s.channels, "channels")?,
        i32_of(s.size, "image size")?,
        i32_of(s.patch, "patch")?,
    ];
    // SAFETY: the argument list of patchify_f32; one item per value of `out`.
    unsafe {
        elementwise(
            gpu,
            K::PATCHIFY_F32,
            n,
            &[&p[0], &p[1], &dims[0], &dims[1], &dims[2], &dims[3]],
        )
    }
}
