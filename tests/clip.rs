//! Per-example norms and book-keeping clipped sums: ghost vs instantiated vs brute
//! force on the CPU, sensitivity, and the CUDA kernels against the CPU reference.
mod common;
use common::{max_abs, rel, rel_err, rng, uniform};
use dualpriv::dp::clip::*;

/// Brute force: materialise every ∇W_i = G_iᵀ X_i (p×d) in f64.
fn per_example_grads(x: &[f32], g: &[f32], s: LinearShape) -> Vec<Vec<f64>> {
    (0..s.b)
        .map(|i| {
            let mut w = vec![0.0f64; s.p * s.d];
            for t in 0..s.t {
                for o in 0..s.p {
                    let gv = g[(i * s.t + t) * s.p + o] as f64;
                    for j in 0..s.d {
                        w[o * s.d + j] += gv * x[(i * s.t + t) * s.d + j] as f64;
                    }
                }
            }
            w
        })
        .collect()
}

/// Shapes on both sides of the 2T² = p·d crossover, plus degenerate ones.
fn shapes() -> Vec<LinearShape> {
    let sh = |b, t, d, p| LinearShape { b, t, d, p };
    vec![
        sh(3, 1, 1, 1),
        sh(2, 1, 7, 5),
        sh(2, 5, 1, 9),
        sh(2, 6, 8, 1),
        sh(4, 4, 33, 17),  // ghost: 32 < 561
        sh(3, 40, 9, 11),  // instantiated: 3200 > 99
        sh(2, 8, 16, 8),   // exactly at the crossover: 2*64 = 128 = p*d -> instantiated
        sh(2, 37, 70, 45), // several tiles, ragged edges
        sh(1, 65, 3, 2),
    ]
}

#[test]
fn ghost_instantiated_and_brute_force_norms_agree() {
    let mut r = rng(1);
    for s in shapes() {
        let x = uniform(&mut r, s.b * s.t * s.d);
        let g = uniform(&mut r, s.b * s.t * s.p);
        let ghost = ghost_sq_norms(&x, &g, s).unwrap();
        let inst = instantiated_sq_norms(&x, &g, s).unwrap();
        let brute: Vec<f64> = per_example_grads(&x, &g, s)
            .iter()
            .map(|w| w.iter().map(|v| v * v).sum())
            .collect();
        for i in 0..s.b {
            assert!(
                rel(ghost[i], brute[i]) < 1e-5,
                "{s:?} ghost {} vs {}",
                ghost[i],
                brute[i]
            );
            assert!(
                rel(inst[i], brute[i]) < 1e-5,
                "{s:?} inst {} vs {}",
                inst[i],
                brute[i]
            );
        }
        // Bias: ‖Σ_t G_i,t‖².
        let bias = bias_sq_norms(&g, s).unwrap();
        for i in 0..s.b {
            let mut col = vec![0.0f64; s.p];
            for t in 0..s.t {
                for o in 0..s.p {
                    col[o] += g[(i * s.t + t) * s.p + o] as f64;
                }
            }
            let want: f64 = col.iter().map(|v| v * v).sum();
            assert!(rel(bias[i], want) < 1e-9);
        }
    }
}

#[test]
fn mixed_rule_picks_the_cheaper_form() {
    let s = |t, d, p| LinearShape { b: 1, t, d, p };
    assert_eq!(s(4, 33, 17).preferred_method(), NormMethod::Ghost);
    assert_eq!(s(40, 9, 11).preferred_method(), NormMethod::Instantiated);
    assert_eq!(s(8, 16, 8).preferred_method(), NormMethod::Instantiated);
    assert_eq!(s(7, 16, 8).preferred_method(), NormMethod::Ghost);
    // llava-7b q_proj with 576 visual + 99 text tokens: 2·675² < 4096².
    assert_eq!(s(675, 4096, 4096).preferred_method(), NormMethod::Ghost);
}

