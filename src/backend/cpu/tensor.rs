//! The generic tensor ops on the CPU: matmul (the packed GEMM of
//! [`crate::linalg`]), bias, residual axpy, strided block copies and patch
//! extraction. GPU twin: `kernels/tensor.cu` (matmul in cuBLAS).
use super::math::simd_fn;
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
    if s.k == 0 {
        // An empty sum: C = beta·C, with beta = 0 writing zeros without reading C
        // (BLAS semantics), so stale NaNs cannot leak in.
        let beta: T = r(s.beta as f64);
        c.iter_mut().for_each(|v| {
            *v = if s.beta == 0.0 {
                T::default()
            } else {
                *v * beta
            }
        });
        return Ok(());
    }
    // matrixmultiply never reads C when beta = 0 ("C does not need to be
    // initialized"), so it is not cleared first.
    T::gemm(r(s.alpha as f64), av, bv, r(s.beta as f64), c);
    Ok(())
}

pub(super) fn add_bias<T: Real>(y: &mut [T], bias: &[T], s: RowShape) -> Result<()> {
    if s.dim == 0 {
        return Ok(());
    }
    // Whole rows per job, about ELEMWISE_CHUNK values each.
    let rows = (ELEMWISE_CHUNK / s.dim).max(1);
    y.par_chunks_mut(rows * s.dim)
        .for_each(|block| add_bias_rows(block, bias));
    Ok(())
}

simd_fn! {
    fn add_bias_rows<T: Real>(block: &mut [T], bias: &[T]) {
        for row in block.chunks_mut(bias.len()) {
            for (v, &b) in row.iter_mut().zip(bias) {
                *v += b;
            }
        }
    }
}

pub(super) fn axpy<T: Real>(y: &mut [T], alpha: f32, x: &[T]) -> Result<()> {
    let a: T = r(alpha as f64);
    y.par_chunks_mut(ELEMWISE_CHUNK)
        .zip(x.par_chunks(ELEMWISE_CHUNK))
        .for_each(|(y, x)| axpy_chunk(y, a, x));
    Ok(())
}

simd_fn! {
    fn axpy_chunk<T: Real>(y: &mut [T], a: T, x: &[T]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y += a * x;
        }
    }
}

/// Values per rayon job of an elementwise op: large enough that a job's work
/// (tens of µs) dwarfs the fork, and contiguous so the loop vectorises.
pub(super) const ELEMWISE_CHUNK: usize = 1 << 14;

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
