//! Per-example gradient clipping for linear layers, without per-example gradients.
//!
//! For a linear layer Y = X·Wᵀ (+ b) with input X of shape B×T×d and output
//! gradient G of shape B×T×p, example i's weight gradient is ∇W_i = G_iᵀ X_i (p×d).
//! Its squared Frobenius norm has two forms (the ghost one from Li et al. 2022,
//! arXiv 2110.05679):
//!
//! * ghost:        ‖∇W_i‖² = ⟨X_i X_iᵀ, G_i G_iᵀ⟩_F, cost O(T²(d+p));
//! * instantiated: ‖∇W_i‖² = ‖X_iᵀ G_i‖²_F,       cost O(T·d·p);
//!
//! and fastDP's mixed rule picks ghost when 2T² < p·d. The bias gradient is
//! Σ_t G_i,t, so its squared norm is ‖Σ_t G_i,t‖². Clip factors come from the total
//! norm over all layers inflated by a bound on the f32 rounding the example's own
//! terms can add to the released sums, c_i = min(1, C / (‖g_i‖ + E_i + 1e-6))
//! ([`clip_factors`], [`layer_rounding_bounds`]), and the book-keeping clipped sum
//! Σ_i c_i G_iᵀ X_i is one GEMM over all B·T rows with G scaled by c.
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
use crate::mem::Recycled;
// `linalg` counts each GEMM block's allocations as the GEMM's (`mem::gemm_scope`).
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

// ---------------------------------------------------------------------------
// Rounding bounds: the clipped sums are f32 sums, and their rounding error is not
// bounded by C unless the clip norm pays for it.
//
// A sum of n floating-point terms, in any order (any binary tree of additions,
// FMA or not), is Σ_k a_k (1 + θ_k) with |θ_k| ≤ γ_n = n·u / (1 − n·u), where n
// bounds the number of roundings on term k's path (Higham, Accuracy and Stability
// of Numerical Algorithms, §3.1; an addition of an exact 0 does not round). The
// book-keeping sum's entry (q, j) is Σ_{i,t} fl(c_i·g_itq)·x_itj (or c_i on X) over
// the micro-batch's b·t rows; the part of its error carried by example i's terms is
// at most γ·c_i Σ_t |g_itq||x_itj|, whose Frobenius norm over (q, j) is at most
// γ·c_i Σ_t ‖x_it‖‖g_it‖ (Cauchy–Schwarz on |G_i|ᵀ|X_i|). So with
//
//     E_i = Σ_layers γ_l Σ_t ‖x_it‖‖g_it‖   (+ γ_l Σ_t ‖g_it‖ for a bias)
//     c_i = min(1, C / (‖∇_i‖ + E_i + 1e-6))
//
// example i's computed contribution is c_i‖∇_i‖ + (its own rounding) ≤ c_i(‖∇_i‖ +
// E_i) ≤ C, however its token rows cancel. Without E_i, an example with ‖∇_i‖ = 0
// but huge rows gets c_i = 1 and releases its rounding residual unclipped.
//
// Not covered: the rounding of the *other* examples' terms also changes when
// example i is removed (≤ 2γ Σ_{j≠i} c_j E_j: the floating-point background of any
// f32 sum, which example i's magnitudes cannot amplify).

/// Unit roundoff of f32 (round to nearest).
pub const F32_UNIT: f64 = 1.0 / (1u64 << 24) as f64;
/// Unit roundoff of f64.
pub const F64_UNIT: f64 = 1.0 / (1u64 << 53) as f64;
/// Micro-batch accumulations (`axpy` of one micro-batch's sum into the step's)
/// that [`sum_gamma`] covers, one rounding each. Beyond that many, a further
/// accumulation rounds i's already-clipped contribution (≤ C) by at most u·C: it
/// cannot amplify the raw magnitudes.
pub const ACCUMULATIONS: usize = 256;

/// γ_n = n·u / (1 − n·u); +∞ once n·u ≥ 1 (no bound: the factor becomes 0).
pub fn gamma(n: usize, u: f64) -> f64 {
    let nu = n as f64 * u;
    if nu >= 1.0 {
        f64::INFINITY
    } else {
        nu / (1.0 - nu)
    }
}

