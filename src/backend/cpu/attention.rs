//! Scaled dot-product attention on the CPU, forward and backward: per example, per
//! head, S = QKᵀ/√hd, P = softmax(S), O = PV, with grouped-query heads. GPU twin:
//! `kernels/attention.cu` (softmax and head relayouts) around cuBLAS GEMMs.
#![allow(clippy::too_many_arguments)]
use super::math::{simd_fn, sum8};
use rayon::prelude::*;

use super::{r, Real};
use crate::backend::AttnShape;
use crate::linalg::View;
use crate::Result;

/// The head `h` of a `[t, heads·hd]` buffer as a t×hd view.
fn head_view<T>(buf: &[T], t: usize, heads: usize, hd: usize, h: usize) -> View<'_, T> {
    View {
        data: &buf[h * hd..],
        rows: t,
        cols: hd,
        rs: heads * hd,
        cs: 1,
    }
}

pub(super) fn attention_fwd<T: Real>(
    out: &mut [T],
    probs: &mut [T],
    q: &[T],
    k: &[T],
    v: &[T],
    s: AttnShape,
) -> Result<()> {
    let (t, hd) = (s.t, s.hd);
    if s.b == 0 || t == 0 || hd == 0 || s.hq == 0 {
        return Ok(());
    }
    let (qs, kvs, ps) = (t * s.hq * hd, t * s.hkv * hd, s.hq * t * t);
    let rep = s.hq / s.hkv;
    out.par_chunks_mut(qs)
        .zip(probs.par_chunks_mut(ps))
        .enumerate()
        .try_for_each(|(bi, (o, p))| -> Result<()> {
            let (qb, kb, vb) = (
                &q[bi * qs..][..qs],
                &k[bi * kvs..][..kvs],
                &v[bi * kvs..][..kvs],
            );
            // Per-example scratch from the backend's pool (no allocation when warm).
            let mut oh = T::zeros(t * hd)?;
            for h in 0..s.hq {
                let kvh = h / rep;
                let ph = &mut p[h * t * t..][..t * t];
                head_probs(ph, qb, kb, h, s);
                let vv = head_view(vb, t, s.hkv, hd, kvh);
                T::gemm(r(1.0), View::row_major(ph, t, t), vv, T::default(), &mut oh);
                for i in 0..t {
                    o[i * s.hq * hd + h * hd..][..hd].copy_from_slice(&oh[i * hd..][..hd]);
                }
            }
            Ok(())
        })
}

/// P = softmax(QKᵀ/√hd) of head `h` of one example into `ph` (t×t).
fn head_probs<T: Real>(ph: &mut [T], qb: &[T], kb: &[T], h: usize, s: AttnShape) {
    let (t, hd) = (s.t, s.hd);
    let qv = head_view(qb, t, s.hq, hd, h);
    let kv = head_view(kb, t, s.hkv, hd, h / (s.hq / s.hkv));
    T::gemm(r(1.0 / (hd as f64).sqrt()), qv, kv.t(), T::default(), ph);
    softmax_rows(ph, t, s.causal);
}

/// The probabilities of [`attention_fwd`] without the output (the backward's
/// recomputation): the same products and softmax, so the same bits.
pub(super) fn attention_probs<T: Real>(probs: &mut [T], q: &[T], k: &[T], s: AttnShape) {
    let (t, hd) = (s.t, s.hd);
    if s.b == 0 || t == 0 || hd == 0 || s.hq == 0 {
        return;
    }
    let (qs, kvs, ps) = (t * s.hq * hd, t * s.hkv * hd, s.hq * t * t);
    probs.par_chunks_mut(ps).enumerate().for_each(|(bi, p)| {
        for h in 0..s.hq {
            head_probs(
                &mut p[h * t * t..][..t * t],
                &q[bi * qs..][..qs],
                &k[bi * kvs..][..kvs],
                h,
                s,
            );
        }
    });
}

