//! Summary statistics of repeated runs: mean, sample standard deviation and the
//! Student-t confidence interval of a mean (used for the paired difference of
//! two methods over repetitions that share a repetition index).
//!
//! The t quantile inverts the CDF written through the regularized incomplete beta
//! function, `F(t; ν) = 1 − ½·I_{ν/(ν+t²)}(ν/2, ½)` for t ≥ 0 (Abramowitz & Stegun
//! 26.7.1), with `I` by the continued fraction of A&S 26.5.8 evaluated with the
//! modified Lentz method and ln Γ by the Lanczos approximation (g = 7, n = 9).

/// Mean, sample standard deviation (n − 1 in the denominator) and count.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    /// Number of values.
    pub n: usize,
    /// Arithmetic mean (NaN when empty).
    pub mean: f64,
    /// Sample standard deviation (NaN when n < 2).
    pub std: f64,
}

/// [`Summary`] of `xs`.
pub fn summary(xs: &[f64]) -> Summary {
    let n = xs.len();
    if n == 0 {
        return Summary {
            n,
            mean: f64::NAN,
            std: f64::NAN,
        };
    }
    let mean = xs.iter().sum::<f64>() / n as f64;
    let std = if n < 2 {
        f64::NAN
    } else {
        // Two-pass: the deviations are summed after the mean is known, which
        // keeps accuracy for values close together.
        (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
    };
    Summary { n, mean, std }
}

/// The median of `xs` (NaN when empty); sorts `xs` in place.
pub fn median(xs: &mut [f64]) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        0.5 * (xs[n / 2 - 1] + xs[n / 2])
    }
}

/// A two-sided confidence interval of a mean.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Interval {
    /// The mean of the values.
    pub mean: f64,
    /// Lower end.
    pub lo: f64,
    /// Upper end.
    pub hi: f64,
    /// Number of values.
    pub n: usize,
}

/// The `level` (e.g. 0.95) two-sided Student-t interval of the mean of `xs`:
/// mean ± t_{(1+level)/2, n−1} · s/√n. `None` with fewer than two values.
pub fn t_interval(xs: &[f64], level: f64) -> Option<Interval> {
    let s = summary(xs);
    if s.n < 2 || !(0.0..1.0).contains(&level) {
        return None;
    }
    let half = t_quantile(0.5 + level / 2.0, (s.n - 1) as f64) * s.std / (s.n as f64).sqrt();
    Some(Interval {
        mean: s.mean,
        lo: s.mean - half,
        hi: s.mean + half,
        n: s.n,
    })
}

/// Paired differences `a[i] − b[i]` over the keys both sides have, in key order:
/// `a` and `b` are (key, value) lists, e.g. (repetition index, accuracy).
pub fn paired_differences(a: &[(u32, f64)], b: &[(u32, f64)]) -> Vec<(u32, f64)> {
    let mut out: Vec<(u32, f64)> = a
        .iter()
        .filter_map(|&(k, x)| b.iter().find(|&&(j, _)| j == k).map(|&(_, y)| (k, x - y)))
        .collect();
    out.sort_by_key(|&(k, _)| k);
    out.dedup_by_key(|&mut (k, _)| k);
    out
}

