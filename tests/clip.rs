//! Per-example norms and book-keeping clipped sums: ghost vs instantiated vs brute
//! force on the CPU, sensitivity, and the CUDA kernels against the CPU reference.
mod common;
use common::{max_rel_err, rel, rng, uniform};
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
        let c = clip_factors(&norms, 0.5).unwrap();
        let mut got = vec![0.0f32; s.p * s.d];
        clipped_weight_sum(&x, &g, &c, s, &mut got).unwrap();
        let mut want = vec![0.0f64; s.p * s.d];
        for (i, w) in per_example_grads(&x, &g, s).iter().enumerate() {
            for (a, v) in want.iter_mut().zip(w) {
                *a += c[i] as f64 * v;
            }
        }
        let want: Vec<f32> = want.iter().map(|&v| v as f32).collect();
        assert!(max_rel_err(&got, &want, 1e-3) < 1e-5, "{s:?}");
        // Accumulation across micro-batches adds.
        clipped_weight_sum(&x, &g, &c, s, &mut got).unwrap();
        let twice: Vec<f32> = want.iter().map(|v| 2.0 * v).collect();
        assert!(max_rel_err(&got, &twice, 1e-3) < 1e-5);
        // The f32 production path (scaled narrower operand, one f32 GEMM) agrees.
        let mut fast = vec![0.0f32; s.p * s.d];
        clipped_weight_sum_f32(&x, &g, &c, s, &mut fast).unwrap();
        // f32 accumulation: judged against the output's scale, not entry by entry.
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let e = max_rel_err(&fast, &want, scale);
        assert!(e < 1e-5, "f32 path {s:?}: {e}");
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
    let c = clip_factors(&norms, clip).unwrap();
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
    let c = clip_factors(&[0.0, 4.0, 0.25], 1.0).unwrap();
    assert_eq!(c[0], 1.0);
    assert!((c[1] - 0.5).abs() < 1e-6);
    assert_eq!(c[2], 1.0);
    assert_eq!(clip_factors(&[1e30], f64::INFINITY).unwrap(), vec![1.0]);
    // f32 rounding of a near-zero ghost norm can go slightly negative: it counts as 0.
    assert_eq!(clip_factors(&[-1e-12], 1.0).unwrap(), vec![1.0]);
    assert!(matches!(
        clip_factors(&[f64::NAN], 1.0),
        Err(dualpriv::Error::NonFinite(_))
    ));
    assert!(matches!(
        clip_factors(&[f64::INFINITY], 1.0),
        Err(dualpriv::Error::NonFinite(_))
    ));
    assert!(matches!(
        clip_factors(&[1.0], 0.0),
        Err(dualpriv::Error::Config(_))
    ));
    assert!(matches!(
        clip_factors(&[1.0], f64::NAN),
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

#[cfg(feature = "cuda")]
mod gpu {
    use super::*;
    use dualpriv::gpu::{clip as gclip, gpu_or_skip};

    /// GPU norms accumulate Gram/product tiles in f32 and tile totals in f64:
    /// 1e-4 relative against the f64 reference covers T, d, p up to a few thousand.
    const NORM_TOL: f64 = 1e-4;
    /// The clipped sum is one strict-FP32 cuBLAS GEMM (TF32 off).
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
            let norms = layer_sq_norms(&x, &g, s, s.preferred_method(), true).unwrap();
            let c = clip_factors(&norms, 0.7).unwrap();
            let dnorms = gpu.upload(&norms).unwrap();
            let mut dc = gpu.zeros::<f32>(s.b).unwrap();
            gclip::clip_factors(&gpu, &dnorms, 0.7, &mut dc).unwrap();
            let gc = gpu.download(&dc).unwrap();
            assert!(max_rel_err(&gc, &c, 1e-6) < 1e-6);
            let mut ws = gpu.zeros::<f32>(gclip::workspace_len(s).max(1)).unwrap();
            let mut out = gpu.upload(&vec![1.0f32; s.p * s.d]).unwrap();
            gclip::clipped_weight_sum(&gpu, &dx, &dg, &dc, s, &mut ws, &mut out, true).unwrap();
            let mut want = vec![1.0f32; s.p * s.d];
            clipped_weight_sum(&x, &g, &c, s, &mut want).unwrap();
            assert!(
                max_rel_err(&gpu.download(&out).unwrap(), &want, 1e-2) < SUM_TOL,
                "{s:?}"
            );
            let mut bias = gpu.zeros::<f32>(s.p).unwrap();
            gclip::clipped_bias_sum(&gpu, &dg, &dc, s, &mut bias, false).unwrap();
            let mut want = vec![0.0f32; s.p];
            clipped_bias_sum(&g, &c, s, &mut want).unwrap();
            assert!(
                max_rel_err(&gpu.download(&bias).unwrap(), &want, 1e-3) < 1e-5,
                "{s:?}"
            );
        }
    }

    #[test]
    fn gpu_non_finite_norm_is_an_error() {
        let Some(gpu) = gpu_or_skip("gpu_non_finite_norm_is_an_error") else {
            return;
        };
        let dn = gpu.upload(&[1.0f64, f64::NAN]).unwrap();
        let mut dc = gpu.zeros::<f32>(2).unwrap();
        assert!(matches!(
            gclip::clip_factors(&gpu, &dn, 1.0, &mut dc),
            Err(dualpriv::Error::NonFinite(_))
        ));
    }
}
