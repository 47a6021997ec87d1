//! Noisy-gradient top-k pruning: the radix select against a plain sort, the exact-k
//! tie rule, masked SGD/AdamW, errors, and the CUDA path against the CPU reference.
mod common;
use common::{rng, uniform};
use dualpriv::dp::noise::{RngKind, StreamKey};
use dualpriv::dp::prune::*;
use rand::Rng;

/// Adversarial arrays: all equal, mostly zeros, negatives, signed zeros, denormals,
/// infinities of scale, and lengths that are not multiples of any block size.
fn adversarial() -> Vec<(String, Vec<f32>)> {
    let mut r = rng(10);
    let mut out = vec![
        ("all equal".into(), vec![0.25f32; 1037]),
        ("all zero".into(), vec![0.0f32; 515]),
        ("single".into(), vec![-3.0f32]),
        (
            "signed zeros".into(),
            (0..999)
                .map(|i| if i % 2 == 0 { 0.0 } else { -0.0 })
                .collect(),
        ),
        (
            "negatives".into(),
            uniform(&mut r, 4099).iter().map(|v| -v.abs()).collect(),
        ),
        (
            "denormals".into(),
            (0..777).map(|i| f32::from_bits(i % 50)).collect(),
        ),
        (
            "wide range".into(),
            (0..2049)
                .map(|i| (i as f32 - 1024.0) * 10f32.powi(i % 30 - 15))
                .collect(),
        ),
    ];
    let mut zeros = vec![0.0f32; 10_007];
    for v in zeros.iter_mut().step_by(97) {
        *v = r.random_range(-1.0..1.0);
    }
    out.push(("many zeros".into(), zeros));
    let few: Vec<f32> = (0..20_011)
        .map(|_| [0.5f32, -0.5, 1.0, -2.0, 0.0][r.random_range(0..5)])
        .collect();
    out.push(("five values".into(), few));
    out.push(("random".into(), uniform(&mut r, 33_333)));
    out
}

fn keys(v: &[f32]) -> Vec<u32> {
    v.iter().map(|&x| magnitude_key(x)).collect()
}

#[test]
fn radix_select_equals_select_nth_bit_for_bit() {
    for (name, v) in adversarial() {
        let ks = keys(&v);
        let n = ks.len() as u64;
        for k in [1, 2, n / 3 + 1, n / 2, n - 1, n]
            .into_iter()
            .filter(|&k| k >= 1 && k <= n)
        {
            let t = radix_select(|| ks.iter().copied(), k);
            let want = select_nth_threshold(&ks, k);
            assert_eq!(t.key, want, "{name} k={k}");
            let gt = ks.iter().filter(|&&x| x > want).count() as u64;
            let eq = ks.iter().filter(|&&x| x == want).count() as u64;
            assert_eq!(
                (t.count_gt, t.count_eq, t.ties_to_keep),
                (gt, eq, k - gt),
                "{name} k={k}"
            );
        }
    }
}

#[test]
fn keep_count_rounds_up_and_rejects_bad_fractions() {
    assert_eq!(keep_count(0.8, 10).unwrap(), 8);
    assert_eq!(keep_count(0.81, 10).unwrap(), 9);
    assert_eq!(keep_count(0.0, 10).unwrap(), 0);
    assert_eq!(keep_count(1.0, 10).unwrap(), 10);
    assert_eq!(keep_count(1e-9, 10).unwrap(), 1);
    for bad in [-0.1, 1.1, f64::NAN, f64::INFINITY] {
        assert!(matches!(
            keep_count(bad, 10),
            Err(dualpriv::Error::Setting {
                setting: dualpriv::error::Setting::KeepFrac,
                ..
            })
        ));
    }
}

const SGD: Optimizer = Optimizer::Sgd {
    lr: 0.5,
    momentum: 0.0,
    weight_decay: 0.0,
};

fn cfg(keep_frac: f64, noise_std: f64, opt: Optimizer) -> UpdateConfig {
    cfg_rng(keep_frac, noise_std, opt, RngKind::Chacha20)
}

fn cfg_rng(keep_frac: f64, noise_std: f64, opt: Optimizer, rng: RngKind) -> UpdateConfig {
    UpdateConfig {
        keep_frac,
        noise_std,
        noise: StreamKey::from_insecure_seed(rng, 99),
        step: 4,
        inv_batch: 0.25,
        opt,
    }
}

