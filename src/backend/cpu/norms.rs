//! LayerNorm (vision tower) and RMSNorm (decoder) on the CPU, forward and backward
//! side by side. Row statistics accumulate in f64. GPU twin: `kernels/norms.cu`.
#![allow(clippy::too_many_arguments)]
use super::math::{simd_fn, sum8};
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
        .for_each(|((o, x), (m, rs))| layernorm_row(o, m, rs, x, w, b, d, eps));
    Ok(())
}

simd_fn! {
    fn layernorm_row<T: Real>(o: &mut [T], m: &mut T, rs: &mut T, x: &[T], w: &[T], b: &[T], d: f64, eps: f32) {
        let mu = sum8(x.len(), |j| x[j].to_f64()) / d;
        let var = sum8(x.len(), |j| (x[j].to_f64() - mu).powi(2)) / d;
        let inv = 1.0 / (var + eps as f64).sqrt();
        for ((o, &x), (&w, &b)) in o.iter_mut().zip(x).zip(w.iter().zip(b)) {
            *o = r::<T>((x.to_f64() - mu) * inv) * w + b;
        }
        *m = r(mu);
        *rs = r(inv);
    }
}

/// Row blocks of a norm backward: a fixed count, so that the weight gradient's
/// partial sums, and hence its rounding, do not depend on the thread count.
const BWD_BLOCKS: usize = 8;

/// Runs `block(r0, rows of dx, partial dw, partial db)` over [`BWD_BLOCKS`] row
/// blocks in parallel, then adds the blocks' partial sums into `dw` (and `db`)
/// in block order. The partials come from the backend's pool.
fn norm_bwd_blocks<T: Real>(
    dx: &mut [T],
    dw: &mut [T],
    mut db: Option<&mut [T]>,
    s: RowShape,
    block: impl Fn(usize, &mut [T], &mut [T], &mut [T]) + Sync,
) -> Result<()> {
    let dim = s.dim;
    let per = s.rows.div_ceil(BWD_BLOCKS).max(1);
    let mut part = T::zeros(2 * BWD_BLOCKS * dim)?;
    dx.par_chunks_mut(per * dim)
        .zip(part.par_chunks_mut(2 * dim))
        .enumerate()
        .for_each(|(i, (dxb, p))| {
            let (pw, pb) = p.split_at_mut(dim);
            block(i * per, dxb, pw, pb);
        });
    for p in part.chunks(2 * dim) {
        for (d, &v) in dw.iter_mut().zip(&p[..dim]) {
            *d += v;
        }
        if let Some(db) = db.as_deref_mut() {
            for (d, &v) in db.iter_mut().zip(&p[dim..]) {
                *d += v;
            }
        }
    }
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
    let dim = s.dim;
    norm_bwd_blocks(dx, dw, Some(db), s, |r0, dxb, pw, pb| {
        let n = dxb.len() / dim;
        layernorm_bwd_rows(
            dxb,
            pw,
            pb,
            &dout[r0 * dim..][..n * dim],
            &x[r0 * dim..][..n * dim],
            w,
            &mean[r0..][..n],
            &rstd[r0..][..n],
        )
    })
}

simd_fn! {
    fn layernorm_bwd_rows<T: Real>(
        dx: &mut [T],
        dw: &mut [T],
        db: &mut [T],
        dout: &[T],
        x: &[T],
        w: &[T],
        mean: &[T],
        rstd: &[T],
    ) {
        let dim = w.len();
        let d = dim as f64;
        for row in 0..mean.len() {
            let xs = &x[row * dim..][..dim];
            let go = &dout[row * dim..][..dim];
            let (mu, inv) = (mean[row].to_f64(), rstd[row].to_f64());
            // dxhat = dout · w;  dx = rstd · (dxhat − mean(dxhat) − xhat · mean(dxhat · xhat))
            let m1 = sum8(dim, |j| go[j].to_f64() * w[j].to_f64()) / d;
            let m2 = sum8(dim, |j| go[j].to_f64() * w[j].to_f64() * ((xs[j].to_f64() - mu) * inv)) / d;
            for j in 0..dim {
                let xhat = (xs[j].to_f64() - mu) * inv;
                dw[j] += r::<T>(go[j].to_f64() * xhat);
                db[j] += go[j];
            }
            let dxr = &mut dx[row * dim..][..dim];
            for j in 0..dim {
                let xhat = (xs[j].to_f64() - mu) * inv;
                let dxhat = go[j].to_f64() * w[j].to_f64();
                dxr[j] = r(inv * (dxhat - m1 - xhat * m2));
            }
        }
    }
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
        .for_each(|((o, x), rs)| rmsnorm_row(o, rs, x, w, eps));
    Ok(())
}

simd_fn! {
    fn rmsnorm_row<T: Real>(o: &mut [T], rs: &mut T, x: &[T], w: &[T], eps: f32) {
        let ms = sum8(x.len(), |j| x[j].to_f64().powi(2)) / x.len() as f64;
        let inv = 1.0 / (ms + eps as f64).sqrt();
        for ((o, &x), &w) in o.iter_mut().zip(x).zip(w) {
            *o = r::<T>(x.to_f64() * inv) * w;
        }
        *rs = r(inv);
    }
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
    let dim = s.dim;
    norm_bwd_blocks(dx, dw, None, s, |r0, dxb, pw, _| {
        let n = dxb.len() / dim;
        rmsnorm_bwd_rows(
            dxb,
            pw,
            &dout[r0 * dim..][..n * dim],
            &x[r0 * dim..][..n * dim],
            w,
            &rstd[r0..][..n],
        )
    })
}

simd_fn! {
    fn rmsnorm_bwd_rows<T: Real>(dx: &mut [T], dw: &mut [T], dout: &[T], x: &[T], w: &[T], rstd: &[T]) {
        let dim = w.len();
        // dxhat = dout · w;  dx = rstd · (dxhat − xhat · mean(dxhat · xhat))
        for row in 0..rstd.len() {
            let xs = &x[row * dim..][..dim];
            let go = &dout[row * dim..][..dim];
            let inv = rstd[row].to_f64();
            let m = sum8(dim, |j| go[j].to_f64() * w[j].to_f64() * (xs[j].to_f64() * inv)) / dim as f64;
            for j in 0..dim {
                dw[j] += r::<T>(go[j].to_f64() * (xs[j].to_f64() * inv));
            }
            let dxr = &mut dx[row * dim..][..dim];
            for j in 0..dim {
                let xhat = xs[j].to_f64() * inv;
                dxr[j] = r(inv * (go[j].to_f64() * w[j].to_f64() - xhat * m));
            }
        }
    }
}
