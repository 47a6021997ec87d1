//! The one-run ε lower bound of Steinke, Nasr & Jagielski, "Privacy Auditing
//! with One (1) Training Run" (NeurIPS 2023, arXiv 2305.08846), and the
//! loss-threshold membership-inference AUC.
//!
//! m canaries are each included with probability ½ by independent coins; the
//! auditor, from the trained model alone, guesses "in" or "out" for r of them and
//! gets v right. Under (ε, δ)-DP (the paper's Theorem 5.2 and its Algorithm 2,
//! the δ version of the bound), for every v,
//!
//! P[≥ v correct] ≤ P[Bin(r, q) ≥ v] + 2mδ · max_{1≤i≤v} P[v − i ≤ Bin(r, q) < v] / i,
//! q = e^ε / (1 + e^ε),
//!
//! so an ε whose right side is below β is rejected at confidence 1 − β; the
//! lower bound is the largest rejected ε (the right side grows with ε).
//! Binomial terms are summed in log space (no underflow at r in the thousands).

/// ln k! for k = 0..=n (summed logs: exact to ~1e-13 relative for n ≤ 1e6).
fn ln_factorials(n: usize) -> Vec<f64> {
    let mut f = Vec::with_capacity(n + 1);
    f.push(0.0);
    for k in 1..=n {
        f.push(f[k - 1] + (k as f64).ln());
    }
    f
}

/// ln P[Bin(n, q) = k] for k = 0..=n, with ln q and ln(1 − q) given (so that
/// q near 1 keeps its precision in ln(1 − q)).
fn ln_pmf_all(n: usize, ln_q: f64, ln_1mq: f64) -> Vec<f64> {
    let lf = ln_factorials(n);
    (0..=n)
        .map(|k| lf[n] - lf[k] - lf[n - k] + k as f64 * ln_q + (n - k) as f64 * ln_1mq)
        .collect()
}

/// ln Σ exp(x) over `xs` (−∞ for none).
fn ln_sum_exp(xs: &[f64]) -> f64 {
    let m = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY {
        return m;
    }
    m + xs.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
}

/// The paper's p-value: an upper bound on P[≥ v of r guesses correct] for m
/// canaries under (ε, δ)-DP. Needs v ≤ r ≤ m and ε ≥ 0, δ ∈ [0, 1].
pub fn p_value(m: usize, r: usize, v: usize, eps: f64, delta: f64) -> f64 {
    debug_assert!(v <= r && r <= m && eps >= 0.0 && (0.0..=1.0).contains(&delta));
    // q = logistic(ε): ln q = −ln(1 + e^−ε), ln(1 − q) = −ln(1 + e^ε).
    let ln_q = -(-eps).exp().ln_1p();
    let ln_1mq = if eps > 700.0 {
        -eps
    } else {
        -eps.exp().ln_1p()
    };
    let lp = ln_pmf_all(r, ln_q, ln_1mq);
    let beta = ln_sum_exp(&lp[v..]).exp();
    if delta == 0.0 || v == 0 {
        return beta.min(1.0);
    }
    // alpha = max_i P[v − i ≤ Bin < v] / i; the partial sums grow by pmf(v − i).
    let (mut alpha, mut sum) = (0.0f64, 0.0f64);
    for i in 1..=v {
        sum += lp[v - i].exp();
        alpha = alpha.max(sum / i as f64);
    }
    (beta + alpha * delta * 2.0 * m as f64).min(1.0)
}

