//! Privacy-loss-distribution (PLD) accountant for the Poisson-subsampled Gaussian,
//! in the style of Google's dp_accounting (0.6.0): pessimistic "connect-the-dots"
//! discretisation, FFT self-composition with Chernoff tail truncation, and separate
//! distributions for the remove and add directions (ε is the max of the two).
//!
//! **The mechanism.** With noise N(0, σ²) and sensitivity 1, one step is a pair of
//! distributions (P, Q); the privacy loss is `L(x) = ln(P(x)/Q(x))` for x ~ P, and
//! (ε, δ)-DP holds iff the hockey-stick divergence
//! `δ(ε) = E_P[(1 − e^{ε − L})₊] ≤ δ`. For Poisson sampling at rate q
//! (Zhu, Dong, Wang 2022, "Optimal accounting of differential privacy via
//! characteristic function", §5):
//! - remove: `P = (1−q)N(0,σ²) + qN(−1,σ²)`, `Q = N(0,σ²)`;
//! - add: `P = N(0,σ²)`, `Q = (1−q)N(0,σ²) + qN(1,σ²)`.
//!
//! Both hockey-stick curves reduce to the Gaussian one, `δ_G(y) = Φ(μ/2 − y/μ) −
//! e^y Φ(−μ/2 − y/μ)` with `μ = 1/σ` (Balle & Wang 2018, Thm. 8):
//! - remove: `δ_R(ε) = q·δ_G(ln(1 + (e^ε − 1)/q))` for `ε > ln(1−q)`, else `1 − e^ε`;
//! - add: `δ_A(ε) = q·e^{ε−y}·δ_G(y)`, `y = −ln(1 − (1 − e^{−ε})/q)`, for
//!   `ε < −ln(1−q)`, else 0.
//!
//! **Discretisation** (Doroshenko, Ghazi, Kamath, Kumar, Manurangsi 2022, "Connect the
//! dots", Alg. 1): on the grid εᵢ = i·h spanning the losses of all but e^{−50} of the
//! noise mass, put probability on εᵢ (and +∞) so that the discrete PLD's hockey-stick
//! curve equals δ(εᵢ) at every grid point and is linear in e^ε between them. Since
//! δ(ε) is convex in e^ε this dominates the true curve: an upper bound on δ, and
//! composing dominating PLDs dominates the composition.
//!
//! **Composition**: T-fold self-convolution by FFT, raising the spectrum to the T-th
//! power; the output window is cut by a Chernoff bound so that at most `tail_mass` is
//! lost, which is added to the +∞ mass (pessimistic).
use std::sync::OnceLock;

use rustfft::num_complex::Complex64;
use rustfft::FftPlanner;

use super::special::log_norm_cdf;
use super::{validate_delta, validate_epsilon, validate_history};
use crate::error::{Error, Result};

/// ln of the noise mass left out of the discretised grid (as dp_accounting's
/// `log_mass_truncation_bound`); it is put at +∞ loss, so it only adds to δ.
const LOG_MASS_TRUNCATION: f64 = -50.0;

/// Largest number of points in any discretised PLD or FFT buffer (2²³ ≈ 8.4 M, about
/// 134 MB of complex workspace). Beyond it ε is enormous anyway.
pub const MAX_POINTS: usize = 1 << 23;

/// Options of the PLD accountant.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PldOptions {
    /// Grid spacing h of the privacy loss (dp_accounting's
    /// `value_discretization_interval`). Default 1e-4; must be in (0, 1].
    pub discretization: f64,
    /// Probability mass each composition may truncate from the tails (moved to +∞,
    /// pessimistic). Default 1e-15; must be in [0, 1e-6]. δ must exceed it.
    pub tail_mass: f64,
}

impl Default for PldOptions {
    fn default() -> Self {
        Self {
            discretization: 1e-4,
            tail_mass: 1e-15,
        }
    }
}

impl PldOptions {
    fn validate(&self) -> Result<()> {
        if !(self.discretization > 0.0 && self.discretization <= 1.0) {
            return Err(Error::Config(format!(
                "PLD discretization = {} is out of range: it must lie in (0, 1]",
                self.discretization
            )));
        }
        if !(self.tail_mass >= 0.0 && self.tail_mass <= 1e-6) {
            return Err(Error::Config(format!(
                "PLD tail mass = {} is out of range: it must lie in [0, 1e-6]",
                self.tail_mass
            )));
        }
        Ok(())
    }
}

