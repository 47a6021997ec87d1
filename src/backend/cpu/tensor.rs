//! The generic tensor ops on the CPU: matmul (the packed GEMM of
//! [`crate::linalg`]), bias, residual axpy, strided block copies and patch
//! extraction. GPU twin: `kernels/tensor.cu` (matmul in cuBLAS).
use rayon::prelude::*;

use super::{r, Real};
use crate::backend::{Blocks, MatmulSpec, PatchShape, RowShape};
use crate::linalg::View;
use crate::Result;

pub(super) fn matmul<T: Real>(c: &mut [T], a: &[T], b: &[T], s: MatmulSpec) -> Result<()> {
    let av = if s.trans_a {
        View::row_major(a, s.k, s.m).t()
    } else {
        View::row_major(a, s.m, s.k)
    };
    let bv = if s.trans_b {
        View::row_major(b, s.n, s.k).t()
    } else {
        View::row_major(b, s.k, s.n)
    };
    if s.beta == 0.0 {
        // beta = 0 never reads C (BLAS semantics), so stale NaNs cannot leak in.
        c.iter_mut().for_each(|v| *v = T::default());
    }
    if s.k == 0 {
        let beta: T = r(s.beta as f64);
        c.iter_mut().for_each(|v| *v = *v * beta);
        return Ok(());
    }
    T::gemm(r(s.alpha as f64), av, bv, r(s.beta as f64), c);
    Ok(())
}

pub(super) fn add_bias<T: Real>(y: &mut [T], bias: &[T], s: RowShape) -> Result<()> {
    if s.dim == 0 {
        return Ok(());
    }
    y.par_chunks_mut(s.dim).for_each(|row| {
        for (v, &b) in row.iter_mut().zip(bias) {
            *v += b;
        }
    });
    Ok(())
}

pub(super) fn axpy<T: Real>(y: &mut [T], alpha: f32, x: &[T]) -> Result<()> {
    let a: T = r(alpha as f64);
    y.iter_mut().zip(x).for_each(|(y, &x)| *y += a * x);
    Ok(())
}

pub(super) fn copy_blocks<T: Real>(dst: &mut [T], src: &[T], b: Blocks) -> Result<()> {
    for i in 0..b.count {
        let s = b.src_off + i * b.src_stride;
        let d = b.dst_off + i * b.dst_stride;
        dst[d..d + b.len].copy_from_slice(&src[s..s + b.len]);
    }
    Ok(())
}

pub(super) fn patchify<T: Real>(out: &mut [T], images: &[T], s: PatchShape) -> Result<()> {
    let np = s.size / s.patch;
    let pdim = s.channels * s.patch * s.patch;
    if pdim == 0 || np == 0 {
        return Ok(());
    }
    out.par_chunks_mut(pdim).enumerate().for_each(|(idx, o)| {
        let (bi, pi) = (idx / (np * np), idx % (np * np));
        let (py, px) = (pi / np, pi % np);
        let mut j = 0;
        for c in 0..s.channels {
            for ky in 0..s.patch {
                for kx in 0..s.patch {
                    let (y, x) = (py * s.patch + ky, px * s.patch + kx);
                    o[j] = images[((bi * s.channels + c) * s.size + y) * s.size + x];
                    j += 1;
                }
            }
        }
    });
    Ok(())
}