/// The largest ε that `v` correct of `r` guesses on `m` canaries rejects at
/// significance `beta` under (ε, δ)-DP; 0 when even ε = 0 is not rejected.
/// Bisection to 1e-9 on a bracket found by doubling.
pub fn epsilon_lower_bound(m: usize, r: usize, v: usize, delta: f64, beta: f64) -> f64 {
    let rejects = |e: f64| p_value(m, r, v, e, delta) < beta;
    if !rejects(0.0) {
        return 0.0;
    }
    let (mut lo, mut hi) = (0.0, 1.0);
    while rejects(hi) {
        lo = hi;
        hi *= 2.0;
        if hi > 1e4 {
            // All-correct guesses at huge r: beyond any ε worth reporting.
            return lo;
        }
    }
    while hi - lo > 1e-9 {
        let mid = 0.5 * (lo + hi);
        if rejects(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

/// The result of guessing on one canary set.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Guesses {
    /// Guesses "in" (the k highest scores) and "out" (the k lowest).
    pub k: usize,
    /// r = 2k guesses.
    pub guesses: usize,
    /// Correct guesses v.
    pub correct: usize,
    /// The ε lower bound of (m, r, v) at the Bonferroni-corrected significance.
    pub epsilon: f64,
}

/// Guesses "in" for the `k` highest scores and "out" for the `k` lowest, ties
/// broken by index (which the coins do not depend on), and counts the correct.
/// `k` is clamped to m/2.
pub fn guess(scores: &[f64], members: &[bool], k: usize) -> (usize, usize) {
    let m = scores.len().min(members.len());
    let k = k.min(m / 2);
    let mut order: Vec<usize> = (0..m).collect();
    // NaN scores (never expected) sort lowest, so they are guessed "out".
    order.sort_by(|&a, &b| {
        let (x, y) = (scores[a], scores[b]);
        y.partial_cmp(&x)
            .unwrap_or_else(|| x.is_nan().cmp(&y.is_nan()))
            .then(a.cmp(&b))
    });
    let correct = order[..k].iter().filter(|&&i| members[i]).count()
        + order[m - k..].iter().filter(|&&i| !members[i]).count();
    (2 * k, correct)
}

/// The audit's bound over a fixed set of guess counts `ks` (chosen before the
/// scores are seen): each is tested at β / |ks| (Bonferroni), so the best of
/// them is still a lower bound at confidence 1 − β. Returns the best.
pub fn best_bound(
    scores: &[f64],
    members: &[bool],
    ks: &[usize],
    delta: f64,
    beta: f64,
) -> Guesses {
    let m = scores.len();
    let b = beta / ks.len().max(1) as f64;
    let mut best = Guesses {
        k: 0,
        guesses: 0,
        correct: 0,
        epsilon: 0.0,
    };
    for &k in ks {
        let (r, v) = guess(scores, members, k);
        let e = epsilon_lower_bound(m, r, v, delta, b);
        if best.guesses == 0 || e > best.epsilon {
            best = Guesses {
                k: r / 2,
                guesses: r,
                correct: v,
                epsilon: e,
            };
        }
    }
    best
}

/// The guess counts the audit tries for m canaries: k = m/20, m/10, m/4 and m/2
/// (each at least 1, distinct), fixed before any score exists.
pub fn default_ks(m: usize) -> Vec<usize> {
    let mut ks: Vec<usize> = [20, 10, 4, 2]
        .iter()
        .map(|d| (m / d).max(1).min(m / 2))
        .filter(|&k| k > 0)
        .collect();
    ks.dedup();
    ks
}

/// Area under the ROC curve of `scores` separating members (higher expected)
/// from non-members: the Mann–Whitney U / (n_in · n_out), ties counted ½.
/// NaN when either class is empty.
pub fn auc(scores: &[f64], members: &[bool]) -> f64 {
    let mut pairs: Vec<(f64, bool)> = scores.iter().zip(members).map(|(&s, &m)| (s, m)).collect();
    let n_in = pairs.iter().filter(|p| p.1).count();
    let n_out = pairs.len() - n_in;
    if n_in == 0 || n_out == 0 {
        return f64::NAN;
    }
    pairs.sort_by(|a, b| a.0.total_cmp(&b.0));
    // Midranks over tie groups: U = Σ rank(in) − n_in(n_in + 1)/2.
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < pairs.len() {
        let mut j = i;
        while j < pairs.len() && pairs[j].0 == pairs[i].0 {
            j += 1;
        }
        let mid = (i + 1 + j) as f64 / 2.0; // ranks i+1 ..= j
        rank_sum += mid * pairs[i..j].iter().filter(|p| p.1).count() as f64;
        i = j;
    }
    let u = rank_sum - (n_in * (n_in + 1)) as f64 / 2.0;
    u / (n_in as f64 * n_out as f64)
}
