//! LayerNorm (vision tower) and RMSNorm (decoder) on the CPU, forward and backward
//! side by side. Row statistics accumulate in f64. GPU twin: `kernels/norms.cu`.
#![allow(clippy::too_many_arguments)]
use super::math::with_simd;
use rayon::prelude::*;

use super::{r, Real};
use crate::backend::RowShape;
use crate::Result;

pub(super) fn layernorm_fwd<T: Real>(
    out: &mut [T],
    mean: &mut [T],
    rstd: &mut [T],
    x: &[T],
    w: &[T],
    b: &[T],
    s: RowShape,
    eps: f32,
) -> Result<()> {
    if s.dim == 0 {
        return Ok(());
    }
    let d = s.dim as f64;
    out.par_chunks_mut(s.dim)
        .zip(x.par_chunks(s.dim))
        .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
        .for_each(|((o, x), (m, rs))| {
            with_simd(|| {
                let mu = x.iter().map(|v| v.to_f64()).sum::<f64>() / d;
                let var = x.iter().map(|v| (v.to_f64() - mu).powi(2)).sum::<f64>() / d;
                let inv = 1.0 / (var + eps as f64).sqrt();
                for j in 0..x.len() {
                    let xhat = (x[j].to_f64() - mu) * inv;
                    o[j] = r::<T>(xhat) * w[j] + b[j];
                }
                *m = r(mu);
                *rs = r(inv);
            })
        });
    Ok(())
}

pub(super) fn layernorm_bwd<T: Real>(
    dx: &mut [T],
    dw: &mut [T],
    db: &mut [T],
    dout: &[T],
    x: &[T],
    w: &[T],
    mean: &[T],
    rstd: &[T],
    s: RowShape,
) -> Result<()> {
    if s.dim == 0 {
        return Ok(());
    }
    let d = s.dim as f64;
    for row in 0..s.rows {
        let xs = &x[row * s.dim..][..s.dim];
        let go = &dout[row * s.dim..][..s.dim];
        let (mu, inv) = (mean[row].to_f64(), rstd[row].to_f64());
        // dxhat = dout · w;  dx = rstd · (dxhat − mean(dxhat) − xhat · mean(dxhat · xhat))
        let mut m1 = 0.0;
        let mut m2 = 0.0;
        for j in 0..s.dim {
            let xhat = (xs[j].to_f64() - mu) * inv;
            let dxhat = go[j].to_f64() * w[j].to_f64();
            m1 += dxhat;
            m2 += dxhat * xhat;
            dw[j] += r::<T>(go[j].to_f64() * xhat);
            db[j] += go[j];
        }
        m1 /= d;
        m2 /= d;
        let dxr = &mut dx[row * s.dim..][..s.dim];
        for j in 0..s.dim {
            let xhat = (xs[j].to_f64() - mu) * inv;
            let dxhat = go[j].to_f64() * w[j].to_f64();
            dxr[j] = r(inv * (dxhat - m1 - xhat * m2));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// RMSNorm (decoder)

pub(super) fn rmsnorm_fwd<T: Real>(
    out: &mut [T],
    rstd: &mut [T],
    x: &[T],
    w: &[T],
    s: RowShape,
    eps: f32,
) -> Result<()> {
    if s.dim == 0 {
        return Ok(());
    }
    out.par_chunks_mut(s.dim)
        .zip(x.par_chunks(s.dim))
        .zip(rstd.par_iter_mut())
        .for_each(|((o, x), rs)| {
            with_simd(|| {
                let ms = x.iter().map(|v| v.to_f64().powi(2)).sum::<f64>() / s.dim as f64;
                let inv = 1.0 / (ms + eps as f64).sqrt();
                for j in 0..x.len() {
                    o[j] = r::<T>(x[j].to_f64() * inv) * w[j];
                }
                *rs = r(inv);
            })
        });
    Ok(())
}

pub(super) fn rmsnorm_bwd<T: Real>(
    dx: &mut [T],
    dw: &mut [T],
    dout: &[T],
    x: &[T],
    w: &[T],
    rstd: &[T],
    s: RowShape,
) -> Result<()> {
    if s.dim == 0 {
        return Ok(());
    }
    // dxhat = dout · w;  dx = rstd · (dxhat − xhat · mean(dxhat · xhat))
    for row in 0..s.rows {
        let xs = &x[row * s.dim..][..s.dim];
        let go = &dout[row * s.dim..][..s.dim];
        let inv = rstd[row].to_f64();
        let mut m = 0.0;
        for j in 0..s.dim {
            let xhat = xs[j].to_f64() * inv;
            m += go[j].to_f64() * w[j].to_f64() * xhat;
            dw[j] += r::<T>(go[j].to_f64() * xhat);
        }
        m /= s.dim as f64;
        let dxr = &mut dx[row * s.dim..][..s.dim];
        for j in 0..s.dim {
            let xhat = xs[j].to_f64() * inv;
            dxr[j] = r(inv * (go[j].to_f64() * w[j].to_f64() - xhat * m));
        }
    }
    Ok(())
}