simd_fn! {
    /// Row-wise softmax of a `t × t` score block in place (causal: row i keeps
    /// columns ≤ i and zeroes the rest): eˣ in the buffer's precision, as the
    /// kernel's `expf`, summed in f64.
    fn softmax_rows<T: Real>(ph: &mut [T], t: usize, causal: bool) {
        for i in 0..t {
            let row = &mut ph[i * t..][..t];
            let n = if causal { i + 1 } else { t };
            let mx = row[..n].iter().map(|v| v.to_f64()).fold(f64::MIN, f64::max);
            // eˣ in the buffer's precision (as the kernel's expf), summed in f64.
            let mx_t = r::<T>(mx);
            for v in row[..n].iter_mut() {
                *v = (*v - mx_t).exp();
            }
            let sum = sum8(n, |j| row[j].to_f64());
            // A probability under 2⁻¹²⁶ (a score ~87 below the row's maximum) is
            // flushed to 0: subnormal operands make x86 arithmetic ~100× slower, and
            // they slowed every product of P (forward and backward) by 1.7× once a
            // trained model had such rows. The mass dropped is below 2⁻¹²⁶ per entry.
            for v in row[..n].iter_mut() {
                *v = r::<T>(v.to_f64() / sum).flush_subnormal();
            }
            row[n..].iter_mut().for_each(|v| *v = T::default());
        }
    }
}

pub(super) fn attention_bwd<T: Real>(
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
    dout: &[T],
    q: &[T],
    k: &[T],
    v: &[T],
    probs: &[T],
    s: AttnShape,
) -> Result<()> {
    let (t, hd) = (s.t, s.hd);
    if s.b == 0 || t == 0 || hd == 0 || s.hq == 0 {
        return Ok(());
    }
    let (qs, kvs, ps) = (t * s.hq * hd, t * s.hkv * hd, s.hq * t * t);
    let rep = s.hq / s.hkv;
    let scale = 1.0 / (hd as f64).sqrt();
    dq.par_chunks_mut(qs)
        .zip(dk.par_chunks_mut(kvs).zip(dv.par_chunks_mut(kvs)))
        .enumerate()
        .try_for_each(|(bi, (dqb, (dkb, dvb)))| -> Result<()> {
            let (qb, kb, vb) = (
                &q[bi * qs..][..qs],
                &k[bi * kvs..][..kvs],
                &v[bi * kvs..][..kvs],
            );
            let gob = &dout[bi * qs..][..qs];
            dkb.iter_mut().for_each(|x| *x = T::default());
            dvb.iter_mut().for_each(|x| *x = T::default());
            // Per-example scratch from the backend's pool (no allocation when warm).
            let (mut dp, mut tmp) = (T::zeros(t * t)?, T::zeros(t * hd)?);
            for h in 0..s.hq {
                let kvh = h / rep;
                let ph = &probs[bi * ps + h * t * t..][..t * t];
                let pv = View::row_major(ph, t, t);
                let go = head_view(gob, t, s.hq, hd, h);
                // dV_h += Pᵀ dO
                T::gemm(r(1.0), pv.t(), go, T::default(), &mut tmp);
                for i in 0..t {
                    let dst = &mut dvb[i * s.hkv * hd + kvh * hd..][..hd];
                    dst.iter_mut()
                        .zip(&tmp[i * hd..][..hd])
                        .for_each(|(a, &b)| *a += b);
                }
                // dP = dO Vᵀ; dS = P ⊙ (dP − Σ_j dP⊙P)
                let vv = head_view(vb, t, s.hkv, hd, kvh);
                T::gemm(r(1.0), go, vv.t(), T::default(), &mut dp);
                for i in 0..t {
                    let pr = &ph[i * t..][..t];
                    let dr = &mut dp[i * t..][..t];
                    let dot: f64 = pr
                        .iter()
                        .zip(dr.iter())
                        .map(|(a, b)| a.to_f64() * b.to_f64())
                        .sum();
                    // Flushed as the probabilities are (softmax_rows).
                    for (d, &p) in dr.iter_mut().zip(pr) {
                        *d = r::<T>(p.to_f64() * (d.to_f64() - dot)).flush_subnormal();
                    }
                }
                let dsv = View::row_major(&dp[..], t, t);
                // dQ_h = scale · dS K
                let kv = head_view(kb, t, s.hkv, hd, kvh);
                T::gemm(r(scale), dsv, kv, T::default(), &mut tmp);
                for i in 0..t {
                    dqb[i * s.hq * hd + h * hd..][..hd].copy_from_slice(&tmp[i * hd..][..hd]);
                }
                // dK_h += scale · dSᵀ Q
                let qv = head_view(qb, t, s.hq, hd, h);
                T::gemm(r(scale), dsv.t(), qv, T::default(), &mut tmp);
                for i in 0..t {
                    let dst = &mut dkb[i * s.hkv * hd + kvh * hd..][..hd];
                    dst.iter_mut()
                        .zip(&tmp[i * hd..][..hd])
                        .for_each(|(a, &b)| *a += b);
                }
            }
            Ok(())
        })
}
