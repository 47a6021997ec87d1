//! Visual token selection: the CPU reference (`dualpriv::vision::tokens`) against a
//! brute-force f64 reference written here in the most obvious way, its edge cases
//! and errors, and the GPU (`dualpriv::gpu::tokens`) against the CPU.
mod common;

use dualpriv::dp::noise::{NoiseKey, RngKind, StreamKey};
use dualpriv::error::Setting;
use dualpriv::vision::tokens::{
    cls_scores, dominant_indices, gather_fuse, plan_tokens, select_tokens, TokenSelectConfig,
    TokenShape, NOT_A_MEMBER, TOKENS_NOISE_TENSOR_ID,
};
use dualpriv::Error;
use rand::seq::SliceRandom;
use rand::Rng;

/// One batch of layer outputs.
struct Inputs {
    shape: TokenShape,
    attn: Vec<f32>,
    keys: Vec<f32>,
    hidden: Vec<f32>,
}

fn shape(batch: usize, tokens: usize, heads: usize, head_dim: usize, hidden: usize) -> TokenShape {
    TokenShape {
        batch,
        tokens,
        heads,
        head_dim,
        hidden,
    }
}

fn cfg(keep: usize, context: usize) -> TokenSelectConfig {
    TokenSelectConfig {
        keep,
        context,
        fuse_noise_std: 0.0,
        noise: StreamKey::from_insecure_seed(RngKind::Chacha20, 0),
    }
}

/// Random inputs whose patch scores have no near-ties: each patch gets a distinct
/// level (a random permutation, 0.01 apart) plus per-head jitter below 0.001, so
/// f32 and f64 rank them identically.
fn gen(s: TokenShape, seed: u64) -> Inputs {
    let mut rng = common::rng(seed);
    let (n, p) = (s.tokens, s.patches());
    let mut attn = vec![0.0f32; s.batch * s.heads * n];
    for b in 0..s.batch {
        let mut level: Vec<usize> = (0..p).collect();
        level.shuffle(&mut rng);
        for h in 0..s.heads {
            let row = &mut attn[(b * s.heads + h) * n..(b * s.heads + h + 1) * n];
            row[0] = rng.random::<f32>();
            for j in 1..n {
                row[j] = (level[j - 1] as f32 + 1.0) * 1e-2 + rng.random::<f32>() * 1e-3;
            }
        }
    }
    let mut uniform =
        |len: usize| -> Vec<f32> { (0..len).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect() };
    let keys = uniform(s.batch * n * s.heads * s.head_dim);
    let hidden = uniform(s.batch * n * s.hidden);
    Inputs {
        shape: s,
        attn,
        keys,
        hidden,
    }
}

/// The brute-force reference's output.
struct Naive {
    tokens: Vec<f32>,
    kept: Vec<u32>,
    /// Whether some member's best and second-best similarity differ by less than
    /// 1e-5 without being exactly equal (an f32 computation might pick either).
    near_tie: bool,
}

