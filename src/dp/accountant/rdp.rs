//! Rényi-DP accountant for the Poisson-subsampled Gaussian, compatible with Opacus.
//!
//! Per step, the RDP of order α is `ln A_α / (α − 1)` (Mironov, Talwar, Zhang 2019,
//! "Rényi Differential Privacy of the Sampled Gaussian Mechanism"):
//! - integer α: `A_α = Σ_{i=0..α} C(α,i) (1−q)^{α−i} q^i exp((i² − i) / (2σ²))`, summed in
//!   log space so α = 63 with small σ cannot overflow;
//! - fractional α: the two-sided series `A_α = A₀ + A₁` with erfc weights (their §3.3);
//! - q = 1: the plain Gaussian, `RDP(α) = α / (2σ²)`.
//!
//! RDP composes by addition over steps. The (ε, δ) conversion is Balle et al. 2020
//! ("Hypothesis testing interpretations and Rényi DP", Thm. 21), as in Opacus:
//! `ε = min_α [RDP(α) + ln((α−1)/α) − (ln δ + ln α)/(α − 1)]`.
use std::f64::consts::LN_2;

use super::special::log_erfc;
use super::{validate_delta, validate_epsilon, validate_history};
use crate::error::Result;

/// Opacus' default orders: 1.1, 1.2, …, 10.9, then 12, 13, …, 63.
///
/// The fractional orders are computed as `1 + x/10` exactly as Opacus does, so that
/// 2.0, 3.0, … hit the integer formula.
pub fn opacus_orders() -> Vec<f64> {
    (1..100)
        .map(|x| 1.0 + f64::from(x) / 10.0)
        .chain((12..64).map(f64::from))
        .collect()
}

/// Per-step RDP of order `alpha` of the Poisson-subsampled Gaussian with sampling
/// rate `q` and noise multiplier `sigma`.
///
/// Returns NaN when the fractional-order series cannot be evaluated reliably
/// (cancellation makes the partial sum negative, or it fails to converge); such an
/// order is skipped by the ε conversion, as in dp_accounting. Inputs are assumed
/// valid (`0 < q ≤ 1`, `σ > 0`, `α > 1`); the public entry points check them.
pub fn rdp_per_step(q: f64, sigma: f64, alpha: f64) -> f64 {
    if q == 1.0 {
        return alpha / (2.0 * sigma * sigma);
    }
    let log_a = if alpha.fract() == 0.0 && alpha <= f64::from(u32::MAX) {
        log_a_int(q, sigma, alpha as u32)
    } else {
        log_a_frac(q, sigma, alpha)
    };
    log_a / (alpha - 1.0)
}

/// Total RDP at each order for a history of `(q, σ, steps)` entries (composition adds).
///
/// Errors on invalid entries (see [`super::epsilon`]).
pub fn rdp_total(history: &[(f64, f64, u64)], orders: &[f64]) -> Result<Vec<f64>> {
    validate_history(history)?;
    Ok(orders
        .iter()
        .map(|&alpha| {
            history
                .iter()
                .filter(|&&(_, _, steps)| steps > 0)
                .map(|&(q, sigma, steps)| steps as f64 * rdp_per_step(q, sigma, alpha))
                .sum()
        })
        .collect())
}

/// The Balle et al. 2020 bound at one order: `RDP + ln((α−1)/α) − (ln δ + ln α)/(α−1)`.
fn eps_at_order(alpha: f64, rdp: f64, log_delta: f64) -> f64 {
    rdp + ((alpha - 1.0) / alpha).ln() - (log_delta + alpha.ln()) / (alpha - 1.0)
}

/// Converts total RDP values at `orders` into ε at `delta`, returning `(ε, best α)`.
///
/// Orders whose RDP is NaN are skipped; if all are, ε = +∞ (no guarantee). ε is
/// clamped at 0: a negative bound still certifies (0, δ)-DP.
pub fn eps_from_rdp(orders: &[f64], rdp: &[f64], delta: f64) -> (f64, f64) {
    let log_delta = delta.ln();
    let mut best = (f64::INFINITY, f64::NAN);
    for (&alpha, &r) in orders.iter().zip(rdp) {
        let eps = eps_at_order(alpha, r, log_delta);
        if eps < best.0 {
            best = (eps, alpha);
        }
    }
    (best.0.max(0.0), best.1)
}

/// Inverts the same conversion: the smallest δ over the orders for which the RDP
/// curve certifies (ε, δ)-DP, `ln δ = (α−1)(RDP − ε + ln((α−1)/α)) − ln α`, capped at 1.
pub fn delta_from_rdp(orders: &[f64], rdp: &[f64], epsilon: f64) -> f64 {
    orders
        .iter()
        .zip(rdp)
        .map(|(&alpha, &r)| {
            let log_delta =
                (alpha - 1.0) * (r - epsilon + ((alpha - 1.0) / alpha).ln()) - alpha.ln();
            log_delta.exp()
        })
        .filter(|d| !d.is_nan())
        .fold(1.0, f64::min)
}

/// ε(δ) for a history of `(q, σ, steps)` entries with Opacus' orders.
pub fn epsilon(history: &[(f64, f64, u64)], delta: f64) -> Result<f64> {
    validate_delta(delta)?;
    let orders = opacus_orders();
    let rdp = rdp_total(history, &orders)?;
    // Nothing released: exactly (0, 0)-DP, which the conversion formula cannot see.
    if releases_nothing(history) {
        return Ok(0.0);
    }
    Ok(eps_from_rdp(&orders, &rdp, delta).0)
}