#[test]
fn bk_clipped_sum_equals_brute_force() {
    let mut r = rng(2);
    for s in shapes() {
        let x = uniform(&mut r, s.b * s.t * s.d);
        let g = uniform(&mut r, s.b * s.t * s.p);
        let norms = layer_sq_norms(&x, &g, s, s.preferred_method(), false).unwrap();
        let bounds = layer_rounding_bounds(&x, &g, s, false, s.b).unwrap();
        let (c, _) = clip_factors(&norms, &bounds, 0.5).unwrap();
        let mut got = vec![0.0f32; s.p * s.d];
        clipped_weight_sum(&x, &g, &c, s, &mut got).unwrap();
        let mut want = vec![0.0f64; s.p * s.d];
        for (i, w) in per_example_grads(&x, &g, s).iter().enumerate() {
            for (a, v) in want.iter_mut().zip(w) {
                *a += c[i] as f64 * v;
            }
        }
        let want: Vec<f32> = want.iter().map(|&v| v as f32).collect();
        assert!(rel_err(&got, &want, 1e-3) < 1e-5, "{s:?}");
        // Accumulation across micro-batches adds.
        clipped_weight_sum(&x, &g, &c, s, &mut got).unwrap();
        let twice: Vec<f32> = want.iter().map(|v| 2.0 * v).collect();
        assert!(rel_err(&got, &twice, 1e-3) < 1e-5);
        // The f32 production path (scaled narrower operand, one f32 GEMM) agrees.
        let mut fast = vec![0.0f32; s.p * s.d];
        clipped_weight_sum_f32(&x, &g, &c, s, &mut fast).unwrap();
        // f32 accumulation: judged against the output's scale, not entry by entry.
        let e = rel_err(&fast, &want, max_abs(&want));
        assert!(e < 1e-5, "f32 path {s:?}: {e}");
        // All-ones factors (nonprivate) take the unscaled operands: the plain sum.
        let mut plain = vec![0.0f32; s.p * s.d];
        clipped_weight_sum_f32(&x, &g, &vec![1.0; s.b], s, &mut plain).unwrap();
        let mut sum = vec![0.0f64; s.p * s.d];
        for w in per_example_grads(&x, &g, s) {
            sum.iter_mut().zip(&w).for_each(|(a, v)| *a += v);
        }
        let sum: Vec<f32> = sum.iter().map(|&v| v as f32).collect();
        let e = rel_err(&plain, &sum, max_abs(&sum));
        assert!(e < 1e-5, "f32 path, unclipped {s:?}: {e}");
        let mut bias = vec![0.0f32; s.p];
        clipped_bias_sum(&g, &c, s, &mut bias).unwrap();
        for o in 0..s.p {
            let want: f64 = (0..s.b)
                .map(|i| {
                    c[i] as f64
                        * (0..s.t)
                            .map(|t| g[(i * s.t + t) * s.p + o] as f64)
                            .sum::<f64>()
                })
                .sum();
            assert!((bias[o] as f64 - want).abs() < 1e-5 * want.abs().max(1e-3));
        }
    }
}

#[test]
fn one_huge_example_contributes_at_most_c() {
    let s = LinearShape {
        b: 4,
        t: 3,
        d: 6,
        p: 5,
    };
    let mut r = rng(3);
    let mut x = uniform(&mut r, s.b * s.t * s.d);
    let g = uniform(&mut r, s.b * s.t * s.p);
    for v in &mut x[2 * s.t * s.d..3 * s.t * s.d] {
        *v *= 1e6;
    }
    let clip = 1.0;
    let norms = layer_sq_norms(&x, &g, s, NormMethod::Ghost, true).unwrap();
    let bounds = layer_rounding_bounds(&x, &g, s, true, s.b).unwrap();
    let (c, _) = clip_factors(&norms, &bounds, clip).unwrap();
    // The outlier's clipped gradient (weight and bias together) has norm ≤ C.
    let grads = per_example_grads(&x, &g, s);
    let bias_sq = bias_sq_norms(&g, s).unwrap();
    for i in 0..s.b {
        let sq: f64 = grads[i].iter().map(|v| v * v).sum::<f64>() + bias_sq[i];
        let clipped = c[i] as f64 * sq.sqrt();
        assert!(
            clipped <= clip * (1.0 + 1e-6),
            "example {i}: clipped norm {clipped}"
        );
    }
    assert!(norms[2].sqrt() > 1e5 && c[2] < 1e-5);
    // Removing the outlier changes the clipped sum by at most C (add/remove sensitivity).
    let mut with = vec![0.0f32; s.p * s.d];
    clipped_weight_sum(&x, &g, &c, s, &mut with).unwrap();
    let mut c_without = c.clone();
    c_without[2] = 0.0;
    let mut without = vec![0.0f32; s.p * s.d];
    clipped_weight_sum(&x, &g, &c_without, s, &mut without).unwrap();
    let diff: f64 = with
        .iter()
        .zip(&without)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    assert!(diff <= clip * (1.0 + 1e-4), "sensitivity {diff}");
}

