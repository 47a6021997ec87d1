//! Central finite differences in f64 for the backward ops ([`Cpu64`] runs the same
//! generic reference code as `Cpu` in double precision, so the tolerance is tight:
//! 1e-6 relative to the gradient's scale).
//!
//! Each check builds the scalar L = Σ go ⊙ f(inputs) for a random upstream gradient
//! go, and compares the op's backward with (L(x + h) − L(x − h)) / 2h for every input
//! coordinate.
//!
//! [`Cpu64`]: dualpriv::backend::cpu::Cpu64
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// The finite-difference step.
pub const H: f64 = 1e-5;
/// The tolerance, relative to the largest gradient entry (at least 1e-3).
pub const TOL: f64 = 1e-6;

/// `n` uniform values in [-scale, scale).
pub fn rand_vec(r: &mut ChaCha8Rng, n: usize, scale: f64) -> Vec<f64> {
    (0..n).map(|_| r.random_range(-scale..scale)).collect()
}

/// Σ a ⊙ b.
pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Checks `analytic[i]` = ∂L/∂inputs[i] by central differences of `loss`.
pub fn fd_check(
    name: &str,
    inputs: &[Vec<f64>],
    analytic: &[Vec<f64>],
    loss: impl Fn(&[Vec<f64>]) -> f64,
) {
    assert_eq!(inputs.len(), analytic.len());
    for (k, (x, g)) in inputs.iter().zip(analytic).enumerate() {
        assert_eq!(x.len(), g.len(), "{name}: input {k} gradient length");
        let scale = g.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-3);
        let mut worst = 0.0f64;
        for j in 0..x.len() {
            let mut p = inputs.to_vec();
            p[k][j] += H;
            let lp = loss(&p);
            p[k][j] -= 2.0 * H;
            let lm = loss(&p);
            let fd = (lp - lm) / (2.0 * H);
            let err = (fd - g[j]).abs() / scale;
            worst = worst.max(err);
            assert!(
                err < TOL,
                "{name}: input {k}[{j}]: analytic {} vs finite difference {fd} (rel err {err:e})",
                g[j]
            );
        }
        println!(
            "{name}: input {k}: worst rel err {worst:.2e} over {} coords",
            x.len()
        );
    }
}