/// VisionZip written in the most obvious way, in f64: sort by score, walk the
/// remaining tokens, argmax over all centers, average the members.
fn naive(inp: &Inputs, c: &TokenSelectConfig) -> Naive {
    let s = inp.shape;
    let (n, h, hd, d) = (s.tokens, s.heads, s.head_dim, s.hidden);
    let (k, m) = (c.keep, c.context);
    let mut tokens = Vec::new();
    let mut kept_all = Vec::new();
    let mut near_tie = false;
    for b in 0..s.batch {
        let hid = |t: usize| &inp.hidden[(b * n + t) * d..(b * n + t + 1) * d];
        let mut scored: Vec<(f64, usize)> = (1..n)
            .map(|j| {
                let sum: f64 = (0..h).map(|hh| inp.attn[(b * h + hh) * n + j] as f64).sum();
                (sum / h as f64, j)
            })
            .collect();
        scored.sort_by(|x, y| y.0.partial_cmp(&x.0).unwrap().then(x.1.cmp(&y.1)));
        let mut kept: Vec<usize> = scored[..k].iter().map(|x| x.1).collect();
        kept.sort();
        kept.insert(0, 0);
        let remaining: Vec<usize> = (1..n).filter(|t| !kept.contains(t)).collect();
        for &t in &kept {
            tokens.extend_from_slice(hid(t));
            kept_all.push(t as u32);
        }
        if m == 0 {
            continue;
        }
        let metric = |t: usize| -> Vec<f64> {
            let row = &inp.keys[(b * n + t) * h * hd..(b * n + t + 1) * h * hd];
            let v: Vec<f64> = (0..hd)
                .map(|e| (0..h).map(|hh| row[hh * hd + e] as f64).sum::<f64>() / h as f64)
                .collect();
            let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
            v.iter().map(|x| x / norm).collect()
        };
        let step = remaining.len() / m;
        let centers: Vec<usize> = (0..m).map(|i| remaining[i * step]).collect();
        let center_metric: Vec<Vec<f64>> = centers.iter().map(|&t| metric(t)).collect();
        let mut members: Vec<Vec<usize>> = vec![Vec::new(); m];
        for &t in remaining.iter().filter(|t| !centers.contains(t)) {
            let mt = metric(t);
            let sims: Vec<f64> = center_metric
                .iter()
                .map(|cm| cm.iter().zip(&mt).map(|(a, b)| a * b).sum())
                .collect();
            let mut best = 0;
            for i in 1..m {
                if sims[i] > sims[best] {
                    best = i;
                }
            }
            for (i, &sim) in sims.iter().enumerate() {
                let gap = sims[best] - sim;
                if i != best && gap > 0.0 && gap < 1e-5 {
                    near_tie = true;
                }
            }
            members[best].push(t);
        }
        for (ci, &ct) in centers.iter().enumerate() {
            let count = members[ci].len().max(1) as f64;
            for e in 0..d {
                let sum: f64 = members[ci].iter().map(|&t| hid(t)[e] as f64).sum();
                tokens.push((hid(ct)[e] as f64 + sum / count) as f32);
            }
        }
    }
    Naive {
        tokens,
        kept: kept_all,
        near_tie,
    }
}

/// Inputs for `s` on which the brute-force reference has no similarity near-tie.
fn gen_clean(s: TokenShape, c: &TokenSelectConfig, seed: u64) -> (Inputs, Naive) {
    for attempt in 0..100 {
        let inp = gen(s, seed * 1000 + attempt);
        let nv = naive(&inp, c);
        if !nv.near_tie {
            return (inp, nv);
        }
    }
    panic!("no near-tie-free inputs found for {s:?}");
}

/// |a − b| ≤ tol · max(1, |b|) element-wise, with a message naming the first failure.
fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
        assert!(
            (a - b).abs() <= tol * b.abs().max(1.0),
            "{what}: element {i}: got {a}, want {b}"
        );
    }
}

/// (B, N, H, hd, D, K, M): N not a power of two, odd hd and D, B > 1, K and M from 0
/// to their limits, P = 0, and LLaVA-1.5's setting.
const CASES: &[(usize, usize, usize, usize, usize, usize, usize)] = &[
    (1, 10, 2, 3, 5, 3, 2),
    (3, 50, 4, 7, 9, 10, 5),
    (2, 197, 3, 16, 33, 40, 13),
    (2, 101, 1, 1, 1, 0, 7),
    (2, 61, 5, 9, 11, 0, 60),
    (1, 30, 2, 5, 3, 29, 0),
    (2, 30, 2, 5, 3, 10, 19),
    (2, 30, 2, 5, 3, 10, 0),
    (2, 30, 2, 5, 3, 28, 1),
    (1, 1, 2, 3, 4, 0, 0),
    (2, 577, 16, 64, 1024, 53, 10),
];