#[test]
fn clip_factor_edge_cases() {
    let z = |n: usize| vec![0.0f64; n];
    let (c, bad) = clip_factors(&[0.0, 4.0, 0.25], &z(3), 1.0).unwrap();
    assert_eq!(c[0], 1.0);
    assert!((c[1] - 0.5).abs() < 1e-6);
    assert_eq!(c[2], 1.0);
    assert_eq!(bad, 0);
    assert_eq!(
        clip_factors(&[1e30], &[1e30], f64::INFINITY).unwrap(),
        (vec![1.0].into(), 0)
    );
    // f32 rounding of a near-zero ghost norm can go slightly negative: it counts as 0.
    assert_eq!(
        clip_factors(&[-1e-12], &z(1), 1.0).unwrap(),
        (vec![1.0].into(), 0)
    );
    // A non-finite norm is factor 0 (the example drops out), counted, not an error.
    let (c, bad) = clip_factors(
        &[f64::NAN, 0.25, f64::INFINITY, f64::NEG_INFINITY],
        &z(4),
        1.0,
    )
    .unwrap();
    assert_eq!(c, vec![0.0, 1.0, 0.0, 0.0]);
    assert_eq!(bad, 3);
    assert_eq!(
        clip_factors(&[f64::NAN], &z(1), f64::INFINITY).unwrap(),
        (vec![0.0].into(), 1)
    );
    // The rounding bound adds to the norm: a zero-norm example with a bound of 4C
    // gets 1/4, and a non-finite bound is factor 0, counted like a non-finite norm.
    let (c, bad) = clip_factors(
        &[0.0, 1.0, 0.0, f64::NAN],
        &[4.0, 1.0, f64::NAN, f64::NAN],
        1.0,
    )
    .unwrap();
    assert!((c[0] - 0.25).abs() < 1e-6 && (c[1] - 0.5).abs() < 1e-6);
    assert_eq!((c[2], c[3], bad), (0.0, 0.0, 2));
    assert!(clip_factors(&[1.0], &z(2), 1.0).is_err());
    assert!(matches!(
        clip_factors(&[1.0], &z(1), 0.0),
        Err(dualpriv::Error::Config(_))
    ));
    assert!(matches!(
        clip_factors(&[1.0], &z(1), f64::NAN),
        Err(dualpriv::Error::Config(_))
    ));
}

#[test]
fn shape_mismatches_are_errors() {
    let s = LinearShape {
        b: 2,
        t: 3,
        d: 4,
        p: 5,
    };
    let x = vec![0.0; 24];
    let g = vec![0.0; 30];
    assert!(ghost_sq_norms(&x[..23], &g, s).is_err());
    assert!(instantiated_sq_norms(&x, &g[..29], s).is_err());
    let mut out = vec![0.0; 19];
    assert!(clipped_weight_sum(&x, &g, &[1.0, 1.0], s, &mut out).is_err());
    let mut out = vec![0.0; 20];
    assert!(clipped_weight_sum(&x, &g, &[1.0], s, &mut out).is_err());
}

// ---------------------------------------------------------------------------
// Backend-level bodies: run on the CPU here and on the CUDA backend in `mod gpu`.

use dualpriv::backend::cpu::Cpu;
use dualpriv::backend::dp::DpBackend;

/// The ways a DP method forms its clipped sums.
#[derive(Clone, Copy, Debug)]
enum Path {
    /// Norms from X, G by this formula, then the book-keeping sums.
    Bk(NormMethod),
    /// DP-SGD: materialised per-example gradients, their norms and weighted sum.
    Materialised,
}

const PATHS: [Path; 3] = [
    Path::Bk(NormMethod::Ghost),
    Path::Bk(NormMethod::Instantiated),
    Path::Materialised,
];

/// What a path releases for one batch: host squared norms, factors, non-finite
/// count, and the clipped weight and bias sums.
struct Released {
    norms: Vec<f64>,
    factors: Vec<f32>,
    non_finite: usize,
    weight: Vec<f32>,
    bias: Vec<f32>,
}

fn release<B: DpBackend>(
    be: &B,
    x: &[f32],
    g: &[f32],
    s: LinearShape,
    path: Path,
    clip: f32,
) -> Released {
    let (dx, dg) = (be.upload(x).unwrap(), be.upload(g).unwrap());
    let mut norms = be.norms_zeros(s.b, s.b).unwrap();
    let mut weight = be.zeros(s.p * s.d).unwrap();
    let mut bias = be.zeros(s.p).unwrap();
    let (factors, non_finite) = match path {
        Path::Bk(m) => {
            be.add_layer_sq_norms(&dx, &dg, s, m, true, &mut norms)
                .unwrap();
            let (f, n) = be.clip_factors(&norms, clip).unwrap();
            be.clipped_weight_sum(&dx, &dg, &f, s, &mut weight, false)
                .unwrap();
            be.clipped_bias_sum(&dg, &f, s, &mut bias, false).unwrap();
            (f, n)
        }
        Path::Materialised => {
            let w = be.per_example_weight_grads(&dx, &dg, s).unwrap();
            let bg = be.per_example_bias_grads(&dg, s).unwrap();
            be.add_row_sq_norms(&w, s.b, &mut norms).unwrap();
            be.add_row_sq_norms(&bg, s.b, &mut norms).unwrap();
            let (f, n) = be.clip_factors(&norms, clip).unwrap();
            be.weighted_row_sum(&w, &f, s.b, &mut weight, false)
                .unwrap();
            be.weighted_row_sum(&bg, &f, s.b, &mut bias, false).unwrap();
            (f, n)
        }
    };
    Released {
        norms: be.norms_download(&norms).unwrap().sq.to_vec(),
        factors: be.download(&factors).unwrap().into_vec(),
        non_finite,
        weight: be.download(&weight).unwrap().into_vec(),
        bias: be.download(&bias).unwrap().into_vec(),
    }
}