/// δ(ε) for a history of `(q, σ, steps)` entries with Opacus' orders (the inverse of
/// the Balle et al. conversion; an upper bound on the true δ, often loose).
pub fn delta_for_epsilon(history: &[(f64, f64, u64)], epsilon: f64) -> Result<f64> {
    validate_epsilon(epsilon)?;
    let orders = opacus_orders();
    let rdp = rdp_total(history, &orders)?;
    if releases_nothing(history) {
        return Ok(0.0);
    }
    Ok(delta_from_rdp(&orders, &rdp, epsilon))
}

fn releases_nothing(history: &[(f64, f64, u64)]) -> bool {
    history.iter().all(|&(_, _, steps)| steps == 0)
}

/// `ln(e^a + e^b)` without overflow.
fn log_add(a: f64, b: f64) -> f64 {
    let (hi, lo) = if a >= b { (a, b) } else { (b, a) };
    if lo == f64::NEG_INFINITY {
        return hi;
    }
    hi + (lo - hi).exp().ln_1p()
}

/// `ln(e^a − e^b)` for `a ≥ b`; NaN when `a < b` (the result would be negative).
fn log_sub(a: f64, b: f64) -> f64 {
    if b == f64::NEG_INFINITY {
        return a;
    }
    if a < b {
        return f64::NAN;
    }
    if a == b {
        return f64::NEG_INFINITY;
    }
    // ln(e^a − e^b) = a + ln(1 − e^{b−a})
    a + (-(b - a).exp_m1()).ln()
}

/// `ln A_α` for integer α by log-sum-exp over the binomial expansion.
fn log_a_int(q: f64, sigma: f64, alpha: u32) -> f64 {
    let (ln_q, ln_1mq) = (q.ln(), (-q).ln_1p());
    let a = f64::from(alpha);
    let two_s2 = 2.0 * sigma * sigma;
    let mut log_binom = 0.0; // ln C(α, 0)
    let terms: Vec<f64> = (0..=alpha)
        .map(|i| {
            let i = f64::from(i);
            if i > 0.0 {
                log_binom += ((a - i + 1.0) / i).ln(); // C(α,i) = C(α,i−1)·(α−i+1)/i
            }
            log_binom + i * ln_q + (a - i) * ln_1mq + (i * i - i) / two_s2
        })
        .collect();
    let max = terms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    max + terms.iter().map(|t| (t - max).exp()).sum::<f64>().ln()
}

/// Upper limit on the fractional-order series length before the order is dropped.
const FRAC_MAX_TERMS: usize = 100_000;

/// `ln A_α` for fractional α: `A_α = Σ_i C(α,i) (t₀,ᵢ + t₁,ᵢ)` with
/// `t₀,ᵢ = q^i (1−q)^{α−i} e^{(i²−i)/2σ²} · ½erfc((i − z₀)/(√2σ))`,
/// `t₁,ᵢ = q^{α−i} (1−q)^i e^{(j²−j)/2σ²} · ½erfc((z₀ − j)/(√2σ))`, `j = α − i`,
/// `z₀ = σ² ln(1/q − 1) + ½` (Mironov et al. 2019, §3.3). The generalised binomial
/// C(α,i) changes sign for i > α, hence signed accumulation in log space.
fn log_a_frac(q: f64, sigma: f64, alpha: f64) -> f64 {
    let (ln_q, ln_1mq) = (q.ln(), (-q).ln_1p());
    let two_s2 = 2.0 * sigma * sigma;
    let sqrt2_sigma = std::f64::consts::SQRT_2 * sigma;
    let z0 = sigma * sigma * (1.0 / q - 1.0).ln() + 0.5;
    let (mut log_a0, mut log_a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let (mut log_abs_binom, mut binom_positive) = (0.0_f64, true);
    for n in 0..FRAC_MAX_TERMS {
        let i = n as f64;
        if n > 0 {
            let factor = (alpha - i + 1.0) / i;
            log_abs_binom += factor.abs().ln();
            binom_positive ^= factor < 0.0;
        }
        let j = alpha - i;
        let log_t0 = log_abs_binom + i * ln_q + j * ln_1mq;
        let log_t1 = log_abs_binom + j * ln_q + i * ln_1mq;
        let log_e0 = log_erfc((i - z0) / sqrt2_sigma) - LN_2; // ln(½ erfc)
        let log_e1 = log_erfc((z0 - j) / sqrt2_sigma) - LN_2;
        let log_s0 = log_t0 + (i * i - i) / two_s2 + log_e0;
        let log_s1 = log_t1 + (j * j - j) / two_s2 + log_e1;
        if binom_positive {
            log_a0 = log_add(log_a0, log_s0);
            log_a1 = log_add(log_a1, log_s1);
        } else {
            log_a0 = log_sub(log_a0, log_s0);
            log_a1 = log_sub(log_a1, log_s1);
        }
        if log_a0.is_nan() || log_a1.is_nan() {
            return f64::NAN;
        }
        if log_s0.max(log_s1) < -30.0 {
            return log_add(log_a0, log_a1);
        }
    }
    f64::NAN
}