/// Reference mask by sorting: stable sort of positions by magnitude key, descending,
/// so equal keys keep their set order; the first k are kept.
fn sorted_mask(noisy: &[f32], k: usize) -> Vec<bool> {
    let mut idx: Vec<usize> = (0..noisy.len()).collect();
    idx.sort_by_key(|&i| std::cmp::Reverse(magnitude_key(noisy[i])));
    let mut mask = vec![false; noisy.len()];
    for &i in &idx[..k] {
        mask[i] = true;
    }
    mask
}

#[test]
fn exactly_k_largest_noisy_coordinates_are_updated() {
    for (name, g) in adversarial() {
        for keep_frac in [0.0, 0.3, 0.5, 0.8, 1.0] {
            for noise_std in [0.0f64, 0.7] {
                let c = cfg(keep_frac, noise_std, SGD);
                let mut p = vec![1.0f32; g.len()];
                let rep = noise_prune_update(
                    &mut [TensorState {
                        tensor_id: 5,
                        grad: &g,
                        param: &mut p,
                        m: &mut [],
                        v: &mut [],
                    }],
                    &c,
                )
                .unwrap();
                let noisy = noisy_gradient(&g, 5, &c);
                let k = keep_count(keep_frac, g.len() as u64).unwrap() as usize;
                assert_eq!(
                    (rep.k, rep.kept),
                    (k as u64, k as u64),
                    "{name} {keep_frac}"
                );
                let mask = sorted_mask(&noisy, k);
                for j in 0..g.len() {
                    let want = if mask[j] {
                        (-0.5f32).mul_add(noisy[j] * 0.25, 1.0)
                    } else {
                        1.0
                    };
                    assert_eq!(
                        p[j].to_bits(),
                        want.to_bits(),
                        "{name} keep={keep_frac} j={j}"
                    );
                }
            }
        }
    }
}

#[test]
fn global_scope_selects_over_the_concatenation() {
    let mut r = rng(11);
    let (a, b) = (
        uniform(&mut r, 1000),
        uniform(&mut r, 3001)
            .iter()
            .map(|v| v * 0.1)
            .collect::<Vec<_>>(),
    );
    let c = cfg(0.5, 0.0, SGD);
    let (mut pa, mut pb) = (vec![0.0f32; a.len()], vec![0.0f32; b.len()]);
    let rep = noise_prune_update(
        &mut [
            TensorState {
                tensor_id: 0,
                grad: &a,
                param: &mut pa,
                m: &mut [],
                v: &mut [],
            },
            TensorState {
                tensor_id: 1,
                grad: &b,
                param: &mut pb,
                m: &mut [],
                v: &mut [],
            },
        ],
        &c,
    )
    .unwrap();
    let cat: Vec<f32> = a.iter().chain(&b).copied().collect();
    let mask = sorted_mask(&cat, rep.k as usize);
    let updated: Vec<bool> = pa.iter().chain(&pb).map(|&x| x != 0.0).collect();
    assert_eq!(updated, mask);
    // b is ten times smaller, so global selection favours a; per-tensor scope does not.
    assert!(pa.iter().filter(|&&x| x != 0.0).count() > 900);
    let mut pb2 = vec![0.0f32; b.len()];
    let rep_b = noise_prune_update(
        &mut [TensorState {
            tensor_id: 1,
            grad: &b,
            param: &mut pb2,
            m: &mut [],
            v: &mut [],
        }],
        &c,
    )
    .unwrap();
    assert_eq!(rep_b.kept, 1501);
}

