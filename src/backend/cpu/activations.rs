//! Activations on the CPU: CLIP's quick-GELU, GELU (tanh approximation), the exact
//! (erf) GELU and SwiGLU, with backwards, computed in f64. GPU twin:
//! `kernels/activations.cu`.
use rayon::prelude::*;

use super::{r, Real};
use crate::dp::accountant::special::norm_cdf;
use crate::Result;

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

pub(super) fn map<T: Real>(out: &mut [T], x: &[T], f: impl Fn(f64) -> f64 + Sync) -> Result<()> {
    out.par_iter_mut()
        .zip(x.par_iter())
        .for_each(|(o, &x)| *o = r(f(x.to_f64())));
    Ok(())
}

pub(super) fn quick_gelu(x: f64) -> f64 {
    x * sigmoid(1.702 * x)
}

const GELU_C: f64 = 0.797_884_560_802_865_4; // √(2/π)

pub(super) fn gelu(x: f64) -> f64 {
    0.5 * x * (1.0 + (GELU_C * (x + 0.044715 * x * x * x)).tanh())
}

pub(super) fn gelu_grad(x: f64) -> f64 {
    let th = (GELU_C * (x + 0.044715 * x * x * x)).tanh();
    0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * GELU_C * (1.0 + 3.0 * 0.044715 * x * x)
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
    grad: impl Fn(f64) -> f64 + Sync,
) -> Result<()> {
    dx.par_iter_mut()
        .zip(dout.par_iter().zip(x.par_iter()))
        .for_each(|(d, (&g, &x))| *d = r(g.to_f64() * grad(x.to_f64())));
    Ok(())
}

pub(super) fn swiglu_fwd<T: Real>(out: &mut [T], gate: &[T], up: &[T]) -> Result<()> {
    out.par_iter_mut()
        .zip(gate.par_iter().zip(up.par_iter()))
        .for_each(|(o, (&g, &u))| {
            let g = g.to_f64();
            *o = r(g * sigmoid(g) * u.to_f64());
        });
    Ok(())
}

pub(super) fn swiglu_bwd<T: Real>(
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