#[test]
fn cpu_matches_brute_force() {
    for (i, &(b, n, h, hd, d, k, m)) in CASES.iter().enumerate() {
        let s = shape(b, n, h, hd, d);
        let c = cfg(k, m);
        let (inp, nv) = gen_clean(s, &c, i as u64);
        let got = select_tokens(&inp.attn, &inp.keys, &inp.hidden, &s, &c).unwrap();
        assert_eq!(got.kept, nv.kept, "case {i} {s:?} {c:?}: kept indices");
        assert_eq!(
            got.tokens.len(),
            b * (1 + k + m) * d,
            "case {i}: output length"
        );
        assert_close(
            &got.tokens,
            &nv.tokens,
            1e-5,
            &format!("case {i} {s:?} {c:?}"),
        );
    }
}

#[test]
fn plan_partitions_the_patches() {
    let s = shape(3, 77, 3, 6, 4);
    let c = cfg(20, 9);
    let inp = gen(s, 7);
    let plan = plan_tokens(&inp.attn, &inp.keys, &s, &c).unwrap();
    let r = s.patches() - c.keep;
    let step = r / c.context;
    for b in 0..s.batch {
        let kept = &plan.kept[b * 21..(b + 1) * 21];
        let rem = &plan.remaining[b * r..(b + 1) * r];
        assert_eq!(kept[0], 0, "CLS first");
        assert!(kept.windows(2).all(|w| w[0] < w[1]), "kept ascending");
        assert!(rem.windows(2).all(|w| w[0] < w[1]), "remaining ascending");
        let mut all: Vec<u32> = kept[1..].iter().chain(rem).copied().collect();
        all.sort();
        assert_eq!(
            all,
            (1..77).collect::<Vec<u32>>(),
            "kept ∪ remaining = patches"
        );
        for m in 0..c.context {
            assert_eq!(plan.centers[b * c.context + m], rem[m * step], "center {m}");
        }
        for (ri, &a) in plan.assign[b * r..(b + 1) * r].iter().enumerate() {
            let is_center = ri % step == 0 && ri / step < c.context;
            assert_eq!(a == NOT_A_MEMBER, is_center, "image {b} remaining {ri}");
            assert!(a == NOT_A_MEMBER || (a as usize) < c.context);
        }
    }
}

#[test]
fn keep_all_without_context_is_the_identity() {
    for &(b, n, h, hd, d) in &[(1, 10, 2, 3, 5), (3, 577, 16, 64, 17), (2, 1, 1, 1, 3)] {
        let s = shape(b, n, h, hd, d);
        let inp = gen(s, 11);
        let got = select_tokens(&inp.attn, &inp.keys, &inp.hidden, &s, &cfg(n - 1, 0)).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got.tokens), bits(&inp.hidden), "{s:?}");
        let want: Vec<u32> = (0..b).flat_map(|_| 0..n as u32).collect();
        assert_eq!(got.kept, want);
    }
}

/// Inputs with H = 1 and the given patch scores, CLS score 0; hidden[t] = [t, −t].
fn scored_inputs(scores: &[f32]) -> Inputs {
    let n = scores.len() + 1;
    let s = shape(1, n, 1, 2, 2);
    let mut attn = vec![0.0];
    attn.extend_from_slice(scores);
    Inputs {
        shape: s,
        attn,
        keys: (0..n * 2).map(|i| (i % 3) as f32 + 1.0).collect(),
        hidden: (0..n).flat_map(|t| [t as f32, -(t as f32)]).collect(),
    }
}