/// A discretised privacy-loss distribution: mass `probs[i]` at loss `(offset + i)·h`
/// and `inf_mass` at +∞.
#[derive(Clone, Debug)]
pub struct DiscretePld {
    h: f64,
    offset: i64,
    probs: Vec<f64>,
    inf_mass: f64,
}

impl DiscretePld {
    /// The PLD of no mechanism: all mass at loss 0.
    fn identity(h: f64) -> Self {
        Self {
            h,
            offset: 0,
            probs: vec![1.0],
            inf_mass: 0.0,
        }
    }

    /// Mass at +∞ loss (a floor on δ: no ε is certified for smaller δ).
    pub fn inf_mass(&self) -> f64 {
        self.inf_mass
    }

    /// Number of grid points.
    pub fn len(&self) -> usize {
        self.probs.len()
    }

    /// Whether the finite part is empty (never, for distributions built here).
    pub fn is_empty(&self) -> bool {
        self.probs.is_empty()
    }

    fn loss(&self, i: usize) -> f64 {
        (self.offset + i as i64) as f64 * self.h
    }

    /// Hockey-stick divergence `δ(ε) = p∞ + Σ_{Lᵢ > ε} pᵢ (1 − e^{ε − Lᵢ})`.
    pub fn delta_for_epsilon(&self, epsilon: f64) -> f64 {
        let finite: f64 = (0..self.probs.len())
            .rev()
            .map(|i| (self.loss(i), self.probs[i]))
            .take_while(|&(l, _)| l > epsilon)
            .map(|(l, p)| -(epsilon - l).exp_m1() * p)
            .sum();
        (self.inf_mass + finite).min(1.0)
    }

    /// Smallest ε ≥ 0 with δ(ε) ≤ `delta`; +∞ if `delta` is below the mass at +∞.
    ///
    /// On [L_{k−1}, L_k], δ(ε) = U_k − e^{ε − L_k}·W_k with U_k = p∞ + Σ_{j≥k} pⱼ and
    /// W_k = Σ_{j≥k} pⱼ e^{L_k − Lⱼ} (scaled to L_k so it never overflows); scan k
    /// downwards until δ(L_{k−1}) ≥ δ and solve for ε on that segment.
    pub fn epsilon_for_delta(&self, delta: f64) -> f64 {
        if self.inf_mass > delta {
            return f64::INFINITY;
        }
        let decay = (-self.h).exp();
        let (mut u, mut w) = (self.inf_mass, 0.0);
        for k in (0..self.probs.len()).rev() {
            let l_k = self.loss(k);
            w = w * decay + self.probs[k];
            u += self.probs[k];
            // Root of δ(ε) = δ lies in [L_{k−1}, L_k] iff δ(L_{k−1}) ≥ δ.
            if w > 0.0 && u - decay * w >= delta {
                return (l_k + ((u - delta) / w).ln()).max(0.0);
            }
            if l_k - self.h <= 0.0 {
                return 0.0; // δ(0) ≤ δ already
            }
        }
        // Below the lowest loss the curve continues as U − e^{ε−L₀}W.
        if u > delta && w > 0.0 {
            (self.loss(0) + ((u - delta) / w).ln()).max(0.0)
        } else {
            0.0
        }
    }
}

/// The two directions of add/remove adjacency; ε and δ are their maxima.
#[derive(Clone, Debug)]
pub struct Pld {
    remove: DiscretePld,
    /// `None` when every entry has q = 1 (the two directions coincide).
    add: Option<DiscretePld>,
}

impl Pld {
    /// ε(δ): max over the add and remove directions.
    pub fn epsilon_for_delta(&self, delta: f64) -> f64 {
        let eps = self.remove.epsilon_for_delta(delta);
        self.add
            .as_ref()
            .map_or(eps, |a| eps.max(a.epsilon_for_delta(delta)))
    }

    /// δ(ε): max over the add and remove directions.
    pub fn delta_for_epsilon(&self, epsilon: f64) -> f64 {
        let d = self.remove.delta_for_epsilon(epsilon);
        self.add
            .as_ref()
            .map_or(d, |a| d.max(a.delta_for_epsilon(epsilon)))
    }