/// Examples `keep` of a batch (X and G rows).
fn subset(x: &[f32], g: &[f32], s: LinearShape, keep: &[usize]) -> (Vec<f32>, Vec<f32>) {
    let rows = |m: &[f32], w: usize| -> Vec<f32> {
        keep.iter()
            .flat_map(|&i| m[i * s.t * w..(i + 1) * s.t * w].iter().copied())
            .collect()
    };
    (rows(x, s.d), rows(g, s.p))
}

/// In a batch of 5, example 1's X holds a NaN and example 3's G a +Inf: both get
/// factor 0, the count is 2, the other examples' norms stay finite and unchanged,
/// and every clipped sum equals that of the batch without them (`exact`: bit for
/// bit; otherwise to FP32 rounding of a different GEMM shape).
fn non_finite_examples_are_absent<B: DpBackend>(be: &B, exact: bool) {
    let mut r = rng(11);
    for (t, d, p) in [(3, 4, 6), (3, 7, 2), (40, 9, 11)] {
        let s = LinearShape { b: 5, t, d, p };
        let mut x = uniform(&mut r, s.b * t * d);
        let mut g = uniform(&mut r, s.b * t * p);
        x[(t + 1) * d + 2 % d] = f32::NAN;
        g[3 * t * p + p / 2] = f32::INFINITY;
        let keep = [0, 2, 4];
        let (xk, gk) = subset(&x, &g, s, &keep);
        let sk = LinearShape { b: 3, ..s };
        for path in PATHS {
            let clip = 0.3;
            let all = release(be, &x, &g, s, path, clip);
            let want = release(be, &xk, &gk, sk, path, clip);
            let what = format!("{} {s:?} {path:?}", be.name());
            assert_eq!(all.non_finite, 2, "{what}");
            assert_eq!((all.factors[1], all.factors[3]), (0.0, 0.0), "{what}");
            for (j, &i) in keep.iter().enumerate() {
                assert!(all.norms[i].is_finite(), "{what}: norm {i}");
                if exact {
                    assert_eq!(all.norms[i], want.norms[j], "{what}: norm {i}");
                    assert_eq!(all.factors[i], want.factors[j], "{what}: factor {i}");
                } else {
                    // GPU tiles add their f64 totals atomically, in any order.
                    assert!(rel(all.norms[i], want.norms[j]) < 1e-12, "{what}: norm {i}");
                    let e = rel(f64::from(all.factors[i]), f64::from(want.factors[j]));
                    assert!(e < 1e-6, "{what}: factor {i}");
                }
            }
            assert!(
                all.weight.iter().chain(&all.bias).all(|v| v.is_finite()),
                "{what}: a non-finite value reached the sum"
            );
            if exact {
                assert_eq!(all.weight, want.weight, "{what}: weight sum");
                assert_eq!(all.bias, want.bias, "{what}: bias sum");
            } else {
                let scale = |v: &[f32]| max_abs(v).max(1e-6);
                let e = rel_err(&all.weight, &want.weight, scale(&want.weight));
                assert!(e < 1e-5, "{what}: weight sum error {e:.2e}");
                let e = rel_err(&all.bias, &want.bias, scale(&want.bias));
                assert!(e < 1e-5, "{what}: bias sum error {e:.2e}");
            }
        }
    }
}

#[test]
fn non_finite_examples_are_absent_cpu() {
    non_finite_examples_are_absent(&Cpu, true);
}

/// The adversarial example's X: two tokens whose rows differ by e = (134, 182), and
/// G rows h and −h, so G_iᵀX_i = −h·eᵀ cancels terms ~1.8e4 down to entries ~1e3
/// (‖X_i‖/‖e‖ ≈ 22). All values are integers whose Gram and product entries stay
/// below 2²⁴, so strict FP32 forms the norms exactly; the x's are odd and above
/// 2048, which TF32's 11 significant bits cannot hold. Emulating a TF32 GEMM (inputs
/// rounded or truncated to TF32) releases 1.0054·C for this example; strict FP32
/// stays within 4·22·2⁻²⁴ ≈ 5e-6 of C.
const ADV_X: [f32; 4] = [2453.0, 2429.0, 2587.0, 2611.0];
const ADV_H: [f32; 3] = [3.0, -5.0, 7.0];