#[test]
fn ties_go_to_the_lower_index_and_output_keeps_original_order() {
    // Tokens 2, 3 and 5 tie at 3.0: the two lowest (2, 3) win.
    assert_eq!(
        dominant_indices(&[1.0, 3.0, 3.0, 2.0, 3.0], 2).unwrap(),
        [0, 2, 3]
    );
    // All equal: the first K.
    assert_eq!(dominant_indices(&[0.5; 8], 3).unwrap(), [0, 1, 2, 3]);
    // Tied at the cut: 4.0 is in, the lower-indexed 2.0 of the three is in.
    assert_eq!(
        dominant_indices(&[2.0, 4.0, 2.0, 1.0, 2.0], 2).unwrap(),
        [0, 1, 2]
    );
    // NaN ranks lowest; −0 and +0 tie.
    assert_eq!(
        dominant_indices(&[f32::NAN, -0.0, 0.0, f32::NEG_INFINITY], 2).unwrap(),
        [0, 2, 3]
    );
    assert_eq!(dominant_indices(&[1.0, 2.0], 0).unwrap(), [0]);

    // Highest scores last: output is still ascending token order, rows follow.
    let inp = scored_inputs(&[1.0, 2.0, 3.0, 4.0, 5.0]);
    let got = select_tokens(&inp.attn, &inp.keys, &inp.hidden, &inp.shape, &cfg(3, 0)).unwrap();
    assert_eq!(got.kept, [0, 3, 4, 5]);
    assert_eq!(got.tokens, [0.0, -0.0, 3.0, -3.0, 4.0, -4.0, 5.0, -5.0]);
}

#[test]
fn scores_are_head_means() {
    let s = shape(2, 3, 2, 1, 1);
    // [B=2, H=2, N=3]
    let attn = [0.0, 1.0, 2.0, 0.0, 3.0, 4.0, 9.0, 0.5, 0.25, 9.0, 0.5, 0.75];
    assert_eq!(cls_scores(&attn, &s).unwrap(), [2.0, 3.0, 0.5, 0.5]);
}

#[test]
fn empty_cluster_equals_its_center() {
    // P = 6, K = 0, M = 2: R = 6, step = 3, centers are tokens 1 and 4. Every other
    // token's key points like token 1's, so center 4 gets no members.
    let n = 7;
    let s = shape(1, n, 1, 2, 3);
    let attn = vec![0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6];
    let key = |t: usize| {
        if t == 4 {
            [0.0, 1.0]
        } else {
            [1.0, 0.1 * t as f32]
        }
    };
    let keys: Vec<f32> = (0..n).flat_map(key).collect();
    let hidden: Vec<f32> = (0..n * 3).map(|i| i as f32 * 0.5 - 3.0).collect();
    let c = cfg(0, 2);
    let plan = plan_tokens(&attn, &keys, &s, &c).unwrap();
    assert_eq!(plan.centers, [1, 4]);
    assert_eq!(plan.assign, [NOT_A_MEMBER, 0, 0, NOT_A_MEMBER, 0, 0]);
    let got = select_tokens(&attn, &keys, &hidden, &s, &c).unwrap();
    assert_eq!(got.kept, [0]);
    let row = |t: usize| &hidden[t * 3..t * 3 + 3];
    assert_eq!(&got.tokens[0..3], row(0), "CLS");
    for e in 0..3 {
        let mean = (row(2)[e] + row(3)[e] + row(5)[e] + row(6)[e]) / 4.0;
        assert!((got.tokens[3 + e] - (row(1)[e] + mean)).abs() < 1e-6);
    }
    assert_eq!(&got.tokens[6..9], row(4), "empty cluster = center alone");
}