/// The γ of an f32 clipped sum over `rows` rows (the GEMM's inner length b·t, or
/// the b rows of a weighted row sum): per term, one rounding of c_i to f32, one of
/// the scaled operand c_i·v, one of the product, at most `rows` additions in the
/// micro-batch's sum (its rows plus the output buffer it adds into), and
/// [`ACCUMULATIONS`] later accumulations across micro-batches. The count is rounded
/// up to a power of two (safe side, at most 2×): γ is then the same for a batch
/// with or without one example except at a power-of-two crossing, so adding an
/// example almost never moves the other examples' factors.
pub fn sum_gamma(rows: usize) -> f64 {
    let n = rows.saturating_add(3 + ACCUMULATIONS);
    gamma(
        n.checked_next_power_of_two().unwrap_or(usize::MAX),
        F32_UNIT,
    )
}

/// Bound (as a multiple of Σ_t ‖x_t‖‖g_t‖) on how much the f64 norm formulas can
/// underestimate ‖∇W_i‖. Ghost: each Gram entry has error ≤ γ_d‖x_s‖‖x_t‖ (resp.
/// γ_p for G), the T² products and their sum γ_{T²+1}, so the squared norm is off
/// by ≤ γ_{2(d+p)+T²+8}·E² and the norm by ≤ √γ·E (|a − b| ≤ √|a² − b²| for a, b ≥
/// 0). The instantiated form and the bias norm are within this too (their error is
/// γ_T·E, smaller). Negligible next to [`sum_gamma`] but free to include.
pub fn norm_gamma(t: usize, d: usize, p: usize) -> f64 {
    let n = 2usize
        .saturating_mul(d.saturating_add(p))
        .saturating_add(t.saturating_mul(t))
        .saturating_add(8);
    gamma(n, F64_UNIT).sqrt()
}

/// The γ of one linear layer: the f32 book-keeping sum over its b·t rows plus the
/// norm formula's own error. Both bias and weight terms use it (the bias sum
/// accumulates in f64 and is rounded once, far inside it).
///
/// `rows_cap` is a public bound on the micro-batch size (the config's): γ uses
/// max(b, rows_cap)·t, so it does not depend on how many examples Poisson sampling
/// drew, and adding one example never moves the other examples' factors.
pub fn layer_gamma(s: LinearShape, rows_cap: usize) -> f64 {
    sum_gamma(s.b.max(rows_cap).saturating_mul(s.t)) + norm_gamma(s.t, s.d, s.p)
}

/// The γ of a weighted sum of `rows` materialised rows of `cols` values (dpsgd):
/// the sum's rounding ([`sum_gamma`]) plus the row norm's f64 error γ_{cols+2}.
pub fn row_gamma(rows: usize, cols: usize) -> f64 {
    sum_gamma(rows) + gamma(cols.saturating_add(2), F64_UNIT)
}

/// Per-example rounding bounds of one linear layer: layer_gamma·(Σ_t ‖x_it‖‖g_it‖,
/// plus Σ_t ‖g_it‖ when it has a bias). In f64, like the norms.
pub fn layer_rounding_bounds(
    x: &[f32],
    g: &[f32],
    s: LinearShape,
    has_bias: bool,
    rows_cap: usize,
) -> Result<Vec<f64>> {
    s.check(x, g)?;
    let gamma = layer_gamma(s, rows_cap);
    let norm = |v: &[f32]| v.iter().map(|&a| f64::from(a).powi(2)).sum::<f64>().sqrt();
    Ok((0..s.b)
        .map(|i| {
            (0..s.t)
                .map(|t| {
                    let r = i * s.t + t;
                    let gn = norm(&g[r * s.p..(r + 1) * s.p]);
                    let xn = norm(&x[r * s.d..(r + 1) * s.d]);
                    gamma * (xn * gn + if has_bias { gn } else { 0.0 })
                })
                .sum()
        })
        .collect())
}