/// On `be`, removing the adversarial example changes each path's clipped weight sum
/// by at most C·(1 + 1e-5) (and by about C: it is clipped).
fn adversarial_example_contributes_at_most_c<B: DpBackend>(be: &B) {
    let s = LinearShape {
        b: 3,
        t: 2,
        d: 2,
        p: 3,
    };
    let mut r = rng(12);
    let mut x = uniform(&mut r, s.b * s.t * s.d);
    let mut g = uniform(&mut r, s.b * s.t * s.p);
    x[s.t * s.d..2 * s.t * s.d].copy_from_slice(&ADV_X);
    let adv_g: Vec<f32> = ADV_H.iter().chain(&ADV_H.map(|v| -v)).copied().collect();
    g[s.t * s.p..2 * s.t * s.p].copy_from_slice(&adv_g);
    let (xk, gk) = subset(&x, &g, s, &[0, 2]);
    let clip = 1.0f32;
    for path in PATHS {
        let with = release(be, &x, &g, s, path, clip);
        let without = release(be, &xk, &gk, LinearShape { b: 2, ..s }, path, clip);
        let diff = with
            .weight
            .iter()
            .zip(&without.weight)
            .map(|(a, b)| (f64::from(*a) - f64::from(*b)).powi(2))
            .sum::<f64>()
            .sqrt();
        let what = format!("{} {path:?}", be.name());
        assert!(with.factors[1] < 1e-3, "{what}: not clipped");
        assert!(
            diff <= f64::from(clip) * (1.0 + 1e-5),
            "{what}: the example contributes {diff} > C = {clip}"
        );
        assert!(diff >= f64::from(clip) * (1.0 - 1e-3), "{what}: {diff}");
    }
}

#[test]
fn adversarial_example_contributes_at_most_c_cpu() {
    adversarial_example_contributes_at_most_c(&Cpu);
}

/// Example 1 has token rows x₁ = a, x₂ = a + δ with |a| ≈ 1024 and δ ∈ {⅛, ¼, ⅜},
/// and output gradients g₁ = b, g₂ = −b: ∇W = −bδᵀ, so ‖∇W‖² = ‖b‖²‖δ‖² exactly,
/// while the Gram entries are ~10⁶ times larger. Every input is exact in f32, every
/// product exact in f64: the norms must come out exact on `be`, in both forms.
/// An f32 accumulation loses the norm entirely here, and an underestimated norm
/// gives a clip factor that releases more than C.
fn norms_survive_cancellation<B: DpBackend>(be: &B) {
    let s = LinearShape {
        b: 2,
        t: 2,
        d: 64,
        p: 48,
    };
    let mut r = rng(5);
    let mut x = uniform(&mut r, s.b * s.t * s.d);
    let mut g = uniform(&mut r, s.b * s.t * s.p);
    let a: Vec<f32> = (0..s.d).map(|k| 1024.0 + k as f32).collect();
    let delta: Vec<f32> = (0..s.d).map(|k| 0.125 * (1 + k % 3) as f32).collect();
    let b: Vec<f32> = (0..s.p).map(|k| (k % 7) as f32 - 3.0).collect();
    let (xo, go) = (s.t * s.d, s.t * s.p);
    for k in 0..s.d {
        x[xo + k] = a[k];
        x[xo + s.d + k] = a[k] + delta[k];
    }
    for k in 0..s.p {
        g[go + k] = b[k];
        g[go + s.p + k] = -b[k];
    }
    let want = b.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>()
        * delta.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>();
    let (xb, gb) = (be.upload(&x).unwrap(), be.upload(&g).unwrap());
    for method in [NormMethod::Ghost, NormMethod::Instantiated] {
        let mut n = be.norms_zeros(s.b, s.b).unwrap();
        be.add_layer_sq_norms(&xb, &gb, s, method, false, &mut n)
            .unwrap();
        let got = be.norms_download(&n).unwrap().sq[1];
        assert!(
            (got - want).abs() <= 1e-9 * want,
            "{} {method:?}: ‖∇W‖² = {got}, exact {want}",
            be.name()
        );
    }
}

#[test]
fn norms_survive_cancellation_cpu() {
    norms_survive_cancellation(&Cpu);
}