#[test]
fn noise_changes_only_contextual_tokens_by_the_noise_stream() {
    let s = shape(2, 40, 3, 5, 7);
    let (k, m, sigma, seed) = (12, 6, 0.25f32, 0xDEAD_BEEF_u64);
    let inp = gen(s, 3);
    let clean = select_tokens(&inp.attn, &inp.keys, &inp.hidden, &s, &cfg(k, m)).unwrap();
    let noisy_cfg = TokenSelectConfig {
        fuse_noise_std: sigma,
        noise: StreamKey::from_insecure_seed(RngKind::Chacha20, seed),
        ..cfg(k, m)
    };
    let noisy = select_tokens(&inp.attn, &inp.keys, &inp.hidden, &s, &noisy_cfg).unwrap();
    let again = select_tokens(&inp.attn, &inp.keys, &inp.hidden, &s, &noisy_cfg).unwrap();
    assert_eq!(noisy, again, "deterministic for a seed");
    assert_eq!(noisy.kept, clean.kept);
    let key = NoiseKey {
        stream: StreamKey::from_insecure_seed(RngKind::Chacha20, seed),
        tensor_id: TOKENS_NOISE_TENSOR_ID,
        step: 0,
    };
    assert_eq!(noisy_cfg.noise_key(), key);
    let (o, d) = (1 + k + m, s.hidden);
    for b in 0..s.batch {
        for t in 0..o {
            for e in 0..d {
                let idx = (b * o + t) * d + e;
                let (y, x) = (noisy.tokens[idx], clean.tokens[idx]);
                if t <= k {
                    assert_eq!(y.to_bits(), x.to_bits(), "kept token changed");
                } else {
                    let i = ((b * m + (t - 1 - k)) * d + e) as u64;
                    let want = (f64::from(x) + f64::from(sigma) * key.normal(i)) as f32;
                    assert_eq!(y.to_bits(), want.to_bits(), "image {b} token {t} dim {e}");
                }
            }
        }
    }
    let other = TokenSelectConfig {
        noise: StreamKey::from_insecure_seed(RngKind::Chacha20, seed + 1),
        ..noisy_cfg
    };
    let other = select_tokens(&inp.attn, &inp.keys, &inp.hidden, &s, &other).unwrap();
    assert_ne!(other.tokens, noisy.tokens, "another seed gives other noise");
    let philox = TokenSelectConfig {
        noise: StreamKey::from_insecure_seed(RngKind::Philox, seed),
        ..noisy_cfg
    };
    let philox = select_tokens(&inp.attn, &inp.keys, &inp.hidden, &s, &philox).unwrap();
    assert_ne!(
        philox.tokens, noisy.tokens,
        "the generator is part of the stream"
    );
}

fn expect_config(r: dualpriv::Result<impl std::fmt::Debug>, needles: &[&str]) {
    match r {
        Err(Error::Config(msg)) => {
            for n in needles {
                assert!(msg.contains(n), "message {msg:?} lacks {n:?}");
            }
        }
        other => panic!("expected a config error, got {other:?}"),
    }
}

/// An error naming `setting` (the CLI adds its flag), whose message holds `needles`.
fn expect_setting(r: dualpriv::Result<impl std::fmt::Debug>, setting: Setting, needles: &[&str]) {
    match r {
        Err(Error::Setting {
            setting: s,
            message,
        }) => {
            assert_eq!(s, setting, "{message}");
            for n in needles {
                assert!(message.contains(n), "message {message:?} lacks {n:?}");
            }
        }
        other => panic!("expected an error naming {setting:?}, got {other:?}"),
    }
}

fn expect_shape(r: dualpriv::Result<impl std::fmt::Debug>, needle: &str) {
    match r {
        Err(Error::Shape(msg)) => assert!(msg.contains(needle), "message {msg:?} lacks {needle:?}"),
        other => panic!("expected a shape error, got {other:?}"),
    }
}

