//! Attention (`kernels/attention.cu` around cuBLAS GEMMs, CPU twin
//! `src/backend/cpu/attention.rs`): forward by brute force and backward by finite
//! differences in f64 for causal/non-causal and grouped-query shapes, then the GPU
//! against the CPU (strict-FP32 GEMMs, f32 softmax: 1e-5); the backward's
//! recomputed probabilities equal the forward's bitwise on each device.
mod common;

use common::device::{assert_close, down, up};
use common::fd::{dot, fd_check, rand_vec};
use common::{rng, uniform};
use dualpriv::backend::cpu::{Cpu, Cpu64};
use dualpriv::backend::{AttnShape, Backend};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

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
    let mut out = dualpriv::backend::cpu::pool::HostBuf::from(vec![0.0f32; s.q_len()]);
    let mut p = dualpriv::backend::cpu::pool::HostBuf::from(vec![0.0f32; s.probs_len()]);
    let q = dualpriv::backend::cpu::pool::HostBuf::from(vec![0.0f32; s.q_len()]);
    let kv = dualpriv::backend::cpu::pool::HostBuf::from(vec![0.0f32; s.kv_len()]);
    assert!(be.attention_fwd(&mut out, &mut p, &q, &kv, &kv, s).is_err());
}

// ---------------------------------------------------------------------------
// The GPU against the CPU

fn op_attention<B: Backend>(
    be: &B,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dy: &[f32],
    s: AttnShape,
) -> Vec<Vec<f32>> {
    let (qb, kb, vb, dyb) = (up(be, q), up(be, k), up(be, v), up(be, dy));
    let mut out = be.zeros(s.q_len()).unwrap();
    let mut probs = be.zeros(s.probs_len()).unwrap();
    be.attention_fwd(&mut out, &mut probs, &qb, &kb, &vb, s)
        .unwrap();
    // The backward's recomputation gives the forward's probabilities, bit for bit.
    let mut again = be.zeros(s.probs_len()).unwrap();
    be.attention_probs(&mut again, &qb, &kb, &vb, s).unwrap();
    let bits = |b: &B::Buf| down(be, b).iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&again), bits(&probs), "attention_probs {s:?}");
    let mut dq = be.zeros(s.q_len()).unwrap();
    let (mut dk, mut dv) = (be.zeros(s.kv_len()).unwrap(), be.zeros(s.kv_len()).unwrap());
    be.attention_bwd(&mut dq, &mut dk, &mut dv, &dyb, &qb, &kb, &vb, &probs, s)
        .unwrap();
    [out, probs, dq, dk, dv]
        .iter()
        .map(|b| down(be, b))
        .collect()
}

fn attention_matches_the_cpu<B: Backend>(be: &B) {
    let mut r = rng(3);
    for (b, t, hq, hkv, hd, causal) in [
        (1, 1, 1, 1, 4, true),
        (2, 17, 4, 4, 16, false),
        (3, 29, 4, 2, 32, true),
        (2, 65, 8, 1, 8, true),
    ] {
        let s = AttnShape {
            b,
            t,
            hq,
            hkv,
            hd,
            causal,
        };
        let q: Vec<f32> = uniform(&mut r, s.q_len()).iter().map(|v| 2.0 * v).collect();
        let (k, v) = (uniform(&mut r, s.kv_len()), uniform(&mut r, s.kv_len()));
        let dy = uniform(&mut r, s.q_len());
        assert_close(
            &format!("attention {s:?}"),
            &op_attention(be, &q, &k, &v, &dy, s),
            &op_attention(&Cpu, &q, &k, &v, &dy, s),
            1e-5,
        );
    }
}

test_device!(attention_matches_the_cpu);