/// The bound itself: for random shapes and factors (some examples with cancelling
/// or huge rows), the f32 clipped sum's error attributable to one example,
/// |fl32 sum with it − fl32 sum without it − exact c_i∇W_i| in Frobenius norm (f64
/// brute force), stays below c_i·(layer_gamma·Σ_t ‖x_t‖‖g_t‖) — the rounding of the
/// other examples' terms (the background) is bounded separately and added.
#[test]
fn rounding_bound_covers_the_f32_sum_error() {
    use rand::Rng;
    let mut r = rng(31);
    for trial in 0..40 {
        let s = LinearShape {
            b: r.random_range(2..6),
            t: r.random_range(1..5),
            d: r.random_range(1..40),
            p: r.random_range(1..40),
        };
        let mut x = uniform(&mut r, s.b * s.t * s.d);
        let mut g = uniform(&mut r, s.b * s.t * s.p);
        let i = r.random_range(0..s.b);
        // Example i: huge rows, cancelling when t ≥ 2 and the trial says so.
        let scale = 10f32.powi(r.random_range(0..5));
        for t in 0..s.t {
            let o = (i * s.t + t) * s.d;
            for v in &mut x[o..o + s.d] {
                *v *= scale;
            }
        }
        if s.t >= 2 && trial % 2 == 0 {
            let (a, b) = (i * s.t * s.d, (i * s.t + 1) * s.d);
            let row: Vec<f32> = x[a..a + s.d].to_vec();
            x[b..b + s.d].copy_from_slice(&row);
            let (a, b) = (i * s.t * s.p, (i * s.t + 1) * s.p);
            let row: Vec<f32> = g[a..a + s.p].iter().map(|v| -v * scale).collect();
            g[b..b + s.p].copy_from_slice(&row);
            for v in &mut g[a..a + s.p] {
                *v *= scale;
            }
        }
        let c: Vec<f32> = (0..s.b).map(|_| r.random_range(0.01f32..1.0)).collect();
        let mut with = vec![0.0f32; s.p * s.d];
        clipped_weight_sum_f32(&x, &g, &c, s, &mut with).unwrap();
        let mut c0 = c.clone();
        c0[i] = 0.0;
        let mut without = vec![0.0f32; s.p * s.d];
        clipped_weight_sum_f32(&x, &g, &c0, s, &mut without).unwrap();
        let grads = per_example_grads(&x, &g, s);
        // Error attributable to example i, beyond its exact clipped gradient.
        let own = with
            .iter()
            .zip(&without)
            .zip(&grads[i])
            .map(|((a, b), w)| (f64::from(*a) - f64::from(*b) - f64::from(c[i]) * w).powi(2))
            .sum::<f64>()
            .sqrt();
        let bound = f64::from(c[i]) * layer_rounding_bounds(&x, &g, s, false, s.b).unwrap()[i];
        // The others' terms round differently with and without i: at most
        // 2γ Σ_{j≠i} c_j Σ_t ‖x_t‖‖g_t‖ (and their sum's own error once).
        let all = layer_rounding_bounds(&x, &g, s, false, s.b).unwrap();
        let background: f64 = (0..s.b)
            .filter(|&j| j != i)
            .map(|j| 2.0 * f64::from(c[j]) * all[j])
            .sum();
        assert!(
            own <= bound + background,
            "{s:?} example {i}: error {own:.3e} > bound {bound:.3e} + {background:.3e}"
        );
        assert!(bound > 0.0 || scale == 0.0);
    }
}

/// The review's rounding attack: examples whose two token rows cancel exactly
/// (x₂ = x₁, g₂ = −g₁, entries ~1e3–1e4), so ‖∇W_i‖ = 0 and the bias gradient is
/// 0, but the f32 GEMM of the book-keeping sum still leaves a rounding residual
/// ~ b·t·2⁻²⁴·Σ_t ‖x_t‖‖g_t‖ of them in the released sum. Removing any one of them
/// (neighbouring batches) must change every path's weight and bias sums by at most
/// C·(1 + 1e-6), the difference taken in f64.
fn cancelling_examples_contribute_at_most_c<B: DpBackend>(be: &B) {
    use rand::Rng;
    let mut r = rng(21);
    let attackers = [1usize, 3, 4];
    for (d, p) in [(16, 24), (24, 16), (33, 9)] {
        let s = LinearShape { b: 6, t: 2, d, p };
        let mut x = uniform(&mut r, s.b * s.t * s.d);
        let mut g = uniform(&mut r, s.b * s.t * s.p);
        let mut big = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    let m: f32 = r.random_range(1e3f32..1e4);
                    if r.random_bool(0.5) {
                        m
                    } else {
                        -m
                    }
                })
                .collect()
        };
        for &i in &attackers {
            let (xr, gr) = (big(s.d), big(s.p));
            for t in 0..s.t {
                let o = (i * s.t + t) * s.d;
                x[o..o + s.d].copy_from_slice(&xr);
                let o = (i * s.t + t) * s.p;
                let sign = if t == 0 { 1.0 } else { -1.0 };
                for (v, &w) in g[o..o + s.p].iter_mut().zip(&gr) {
                    *v = sign * w;
                }
            }
        }
        let clip = 1.0f32;
        for path in PATHS {
            let with = release(be, &x, &g, s, path, clip);
            for &i in &attackers {
                let keep: Vec<usize> = (0..s.b).filter(|&k| k != i).collect();
                let (xk, gk) = subset(&x, &g, s, &keep);
                let without = release(be, &xk, &gk, LinearShape { b: s.b - 1, ..s }, path, clip);
                let dist = |a: &[f32], b: &[f32]| {
                    a.iter()
                        .zip(b)
                        .map(|(a, b)| (f64::from(*a) - f64::from(*b)).powi(2))
                        .sum::<f64>()
                };
                let diff =
                    (dist(&with.weight, &without.weight) + dist(&with.bias, &without.bias)).sqrt();
                let what = format!("{} {s:?} {path:?} example {i}", be.name());
                eprintln!("{what}: contributes {:.4e} C", diff / f64::from(clip));
                assert!(
                    diff <= f64::from(clip) * (1.0 + 1e-6),
                    "{what}: a zero-gradient example contributes {diff} > C = {clip}"
                );
            }
        }
    }
}