#[test]
fn bad_configs_and_shapes_are_errors() {
    let s = shape(2, 30, 2, 5, 3);
    let inp = gen(s, 1);
    let run = |c: TokenSelectConfig| select_tokens(&inp.attn, &inp.keys, &inp.hidden, &s, &c);
    // M > R: P = 29, K = 20, R = 9.
    expect_setting(
        run(cfg(20, 10)),
        Setting::ContextTokens,
        &["10", "9", "fewer dominant patches"],
    );
    expect_setting(run(cfg(30, 0)), Setting::KeepTokens, &["30", "29"]);
    expect_config(
        run(TokenSelectConfig {
            fuse_noise_std: -1.0,
            ..cfg(3, 2)
        }),
        &["noise"],
    );
    expect_config(
        run(TokenSelectConfig {
            fuse_noise_std: f32::NAN,
            ..cfg(3, 2)
        }),
        &["noise"],
    );
    expect_setting(
        dominant_indices(&[1.0, 2.0], 3),
        Setting::KeepTokens,
        &["3", "2"],
    );
    assert!(run(cfg(20, 9)).is_ok(), "M = R is allowed");

    let c = cfg(3, 2);
    let short = &inp.attn[1..];
    expect_shape(
        select_tokens(short, &inp.keys, &inp.hidden, &s, &c),
        "attn_cls",
    );
    expect_shape(select_tokens(&inp.attn, short, &inp.hidden, &s, &c), "keys");
    expect_shape(select_tokens(&inp.attn, &inp.keys, short, &s, &c), "hidden");
    expect_shape(cls_scores(short, &s), "attn_cls");
    for zero in [
        shape(0, 30, 2, 5, 3),
        shape(2, 0, 2, 5, 3),
        shape(2, 30, 0, 5, 3),
        shape(2, 30, 2, 0, 3),
        shape(2, 30, 2, 5, 0),
    ] {
        expect_shape(
            select_tokens(&[], &[], &[], &zero, &cfg(0, 0)),
            "must be ≥ 1",
        );
    }
    let huge = shape(usize::MAX / 2, 30, 2, 5, 3);
    expect_shape(select_tokens(&[], &[], &[], &huge, &cfg(0, 0)), "overflows");
}

#[test]
fn gather_fuse_rejects_a_bad_plan() {
    let s = shape(2, 30, 2, 5, 3);
    let c = cfg(10, 4);
    let inp = gen(s, 9);
    let plan = plan_tokens(&inp.attn, &inp.keys, &s, &c).unwrap();
    assert!(gather_fuse(&inp.hidden, &s, &c, &plan).is_ok());
    let mut short = plan.clone();
    short.assign.pop();
    expect_shape(gather_fuse(&inp.hidden, &s, &c, &short), "plan.assign");
    let mut far = plan.clone();
    far.centers[3] = 30;
    expect_shape(
        gather_fuse(&inp.hidden, &s, &c, &far),
        "plan.centers holds 30",
    );
    let mut wrong = plan;
    wrong.assign[1] = 4;
    expect_shape(
        gather_fuse(&inp.hidden, &s, &c, &wrong),
        "plan.assign holds 4",
    );
}

#[cfg(feature = "cuda")]
mod gpu {
    use super::*;
    use dualpriv::gpu::gpu_or_skip;
    use dualpriv::gpu::tokens as gt;
    use dualpriv::vision::tokens as ct;

    fn check(gpu: &dualpriv::gpu::Gpu, inp: &Inputs, c: &TokenSelectConfig, what: &str) {
        let s = inp.shape;
        let cpu_plan = ct::plan_tokens(&inp.attn, &inp.keys, &s, c).unwrap();
        let gpu_plan = gt::plan_tokens(gpu, &inp.attn, &inp.keys, &s, c).unwrap();
        assert_eq!(gpu_plan.kept, cpu_plan.kept, "{what}: kept");
        assert_eq!(gpu_plan.remaining, cpu_plan.remaining, "{what}: remaining");
        assert_eq!(gpu_plan.centers, cpu_plan.centers, "{what}: centers");
        assert_eq!(gpu_plan.assign, cpu_plan.assign, "{what}: assignments");
        let cpu = ct::select_tokens(&inp.attn, &inp.keys, &inp.hidden, &s, c).unwrap();
        let got = gt::select_tokens(gpu, &inp.attn, &inp.keys, &inp.hidden, &s, c).unwrap();
        assert_eq!(got.kept, cpu.kept, "{what}: kept");
        assert_close(&got.tokens, &cpu.tokens, 1e-5, what);
    }