/// Per-example accumulators over all layers: squared gradient norms and rounding
/// bounds (both f64, both added layer by layer).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NormTotals {
    /// Σ_layers ‖∇W_il‖² (plus bias terms).
    pub sq: Recycled<f64>,
    /// Σ_layers γ_l·E_il: what the f32 clipped sums can add to example i's part.
    pub bound: Recycled<f64>,
    /// The public micro-batch bound the γ's use (see [`layer_gamma`]).
    pub rows_cap: usize,
}

impl NormTotals {
    /// `b` zeroed accumulators whose bounds use the public micro-batch bound `rows_cap`.
    pub fn zeros(b: usize, rows_cap: usize) -> Self {
        Self {
            sq: Recycled::filled(b, 0.0),
            bound: Recycled::filled(b, 0.0),
            rows_cap,
        }
    }
}

/// Clip factors c_i = min(1, C / (‖g_i‖ + E_i + 1e-6)) from per-example squared
/// norms and rounding bounds E_i summed over all layers (see the rounding-bounds
/// note above: c_i(‖g_i‖ + E_i) ≤ C bounds what the f32 sums release), and the
/// number of examples whose norm or bound is not finite (NaN or ±Inf): those get
/// c_i = 0 and drop out of every clipped sum, so the released sum still has
/// sensitivity C. A slightly negative squared norm counts as 0.
pub fn clip_factors(
    total_sq_norms: &[f64],
    bounds: &[f64],
    clip_norm: f64,
) -> Result<(Recycled<f32>, usize)> {
    if clip_norm.is_nan() || clip_norm <= 0.0 {
        return Err(Error::Config(format!(
            "clip norm C = {clip_norm} must be positive (use a value like 1.0)"
        )));
    }
    ensure_shape(bounds.len() == total_sq_norms.len(), || {
        format!(
            "{} rounding bounds for {} norms",
            bounds.len(),
            total_sq_norms.len()
        )
    })?;
    let mut non_finite = 0;
    let factors = total_sq_norms
        .iter()
        .zip(bounds)
        .map(|(&sq, &e)| {
            if !sq.is_finite() || !e.is_finite() {
                non_finite += 1;
                return 0.0;
            }
            // Same operation order as `clip_factors_f32` in kernels/clip.cu, and
            // rounded down to f32 (as its __double2float_rz): a factor rounded up
            // would let c·‖g‖ exceed C by an ulp.
            let c = (clip_norm / (sq.max(0.0).sqrt() + e.max(0.0) + CLIP_EPS)).min(1.0);
            let f = c as f32;
            if f64::from(f) > c {
                f.next_down()
            } else {
                f
            }
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
    // The scaled copy comes from the CPU backend's pool: no allocation once warm
    // (every value is written before it is read).
    let scaled = |m: &[f32], width: usize| -> Result<crate::backend::cpu::pool::HostBuf<f32>> {
        let mut out = crate::backend::Backend::output(&crate::backend::cpu::Cpu, m.len())?;
        scale_examples(&mut out, m, factors, (s.t * width).max(1));
        Ok(out)
    };
    if factors.iter().all(|&c| c == 1.0) {
        // Unclipped (nonprivate's all-ones factors): v·1 = v, so the copy is skipped.
        let gv = View::row_major(g, bt, s.p).t();
        gemm_f32(1.0, gv, View::row_major(x, bt, s.d), 1.0, out, s.d);
    } else if s.d < s.p {
        let xs = scaled(x, s.d)?;
        let gv = View::row_major(g, bt, s.p).t();
        gemm_f32(1.0, gv, View::row_major(&xs, bt, s.d), 1.0, out, s.d);
    } else {
        let gs = scaled(g, s.p)?;
        let gv = View::row_major(&gs, bt, s.p).t();
        gemm_f32(1.0, gv, View::row_major(x, bt, s.d), 1.0, out, s.d);
    }
    Ok(())
}

crate::backend::cpu::math::simd_fn! {
    /// `out = m` with example i's `per` values scaled by `factors[i]`.
    fn scale_examples(out: &mut [f32], m: &[f32], factors: &[f32], per: usize) {
        for ((o, m), &c) in out.chunks_mut(per).zip(m.chunks(per)).zip(factors) {
            for (o, &v) in o.iter_mut().zip(m) {
                *o = v * c;
            }
        }
    }
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
