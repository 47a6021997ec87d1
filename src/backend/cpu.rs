//! The CPU backend: plain `Vec` buffers, rayon threads and a packed GEMM.
//!
//! Every op is written once, generic over the element type ([`Real`]), and read
//! like the math, with each layer's forward and backward side by side (llm.c
//! style). Two backends share the code:
//!
//! * [`Cpu`]: `f32` buffers, the reference the CUDA backend is compared with;
//! * [`Cpu64`]: `f64` buffers, the same ops in double precision, so finite
//!   difference checks of whole layers and of the whole model can use tight
//!   tolerances (tests only; uploads and downloads convert from and to f32).
//!
//! Row reductions (norm statistics, softmax sums, the log-sum-exp of the loss)
//! accumulate in f64 whatever the element type.
#![allow(clippy::too_many_arguments)]

use std::fmt::Debug;
use std::marker::PhantomData;
use std::ops::{Add, AddAssign, Div, Mul, Neg, Sub};

use rayon::prelude::*;

use super::{AttnShape, Backend, Blocks, MatmulSpec, PatchShape, RopeShape, RowShape};
use crate::linalg::{gemm_f32, gemm_f64, View};
use crate::vision::tokens::{select_tokens, TokenSelectConfig, TokenShape};
use crate::{Error, Result};

/// The element type of a CPU buffer: `f32` or `f64`.
pub trait Real:
    Copy
    + Default
    + Send
    + Sync
    + Debug
    + PartialOrd
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
{
    /// Converts from f64 (rounding for f32).
    fn from_f64(x: f64) -> Self;
    /// Converts to f64 (exact).
    fn to_f64(self) -> f64;
    /// The name of the CPU backend on this type ("cpu", "cpu64").
    const BACKEND: &'static str;
    /// `c[m×n] = alpha·a·b + beta·c` (see [`crate::linalg`]).
    fn gemm(alpha: Self, a: View<'_, Self>, b: View<'_, Self>, beta: Self, c: &mut [Self]);
}

impl Real for f32 {
    const BACKEND: &'static str = "cpu";
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn gemm(alpha: Self, a: View<'_, Self>, b: View<'_, Self>, beta: Self, c: &mut [Self]) {
        let n = b.cols;
        gemm_f32(alpha, a, b, beta, c, n)
    }
}

impl Real for f64 {
    const BACKEND: &'static str = "cpu64";
    fn from_f64(x: f64) -> Self {
        x
    }
    fn to_f64(self) -> f64 {
        self
    }
    fn gemm(alpha: Self, a: View<'_, Self>, b: View<'_, Self>, beta: Self, c: &mut [Self]) {
        let n = b.cols;
        gemm_f64(alpha, a, b, beta, c, n)
    }
}

fn r<T: Real>(x: f64) -> T {
    T::from_f64(x)
}

fn alloc<T: Real>(n: usize) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| {
        Error::Config(format!(
            "out of host memory allocating {n} values ({} bytes)",
            n.saturating_mul(std::mem::size_of::<T>())
        ))
    })?;
    v.resize(n, T::default());
    Ok(v)
}

// ---------------------------------------------------------------------------
// matmul, bias, residual, copies

