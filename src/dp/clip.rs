//! Per-example gradient clipping for linear layers, without per-example gradients.
//!
//! For a linear layer Y = X·Wᵀ (+ b) with input X of shape B×T×d and output
//! gradient G of shape B×T×p, example i's weight gradient is ∇W_i = G_iᵀ X_i (p×d).
//! Its squared Frobenius norm has two forms (REFERENCE.md §3):
//!
//! * ghost:        ‖∇W_i‖² = ⟨X_i X_iᵀ, G_i G_iᵀ⟩_F, cost O(T²(d+p));
//! * instantiated: ‖∇W_i‖² = ‖X_iᵀ G_i‖²_F,       cost O(T·d·p);
//!
//! and fastDP's mixed rule picks ghost when 2T² < p·d. The bias gradient is
//! Σ_t G_i,t, so its squared norm is ‖Σ_t G_i,t‖². Clip factors come from the total
//! norm over all layers, c_i = min(1, C / (‖g_i‖ + 1e-6)), and the book-keeping
//! clipped sum Σ_i c_i G_iᵀ X_i is one GEMM over all B·T rows with G scaled by c.
//!
//! An example whose total norm is not finite (a NaN or Inf in its activations or
//! gradients) gets factor 0, and every clipped sum treats a factor-0 example as
//! absent, so its NaN rows cannot poison the sum (0·NaN = NaN) and the step goes on:
//! aborting would itself reveal that such an example was sampled.
//!
//! This is the CPU reference: f64 accumulation throughout. `kernels/clip.cu` is its
//! CUDA twin.
use rayon::prelude::*;

use crate::error::{ensure_shape, Error, Result};
use crate::linalg::{gemm_f32, gemm_f64, View};

/// Shapes of one linear layer's saved activations: X is b×t×d, G is b×t×p.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearShape {
    /// Examples in the (micro-)batch.
    pub b: usize,
    /// Tokens per example.
    pub t: usize,
    /// Input features.
    pub d: usize,
    /// Output features.
    pub p: usize,
}

/// Which per-example norm formula to use for a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormMethod {
    /// ⟨XXᵀ, GGᵀ⟩: cheap when sequences are short relative to the layer width.
    Ghost,
    /// ‖XᵀG‖²: cheap when sequences are long.
    Instantiated,
}

/// The smallest `eps` added to the norm before dividing, as Opacus does, so a zero
/// gradient gets factor 1 instead of a division by zero.
pub const CLIP_EPS: f64 = 1e-6;

impl LinearShape {
    /// fastDP's mixed rule: ghost when 2T² < p·d.
    pub fn preferred_method(&self) -> NormMethod {
        let (t, d, p) = (self.t as u128, self.d as u128, self.p as u128);
        if 2 * t * t < p * d {
            NormMethod::Ghost
        } else {
            NormMethod::Instantiated
        }
    }

    /// Checks that `x` and `g` hold exactly b·t·d and b·t·p values.
    pub fn check(&self, x: &[f32], g: &[f32]) -> Result<()> {
        ensure_shape(x.len() == self.b * self.t * self.d, || {
            format!(
                "linear input has {} values, expected b*t*d = {}*{}*{}",
                x.len(),
                self.b,
                self.t,
                self.d
            )
        })?;
        self.check_g(g)
    }

    fn check_g(&self, g: &[f32]) -> Result<()> {
        ensure_shape(g.len() == self.b * self.t * self.p, || {
            format!(
                "linear output gradient has {} values, expected b*t*p = {}*{}*{}",
                g.len(),
                self.b,
                self.t,
                self.p
            )
        })
    }

    fn check_factors(&self, c: &[f32]) -> Result<()> {
        ensure_shape(c.len() == self.b, || {
            format!("{} clip factors for a batch of {}", c.len(), self.b)
        })
    }
}

fn to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

/// Per-example ‖∇W_i‖² in ghost form, ⟨X_i X_iᵀ, G_i G_iᵀ⟩_F.
pub fn ghost_sq_norms(x: &[f32], g: &[f32], s: LinearShape) -> Result<Vec<f64>> {
    s.check(x, g)?;
    let (t, d, p) = (s.t, s.d, s.p);
    Ok((0..s.b)
        .into_par_iter()
        .map(|i| {
            let xi = to_f64(&x[i * t * d..(i + 1) * t * d]);
            let gi = to_f64(&g[i * t * p..(i + 1) * t * p]);
            let (mut xx, mut gg) = (vec![0.0; t * t], vec![0.0; t * t]);
            let xv = View::row_major(&xi, t, d);
            let gv = View::row_major(&gi, t, p);
            gemm_f64(1.0, xv, xv.t(), 0.0, &mut xx, t);
            gemm_f64(1.0, gv, gv.t(), 0.0, &mut gg, t);
            xx.iter().zip(&gg).map(|(a, b)| a * b).sum()
        })
        .collect())
}