#[test]
fn masked_out_coordinates_keep_params_and_moments() {
    let mut r = rng(12);
    let g = uniform(&mut r, 5000);
    for opt in [
        Optimizer::Sgd {
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 0.01,
        },
        Optimizer::AdamW {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
            t: 3,
        },
    ]
    .into_iter()
    // keep 1.0: every coordinate, the update's parallel path (5000 values: 3 chunks).
    .flat_map(|o| [(o, 0.2), (o, 1.0)])
    {
        let (opt, keep) = opt;
        let c = cfg(keep, 0.3, opt);
        let p0 = uniform(&mut r, g.len());
        let m0 = uniform(&mut r, g.len());
        let v0: Vec<f32> = uniform(&mut r, g.len()).iter().map(|x| x.abs()).collect();
        let (mut p, mut m, mut v) = (p0.clone(), m0.clone(), v0.clone());
        noise_prune_update(
            &mut [TensorState {
                tensor_id: 2,
                grad: &g,
                param: &mut p,
                m: &mut m,
                v: &mut v,
            }],
            &c,
        )
        .unwrap();
        let noisy = noisy_gradient(&g, 2, &c);
        let mask = sorted_mask(&noisy, keep_count(keep, g.len() as u64).unwrap() as usize);
        for j in 0..g.len() {
            if !mask[j] {
                assert_eq!((p[j], m[j], v[j]), (p0[j], m0[j], v0[j]), "{opt:?} j={j}");
                continue;
            }
            // The textbook formulas, in f64.
            let gj = noisy[j] as f64 * 0.25;
            let (pj, mj, vj) = (p0[j] as f64, m0[j] as f64, v0[j] as f64);
            let (wp, wm) = match opt {
                Optimizer::Sgd {
                    lr,
                    momentum,
                    weight_decay,
                } => {
                    let gg = gj + weight_decay as f64 * pj;
                    let mm = momentum as f64 * mj + gg;
                    (pj - lr as f64 * mm, mm)
                }
                Optimizer::AdamW {
                    lr,
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                    t,
                } => {
                    let (b1, b2) = (beta1 as f64, beta2 as f64);
                    let mm = b1 * mj + (1.0 - b1) * gj;
                    let vv = b2 * vj + (1.0 - b2) * gj * gj;
                    assert!((v[j] as f64 - vv).abs() <= 1e-5 * vv.abs().max(1e-6));
                    let upd = (mm / (1.0 - b1.powi(t as i32)))
                        / ((vv / (1.0 - b2.powi(t as i32))).sqrt() + eps as f64);
                    (pj - lr as f64 * (upd + weight_decay as f64 * pj), mm)
                }
            };
            assert!(
                (p[j] as f64 - wp).abs() <= 1e-5 * wp.abs().max(1e-3),
                "{opt:?} p {} vs {wp}",
                p[j]
            );
            assert!(
                (m[j] as f64 - wm).abs() <= 1e-5 * wm.abs().max(1e-3),
                "{opt:?} m"
            );
        }
    }
}

/// ñ_j = (f64(S_j) + σC·z_j) as f32 with z from the configured stream (tensor id,
/// step), for both generators; σC = 0 passes S through bit for bit (−0.0 included).
#[test]
fn noisy_gradient_is_formed_in_f64_from_the_stream() {
    use dualpriv::dp::noise::NoiseKey;
    let mut r = rng(13);
    let mut g = uniform(&mut r, 10_001);
    g[3] = -0.0;
    g[4] = f32::from_bits(1); // a denormal
    for rng_kind in [RngKind::Chacha20, RngKind::Philox] {
        let c = cfg_rng(0.5, 0.7, SGD, rng_kind);
        let got = noisy_gradient(&g, 6, &c);
        for (j, (&x, &y)) in g.iter().zip(&got).enumerate() {
            let z = NoiseKey {
                stream: c.noise,
                tensor_id: 6,
                step: c.step,
            }
            .normal(j as u64);
            let want = (f64::from(x) + 0.7 * z) as f32;
            assert_eq!(y.to_bits(), want.to_bits(), "{rng_kind} j={j}");
        }
        let clean = noisy_gradient(&g, 6, &cfg_rng(0.5, 0.0, SGD, rng_kind));
        assert_eq!(
            clean.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            g.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
    }
    let (a, b) = (
        noisy_gradient(&g, 6, &cfg_rng(0.5, 0.7, SGD, RngKind::Chacha20)),
        noisy_gradient(&g, 6, &cfg_rng(0.5, 0.7, SGD, RngKind::Philox)),
    );
    assert!(a.iter().zip(&b).filter(|(x, y)| x == y).count() < 10);
}

#[test]
fn non_finite_values_are_reported_and_nothing_is_written() {
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut g = vec![0.5f32; 100];
        g[37] = bad;
        for keep in [0.0, 0.5, 1.0] {
            let mut p = vec![1.0f32; 100];
            let e = noise_prune_update(
                &mut [TensorState {
                    tensor_id: 0,
                    grad: &g,
                    param: &mut p,
                    m: &mut [],
                    v: &mut [],
                }],
                &cfg(keep, 0.1, SGD),
            );
            assert!(
                matches!(e, Err(dualpriv::Error::NonFinite(_))),
                "{bad} keep {keep}"
            );
            assert!(p.iter().all(|&x| x == 1.0));
        }
    }
}

