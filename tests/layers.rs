//! Every backward op against central finite differences of its forward, in f64
//! ([`Cpu64`] runs the same generic reference code as [`Cpu`] in double precision),
//! so the tolerance is tight: 1e-6 relative to the gradient's scale.
//!
//! Each check builds the scalar L = Σ go ⊙ f(inputs) for a random upstream gradient
//! go, and compares the op's backward with (L(x + h) − L(x − h)) / 2h for every input
//! coordinate.
use dualpriv::backend::cpu::{Cpu, Cpu64};
use dualpriv::backend::{AttnShape, Backend, Blocks, MatmulSpec, PatchShape, RopeShape, RowShape};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const H: f64 = 1e-5;
const TOL: f64 = 1e-6;

fn rand_vec(r: &mut ChaCha8Rng, n: usize, scale: f64) -> Vec<f64> {
    (0..n).map(|_| r.random_range(-scale..scale)).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Checks `analytic[i]` = ∂L/∂inputs[i] by central differences of `loss`.
fn fd_check(
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

#[test]
fn matmul_all_transposes() {
    let be = Cpu64;
    let mut r = ChaCha8Rng::seed_from_u64(1);
    let (m, n, k) = (3, 4, 5);
    for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
        let a = rand_vec(&mut r, m * k, 1.0);
        let b = rand_vec(&mut r, k * n, 1.0);
        let c0 = rand_vec(&mut r, m * n, 1.0);
        let spec = MatmulSpec {
            m,
            n,
            k,
            trans_a: ta,
            trans_b: tb,
            alpha: 0.5,
            beta: 2.0,
        };
        let mut c = c0.clone();
        be.matmul(&mut c, &a, &b, spec).unwrap();
        for i in 0..m {
            for j in 0..n {
                let mut want = 2.0 * c0[i * n + j];
                for l in 0..k {
                    let av = if ta { a[l * m + i] } else { a[i * k + l] };
                    let bv = if tb { b[j * k + l] } else { b[l * n + j] };
                    want += 0.5 * av * bv;
                }
                assert!((c[i * n + j] - want).abs() < 1e-12, "matmul {ta} {tb}");
            }
        }
    }
    // Shape errors, not panics.
    let mut c = vec![0.0; 5];
    assert!(be
        .matmul(
            &mut c,
            &vec![0.0; 15],
            &vec![0.0; 20],
            MatmulSpec::nn(3, 4, 5)
        )
        .is_err());
}

#[test]
fn layernorm_backward() {
    let be = Cpu64;
    let mut r = ChaCha8Rng::seed_from_u64(2);
    let s = RowShape { rows: 3, dim: 7 };
    let eps = 1e-5;
    let x = rand_vec(&mut r, 21, 2.0);
    let w = rand_vec(&mut r, 7, 1.5);
    let b = rand_vec(&mut r, 7, 1.0);
    let go = rand_vec(&mut r, 21, 1.0);
    let fwd = |inp: &[Vec<f64>]| {
        let mut out = vec![0.0; 21];
        let (mut m, mut rs) = (vec![0.0; 3], vec![0.0; 3]);
        be.layernorm_fwd(&mut out, &mut m, &mut rs, &inp[0], &inp[1], &inp[2], s, eps)
            .unwrap();
        (out, m, rs)
    };
    let (_, m, rs) = fwd(&[x.clone(), w.clone(), b.clone()]);
    let (mut dx, mut dw, mut db) = (vec![0.0; 21], vec![0.0; 7], vec![0.0; 7]);
    be.layernorm_bwd(&mut dx, &mut dw, &mut db, &go, &x, &w, &m, &rs, s)
        .unwrap();
    fd_check("layernorm", &[x, w, b], &[dx, dw, db], |inp| {
        dot(&fwd(inp).0, &go)
    });
}

#[test]
fn rmsnorm_backward() {
    let be = Cpu64;
    let mut r = ChaCha8Rng::seed_from_u64(3);
    let s = RowShape { rows: 4, dim: 6 };
    let x = rand_vec(&mut r, 24, 2.0);
    let w = rand_vec(&mut r, 6, 1.5);
    let go = rand_vec(&mut r, 24, 1.0);
    let fwd = |inp: &[Vec<f64>]| {
        let (mut out, mut rs) = (vec![0.0; 24], vec![0.0; 4]);
        be.rmsnorm_fwd(&mut out, &mut rs, &inp[0], &inp[1], s, 1e-5)
            .unwrap();
        (out, rs)
    };
    let (_, rs) = fwd(&[x.clone(), w.clone()]);
    let (mut dx, mut dw) = (vec![0.0; 24], vec![0.0; 6]);
    be.rmsnorm_bwd(&mut dx, &mut dw, &go, &x, &w, &rs, s)
        .unwrap();
    fd_check("rmsnorm", &[x, w], &[dx, dw], |inp| dot(&fwd(inp).0, &go));
}

#[test]
fn rope_backward_and_convention() {
    let be = Cpu64;
    let mut r = ChaCha8Rng::seed_from_u64(4);
    let s = RopeShape {
        b: 2,
        t: 5,
        heads: 3,
        hd: 8,
        theta: 10000.0,
    };
    let n = 2 * 5 * 3 * 8;
    let x = rand_vec(&mut r, n, 1.0);
    let go = rand_vec(&mut r, n, 1.0);
    let fwd = |inp: &[Vec<f64>]| {
        let mut y = inp[0].clone();
        be.rope_fwd(&mut y, s).unwrap();
        y
    };
    let mut dx = go.clone();
    be.rope_bwd(&mut dx, s).unwrap();
    fd_check("rope", std::slice::from_ref(&x), &[dx], |inp| {
        dot(&fwd(inp), &go)
    });
    // Rotate-half convention, checked by hand at one coordinate: example 1, position
    // 3, head 2, pair i = 1 of hd = 8 (x1 at 1, x2 at 5).
    let y = fwd(std::slice::from_ref(&x));
    let base = ((5 + 3) * 3 + 2) * 8;
    let a = 3.0 * 10000f64.powf(-2.0 / 8.0);
    let (x1, x2) = (x[base + 1], x[base + 5]);
    assert!((y[base + 1] - (x1 * a.cos() - x2 * a.sin())).abs() < 1e-14);
    assert!((y[base + 5] - (x2 * a.cos() + x1 * a.sin())).abs() < 1e-14);
    // Position 0 is the identity.
    assert_eq!(&y[..24], &x[..24]);
}

fn attention_case(name: &str, shape: AttnShape, seed: u64) {
    let be = Cpu64;
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    let q = rand_vec(&mut r, shape.q_len(), 1.5);
    let k = rand_vec(&mut r, shape.kv_len(), 1.5);
    let v = rand_vec(&mut r, shape.kv_len(), 1.5);
    let go = rand_vec(&mut r, shape.q_len(), 1.0);
    let fwd = |inp: &[Vec<f64>]| {
        let mut out = vec![0.0; shape.q_len()];
        let mut p = vec![0.0; shape.probs_len()];
        be.attention_fwd(&mut out, &mut p, &inp[0], &inp[1], &inp[2], shape)
            .unwrap();
        (out, p)
    };
    let (out, p) = fwd(&[q.clone(), k.clone(), v.clone()]);
    // Brute-force forward check.
    let (t, hd, rep) = (shape.t, shape.hd, shape.hq / shape.hkv);
    for b in 0..shape.b {
        for h in 0..shape.hq {
            let kh = h / rep;
            for i in 0..t {
                let n = if shape.causal { i + 1 } else { t };
                let sc: Vec<f64> = (0..n)
                    .map(|j| {
                        (0..hd)
                            .map(|c| {
                                q[(b * t + i) * shape.hq * hd + h * hd + c]
                                    * k[(b * t + j) * shape.hkv * hd + kh * hd + c]
                            })
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let mx = sc.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = sc.iter().map(|s| (s - mx).exp()).sum();
                for c in 0..hd {
                    let want: f64 = (0..n)
                        .map(|j| {
                            (sc[j] - mx).exp() / z * v[(b * t + j) * shape.hkv * hd + kh * hd + c]
                        })
                        .sum();
                    let got = out[(b * t + i) * shape.hq * hd + h * hd + c];
                    assert!((got - want).abs() < 1e-12, "{name}: forward");
                }
                let prow = &p[((b * shape.hq + h) * t + i) * t..][..t];
                assert!(prow[n..].iter().all(|&x| x == 0.0), "{name}: mask");
            }
        }
    }
    let mut dq = vec![0.0; shape.q_len()];
    let (mut dk, mut dv) = (vec![7.0; shape.kv_len()], vec![7.0; shape.kv_len()]);
    be.attention_bwd(&mut dq, &mut dk, &mut dv, &go, &q, &k, &v, &p, shape)
        .unwrap();
    fd_check(name, &[q, k, v], &[dq, dk, dv], |inp| dot(&fwd(inp).0, &go));
}

#[test]
fn attention_backward_causal_gqa() {
    let s = AttnShape {
        b: 2,
        t: 5,
        hq: 4,
        hkv: 2,
        hd: 3,
        causal: true,
    };
    attention_case("attention causal gqa", s, 5);
}

#[test]
fn attention_backward_noncausal_mha() {
    let s = AttnShape {
        b: 2,
        t: 4,
        hq: 2,
        hkv: 2,
        hd: 4,
        causal: false,
    };
    attention_case("attention non-causal", s, 6);
}

#[test]
fn attention_backward_noncausal_gqa_and_t1() {
    let s = AttnShape {
        b: 1,
        t: 3,
        hq: 4,
        hkv: 2,
        hd: 2,
        causal: false,
    };
    attention_case("attention non-causal gqa", s, 7);
    for causal in [true, false] {
        let s = AttnShape {
            b: 3,
            t: 1,
            hq: 4,
            hkv: 2,
            hd: 4,
            causal,
        };
        attention_case("attention t=1", s, 8);
    }
}

#[test]
fn attention_rejects_bad_heads() {
    let be = Cpu;
    let s = AttnShape {
        b: 1,
        t: 2,
        hq: 3,
        hkv: 2,
        hd: 2,
        causal: true,
    };
    let mut out = vec![0.0f32; s.q_len()];
    let mut p = vec![0.0f32; s.probs_len()];
    let q = vec![0.0f32; s.q_len()];
    let kv = vec![0.0f32; s.kv_len()];
    assert!(be.attention_fwd(&mut out, &mut p, &q, &kv, &kv, s).is_err());
}

#[test]
fn gelu_backward() {
    let be = Cpu64;
    let mut r = ChaCha8Rng::seed_from_u64(9);
    let x = rand_vec(&mut r, 40, 4.0);
    let go = rand_vec(&mut r, 40, 1.0);
    let fwd = |inp: &[Vec<f64>]| {
        let mut y = vec![0.0; 40];
        be.gelu_fwd(&mut y, &inp[0]).unwrap();
        y
    };
    let mut dx = vec![0.0; 40];
    be.gelu_bwd(&mut dx, &go, &x).unwrap();
    fd_check("gelu", std::slice::from_ref(&x), &[dx], |inp| {
        dot(&fwd(inp), &go)
    });
    // tanh approximation at known points: gelu(1) = 0.8411920, gelu(-2) = -0.0454023.
    let mut y = vec![0.0; 2];
    be.gelu_fwd(&mut y, &vec![1.0, -2.0]).unwrap();
    assert!((y[0] - 0.841_192_0).abs() < 1e-6 && (y[1] + 0.045_402_3).abs() < 1e-6);
    // quick-GELU value.
    be.quick_gelu_fwd(&mut y, &vec![1.0, -2.0]).unwrap();
    let qg = |x: f64| x / (1.0 + (-1.702 * x).exp());
    assert!((y[0] - qg(1.0)).abs() < 1e-15 && (y[1] - qg(-2.0)).abs() < 1e-15);
}

#[test]
fn swiglu_backward() {
    let be = Cpu64;
    let mut r = ChaCha8Rng::seed_from_u64(10);
    let g = rand_vec(&mut r, 30, 4.0);
    let u = rand_vec(&mut r, 30, 2.0);
    let go = rand_vec(&mut r, 30, 1.0);
    let fwd = |inp: &[Vec<f64>]| {
        let mut y = vec![0.0; 30];
        be.swiglu_fwd(&mut y, &inp[0], &inp[1]).unwrap();
        y
    };
    let (mut dg, mut du) = (vec![0.0; 30], vec![0.0; 30]);
    be.swiglu_bwd(&mut dg, &mut du, &go, &g, &u).unwrap();
    fd_check("swiglu", &[g, u], &[dg, du], |inp| dot(&fwd(inp), &go));
}

#[test]
fn cross_entropy_with_mask() {
    let be = Cpu64;
    let mut r = ChaCha8Rng::seed_from_u64(11);
    let s = RowShape { rows: 5, dim: 7 };
    let logits = rand_vec(&mut r, 35, 3.0);
    // Row 1 and 3 masked; masked rows may hold out-of-range targets.
    let targets = vec![3u32, 99, 0, 99, 6];
    let weights = vec![0.5, 0.0, 1.0, 0.0, 0.25];
    let fwd = |inp: &[Vec<f64>]| {
        let (mut l, mut d) = (vec![0.0; 5], vec![0.0; 35]);
        be.cross_entropy(&mut l, &mut d, &inp[0], &targets, &weights, s)
            .unwrap();
        (l, d)
    };
    let (l, d) = fwd(std::slice::from_ref(&logits));
    // Brute-force value.
    for row in 0..5 {
        let lr = &logits[row * 7..][..7];
        let want = if weights[row] == 0.0 {
            0.0
        } else {
            let z: f64 = lr.iter().map(|v| v.exp()).sum();
            weights[row] * (z.ln() - lr[targets[row] as usize])
        };
        assert!((l[row] - want).abs() < 1e-12);
    }
    assert!(d[7..14].iter().all(|&v| v == 0.0));
    fd_check("cross_entropy", &[logits], &[d], |inp| {
        fwd(inp).0.iter().sum()
    });
    // A used target out of range is an error.
    let (mut l2, mut d2) = (vec![0.0; 5], vec![0.0; 35]);
    let bad = vec![3u32, 7, 0, 0, 0];
    let w2 = vec![1.0; 5];
    assert!(be
        .cross_entropy(&mut l2, &mut d2, &vec![0.0; 35], &bad, &w2, s)
        .is_err());
}

#[test]
fn embedding_forward_backward() {
    let be = Cpu64;
    let mut r = ChaCha8Rng::seed_from_u64(12);
    let (vocab, dim) = (6, 4);
    let ids = vec![1u32, 5, 1, 0];
    let s = RowShape { rows: 4, dim };
    let table = rand_vec(&mut r, vocab * dim, 1.0);
    let go = rand_vec(&mut r, 16, 1.0);
    let fwd = |inp: &[Vec<f64>]| {
        let mut y = vec![0.0; 16];
        be.embedding_fwd(&mut y, &inp[0], &ids, s, vocab).unwrap();
        y
    };
    let mut dt = vec![0.0; vocab * dim];
    be.embedding_bwd(&mut dt, &go, &ids, s, vocab).unwrap();
    fd_check("embedding", std::slice::from_ref(&table), &[dt], |inp| {
        dot(&fwd(inp), &go)
    });
    let mut y = vec![0.0; 16];
    assert!(be
        .embedding_fwd(&mut y, &table, &vec![1, 6, 0, 0], s, vocab)
        .is_err());
}

#[test]
fn bias_axpy_copy_patchify() {
    let be = Cpu;
    let mut y = vec![1.0f32; 6];
    be.add_bias(&mut y, &vec![1.0, 2.0, 3.0], RowShape { rows: 2, dim: 3 })
        .unwrap();
    assert_eq!(y, vec![2.0, 3.0, 4.0, 2.0, 3.0, 4.0]);
    be.axpy(&mut y, -2.0, &vec![1.0; 6]).unwrap();
    assert_eq!(y, vec![0.0, 1.0, 2.0, 0.0, 1.0, 2.0]);
    assert!(be.axpy(&mut y, 1.0, &vec![1.0; 5]).is_err());
    // Broadcast one block into two rows of a [2, 3, 2] tensor at position 0.
    let mut dst = vec![0.0f32; 12];
    let blocks = Blocks {
        count: 2,
        len: 2,
        src_off: 0,
        src_stride: 0,
        dst_off: 0,
        dst_stride: 6,
    };
    be.copy_blocks(&mut dst, &vec![8.0, 9.0], blocks).unwrap();
    assert_eq!(dst[..2], [8.0, 9.0]);
    assert_eq!(dst[6..8], [8.0, 9.0]);
    assert!(be
        .copy_blocks(
            &mut dst,
            &vec![8.0, 9.0],
            Blocks {
                dst_off: 7,
                ..blocks
            }
        )
        .is_err());
    // Patchify: 1 image, 2 channels, 4×4, patch 2 → 4 patches of 8 values.
    let img: Vec<f32> = (0..32).map(|v| v as f32).collect();
    let s = PatchShape {
        b: 1,
        channels: 2,
        size: 4,
        patch: 2,
    };
    let mut out = vec![0.0f32; 32];
    be.patchify(&mut out, &img, s).unwrap();
    // Patch 1 (row 0, col 1): channel 0 rows 0-1 cols 2-3, then channel 1.
    assert_eq!(out[8..16], [2.0, 3.0, 6.0, 7.0, 18.0, 19.0, 22.0, 23.0]);
    assert!(be
        .patchify(&mut out, &img, PatchShape { patch: 3, ..s })
        .is_err());
}