/// Per-example ‖∇W_i‖² in instantiated form, ‖X_iᵀ G_i‖²_F.
pub fn instantiated_sq_norms(x: &[f32], g: &[f32], s: LinearShape) -> Result<Vec<f64>> {
    s.check(x, g)?;
    let (t, d, p) = (s.t, s.d, s.p);
    Ok((0..s.b)
        .into_par_iter()
        .map(|i| {
            let xi = to_f64(&x[i * t * d..(i + 1) * t * d]);
            let gi = to_f64(&g[i * t * p..(i + 1) * t * p]);
            let mut xg = vec![0.0; d * p];
            gemm_f64(
                1.0,
                View::row_major(&xi, t, d).t(),
                View::row_major(&gi, t, p),
                0.0,
                &mut xg,
                p,
            );
            xg.iter().map(|v| v * v).sum()
        })
        .collect())
}

/// Per-example squared norm of the bias gradient, ‖Σ_t G_i,t‖².
pub fn bias_sq_norms(g: &[f32], s: LinearShape) -> Result<Vec<f64>> {
    s.check_g(g)?;
    let (t, p) = (s.t, s.p);
    Ok((0..s.b)
        .map(|i| {
            let mut col = vec![0.0f64; p];
            for row in g[i * t * p..(i + 1) * t * p].chunks_exact(p.max(1)) {
                for (c, &v) in col.iter_mut().zip(row) {
                    *c += f64::from(v);
                }
            }
            col.iter().map(|v| v * v).sum()
        })
        .collect())
}

/// Per-example squared gradient norm of one linear layer by the given method,
/// plus its bias term when the layer has a bias.
pub fn layer_sq_norms(
    x: &[f32],
    g: &[f32],
    s: LinearShape,
    method: NormMethod,
    has_bias: bool,
) -> Result<Vec<f64>> {
    let mut n = match method {
        NormMethod::Ghost => ghost_sq_norms(x, g, s)?,
        NormMethod::Instantiated => instantiated_sq_norms(x, g, s)?,
    };
    if has_bias {
        for (a, b) in n.iter_mut().zip(bias_sq_norms(g, s)?) {
            *a += b;
        }
    }
    Ok(n)
}

/// Clip factors c_i = min(1, C / (‖g_i‖ + 1e-6)) from per-example squared norms
/// summed over all layers, and the number of examples whose norm is not finite
/// (NaN or ±Inf): those get c_i = 0 and drop out of every clipped sum, so the
/// released sum still has sensitivity C. A slightly negative sum (f32 rounding of a
/// near-zero ghost norm) counts as 0.
pub fn clip_factors(total_sq_norms: &[f64], clip_norm: f64) -> Result<(Vec<f32>, usize)> {
    if clip_norm.is_nan() || clip_norm <= 0.0 {
        return Err(Error::Config(format!(
            "clip norm C = {clip_norm} must be positive (use a value like 1.0)"
        )));
    }
    let mut non_finite = 0;
    let factors = total_sq_norms
        .iter()
        .map(|&sq| {
            if !sq.is_finite() {
                non_finite += 1;
                return 0.0;
            }
            (clip_norm / (sq.max(0.0).sqrt() + CLIP_EPS)).min(1.0) as f32
        })
        .collect();
    Ok((factors, non_finite))
}

/// The rows (`per` values each) of the examples with a non-zero factor, and those
/// factors: a factor-0 example is absent, whatever its rows hold.
fn present(m: &[f32], per: usize, factors: &[f32]) -> Vec<f32> {
    m.chunks(per.max(1))
        .zip(factors)
        .filter(|(_, &c)| c != 0.0)
        .flat_map(|(rows, _)| rows.iter().copied())
        .collect()
}

/// A batch's X, G, factors and shape.
type Batch = (Vec<f32>, Vec<f32>, Vec<f32>, LinearShape);

/// The batch without its factor-0 examples, or `None` when every factor is non-zero
/// (the common case, which needs no copy).
fn without_absent(x: &[f32], g: &[f32], factors: &[f32], s: LinearShape) -> Option<Batch> {
    if !factors.contains(&0.0) {
        return None;
    }
    let kept: Vec<f32> = factors.iter().copied().filter(|&c| c != 0.0).collect();
    let shape = LinearShape { b: kept.len(), ..s };
    Some((
        present(x, s.t * s.d, factors),
        present(g, s.t * s.p, factors),
        kept,
        shape,
    ))
}