#[test]
fn bad_configs_and_buffers_are_errors() {
    let g = vec![1.0f32; 10];
    let run = |c: UpdateConfig, p: &mut [f32], m: &mut [f32]| {
        noise_prune_update(
            &mut [TensorState {
                tensor_id: 0,
                grad: &g,
                param: p,
                m,
                v: &mut [],
            }],
            &c,
        )
    };
    assert!(run(cfg(1.5, 0.0, SGD), &mut [0.0; 10], &mut []).is_err());
    assert!(run(cfg(0.5, -1.0, SGD), &mut [0.0; 10], &mut []).is_err());
    assert!(run(cfg(0.5, f64::NAN, SGD), &mut [0.0; 10], &mut []).is_err());
    assert!(run(cfg(0.5, f64::INFINITY, SGD), &mut [0.0; 10], &mut []).is_err());
    assert!(run(cfg(0.5, 0.0, SGD), &mut [0.0; 9], &mut []).is_err());
    let mom = Optimizer::Sgd {
        lr: 0.1,
        momentum: 0.9,
        weight_decay: 0.0,
    };
    assert!(
        run(cfg(0.5, 0.0, mom), &mut [0.0; 10], &mut []).is_err(),
        "momentum without buffer"
    );
    let adam = Optimizer::AdamW {
        lr: 0.1,
        beta1: 0.9,
        beta2: 0.99,
        eps: 1e-8,
        weight_decay: 0.0,
        t: 0,
    };
    assert!(
        run(cfg(0.5, 0.0, adam), &mut [0.0; 10], &mut [0.0; 10]).is_err(),
        "t = 0"
    );
    let sgd_bad = Optimizer::Sgd {
        lr: f32::NAN,
        momentum: 0.0,
        weight_decay: 0.0,
    };
    assert!(run(cfg(0.5, 0.0, sgd_bad), &mut [0.0; 10], &mut []).is_err());
}

#[cfg(feature = "cuda")]
mod gpu {
    use super::*;
    use dualpriv::gpu::gpu_or_skip;
    use dualpriv::gpu::prune::{DeviceTensor, PrunePlan};

    /// Runs the CPU reference and the GPU on the same tensors and compares the
    /// report, the mask and every updated value bit for bit: the noisy values are
    /// formed identically in f64 (same normals, plain product and sum), the update
    /// mirrors the CPU's fused multiply-adds, and AdamW's division and sqrt are
    /// correctly rounded on both.
    fn compare(
        gpu: &dualpriv::gpu::Gpu,
        plan: &mut PrunePlan,
        grads: &[Vec<f32>],
        c: &UpdateConfig,
        what: &str,
    ) {
        let mut r = rng(20);
        let p0: Vec<Vec<f32>> = grads.iter().map(|g| uniform(&mut r, g.len())).collect();
        let m0: Vec<Vec<f32>> = grads.iter().map(|g| uniform(&mut r, g.len())).collect();
        let v0: Vec<Vec<f32>> = grads
            .iter()
            .map(|g| uniform(&mut r, g.len()).iter().map(|x| x.abs()).collect())
            .collect();
        let (mut p, mut m, mut v) = (p0.clone(), m0.clone(), v0.clone());
        let mut states: Vec<TensorState> = p
            .iter_mut()
            .zip(m.iter_mut())
            .zip(v.iter_mut())
            .enumerate()
            .map(|(i, ((p, m), v))| TensorState {
                tensor_id: 100 + i as u32,
                grad: &grads[i],
                param: p,
                m,
                v,
            })
            .collect();
        let want = noise_prune_update(&mut states, c).unwrap();
        let dg: Vec<_> = grads.iter().map(|g| gpu.upload(g).unwrap()).collect();
        let mut dp: Vec<_> = p0.iter().map(|x| gpu.upload(x).unwrap()).collect();
        let mut dm: Vec<_> = m0.iter().map(|x| gpu.upload(x).unwrap()).collect();
        let mut dv: Vec<_> = v0.iter().map(|x| gpu.upload(x).unwrap()).collect();
        let tensors: Vec<DeviceTensor> = dg
            .iter()
            .zip(dp.iter_mut())
            .zip(dm.iter_mut().zip(dv.iter_mut()))
            .enumerate()
            .map(|(i, ((g, p), (m, v)))| {
                DeviceTensor::new(gpu, 100 + i as u32, g, p, Some(m), Some(v)).unwrap()
            })
            .collect();
        let got = plan.run(gpu, &tensors, c).unwrap();
        drop(tensors);
        assert_eq!(got, want, "{what}: report");
        for i in 0..grads.len() {
            for (name, dev, cpu, init) in [
                ("param", &dp[i], &p[i], &p0[i]),
                ("m", &dm[i], &m[i], &m0[i]),
                ("v", &dv[i], &v[i], &v0[i]),
            ] {
                let g = gpu.download(dev).unwrap();
                for j in 0..g.len() {
                    assert_eq!(
                        g[j] == init[j],
                        cpu[j] == init[j],
                        "{what}: {name}[{i}][{j}] mask differs"
                    );
                    assert_eq!(
                        g[j].to_bits(),
                        cpu[j].to_bits(),
                        "{what}: {name}[{i}][{j}] {} vs {}",
                        g[j],
                        cpu[j]
                    );
                }
            }
        }
    }

