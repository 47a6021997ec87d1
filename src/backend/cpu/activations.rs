//! Activations on the CPU: CLIP's quick-GELU, GELU (tanh approximation), the exact
//! (erf) GELU and SwiGLU, with backwards. GPU twin: `kernels/activations.cu`.
//!
//! Each is computed in the buffer's precision (on the f32 hot path a vectorisable
//! `expf` within 2 ulp, [`super::math::exp_f32`], as CUDA's `expf` is, and libm's
//! `tanhf`; f64 on the finite-difference backend), except the exact
//! GELU, which goes through f64 `erfc` on both devices for its negative tail.
use rayon::prelude::*;

use super::math::simd_fn;
use super::tensor::ELEMWISE_CHUNK;
use super::{r, Real};
use crate::dp::accountant::special::norm_cdf;
use crate::Result;

/// σ(x), flushed to 0 below 2⁻¹²⁶ in f32 (x ≲ −87.3): a subnormal there would
/// slow the products it feeds (see `math::exp_f32`).
#[inline(always)]
fn sigmoid<T: Real>(x: T) -> T {
    let one: T = r(1.0);
    (one / (one + (-x).exp())).flush_subnormal()
}

/// `out = f(x)` elementwise, in the buffer's precision.
pub(super) fn map<T: Real>(out: &mut [T], x: &[T], f: impl Fn(T) -> T + Sync) -> Result<()> {
    out.par_chunks_mut(ELEMWISE_CHUNK)
        .zip(x.par_chunks(ELEMWISE_CHUNK))
        .for_each(|(o, x)| map_chunk(o, x, &f));
    Ok(())
}

simd_fn! {
    fn map_chunk<T: Real>(o: &mut [T], x: &[T], f: &(impl Fn(T) -> T + Sync)) {
        for (o, &x) in o.iter_mut().zip(x) {
            *o = f(x);
        }
    }
}

/// `out = f(x)` elementwise, evaluated in f64.
pub(super) fn map_f64<T: Real>(
    out: &mut [T],
    x: &[T],
    f: impl Fn(f64) -> f64 + Sync,
) -> Result<()> {
    map(out, x, |x| r(f(x.to_f64())))
}

pub(super) fn quick_gelu<T: Real>(x: T) -> T {
    x * sigmoid(r::<T>(1.702) * x)
}

const GELU_C: f64 = 0.797_884_560_802_865_4; // √(2/π)

pub(super) fn gelu<T: Real>(x: T) -> T {
    let (c, k, half, one) = (r::<T>(GELU_C), r::<T>(0.044715), r::<T>(0.5), r::<T>(1.0));
    half * x * (one + (c * (x + k * x * x * x)).tanh())
}

pub(super) fn gelu_grad<T: Real>(x: T) -> T {
    let (c, k, half, one) = (r::<T>(GELU_C), r::<T>(0.044715), r::<T>(0.5), r::<T>(1.0));
    let th = (c * (x + k * x * x * x)).tanh();
    half * (one + th) + half * x * (one - th * th) * c * (one + r::<T>(3.0) * k * x * x)
}

const FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_7; // 1/√(2π)

/// The exact GELU `x·Φ(x)`. Φ comes from erfc, not from 1 + erf(x/√2), so the
/// negative tail keeps its relative accuracy (torch's f32 GELU, which adds 1 + erf in
/// f32, returns −0 from x ≈ −5.5 on).
pub(super) fn gelu_erf(x: f64) -> f64 {
    x * norm_cdf(x)
}

/// `Φ(x) + x·φ(x)`; the CUDA kernel evaluates the same expression in double.
pub(super) fn gelu_erf_grad(x: f64) -> f64 {
    norm_cdf(x) + x * FRAC_1_SQRT_2PI * (-0.5 * x * x).exp()
}

/// `dx = dout · f'(x)` for an elementwise activation with derivative `grad`.
pub(super) fn unary_bwd<T: Real>(
    dx: &mut [T],
    dout: &[T],
    x: &[T],
    grad: impl Fn(T) -> T + Sync,
) -> Result<()> {
    dx.par_chunks_mut(ELEMWISE_CHUNK)
        .zip(
            dout.par_chunks(ELEMWISE_CHUNK)
                .zip(x.par_chunks(ELEMWISE_CHUNK)),
        )
        .for_each(|(d, (g, x))| unary_bwd_chunk(d, g, x, &grad));
    Ok(())
}

simd_fn! {
    fn unary_bwd_chunk<T: Real>(d: &mut [T], g: &[T], x: &[T], grad: &(impl Fn(T) -> T + Sync)) {
        for ((d, &g), &x) in d.iter_mut().zip(g).zip(x) {
            *d = g * grad(x);
        }
    }
}

/// [`unary_bwd`] with the derivative evaluated in f64.
pub(super) fn unary_bwd_f64<T: Real>(
    dx: &mut [T],
    dout: &[T],
    x: &[T],
    grad: impl Fn(f64) -> f64 + Sync,
) -> Result<()> {
    unary_bwd(dx, dout, x, |x| r(grad(x.to_f64())))
}

pub(super) fn swiglu_fwd<T: Real>(out: &mut [T], gate: &[T], up: &[T]) -> Result<()> {
    out.par_chunks_mut(ELEMWISE_CHUNK)
        .zip(
            gate.par_chunks(ELEMWISE_CHUNK)
                .zip(up.par_chunks(ELEMWISE_CHUNK)),
        )
        .for_each(|(o, (g, u))| swiglu_fwd_chunk(o, g, u));
    Ok(())
}

simd_fn! {
    fn swiglu_fwd_chunk<T: Real>(o: &mut [T], g: &[T], u: &[T]) {
        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
            *o = g * sigmoid(g) * u;
        }
    }
}

pub(super) fn swiglu_bwd<T: Real>(
    dgate: &mut [T],
    dup: &mut [T],
    dout: &[T],
    gate: &[T],
    up: &[T],
) -> Result<()> {
    dgate
        .par_chunks_mut(ELEMWISE_CHUNK)
        .zip(dup.par_chunks_mut(ELEMWISE_CHUNK))
        .zip(dout.par_chunks(ELEMWISE_CHUNK))
        .zip(
            gate.par_chunks(ELEMWISE_CHUNK)
                .zip(up.par_chunks(ELEMWISE_CHUNK)),
        )
        .for_each(|(((dg, du), go), (g, u))| swiglu_bwd_chunk(dg, du, go, g, u));
    Ok(())
}

simd_fn! {
    fn swiglu_bwd_chunk<T: Real>(dg: &mut [T], du: &mut [T], go: &[T], g: &[T], u: &[T]) {
        let one: T = r(1.0);
        for ((((dg, du), &go), &g), &u) in dg.iter_mut().zip(du.iter_mut()).zip(go).zip(g).zip(u) {
            let sg = sigmoid(g);
            // silu(g) = g σ(g),  silu'(g) = σ(g) (1 + g (1 − σ(g)))
            *dg = go * u * sg * (one + g * (one - sg));
            *du = go * g * sg;
        }
    }
}