/// The argument checks shared by both clipped weight sums.
fn check_weight_sum(
    x: &[f32],
    g: &[f32],
    factors: &[f32],
    s: LinearShape,
    out_len: usize,
) -> Result<()> {
    s.check(x, g)?;
    s.check_factors(factors)?;
    ensure_shape(out_len == s.p * s.d, || {
        format!(
            "clipped sum buffer has {out_len} values, expected p*d = {}",
            s.p * s.d
        )
    })
}

/// [`clipped_weight_sum`] in f32, the CPU backend's production path: the narrower of
/// X and G is scaled by each example's factor, then one packed f32 GEMM over all b·t
/// rows, the same plan as the GPU's. Added into `out`. Factor-0 examples are
/// dropped first (a copy, only when there are any), so the result is bit for bit
/// that of the batch without them.
pub fn clipped_weight_sum_f32(
    x: &[f32],
    g: &[f32],
    factors: &[f32],
    s: LinearShape,
    out: &mut [f32],
) -> Result<()> {
    check_weight_sum(x, g, factors, s, out.len())?;
    if let Some((x, g, factors, s)) = without_absent(x, g, factors, s) {
        return clipped_weight_sum_f32(&x, &g, &factors, s, out);
    }
    let bt = s.b * s.t;
    if bt == 0 || out.is_empty() {
        return Ok(());
    }
    let scaled = |m: &[f32], width: usize| -> Vec<f32> {
        let per = (s.t * width).max(1);
        m.iter()
            .enumerate()
            .map(|(j, &v)| v * factors[j / per])
            .collect()
    };
    if s.d < s.p {
        let xs = scaled(x, s.d);
        let gv = View::row_major(g, bt, s.p).t();
        gemm_f32(1.0, gv, View::row_major(&xs, bt, s.d), 1.0, out, s.d);
    } else {
        let gs = scaled(g, s.p);
        let gv = View::row_major(&gs, bt, s.p).t();
        gemm_f32(1.0, gv, View::row_major(x, bt, s.d), 1.0, out, s.d);
    }
    Ok(())
}

/// The book-keeping clipped weight-gradient sum Σ_i c_i G_iᵀ X_i over the examples
/// with c_i ≠ 0, as a p×d matrix (the layout of W), added into `out` (so
/// micro-batches accumulate).
pub fn clipped_weight_sum(
    x: &[f32],
    g: &[f32],
    factors: &[f32],
    s: LinearShape,
    out: &mut [f32],
) -> Result<()> {
    check_weight_sum(x, g, factors, s, out.len())?;
    if let Some((x, g, factors, s)) = without_absent(x, g, factors, s) {
        return clipped_weight_sum(&x, &g, &factors, s, out);
    }
    let (bt, t, p) = (s.b * s.t, s.t, s.p);
    // Scale each example's rows of G by its factor: Xᵀ diag(c) G as one GEMM.
    let gs: Vec<f64> = g
        .iter()
        .enumerate()
        .map(|(j, &v)| f64::from(v) * f64::from(factors[j / (t * p).max(1)]))
        .collect();
    let mut acc: Vec<f64> = to_f64(out);
    gemm_f64(
        1.0,
        View::row_major(&gs, bt, p).t(),
        View::row_major(&to_f64(x), bt, s.d),
        1.0,
        &mut acc,
        s.d,
    );
    for (o, a) in out.iter_mut().zip(acc) {
        *o = a as f32;
    }
    Ok(())
}

/// The clipped bias-gradient sum Σ_i c_i Σ_t G_i,t (length p) over the examples
/// with c_i ≠ 0, added into `out`.
pub fn clipped_bias_sum(g: &[f32], factors: &[f32], s: LinearShape, out: &mut [f32]) -> Result<()> {
    s.check_g(g)?;
    s.check_factors(factors)?;
    ensure_shape(out.len() == s.p, || {
        format!(
            "clipped bias buffer has {} values, expected p = {}",
            out.len(),
            s.p
        )
    })?;
    let mut acc = to_f64(out);
    for (i, &c) in factors.iter().enumerate() {
        // A factor-0 example is absent: skipped, not multiplied (0·NaN = NaN).
        if c == 0.0 {
            continue;
        }
        for row in g[i * s.t * s.p..(i + 1) * s.t * s.p].chunks_exact(s.p.max(1)) {
            for (a, &v) in acc.iter_mut().zip(row) {
                *a += f64::from(c) * f64::from(v);
            }
        }
    }
    for (o, a) in out.iter_mut().zip(acc) {
        *o = a as f32;
    }
    Ok(())
}