    #[test]
    fn gpu_matches_cpu() {
        let Some(gpu) = gpu_or_skip("gpu_matches_cpu") else {
            return;
        };
        for (i, &(b, n, h, hd, d, k, m)) in CASES.iter().enumerate() {
            let s = shape(b, n, h, hd, d);
            let inp = gen(s, 100 + i as u64);
            check(
                &gpu,
                &inp,
                &cfg(k, m),
                &format!("case {i} {s:?} K={k} M={m}"),
            );
            let noisy = TokenSelectConfig {
                fuse_noise_std: 0.3,
                noise: StreamKey::from_insecure_seed(
                    if i % 2 == 0 {
                        RngKind::Chacha20
                    } else {
                        RngKind::Philox
                    },
                    42 + i as u64,
                ),
                ..cfg(k, m)
            };
            check(
                &gpu,
                &inp,
                &noisy,
                &format!("noisy case {i} {s:?} K={k} M={m}"),
            );
        }
        // The largest supported image: P = 1024, one full block.
        let s = shape(3, 1025, 2, 8, 40);
        check(&gpu, &gen(s, 5), &cfg(100, 50), "N = 1025");
    }

    /// Unstructured LLaVA-sized inputs, near-ties in score and similarity included:
    /// the kernels repeat the CPU's operations in order, so the plan is identical.
    #[test]
    fn gpu_plan_is_bit_exact_on_raw_llava_inputs() {
        let Some(gpu) = gpu_or_skip("gpu_plan_is_bit_exact_on_raw_llava_inputs") else {
            return;
        };
        let s = shape(2, 577, 16, 64, 1024);
        let mut rng = common::rng(2024);
        let mut draw = |len: usize, scale: f32| -> Vec<f32> {
            (0..len).map(|_| rng.random::<f32>() * scale).collect()
        };
        let inp = Inputs {
            shape: s,
            attn: draw(2 * 16 * 577, 1.0 / 577.0),
            keys: draw(2 * 577 * 1024, 2.0).iter().map(|x| x - 1.0).collect(),
            hidden: draw(2 * 577 * 1024, 1.0),
        };
        check(&gpu, &inp, &TokenSelectConfig::LLAVA_DEFAULT, "raw LLaVA");
        // Exact ties everywhere: identical scores and keys.
        let tied = Inputs {
            attn: vec![0.001; inp.attn.len()],
            keys: vec![0.5; inp.keys.len()],
            ..inp
        };
        check(&gpu, &tied, &TokenSelectConfig::LLAVA_DEFAULT, "all tied");
    }

    #[test]
    fn gpu_rejects_what_it_cannot_run() {
        let Some(gpu) = gpu_or_skip("gpu_rejects_what_it_cannot_run") else {
            return;
        };
        let s = shape(1, 1026, 1, 1, 1);
        let inp = gen(s, 0);
        expect_shape(
            gt::select_tokens(&gpu, &inp.attn, &inp.keys, &inp.hidden, &s, &cfg(1, 1)),
            "at most 1024 patches",
        );
        let s = shape(2, 30, 2, 5, 3);
        let inp = gen(s, 1);
        expect_setting(
            gt::select_tokens(&gpu, &inp.attn, &inp.keys, &inp.hidden, &s, &cfg(20, 10)),
            Setting::ContextTokens,
            &["contextual"],
        );
        expect_shape(
            gt::select_tokens(&gpu, &inp.attn[1..], &inp.keys, &inp.hidden, &s, &cfg(3, 2)),
            "attn_cls",
        );
        // A workspace sized for a small config refuses a larger one.
        let ws = gt::TokenWorkspace::new(&gpu, &s, &cfg(20, 2)).unwrap();
        expect_shape(ws.check_fits(&s, &cfg(3, 2)), "workspace");
    }
}