/// ln Γ(x) for x > 0 (Lanczos, g = 7, 9 terms; relative error below 1e-14).
pub fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection: Γ(x)Γ(1−x) = π / sin(πx).
        return (std::f64::consts::PI / (std::f64::consts::PI * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = C[0];
    let t = x + G + 0.5;
    for (i, &c) in C.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// The regularized incomplete beta function I_x(a, b), a, b > 0, x ∈ [0, 1].
pub fn inc_beta(x: f64, a: f64, b: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let front =
        (ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln()).exp();
    // The continued fraction converges fast for x < (a+1)/(a+b+2); use the
    // symmetry I_x(a,b) = 1 − I_{1−x}(b,a) on the other side.
    if x < (a + 1.0) / (a + b + 2.0) {
        front * beta_cf(x, a, b) / a
    } else {
        1.0 - front * beta_cf(1.0 - x, b, a) / b
    }
}

/// The continued fraction of I_x(a, b) (A&S 26.5.8), modified Lentz.
fn beta_cf(x: f64, a: f64, b: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let mut c = 1.0;
    let mut d = 1.0 - (a + b) * x / (a + 1.0);
    if d.abs() < TINY {
        d = TINY;
    }
    d = 1.0 / d;
    let mut h = d;
    for m in 1..=300 {
        let m = f64::from(m);
        // Even step d_{2m}, then odd step d_{2m+1}.
        for num in [
            m * (b - m) * x / ((a + 2.0 * m - 1.0) * (a + 2.0 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2.0 * m) * (a + 2.0 * m + 1.0)),
        ] {
            d = 1.0 + num * d;
            if d.abs() < TINY {
                d = TINY;
            }
            c = 1.0 + num / c;
            if c.abs() < TINY {
                c = TINY;
            }
            d = 1.0 / d;
            h *= d * c;
        }
        if (d * c - 1.0).abs() < 1e-16 {
            break;
        }
    }
    h
}

/// The CDF of Student's t distribution with `df` degrees of freedom.
pub fn t_cdf(t: f64, df: f64) -> f64 {
    let tail = 0.5 * inc_beta(df / (df + t * t), df / 2.0, 0.5);
    if t >= 0.0 {
        1.0 - tail
    } else {
        tail
    }
}

/// The `p`-quantile of Student's t with `df` degrees of freedom, p ∈ (0, 1):
/// bisection on [`t_cdf`] to within 1e-13 relative.
pub fn t_quantile(p: f64, df: f64) -> f64 {
    if !(p > 0.0 && p < 1.0 && df > 0.0) {
        return f64::NAN;
    }
    if p < 0.5 {
        return -t_quantile(1.0 - p, df);
    }
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    while t_cdf(hi, df) < p {
        hi *= 2.0;
        if hi > 1e300 {
            return f64::INFINITY;
        }
    }
    for _ in 0..2000 {
        let mid = 0.5 * (lo + hi);
        if t_cdf(mid, df) < p {
            lo = mid;
        } else {
            hi = mid;
        }
        if hi - lo <= 1e-13 * hi {
            break;
        }
    }
    0.5 * (lo + hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Exact closed forms: ν = 1 is Cauchy (t = tan(π(p − ½))); ν = 2 has
    /// t = (2p − 1)·√(2 / (4p(1 − p))).
    #[test]
    fn t_quantile_matches_closed_forms() {
        for p in [0.6, 0.9, 0.975, 0.995] {
            let cauchy = (std::f64::consts::PI * (p - 0.5)).tan();
            assert!(
                (t_quantile(p, 1.0) - cauchy).abs() < 1e-9 * cauchy,
                "ν=1 p={p}"
            );
            let two = (2.0 * p - 1.0) * (2.0 / (4.0 * p * (1.0 - p))).sqrt();
            assert!((t_quantile(p, 2.0) - two).abs() < 1e-10 * two, "ν=2 p={p}");
        }
        assert!((t_quantile(0.025, 2.0) + 4.302_652_729_749_461).abs() < 1e-9);
    }

    #[test]
    fn summary_of_known_values() {
        // 2, 4, 4, 4, 5, 5, 7, 9: mean 5, sum of squared deviations 32, s² = 32/7.
        let s = summary(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]);
        assert_eq!(s.n, 8);
        assert!((s.mean - 5.0).abs() < 1e-15);
        assert!((s.std - (32.0f64 / 7.0).sqrt()).abs() < 1e-15);
        assert!(summary(&[1.0]).std.is_nan());
        assert!(summary(&[]).mean.is_nan());
        assert!(t_interval(&[1.0], 0.95).is_none());
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&mut []).is_nan());
    }

    #[test]
    fn pairs_by_key() {
        let a = [(2, 0.5), (0, 0.7), (1, 0.6)];
        let b = [(1, 0.4), (0, 0.6), (3, 0.1)];
        let d = paired_differences(&a, &b);
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].0, 0);
        assert!((d[0].1 - 0.1).abs() < 1e-12 && (d[1].1 - 0.2).abs() < 1e-12);
    }

    #[test]
    fn ln_gamma_of_integers_and_half() {
        // Γ(n) = (n−1)!, Γ(½) = √π.
        let mut fact = 1.0f64;
        for n in 1..20 {
            assert!((ln_gamma(f64::from(n)) - fact.ln()).abs() < 1e-12, "n={n}");
            fact *= f64::from(n);
        }
        assert!((ln_gamma(0.5) - std::f64::consts::PI.sqrt().ln()).abs() < 1e-13);
    }
}