    /// The remove-direction distribution.
    pub fn remove(&self) -> &DiscretePld {
        &self.remove
    }

    /// The add-direction distribution (the remove one when all q = 1).
    pub fn add(&self) -> &DiscretePld {
        self.add.as_ref().unwrap_or(&self.remove)
    }
}

/// ε(δ) of a history of `(q, σ, steps)` entries (see [`super::epsilon`]).
pub fn epsilon(history: &[(f64, f64, u64)], delta: f64, opts: &PldOptions) -> Result<f64> {
    validate_delta(delta)?;
    opts.validate()?;
    if delta <= opts.tail_mass {
        return Err(Error::Config(format!(
            "delta = {delta} must exceed the PLD tail-mass bound {}",
            opts.tail_mass
        )));
    }
    Ok(compose(history, opts)?.epsilon_for_delta(delta))
}

/// δ(ε) of a history of `(q, σ, steps)` entries (see [`super::delta_for_epsilon`]).
pub fn delta_for_epsilon(
    history: &[(f64, f64, u64)],
    epsilon: f64,
    opts: &PldOptions,
) -> Result<f64> {
    validate_epsilon(epsilon)?;
    Ok(compose(history, opts)?.delta_for_epsilon(epsilon))
}

/// Builds the composed PLD of a history of `(q, σ, steps)` entries.
pub fn compose(history: &[(f64, f64, u64)], opts: &PldOptions) -> Result<Pld> {
    validate_history(history)?;
    opts.validate()?;
    let h = opts.discretization;
    let mut remove = DiscretePld::identity(h);
    let mut add: Option<DiscretePld> = None;
    for &(q, sigma, steps) in history.iter().filter(|e| e.2 > 0) {
        let step_remove = single_step(q, sigma, Direction::Remove, h)?;
        let step_add = if q < 1.0 {
            Some(single_step(q, sigma, Direction::Add, h)?)
        } else {
            None
        };
        // The add side diverges from the remove side at the first q < 1 entry.
        if add.is_none() && step_add.is_some() {
            add = Some(remove.clone());
        }
        if let Some(a) = add.as_mut() {
            let step = step_add.as_ref().unwrap_or(&step_remove);
            *a = convolve(
                a,
                &self_compose(step, steps, opts.tail_mass)?,
                opts.tail_mass,
            )?;
        }
        remove = convolve(
            &remove,
            &self_compose(&step_remove, steps, opts.tail_mass)?,
            opts.tail_mass,
        )?;
    }
    Ok(Pld { remove, add })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    Remove,
    Add,
}

/// `ln δ_G(y)` for the Gaussian with `μ = 1/σ`: `ln[Φ(a) − e^y Φ(b)]`,
/// `a = μ/2 − y/μ`, `b = −μ/2 − y/μ`, as `A + ln(−expm1(B − A))` to keep tiny values.
fn log_gaussian_delta(mu: f64, y: f64) -> f64 {
    let a = log_norm_cdf(mu / 2.0 - y / mu);
    let b = y + log_norm_cdf(-mu / 2.0 - y / mu);
    if b >= a {
        return f64::NEG_INFINITY;
    }
    a + (-(b - a).exp_m1()).ln()
}

/// Hockey-stick divergence δ(ε) of one step of the subsampled Gaussian.
fn step_delta(q: f64, sigma: f64, dir: Direction, eps: f64) -> f64 {
    let mu = 1.0 / sigma;
    let ln_q = q.ln();
    let delta = match dir {
        Direction::Remove => {
            if q < 1.0 && eps <= (-q).ln_1p() {
                return -eps.exp_m1();
            }
            // y = ln(1 + (e^ε − 1)/q), written to survive large ε.
            let y = if eps > 1.0 {
                eps - ln_q + (-(1.0 - q) * (-eps).exp()).ln_1p()
            } else {
                (eps.exp_m1() / q).ln_1p()
            };
            (ln_q + log_gaussian_delta(mu, y)).exp()
        }
        Direction::Add => {
            if q < 1.0 && eps >= -(-q).ln_1p() {
                return 0.0;
            }
            // y = −ln(1 + (e^{−ε} − 1)/q), written to survive very negative ε.
            let y = if eps < -1.0 {
                eps + ln_q - (-(1.0 - q) * eps.exp()).ln_1p()
            } else {
                -((-eps).exp_m1() / q).ln_1p()
            };
            (ln_q + eps - y + log_gaussian_delta(mu, y)).exp()
        }
    };
    delta.clamp(0.0, 1.0)
}