#[test]
fn cancelling_examples_contribute_at_most_c_cpu() {
    cancelling_examples_contribute_at_most_c(&Cpu);
}

#[cfg(feature = "cuda")]
mod gpu {
    use super::*;
    use dualpriv::backend::cuda::cuda_or_skip;
    use dualpriv::gpu::{clip as gclip, gpu_or_skip};

    /// GPU norms accumulate in f64 like the CPU; only the order of the tile sums
    /// differs.
    const NORM_TOL: f64 = 1e-9;
    /// The clipped sum is one strict-FP32 cuBLAS GEMM (the DP handle).
    const SUM_TOL: f32 = 1e-4;

    #[test]
    fn gpu_norms_and_clipped_sums_match_cpu() {
        let Some(gpu) = gpu_or_skip("gpu_norms_and_clipped_sums_match_cpu") else {
            return;
        };
        let mut r = rng(4);
        let mut all = shapes();
        all.push(LinearShape {
            b: 2,
            t: 100,
            d: 256,
            p: 96,
        });
        for s in all {
            let x = uniform(&mut r, s.b * s.t * s.d);
            let g = uniform(&mut r, s.b * s.t * s.p);
            let (dx, dg) = (gpu.upload(&x).unwrap(), gpu.upload(&g).unwrap());
            for method in [NormMethod::Ghost, NormMethod::Instantiated] {
                for bias in [false, true] {
                    let mut tot = gpu.zeros::<f64>(s.b).unwrap();
                    gclip::add_layer_sq_norms(&gpu, &dx, &dg, s, method, bias, &mut tot).unwrap();
                    let got = gpu.download(&tot).unwrap();
                    let want = layer_sq_norms(&x, &g, s, method, bias).unwrap();
                    for i in 0..s.b {
                        assert!(
                            rel(got[i], want[i]) < NORM_TOL,
                            "{s:?} {method:?} bias={bias}: {} vs {}",
                            got[i],
                            want[i]
                        );
                    }
                }
            }
            for bias in [false, true] {
                let mut tot = gpu.zeros::<f64>(s.b).unwrap();
                gclip::add_layer_rounding_bounds(&gpu, &dx, &dg, s, bias, s.b, &mut tot).unwrap();
                let got = gpu.download(&tot).unwrap();
                let want = layer_rounding_bounds(&x, &g, s, bias, s.b).unwrap();
                for i in 0..s.b {
                    assert!(
                        rel(got[i], want[i]) < NORM_TOL,
                        "{s:?} bound bias={bias}: {} vs {}",
                        got[i],
                        want[i]
                    );
                }
            }
            let norms = layer_sq_norms(&x, &g, s, s.preferred_method(), true).unwrap();
            let bounds = layer_rounding_bounds(&x, &g, s, true, s.b).unwrap();
            let (c, _) = clip_factors(&norms, &bounds, 0.7).unwrap();
            let dnorms = gpu.upload(&norms).unwrap();
            let dbounds = gpu.upload(&bounds).unwrap();
            let mut dc = gpu.zeros::<f32>(s.b).unwrap();
            let counts = gclip::clip_factors(&gpu, &dnorms, &dbounds, 0.7, &mut dc).unwrap();
            assert_eq!(counts, gclip::FactorCounts::default());
            let gc = gpu.download(&dc).unwrap();
            assert!(rel_err(&gc, &c, 1e-6) < 1e-6);
            let mut ws = gpu.zeros::<f32>(gclip::workspace_len(s).max(1)).unwrap();
            let mut out = gpu.upload(&vec![1.0f32; s.p * s.d]).unwrap();
            gclip::clipped_weight_sum(&gpu, &dx, &dg, &dc, s, &mut ws, &mut out, true, None)
                .unwrap();
            let mut want = vec![1.0f32; s.p * s.d];
            clipped_weight_sum(&x, &g, &c, s, &mut want).unwrap();
            assert!(
                rel_err(&gpu.download(&out).unwrap(), &want, 1e-2) < SUM_TOL,
                "{s:?}"
            );
            let mut bias = gpu.zeros::<f32>(s.p).unwrap();
            gclip::clipped_bias_sum(&gpu, &dg, &dc, s, &mut bias, false).unwrap();
            let mut want = vec![0.0f32; s.p];
            clipped_bias_sum(&g, &c, s, &mut want).unwrap();
            assert!(
                rel_err(&gpu.download(&bias).unwrap(), &want, 1e-3) < 1e-5,
                "{s:?}"
            );
        }
    }