fn matmul<T: Real>(c: &mut [T], a: &[T], b: &[T], s: MatmulSpec) -> Result<()> {
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

fn add_bias<T: Real>(y: &mut [T], bias: &[T], s: RowShape) -> Result<()> {
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

fn axpy<T: Real>(y: &mut [T], alpha: f32, x: &[T]) -> Result<()> {
    let a: T = r(alpha as f64);
    y.iter_mut().zip(x).for_each(|(y, &x)| *y += a * x);
    Ok(())
}

fn copy_blocks<T: Real>(dst: &mut [T], src: &[T], b: Blocks) -> Result<()> {
    for i in 0..b.count {
        let s = b.src_off + i * b.src_stride;
        let d = b.dst_off + i * b.dst_stride;
        dst[d..d + b.len].copy_from_slice(&src[s..s + b.len]);
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// LayerNorm (vision tower)

fn layernorm_fwd<T: Real>(
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
            let mu = x.iter().map(|v| v.to_f64()).sum::<f64>() / d;
            let var = x.iter().map(|v| (v.to_f64() - mu).powi(2)).sum::<f64>() / d;
            let inv = 1.0 / (var + eps as f64).sqrt();
            for j in 0..x.len() {
                let xhat = (x[j].to_f64() - mu) * inv;
                o[j] = r::<T>(xhat) * w[j] + b[j];
            }
            *m = r(mu);
            *rs = r(inv);
        });
    Ok(())
}

fn layernorm_bwd<T: Real>(
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

fn rmsnorm_fwd<T: Real>(
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
            let ms = x.iter().map(|v| v.to_f64().powi(2)).sum::<f64>() / s.dim as f64;
            let inv = 1.0 / (ms + eps as f64).sqrt();
            for j in 0..x.len() {
                o[j] = r::<T>(x[j].to_f64() * inv) * w[j];
            }
            *rs = r(inv);
        });
    Ok(())
}

fn rmsnorm_bwd<T: Real>(
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

// ---------------------------------------------------------------------------
// RoPE (rotate-half); the backward is the rotation by the opposite angle

fn rope<T: Real>(x: &mut [T], s: RopeShape, sign: f64) -> Result<()> {
    let row = s.heads * s.hd;
    if row == 0 {
        return Ok(());
    }
    let half = s.hd / 2;
    let t = s.t.max(1);
    let freqs: Vec<f64> = (0..half)
        .map(|i| (s.theta as f64).powf(-2.0 * i as f64 / s.hd as f64))
        .collect();
    x.par_chunks_mut(row).enumerate().for_each(|(idx, xr)| {
        let pos = (idx % t) as f64;
        for (i, &freq) in freqs.iter().enumerate() {
            // One angle per (position, pair), shared by every head.
            let (sin, cos) = (sign * pos * freq).sin_cos();
            for head in xr.chunks_mut(s.hd) {
                let (x1, x2) = (head[i].to_f64(), head[i + half].to_f64());
                head[i] = r(x1 * cos - x2 * sin);
                head[i + half] = r(x2 * cos + x1 * sin);
            }
        }
    });
    Ok(())
}

// ---------------------------------------------------------------------------
// Attention: per example, per head, S = QKᵀ/√hd, P = softmax(S), O = PV

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

fn attention_fwd<T: Real>(
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
    let scale = 1.0 / (hd as f64).sqrt();
    out.par_chunks_mut(qs)
        .zip(probs.par_chunks_mut(ps))
        .enumerate()
        .for_each(|(bi, (o, p))| {
            let (qb, kb, vb) = (
                &q[bi * qs..][..qs],
                &k[bi * kvs..][..kvs],
                &v[bi * kvs..][..kvs],
            );
            let mut oh = vec![T::default(); t * hd];
            for h in 0..s.hq {
                let kvh = h / rep;
                let ph = &mut p[h * t * t..][..t * t];
                let qv = head_view(qb, t, s.hq, hd, h);
                let kv = head_view(kb, t, s.hkv, hd, kvh);
                T::gemm(r(scale), qv, kv.t(), T::default(), ph);
                for i in 0..t {
                    let row = &mut ph[i * t..][..t];
                    let n = if s.causal { i + 1 } else { t };
                    let mx = row[..n].iter().map(|v| v.to_f64()).fold(f64::MIN, f64::max);
                    let mut sum = 0.0;
                    for v in row[..n].iter_mut() {
                        let e = (v.to_f64() - mx).exp();
                        sum += e;
                        *v = r(e);
                    }
                    for v in row[..n].iter_mut() {
                        *v = r(v.to_f64() / sum);
                    }
                    row[n..].iter_mut().for_each(|v| *v = T::default());
                }
                let vv = head_view(vb, t, s.hkv, hd, kvh);
                T::gemm(r(1.0), View::row_major(ph, t, t), vv, T::default(), &mut oh);
                for i in 0..t {
                    o[i * s.hq * hd + h * hd..][..hd].copy_from_slice(&oh[i * hd..][..hd]);
                }
            }
        });
    Ok(())
}

fn attention_bwd<T: Real>(
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
        .for_each(|(bi, (dqb, (dkb, dvb)))| {
            let (qb, kb, vb) = (
                &q[bi * qs..][..qs],
                &k[bi * kvs..][..kvs],
                &v[bi * kvs..][..kvs],
            );
            let gob = &dout[bi * qs..][..qs];
            dkb.iter_mut().for_each(|x| *x = T::default());
            dvb.iter_mut().for_each(|x| *x = T::default());
            let mut dp = vec![T::default(); t * t];
            let mut tmp = vec![T::default(); t * hd];
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
                    for (d, &p) in dr.iter_mut().zip(pr) {
                        *d = r(p.to_f64() * (d.to_f64() - dot));
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
        });
    Ok(())
}

// ---------------------------------------------------------------------------
// Activations

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn map<T: Real>(out: &mut [T], x: &[T], f: impl Fn(f64) -> f64 + Sync) -> Result<()> {
    out.par_iter_mut()
        .zip(x.par_iter())
        .for_each(|(o, &x)| *o = r(f(x.to_f64())));
    Ok(())
}

fn quick_gelu(x: f64) -> f64 {
    x * sigmoid(1.702 * x)
}

const GELU_C: f64 = 0.797_884_560_802_865_4; // √(2/π)

fn gelu(x: f64) -> f64 {
    0.5 * x * (1.0 + (GELU_C * (x + 0.044715 * x * x * x)).tanh())
}

fn gelu_grad(x: f64) -> f64 {
    let th = (GELU_C * (x + 0.044715 * x * x * x)).tanh();
    0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * GELU_C * (1.0 + 3.0 * 0.044715 * x * x)
}

fn gelu_bwd<T: Real>(dx: &mut [T], dout: &[T], x: &[T]) -> Result<()> {
    dx.par_iter_mut()
        .zip(dout.par_iter().zip(x.par_iter()))
        .for_each(|(d, (&g, &x))| *d = r(g.to_f64() * gelu_grad(x.to_f64())));
    Ok(())
}

fn swiglu_fwd<T: Real>(out: &mut [T], gate: &[T], up: &[T]) -> Result<()> {
    out.par_iter_mut()
        .zip(gate.par_iter().zip(up.par_iter()))
        .for_each(|(o, (&g, &u))| {
            let g = g.to_f64();
            *o = r(g * sigmoid(g) * u.to_f64());
        });
    Ok(())
}

fn swiglu_bwd<T: Real>(
    dgate: &mut [T],
    dup: &mut [T],
    dout: &[T],
    gate: &[T],
    up: &[T],
) -> Result<()> {
    dgate
        .par_iter_mut()
        .zip(dup.par_iter_mut())
        .enumerate()
        .for_each(|(i, (dg, du))| {
            let (g, u, go) = (gate[i].to_f64(), up[i].to_f64(), dout[i].to_f64());
            let sg = sigmoid(g);
            // silu(g) = g σ(g),  silu'(g) = σ(g) (1 + g (1 − σ(g)))
            *dg = r(go * u * sg * (1.0 + g * (1.0 - sg)));
            *du = r(go * g * sg);
        });
    Ok(())
}

// ---------------------------------------------------------------------------
// Embedding and the loss

fn embedding_fwd<T: Real>(out: &mut [T], table: &[T], ids: &[u32], s: RowShape) -> Result<()> {
    for (row, &id) in ids.iter().enumerate() {
        out[row * s.dim..][..s.dim].copy_from_slice(&table[id as usize * s.dim..][..s.dim]);
    }
    Ok(())
}

fn embedding_bwd<T: Real>(dtable: &mut [T], dout: &[T], ids: &[u32], s: RowShape) -> Result<()> {
    for (row, &id) in ids.iter().enumerate() {
        let dst = &mut dtable[id as usize * s.dim..][..s.dim];
        dst.iter_mut()
            .zip(&dout[row * s.dim..][..s.dim])
            .for_each(|(a, &b)| *a += b);
    }
    Ok(())
}

fn cross_entropy<T: Real>(
    losses: &mut [T],
    dlogits: &mut [T],
    logits: &[T],
    targets: &[u32],
    weights: &[T],
    s: RowShape,
) -> Result<()> {
    if s.dim == 0 {
        losses.iter_mut().for_each(|l| *l = T::default());
        return Ok(());
    }
    dlogits
        .par_chunks_mut(s.dim)
        .zip(losses.par_iter_mut())
        .enumerate()
        .for_each(|(row, (dl, loss))| {
            let w = weights[row].to_f64();
            if w == 0.0 {
                dl.iter_mut().for_each(|v| *v = T::default());
                *loss = T::default();
                return;
            }
            let lg = &logits[row * s.dim..][..s.dim];
            let tg = targets[row] as usize;
            let mx = lg.iter().map(|v| v.to_f64()).fold(f64::MIN, f64::max);
            let sum: f64 = lg.iter().map(|v| (v.to_f64() - mx).exp()).sum();
            let lse = mx + sum.ln();
            *loss = r(w * (lse - lg[tg].to_f64()));
            for (j, d) in dl.iter_mut().enumerate() {
                let p = (lg[j].to_f64() - lse).exp();
                *d = r(w * (p - if j == tg { 1.0 } else { 0.0 }));
            }
        });
    Ok(())
}

fn patchify<T: Real>(out: &mut [T], images: &[T], s: PatchShape) -> Result<()> {
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

fn to_f32<T: Real>(x: &[T]) -> Vec<f32> {
    x.iter().map(|v| v.to_f64() as f32).collect()
}

/// The CPU backend on element type `T`: `Vec<T>` buffers, the ops of this module.
/// Use it through [`Cpu`] (f32) and [`Cpu64`] (f64).
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuOf<T>(PhantomData<T>);

impl<T> CpuOf<T> {
    /// The backend (it holds no state).
    pub const fn new() -> Self {
        Self(PhantomData)
    }
}

/// The CPU reference backend, `f32` buffers.
pub type Cpu = CpuOf<f32>;
/// The value of [`Cpu`], so that `&Cpu` reads as it did when `Cpu` was a unit struct.
#[allow(non_upper_case_globals)]
pub const Cpu: Cpu = CpuOf::new();

/// The CPU backend in double precision, `f64` buffers: the same ops as [`Cpu`],
/// used by finite-difference tests. Token selection runs in f32 (its input is
/// rounded), as it has no gradient.
pub type Cpu64 = CpuOf<f64>;
/// The value of [`Cpu64`].
#[allow(non_upper_case_globals)]
pub const Cpu64: Cpu64 = CpuOf::new();

impl<T: Real> Backend for CpuOf<T> {
    type Buf = Vec<T>;
    type Ids = Vec<u32>;

    fn name(&self) -> &'static str {
        T::BACKEND
    }
    fn zeros(&self, n: usize) -> Result<Vec<T>> {
        alloc(n)
    }
    fn upload(&self, host: &[f32]) -> Result<Vec<T>> {
        let mut v = alloc::<T>(host.len())?;
        v.iter_mut()
            .zip(host)
            .for_each(|(d, &s)| *d = r(f64::from(s)));
        Ok(v)
    }
    fn download(&self, buf: &Vec<T>) -> Result<Vec<f32>> {
        Ok(to_f32(buf))
    }
    fn len(&self, buf: &Vec<T>) -> usize {
        buf.len()
    }
    fn upload_ids(&self, ids: &[u32]) -> Result<Vec<u32>> {
        Ok(ids.to_vec())
    }
    fn host_ids<'a>(&self, ids: &'a Vec<u32>) -> &'a [u32] {
        ids
    }
    fn is_zero(&self, buf: &Vec<T>) -> Result<Vec<bool>> {
        Ok(buf.iter().map(|v| v.to_f64() == 0.0).collect())
    }
    fn available_memory(&self) -> Option<u64> {
        host_available_memory()
    }
    fn value_bytes(&self) -> usize {
        std::mem::size_of::<T>()
    }
    fn duplicate(&self, src: &Vec<T>) -> Result<Vec<T>> {
        let mut v = alloc::<T>(src.len())?;
        v.copy_from_slice(src);
        Ok(v)
    }
    unsafe fn copy_blocks_unchecked(
        &self,
        dst: &mut Vec<T>,
        src: &Vec<T>,
        b: Blocks,
    ) -> Result<()> {
        copy_blocks(dst, src, b)
    }
    unsafe fn matmul_unchecked(
        &self,
        c: &mut Vec<T>,
        a: &Vec<T>,
        b: &Vec<T>,
        s: MatmulSpec,
    ) -> Result<()> {
        matmul(c, a, b, s)
    }
    unsafe fn add_bias_unchecked(&self, y: &mut Vec<T>, bias: &Vec<T>, s: RowShape) -> Result<()> {
        add_bias(y, bias, s)
    }
    unsafe fn axpy_unchecked(&self, y: &mut Vec<T>, alpha: f32, x: &Vec<T>) -> Result<()> {
        axpy(y, alpha, x)
    }
    unsafe fn layernorm_fwd_unchecked(
        &self,
        out: &mut Vec<T>,
        mean: &mut Vec<T>,
        rstd: &mut Vec<T>,
        x: &Vec<T>,
        w: &Vec<T>,
        b: &Vec<T>,
        s: RowShape,
        eps: f32,
    ) -> Result<()> {
        layernorm_fwd(out, mean, rstd, x, w, b, s, eps)
    }
    unsafe fn layernorm_bwd_unchecked(
        &self,
        dx: &mut Vec<T>,
        dw: &mut Vec<T>,
        db: &mut Vec<T>,
        dout: &Vec<T>,
        x: &Vec<T>,
        w: &Vec<T>,
        mean: &Vec<T>,
        rstd: &Vec<T>,
        s: RowShape,
    ) -> Result<()> {
        layernorm_bwd(dx, dw, db, dout, x, w, mean, rstd, s)
    }
    unsafe fn rmsnorm_fwd_unchecked(
        &self,
        out: &mut Vec<T>,
        rstd: &mut Vec<T>,
        x: &Vec<T>,
        w: &Vec<T>,
        s: RowShape,
        eps: f32,
    ) -> Result<()> {
        rmsnorm_fwd(out, rstd, x, w, s, eps)
    }
    unsafe fn rmsnorm_bwd_unchecked(
        &self,
        dx: &mut Vec<T>,
        dw: &mut Vec<T>,
        dout: &Vec<T>,
        x: &Vec<T>,
        w: &Vec<T>,
        rstd: &Vec<T>,
        s: RowShape,
    ) -> Result<()> {
        rmsnorm_bwd(dx, dw, dout, x, w, rstd, s)
    }
    unsafe fn rope_unchecked(&self, x: &mut Vec<T>, s: RopeShape, sign: f64) -> Result<()> {
        rope(x, s, sign)
    }
    unsafe fn attention_fwd_unchecked(
        &self,
        out: &mut Vec<T>,
        probs: &mut Vec<T>,
        q: &Vec<T>,
        k: &Vec<T>,
        v: &Vec<T>,
        s: AttnShape,
    ) -> Result<()> {
        attention_fwd(out, probs, q, k, v, s)
    }
    unsafe fn attention_bwd_unchecked(
        &self,
        dq: &mut Vec<T>,
        dk: &mut Vec<T>,
        dv: &mut Vec<T>,
        dout: &Vec<T>,
        q: &Vec<T>,
        k: &Vec<T>,
        v: &Vec<T>,
        probs: &Vec<T>,
        s: AttnShape,
    ) -> Result<()> {
        attention_bwd(dq, dk, dv, dout, q, k, v, probs, s)
    }
    unsafe fn quick_gelu_fwd_unchecked(&self, out: &mut Vec<T>, x: &Vec<T>) -> Result<()> {
        map(out, x, quick_gelu)
    }
    unsafe fn gelu_fwd_unchecked(&self, out: &mut Vec<T>, x: &Vec<T>) -> Result<()> {
        map(out, x, gelu)
    }
    unsafe fn gelu_bwd_unchecked(&self, dx: &mut Vec<T>, dout: &Vec<T>, x: &Vec<T>) -> Result<()> {
        gelu_bwd(dx, dout, x)
    }
    unsafe fn swiglu_fwd_unchecked(
        &self,
        out: &mut Vec<T>,
        gate: &Vec<T>,
        up: &Vec<T>,
    ) -> Result<()> {
        swiglu_fwd(out, gate, up)
    }
    unsafe fn swiglu_bwd_unchecked(
        &self,
        dgate: &mut Vec<T>,
        dup: &mut Vec<T>,
        dout: &Vec<T>,
        gate: &Vec<T>,
        up: &Vec<T>,
    ) -> Result<()> {
        swiglu_bwd(dgate, dup, dout, gate, up)
    }
    unsafe fn embedding_fwd_unchecked(
        &self,
        out: &mut Vec<T>,
        table: &Vec<T>,
        ids: &Vec<u32>,
        s: RowShape,
    ) -> Result<()> {
        embedding_fwd(out, table, ids, s)
    }
    unsafe fn embedding_bwd_unchecked(
        &self,
        dtable: &mut Vec<T>,
        dout: &Vec<T>,
        ids: &Vec<u32>,
        s: RowShape,
    ) -> Result<()> {
        embedding_bwd(dtable, dout, ids, s)
    }
    unsafe fn cross_entropy_unchecked(
        &self,
        losses: &mut Vec<T>,
        dlogits: &mut Vec<T>,
        logits: &Vec<T>,
        targets: &Vec<u32>,
        weights: &Vec<T>,
        s: RowShape,
    ) -> Result<()> {
        cross_entropy(losses, dlogits, logits, targets, weights, s)
    }
    unsafe fn patchify_unchecked(
        &self,
        out: &mut Vec<T>,
        images: &Vec<T>,
        s: PatchShape,
    ) -> Result<()> {
        patchify(out, images, s)
    }
    unsafe fn select_tokens_unchecked(
        &self,
        attn_cls: &Vec<T>,
        keys: &Vec<T>,
        hidden: &Vec<T>,
        shape: &TokenShape,
        cfg: &TokenSelectConfig,
    ) -> Result<Vec<T>> {
        let sel = select_tokens(
            &to_f32(attn_cls),
            &to_f32(keys),
            &to_f32(hidden),
            shape,
            cfg,
        )?;
        self.upload(&sel.tokens)
    }
}

/// `MemAvailable` from `/proc/meminfo`, in bytes (None where unreadable).
fn host_available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