/// `ln(1 − q + q·e^b)`, the log-likelihood ratio of a q-mixture.
fn log_mix(q: f64, b: f64) -> f64 {
    if q == 1.0 {
        return b;
    }
    let (x, y) = ((-q).ln_1p(), q.ln() + b);
    let hi = x.max(y);
    hi + (-(x - y).abs()).exp().ln_1p()
}

/// Privacy loss at output x (decreasing in x).
fn step_loss(q: f64, sigma: f64, dir: Direction, x: f64) -> f64 {
    let s2 = sigma * sigma;
    match dir {
        Direction::Remove => log_mix(q, (-0.5 - x) / s2),
        Direction::Add => -log_mix(q, (x - 0.5) / s2),
    }
}

/// z with Φ(z) = ½·e^{LOG_MASS_TRUNCATION}, by bisection on ln Φ (≈ −9.74).
fn truncation_quantile() -> f64 {
    static Z: OnceLock<f64> = OnceLock::new();
    *Z.get_or_init(|| {
        let target = 0.5f64.ln() + LOG_MASS_TRUNCATION;
        let (mut lo, mut hi) = (-40.0, 0.0);
        for _ in 0..200 {
            let mid = 0.5 * (lo + hi);
            if log_norm_cdf(mid) < target {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        0.5 * (lo + hi)
    })
}

fn too_large(n: f64, what: &str) -> Error {
    Error::Config(format!(
        "PLD {what} would need {n:.3e} points, over the limit {MAX_POINTS}: epsilon is \
         enormous here; increase sigma, use a coarser discretization, or use the RDP \
         accountant"
    ))
}

/// Connect-the-dots discretisation of one step.
fn single_step(q: f64, sigma: f64, dir: Direction, h: f64) -> Result<DiscretePld> {
    // Outputs beyond [x_lo, x_hi] carry < e^{−50} of P's mass (both mixture parts).
    let z = truncation_quantile() * sigma;
    let (x_lo, x_hi) = match dir {
        Direction::Remove => (z - 1.0, -z),
        Direction::Add => (z, 1.0 - z),
    };
    let (eps_hi, eps_lo) = (
        step_loss(q, sigma, dir, x_lo),
        step_loss(q, sigma, dir, x_hi),
    );
    let (i_lo, i_hi) = ((eps_lo / h).floor(), (eps_hi / h).ceil());
    let n = i_hi - i_lo + 1.0;
    if n.is_nan() || n > MAX_POINTS as f64 {
        return Err(too_large(n, "discretization of one step"));
    }
    let (i_lo, n) = (i_lo as i64, n as usize);
    // δ at the grid points, forced non-increasing against round-off.
    let mut deltas: Vec<f64> = (0..n)
        .map(|k| step_delta(q, sigma, dir, (i_lo + k as i64) as f64 * h))
        .collect();
    for k in 1..n {
        deltas[k] = deltas[k].min(deltas[k - 1]);
    }
    if n == 1 {
        return Ok(DiscretePld {
            h,
            offset: i_lo,
            probs: vec![1.0 - deltas[0]],
            inf_mass: deltas[0],
        });
    }
    // Masses making the discrete curve pass through every (εᵢ, δᵢ), linear in e^ε
    // between them: with Δᵢ = δᵢ − δᵢ₊₁ ≥ 0 and g = e^h − 1,
    //   p₀ = 1 − δ₀ − Δ₀/g,   pᵢ = (e^h Δᵢ₋₁ − Δᵢ)/g,   p_{n−1} = e^h Δ_{n−2}/g,
    // and δ_{n−1} at +∞.
    let g = h.exp_m1();
    let eh = h.exp();
    let drop = |i: usize| deltas[i] - deltas[i + 1];
    let probs: Vec<f64> = (0..n)
        .map(|i| {
            let p = if i == 0 {
                1.0 - deltas[0] - drop(0) / g
            } else if i == n - 1 {
                eh * drop(n - 2) / g
            } else {
                (eh * drop(i - 1) - drop(i)) / g
            };
            p.max(0.0)
        })
        .collect();
    Ok(DiscretePld {
        h,
        offset: i_lo,
        probs,
        inf_mass: deltas[n - 1],
    })
}

/// Smallest length ≥ n whose prime factors are 2, 3, 5, 7 (fast for rustfft).
fn fast_len(n: usize) -> usize {
    (n.max(1)..)
        .find(|&m| {
            let mut r = m;
            for p in [2, 3, 5, 7] {
                while r % p == 0 {
                    r /= p;
                }
            }
            r == 1
        })
        .expect("smooth numbers are unbounded")
}

/// Chernoff upper bound on the T-fold sum of indices (0-based) of `probs`, leaving
/// leaves at most `e^{−c}` of the mass above it: `P(S ≥ s) ≤ e^{T·K(λ) − λs}` with
/// `K(λ) = ln Σ pᵢ e^{λi}`, so `s = min_{λ>0} (T·K(λ) + c)/λ`.
fn chernoff_upper(probs: &[f64], steps: u64, c: f64) -> f64 {
    let t = steps as f64;
    let n = probs.len() as f64;
    let top = probs.iter().rposition(|&x| x > 0.0).unwrap_or(0) as f64;
    // K(λ) and K'(λ), referenced to the top index so every exponent is ≤ 0.
    let k_and_slope = |lambda: f64| {
        let (mut s, mut s1) = (0.0, 0.0);
        for (i, &p) in probs.iter().enumerate() {
            if p > 0.0 {
                let w = p * (lambda * (i as f64 - top)).exp();
                s += w;
                s1 += w * i as f64;
            }
        }
        (lambda * top + s.ln(), s1 / s)
    };
    let bound = |lambda: f64| (t * k_and_slope(lambda).0 + c) / lambda;
    // The bound is unimodal in λ: its derivative has the sign of T(λK' − K) − c,
    // which increases with λ (K is convex). Bisect on that sign in ln λ.
    let (mut lo, mut hi) = ((1e-6 / n).ln(), (1e3 / n).ln());
    for _ in 0..30 {
        let mid = 0.5 * (lo + hi);
        let lambda = mid.exp();
        let (k, slope) = k_and_slope(lambda);
        if t * (lambda * slope - k) < c {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    bound(lo.exp()).min(bound(hi.exp()))
}

/// Index window `[lo, hi]` of the T-fold sum of indices that holds all but
/// `tail_mass` of the mass (τ/2 per side, by [`chernoff_upper`] on the PMF and on
/// its mirror image).
fn chernoff_window(probs: &[f64], steps: u64, tail_mass: f64) -> (u64, u64) {
    let max_index = (probs.len() as u64 - 1).saturating_mul(steps);
    if tail_mass == 0.0 || probs.len() == 1 {
        return (0, max_index);
    }
    let c = (2.0 / tail_mass).ln();
    let to_index = |b: f64| {
        if b.is_finite() {
            (b.ceil().max(0.0) as u64).min(max_index)
        } else {
            max_index
        }
    };
    let hi = to_index(chernoff_upper(probs, steps, c));
    let mirrored: Vec<f64> = probs.iter().rev().copied().collect();
    let lo = max_index - to_index(chernoff_upper(&mirrored, steps, c));
    (lo.min(hi), hi)
}

/// `z^n` by repeated squaring (relative error grows like log n, not n).
fn cpow(mut z: Complex64, mut n: u64) -> Complex64 {
    let mut acc = Complex64::new(1.0, 0.0);
    while n > 0 {
        if n & 1 == 1 {
            acc *= z;
        }
        z *= z;
        n >>= 1;
    }
    acc
}

/// T-fold composition of a PLD with itself by FFT.
fn self_compose(pld: &DiscretePld, steps: u64, tail_mass: f64) -> Result<DiscretePld> {
    if steps == 1 {
        return Ok(pld.clone());
    }
    let n = pld.probs.len();
    let (lo, hi) = chernoff_window(&pld.probs, steps, tail_mass);
    let out_len = (hi - lo).saturating_add(1);
    // The loss offset T·offset + lo must also fit (T can be absurdly large).
    let offset = i64::try_from(steps)
        .ok()
        .and_then(|t| pld.offset.checked_mul(t))
        .and_then(|o| o.checked_add(i64::try_from(lo).ok()?));
    let (Some(offset), true) = (offset, out_len <= MAX_POINTS as u64 && n <= MAX_POINTS) else {
        return Err(too_large(
            out_len as f64,
            &format!("composition over {steps} steps"),
        ));
    };
    let out_len = out_len as usize;
    // The cyclic length only needs to hold the window: mass outside it (≤ τ) aliases
    // into the window, which the τ added to +∞ covers.
    let len = fast_len(out_len.max(n));
    let mut buf: Vec<Complex64> = pld
        .probs
        .iter()
        .map(|&p| Complex64::new(p, 0.0))
        .chain(std::iter::repeat(Complex64::new(0.0, 0.0)))
        .take(len)
        .collect();
    let mut planner = FftPlanner::<f64>::new();
    planner.plan_fft_forward(len).process(&mut buf);
    for z in buf.iter_mut() {
        *z = cpow(*z, steps);
    }
    planner.plan_fft_inverse(len).process(&mut buf);
    let scale = 1.0 / len as f64;
    let start = (lo % len as u64) as usize;
    let probs: Vec<f64> = (0..out_len)
        .map(|k| (buf[(start + k) % len].re * scale).max(0.0))
        .collect();
    // 1 − (1 − p∞)^T, stably, plus the truncated tails.
    let inf_mass = (-(steps as f64 * (-pld.inf_mass).ln_1p()).exp_m1() + tail_mass).min(1.0);
    Ok(DiscretePld {
        h: pld.h,
        offset,
        probs,
        inf_mass,
    })
}

/// Composition of two PLDs (linear convolution by FFT), then dropping at most τ/2 of
/// mass from each end: the left tail is folded into the first kept point, the right
/// tail moved to +∞ (both pessimistic).
fn convolve(a: &DiscretePld, b: &DiscretePld, tail_mass: f64) -> Result<DiscretePld> {
    if a.probs.len() == 1 && a.probs[0] == 1.0 && a.offset == 0 && a.inf_mass == 0.0 {
        return Ok(b.clone()); // identity
    }
    let out_len = a.probs.len() + b.probs.len() - 1;
    if out_len > MAX_POINTS {
        return Err(too_large(out_len as f64, "composition of history entries"));
    }
    let len = fast_len(out_len);
    let spectrum = |p: &[f64], planner: &mut FftPlanner<f64>| {
        let mut v: Vec<Complex64> = p
            .iter()
            .map(|&x| Complex64::new(x, 0.0))
            .chain(std::iter::repeat(Complex64::new(0.0, 0.0)))
            .take(len)
            .collect();
        planner.plan_fft_forward(len).process(&mut v);
        v
    };
    let mut planner = FftPlanner::<f64>::new();
    let mut buf = spectrum(&a.probs, &mut planner);
    let sb = spectrum(&b.probs, &mut planner);
    for (x, y) in buf.iter_mut().zip(&sb) {
        *x *= y;
    }
    planner.plan_fft_inverse(len).process(&mut buf);
    let scale = 1.0 / len as f64;
    let mut probs: Vec<f64> = buf[..out_len]
        .iter()
        .map(|z| (z.re * scale).max(0.0))
        .collect();
    // Tail truncation.
    let half = tail_mass / 2.0;
    let (mut left, mut left_mass) = (0, 0.0);
    while left + 1 < probs.len() && left_mass + probs[left] <= half {
        left_mass += probs[left];
        left += 1;
    }
    let (mut right, mut right_mass) = (probs.len(), 0.0);
    while right > left + 1 && right_mass + probs[right - 1] <= half {
        right_mass += probs[right - 1];
        right -= 1;
    }
    probs.truncate(right);
    probs.drain(..left);
    probs[0] += left_mass;
    let inf_mass = (a.inf_mass + b.inf_mass - a.inf_mass * b.inf_mass + right_mass).min(1.0);
    Ok(DiscretePld {
        h: a.h,
        offset: a.offset + b.offset + left as i64,
        probs,
        inf_mass,
    })
}