    #[test]
    fn gpu_non_finite_norm_gets_factor_zero() {
        let Some(gpu) = gpu_or_skip("gpu_non_finite_norm_gets_factor_zero") else {
            return;
        };
        let dn = gpu
            .upload(&[0.25f64, f64::NAN, 0.01, f64::INFINITY, 1e300, 0.0])
            .unwrap();
        let de = gpu.upload(&[0.0f64, 0.0, 0.0, 0.0, 0.0, f64::NAN]).unwrap();
        let mut dc = gpu.zeros::<f32>(6).unwrap();
        let counts = gclip::clip_factors(&gpu, &dn, &de, 1.0, &mut dc).unwrap();
        // 1e300 is finite, but C/1e150 underflows f32: a zero factor, not non-finite.
        // A non-finite rounding bound counts like a non-finite norm.
        assert_eq!(
            counts,
            gclip::FactorCounts {
                non_finite: 3,
                zero: 4
            }
        );
        assert_eq!(
            gpu.download(&dc).unwrap(),
            vec![1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
        );
    }

    #[test]
    fn gpu_non_finite_examples_are_absent() {
        let Some(be) = cuda_or_skip("gpu_non_finite_examples_are_absent") else {
            return;
        };
        non_finite_examples_are_absent(&be, false);
    }

    /// On the shipped defaults (`Cuda::new()`, TF32 model GEMMs) the DP GEMMs are
    /// strict: the near-cancelling example contributes at most C.
    #[test]
    fn gpu_adversarial_example_contributes_at_most_c() {
        let Some(be) = cuda_or_skip("gpu_adversarial_example_contributes_at_most_c") else {
            return;
        };
        assert!(be.tf32(), "the shipped default has TF32 model GEMMs");
        adversarial_example_contributes_at_most_c(&be);
    }

    #[test]
    fn gpu_cancelling_examples_contribute_at_most_c() {
        let Some(be) = cuda_or_skip("gpu_cancelling_examples_contribute_at_most_c") else {
            return;
        };
        cancelling_examples_contribute_at_most_c(&be);
    }

    #[test]
    fn gpu_norms_survive_cancellation() {
        let Some(be) = cuda_or_skip("gpu_norms_survive_cancellation") else {
            return;
        };
        norms_survive_cancellation(&be);
    }
}

/// The rounding bound's γ grows with the rows of the clipped-sum GEMM. Taken from
/// the sampled micro-batch, one more example at a power-of-two crossing would change
/// every other example's clip factor (by ~γ relative, over all B of them: far more
/// than the slack of the sensitivity bound). With the public micro-batch bound, the
/// others' factors are bit-identical with or without the added example.
#[test]
fn other_examples_factors_ignore_the_sampled_batch_size() {
    let s = |b: usize| LinearShape {
        b,
        t: 1,
        d: 4,
        p: 3,
    };
    // 253 + 3 + 256 = 512 rounds to 512; 254 + 259 = 513 rounds to 1024.
    let b = 253;
    let mut r = rng(31);
    let x = uniform(&mut r, (b + 1) * 4);
    let g = uniform(&mut r, (b + 1) * 3);
    let factors = |rows: usize, cap: usize| {
        let (xb, gb) = (
            dualpriv::backend::Backend::upload(&Cpu, &x[..rows * 4]).unwrap(),
            dualpriv::backend::Backend::upload(&Cpu, &g[..rows * 3]).unwrap(),
        );
        let mut n = Cpu.norms_zeros(rows, cap).unwrap();
        Cpu.add_layer_sq_norms(&xb, &gb, s(rows), NormMethod::Ghost, true, &mut n)
            .unwrap();
        Cpu.clip_factors(&n, 1e-3).unwrap().0
    };
    let (with, without) = (factors(b + 1, 256), factors(b, 256));
    assert_eq!(&with[..b], &without[..], "the others' factors moved");
    // Taking γ from the sampled size instead does move them (the test can fail).
    let (with, without) = (factors(b + 1, 0), factors(b, 0));
    assert_ne!(&with[..b], &without[..]);
}

#[test]
fn clip_factors_never_round_up() {
    use rand::Rng;
    // c·(‖g‖ + E + 1e-6) ≤ C must hold for the f32 factor itself.
    let mut r = rng(41);
    let sq: Vec<f64> = (0..10_000)
        .map(|_| 10f64.powf(r.random_range(-6.0..6.0)))
        .collect();
    let bounds = vec![0.0; sq.len()];
    let (c, _) = clip_factors(&sq, &bounds, 0.7).unwrap();
    for (&ci, &s) in c.iter().zip(&sq) {
        let exact = (0.7 / (s.sqrt() + CLIP_EPS)).min(1.0);
        assert!(f64::from(ci) <= exact, "{ci} > {exact}");
        assert!(
            f64::from(ci.next_up()) > exact,
            "{ci} is not the largest f32 below {exact}"
        );
    }
}