    #[test]
    fn gpu_prune_matches_cpu() {
        let Some(gpu) = gpu_or_skip("gpu_prune_matches_cpu") else {
            return;
        };
        let mut plan = PrunePlan::new(&gpu, 4, 1 << 22).unwrap();
        let adam = Optimizer::AdamW {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            t: 2,
        };
        let mom = Optimizer::Sgd {
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 0.0,
        };
        for (name, g) in adversarial() {
            for keep in [0.0, 0.3, 0.8, 1.0] {
                // Plain SGD is handed (unused) moment buffers: they must stay untouched.
                for (opt, std) in [(mom, 0.0), (adam, 0.5), (SGD, 0.3)] {
                    for rng_kind in [RngKind::Chacha20, RngKind::Philox] {
                        compare(
                            &gpu,
                            &mut plan,
                            std::slice::from_ref(&g),
                            &cfg_rng(keep, std, opt, rng_kind),
                            &format!("{name} keep={keep} std={std} {rng_kind}"),
                        );
                    }
                }
            }
        }
        // Global scope over several tensors, with ties spanning many apply chunks.
        let mut r = rng(21);
        let big: Vec<f32> = (0..300_001)
            .map(|_| [0.5f32, -0.5, 0.25, 0.0][r.random_range(0..4)])
            .collect();
        let set = vec![
            uniform(&mut r, 70_000),
            big,
            vec![0.5; 9000],
            uniform(&mut r, 3),
        ];
        for keep in [0.1, 0.5, 0.77] {
            compare(
                &gpu,
                &mut plan,
                &set,
                &cfg(keep, 0.0, mom),
                &format!("ties global keep={keep}"),
            );
            for rng_kind in [RngKind::Chacha20, RngKind::Philox] {
                compare(
                    &gpu,
                    &mut plan,
                    &set,
                    &cfg_rng(keep, 0.2, adam, rng_kind),
                    &format!("noisy global keep={keep} {rng_kind}"),
                );
            }
        }
    }

    #[test]
    fn gpu_non_finite_is_reported_and_nothing_written() {
        let Some(gpu) = gpu_or_skip("gpu_non_finite_is_reported_and_nothing_written") else {
            return;
        };
        let mut plan = PrunePlan::new(&gpu, 1, 1 << 16).unwrap();
        let mut g = vec![0.5f32; 20_000];
        g[12_345] = f32::NAN;
        let dg = gpu.upload(&g).unwrap();
        for keep in [0.0, 0.5, 1.0] {
            let mut dp = gpu.upload(&vec![1.0f32; g.len()]).unwrap();
            let t = DeviceTensor::plain(&gpu, 0, &dg, &mut dp).unwrap();
            let e = plan.run(&gpu, &[t], &cfg(keep, 0.1, SGD));
            assert!(
                matches!(e, Err(dualpriv::Error::NonFinite(_))),
                "keep {keep}"
            );
            assert!(gpu.download(&dp).unwrap().iter().all(|&x| x == 1.0));
        }
    }
}

#[test]
fn a_tensor_id_twice_in_one_update_is_refused() {
    // Two tensors under one id would draw the same noise (the id is part of the
    // noise counter): the backend refuses the set before any update.
    use dualpriv::backend::cpu::Cpu;
    use dualpriv::backend::dp::{DpBackend, TensorUpdate};
    use dualpriv::backend::Backend;
    let be = Cpu;
    let g = be.upload(&[0.5f32; 8]).unwrap();
    let mut p1 = be.upload(&[1.0f32; 8]).unwrap();
    let mut p2 = be.upload(&[1.0f32; 8]).unwrap();
    let c = cfg(1.0, 1.0, SGD);
    for (ids, ok) in [((3, 3), false), ((3, 4), true)] {
        let mut set = vec![
            TensorUpdate::<Cpu> {
                tensor_id: ids.0,
                grad: &g,
                param: &mut p1,
                m: None,
                v: None,
            },
            TensorUpdate::<Cpu> {
                tensor_id: ids.1,
                grad: &g,
                param: &mut p2,
                m: None,
                v: None,
            },
        ];
        let res = be.noise_prune_update(&mut set, &c);
        drop(set);
        if ok {
            assert!(res.is_ok(), "{res:?}");
            assert_ne!(be.download(&p1).unwrap(), vec![1.0f32; 8], "updated");
        } else {
            let err = res.unwrap_err().to_string();
            assert!(err.contains("appears twice"), "{err}");
            assert_eq!(
                be.download(&p1).unwrap(),
                vec![1.0f32; 8],
                "nothing updated"
            );
        }
    }
}
