//! The CUDA backend against the CPU reference: every op's forward and backward,
//! then one whole training step per method on `tiny`. Without a GPU every test
//! prints `skipped: no CUDA driver` and passes.
//!
//! The op tests judge kernels at FP32 tolerances, so they open a backend whose
//! model GEMMs are strict too (`cuda_strict_or_skip`); the whole-step tests run the
//! shipped defaults (`cuda_or_skip`: `Cuda::new()`, TF32 model GEMMs, DP GEMMs
//! strict), as training does.
//!
//! Tolerances (strict-FP32 cuBLAS unless a test says TF32):
//! * elementwise ops, copies, embedding: 2e-6 relative to the output's scale
//!   (f32 transcendental functions differ from the CPU's f64 ones by a few ulp, and
//!   `1 + tanh` in GELU loses digits in the far negative tail);
//! * row reductions (norms, softmax, loss) and GEMMs: 1e-5 (f32 accumulation in a
//!   different order from the CPU's f64 / packed-GEMM order);
//! * TF32 GEMMs: 3e-3 (10-bit mantissa inputs);
//! * whole steps (TF32 forward/backward): see `TF32_STEP_*` below.
#![cfg(feature = "cuda")]

mod common;

use common::{rng, uniform};
use dualpriv::backend::cpu::Cpu;
use dualpriv::backend::cuda::{cuda_or_skip, cuda_strict_or_skip, Cuda};
use dualpriv::backend::dp::DpBackend;
use dualpriv::backend::{AttnShape, Backend, Blocks, MatmulSpec, PatchShape, RopeShape, RowShape};
use dualpriv::data::synthetic::{Dataset, Split};
use dualpriv::dp::key::RunKey;
use dualpriv::dp::noise::{NoiseKey, RngKind, StreamKey};
use dualpriv::model::Mllm;
use dualpriv::train::checkpoint::ModelSpec;
use dualpriv::train::method::Method;
use dualpriv::train::optim::OptConfig;
use dualpriv::train::sampler::Sampling;
use dualpriv::train::step::gradient_sums;
use dualpriv::train::{PruneScope, TrainConfig, Trainer};
use dualpriv::vision::tokens::{TokenSelectConfig, TokenShape};
use dualpriv::Error;

/// max |a − b| / max(max |b|, 1e-12): error relative to the output's scale.
fn scaled_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-12);
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
        / scale
}

fn assert_close(what: &str, gpu: &[Vec<f32>], cpu: &[Vec<f32>], tol: f32) {
    assert_eq!(gpu.len(), cpu.len());
    for (i, (g, c)) in gpu.iter().zip(cpu).enumerate() {
        let e = scaled_err(g, c);
        assert!(e <= tol, "{what} output {i}: error {e:.3e} > {tol:.1e}");
    }
}

fn up<B: Backend>(be: &B, v: &[f32]) -> B::Buf {
    be.upload(v).unwrap()
}

fn down<B: Backend>(be: &B, b: &B::Buf) -> Vec<f32> {
    be.download(b).unwrap()
}

// ---------------------------------------------------------------------------
// Per op: each function runs the op on any backend from host inputs.

fn op_layernorm<B: Backend>(
    be: &B,
    x: &[f32],
    w: &[f32],
    bias: &[f32],
    dy: &[f32],
    s: RowShape,
) -> Vec<Vec<f32>> {
    let (xb, wb, bb, dyb) = (up(be, x), up(be, w), up(be, bias), up(be, dy));
    let mut out = be.zeros(x.len()).unwrap();
    let (mut mean, mut rstd) = (be.zeros(s.rows).unwrap(), be.zeros(s.rows).unwrap());
    be.layernorm_fwd(&mut out, &mut mean, &mut rstd, &xb, &wb, &bb, s, 1e-5)
        .unwrap();
    let mut dx = be.zeros(x.len()).unwrap();
    // dw, db accumulate: start from non-zero values to check that.
    let (mut dw, mut db) = (up(be, w), up(be, bias));
    be.layernorm_bwd(&mut dx, &mut dw, &mut db, &dyb, &xb, &wb, &mean, &rstd, s)
        .unwrap();
    [out, mean, rstd, dx, dw, db]
        .iter()
        .map(|b| down(be, b))
        .collect()
}

fn op_rmsnorm<B: Backend>(be: &B, x: &[f32], w: &[f32], dy: &[f32], s: RowShape) -> Vec<Vec<f32>> {
    let (xb, wb, dyb) = (up(be, x), up(be, w), up(be, dy));
    let mut out = be.zeros(x.len()).unwrap();
    let mut rstd = be.zeros(s.rows).unwrap();
    be.rmsnorm_fwd(&mut out, &mut rstd, &xb, &wb, s, 1e-5)
        .unwrap();
    let mut dx = be.zeros(x.len()).unwrap();
    let mut dw = up(be, w);
    be.rmsnorm_bwd(&mut dx, &mut dw, &dyb, &xb, &wb, &rstd, s)
        .unwrap();
    [out, rstd, dx, dw].iter().map(|b| down(be, b)).collect()
}

fn op_rope<B: Backend>(be: &B, x: &[f32], s: RopeShape) -> Vec<Vec<f32>> {
    let mut a = up(be, x);
    be.rope_fwd(&mut a, s).unwrap();
    let fwd = down(be, &a);
    be.rope_bwd(&mut a, s).unwrap();
    vec![fwd, down(be, &a)]
}

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
    let mut dq = be.zeros(s.q_len()).unwrap();
    let (mut dk, mut dv) = (be.zeros(s.kv_len()).unwrap(), be.zeros(s.kv_len()).unwrap());
    be.attention_bwd(&mut dq, &mut dk, &mut dv, &dyb, &qb, &kb, &vb, &probs, s)
        .unwrap();
    [out, probs, dq, dk, dv]
        .iter()
        .map(|b| down(be, b))
        .collect()
}

fn op_activations<B: Backend>(be: &B, x: &[f32], y: &[f32], dy: &[f32]) -> Vec<Vec<f32>> {
    let (xb, yb, dyb) = (up(be, x), up(be, y), up(be, dy));
    let n = x.len();
    let mut outs = Vec::new();
    let mut o = be.zeros(n).unwrap();
    be.quick_gelu_fwd(&mut o, &xb).unwrap();
    outs.push(down(be, &o));
    be.gelu_fwd(&mut o, &xb).unwrap();
    outs.push(down(be, &o));
    be.gelu_bwd(&mut o, &dyb, &xb).unwrap();
    outs.push(down(be, &o));
    be.swiglu_fwd(&mut o, &xb, &yb).unwrap();
    outs.push(down(be, &o));
    let mut o2 = be.zeros(n).unwrap();
    be.swiglu_bwd(&mut o, &mut o2, &dyb, &xb, &yb).unwrap();
    outs.push(down(be, &o));
    outs.push(down(be, &o2));
    outs
}

fn op_embedding_loss<B: Backend>(
    be: &B,
    table: &[f32],
    ids: &[u32],
    logits: &[f32],
    weights: &[f32],
    dim: usize,
    vocab: usize,
) -> Vec<Vec<f32>> {
    let rows = ids.len();
    let s = RowShape { rows, dim };
    let (tb, idb) = (up(be, table), be.upload_ids(ids).unwrap());
    let mut out = be.zeros(rows * dim).unwrap();
    be.embedding_fwd(&mut out, &tb, &idb, s, vocab).unwrap();
    let mut dt = up(be, table);
    be.embedding_bwd(&mut dt, &out, &idb, s, vocab).unwrap();
    let (lb, wb) = (up(be, logits), up(be, weights));
    let mut losses = be.zeros(rows).unwrap();
    let mut dl = be.zeros(rows * vocab).unwrap();
    be.cross_entropy(
        &mut losses,
        &mut dl,
        &lb,
        &idb,
        &wb,
        RowShape { rows, dim: vocab },
    )
    .unwrap();
    [out, dt, losses, dl].iter().map(|b| down(be, b)).collect()
}

fn op_misc<B: Backend>(be: &B, a: &[f32], b: &[f32], c: &[f32], img: &[f32]) -> Vec<Vec<f32>> {
    let (ab, bb) = (up(be, a), up(be, b));
    let mut outs = Vec::new();
    // matmul in all four transpose combinations, with beta ≠ 0 once.
    for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
        let spec = MatmulSpec {
            m: 24,
            n: 40,
            k: 33,
            trans_a: ta,
            trans_b: tb,
            alpha: 0.7,
            beta: if ta { 0.5 } else { 0.0 },
        };
        let mut cb = up(be, c);
        be.matmul(&mut cb, &ab, &bb, spec).unwrap();
        outs.push(down(be, &cb));
    }
    // bias, axpy, copy_blocks (with a broadcast source), patchify
    let mut y = up(be, c);
    be.add_bias(&mut y, &up(be, &a[..40]), RowShape { rows: 24, dim: 40 })
        .unwrap();
    be.axpy(&mut y, -1.5, &up(be, c)).unwrap();
    outs.push(down(be, &y));
    let mut dst = be.zeros(300).unwrap();
    let blk = Blocks {
        count: 5,
        len: 17,
        src_off: 3,
        src_stride: 0,
        dst_off: 11,
        dst_stride: 40,
    };
    be.copy_blocks(&mut dst, &ab, blk).unwrap();
    let blk2 = Blocks {
        src_stride: 19,
        dst_off: 30,
        ..blk
    };
    be.copy_blocks(&mut dst, &ab, blk2).unwrap();
    outs.push(down(be, &dst));
    let ps = PatchShape {
        b: 2,
        channels: 3,
        size: 12,
        patch: 4,
    };
    let mut p = be.zeros(2 * 9 * 48).unwrap();
    be.patchify(&mut p, &up(be, img), ps).unwrap();
    outs.push(down(be, &p));
    outs
}

fn op_tokens<B: Backend>(
    be: &B,
    attn: &[f32],
    keys: &[f32],
    hidden: &[f32],
    shape: &TokenShape,
    cfg: &TokenSelectConfig,
) -> Vec<Vec<f32>> {
    let out = be
        .select_tokens(&up(be, attn), &up(be, keys), &up(be, hidden), shape, cfg)
        .unwrap();
    vec![down(be, &out)]
}

#[test]
fn norms_match_the_cpu() {
    let Some(g) = cuda_strict_or_skip("norms_match_the_cpu") else {
        return;
    };
    let mut r = rng(1);
    for (rows, dim) in [(1, 1), (1, 2), (7, 64), (33, 1000), (5, 4096)] {
        let s = RowShape { rows, dim };
        let x: Vec<f32> = uniform(&mut r, rows * dim)
            .iter()
            .map(|v| 3.0 * v + 0.5)
            .collect();
        let (w, b, dy) = (
            uniform(&mut r, dim),
            uniform(&mut r, dim),
            uniform(&mut r, rows * dim),
        );
        assert_close(
            &format!("layernorm {rows}x{dim}"),
            &op_layernorm(&g, &x, &w, &b, &dy, s),
            &op_layernorm(&Cpu, &x, &w, &b, &dy, s),
            1e-5,
        );
        // At dim 1, RMSNorm's dx = inv·(go·w − x̂·mean(go·w·x̂)) cancels to ~eps/x²
        // (x̂² ≈ 1): f32 keeps ~1e-8 of the terms, which is large relative to that tiny
        // result (the CPU subtracts in f64). A CPU emulation of the kernel measured it.
        if dim > 1 {
            assert_close(
                &format!("rmsnorm {rows}x{dim}"),
                &op_rmsnorm(&g, &x, &w, &dy, s),
                &op_rmsnorm(&Cpu, &x, &w, &dy, s),
                1e-5,
            );
        }
    }
}

#[test]
fn rope_matches_the_cpu() {
    let Some(g) = cuda_strict_or_skip("rope_matches_the_cpu") else {
        return;
    };
    let mut r = rng(2);
    for (b, t, heads, hd) in [(1, 1, 1, 2), (2, 77, 4, 32), (1, 700, 2, 128)] {
        let s = RopeShape {
            b,
            t,
            heads,
            hd,
            theta: 10000.0,
        };
        let x = uniform(&mut r, b * t * heads * hd);
        assert_close(
            &format!("rope {b}x{t}x{heads}x{hd}"),
            &op_rope(&g, &x, s),
            &op_rope(&Cpu, &x, s),
            1e-5,
        );
    }
}

#[test]
fn attention_matches_the_cpu() {
    let Some(g) = cuda_strict_or_skip("attention_matches_the_cpu") else {
        return;
    };
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
            &op_attention(&g, &q, &k, &v, &dy, s),
            &op_attention(&Cpu, &q, &k, &v, &dy, s),
            1e-5,
        );
    }
}

#[test]
fn activations_match_the_cpu() {
    let Some(g) = cuda_strict_or_skip("activations_match_the_cpu") else {
        return;
    };
    let mut r = rng(4);
    let n = 10_001;
    let x: Vec<f32> = uniform(&mut r, n).iter().map(|v| 8.0 * v).collect();
    let (y, dy) = (uniform(&mut r, n), uniform(&mut r, n));
    assert_close(
        "activations",
        &op_activations(&g, &x, &y, &dy),
        &op_activations(&Cpu, &x, &y, &dy),
        2e-6,
    );
}

#[test]
fn embedding_and_loss_match_the_cpu() {
    let Some(g) = cuda_strict_or_skip("embedding_and_loss_match_the_cpu") else {
        return;
    };
    let mut r = rng(5);
    let (vocab, dim, rows) = (1000, 48, 37);
    let table = uniform(&mut r, vocab * dim);
    // Repeated ids exercise the atomic accumulation of the embedding backward.
    let ids: Vec<u32> = (0..rows as u32).map(|i| (i * 7919) % 50).collect();
    let logits: Vec<f32> = uniform(&mut r, rows * vocab)
        .iter()
        .map(|v| 10.0 * v)
        .collect();
    let weights: Vec<f32> = (0..rows)
        .map(|i| if i % 3 == 0 { 0.0 } else { 0.5 })
        .collect();
    assert_close(
        "embedding + cross-entropy",
        &op_embedding_loss(&g, &table, &ids, &logits, &weights, dim, vocab),
        &op_embedding_loss(&Cpu, &table, &ids, &logits, &weights, dim, vocab),
        1e-5,
    );
    // Out-of-range ids are shape errors on both backends, not device faults.
    let bad = g.upload_ids(&[vocab as u32]).unwrap();
    let mut out = g.zeros(dim).unwrap();
    let t = g.upload(&table).unwrap();
    let e = g.embedding_fwd(&mut out, &t, &bad, RowShape { rows: 1, dim }, vocab);
    assert!(matches!(e, Err(Error::Shape(_))), "{e:?}");
}

#[test]
fn gemm_copies_and_patches_match_the_cpu() {
    let Some(g) = cuda_strict_or_skip("gemm_copies_and_patches_match_the_cpu") else {
        return;
    };
    let mut r = rng(6);
    let a = uniform(&mut r, 40 * 33);
    let b = uniform(&mut r, 40 * 33);
    let c = uniform(&mut r, 24 * 40);
    let img = uniform(&mut r, 2 * 3 * 12 * 12);
    let cpu = op_misc(&Cpu, &a, &b, &c, &img);
    assert_close(
        "matmul/bias/copies/patches",
        &op_misc(&g, &a, &b, &c, &img),
        &cpu,
        1e-5,
    );
    // TF32 tensor cores (the shipped default): the same GEMMs within TF32 accuracy.
    let tf = Cuda::new().unwrap();
    let out = op_misc(&tf, &a, &b, &c, &img);
    assert_close("TF32 matmul", &out[..4], &cpu[..4], 3e-3);
}

#[test]
fn token_selection_matches_the_cpu() {
    let Some(g) = cuda_strict_or_skip("token_selection_matches_the_cpu") else {
        return;
    };
    let mut r = rng(7);
    let shape = TokenShape {
        batch: 3,
        tokens: 65,
        heads: 4,
        head_dim: 16,
        hidden: 64,
    };
    let attn: Vec<f32> = uniform(&mut r, 3 * 4 * 65)
        .iter()
        .map(|v| v.abs())
        .collect();
    let keys = uniform(&mut r, 3 * 65 * 64);
    let hidden = uniform(&mut r, 3 * 65 * 64);
    let cfg = TokenSelectConfig {
        keep: 24,
        context: 4,
        fuse_noise_std: 0.0,
        noise: StreamKey::from_insecure_seed(RngKind::Chacha20, 0),
    };
    assert_close(
        "select_tokens",
        &op_tokens(&g, &attn, &keys, &hidden, &shape, &cfg),
        &op_tokens(&Cpu, &attn, &keys, &hidden, &shape, &cfg),
        1e-5,
    );
}

/// `noise_axpy` then the fused noise + top-k + AdamW update through the backend
/// trait, for both generators: GPU == CPU bit for bit.
fn op_noise_update<B: DpBackend>(be: &B, rng_kind: RngKind) -> Vec<Vec<f32>> {
    use dualpriv::backend::dp::TensorUpdate;
    use dualpriv::dp::prune::{Optimizer, UpdateConfig};
    let mut r = rng(31);
    let n = [70_001usize, 9, 4099];
    let mut out = Vec::new();
    let mut y = up(be, &uniform(&mut r, n[0]));
    let key = NoiseKey {
        stream: StreamKey::from_insecure_seed(rng_kind, 77),
        tensor_id: 5,
        step: 3,
    };
    be.noise_axpy(&mut y, key, -0.37).unwrap();
    out.push(down(be, &y));
    let grads: Vec<B::Buf> = n.iter().map(|&k| up(be, &uniform(&mut r, k))).collect();
    let mut params: Vec<B::Buf> = n.iter().map(|&k| up(be, &uniform(&mut r, k))).collect();
    let mut ms: Vec<B::Buf> = n.iter().map(|&k| up(be, &uniform(&mut r, k))).collect();
    let mut vs: Vec<B::Buf> = n
        .iter()
        .map(|&k| {
            up(
                be,
                &uniform(&mut r, k)
                    .iter()
                    .map(|x| x.abs())
                    .collect::<Vec<_>>(),
            )
        })
        .collect();
    let cfg = UpdateConfig {
        keep_frac: 0.6,
        noise_std: 0.8,
        noise: StreamKey::from_insecure_seed(rng_kind, 78),
        step: 3,
        inv_batch: 0.125,
        opt: Optimizer::AdamW {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            t: 4,
        },
    };
    let mut set: Vec<TensorUpdate<'_, B>> = grads
        .iter()
        .zip(params.iter_mut())
        .zip(ms.iter_mut().zip(vs.iter_mut()))
        .enumerate()
        .map(|(i, ((g, p), (m, v)))| TensorUpdate {
            tensor_id: 10 + i as u32,
            grad: g,
            param: p,
            m: Some(m),
            v: Some(v),
        })
        .collect();
    let rep = be.noise_prune_update(&mut set, &cfg).unwrap();
    drop(set);
    out.push(vec![rep.kept as f32, rep.threshold]);
    for b in params.iter().chain(&ms).chain(&vs) {
        out.push(down(be, b));
    }
    out
}

#[test]
fn noise_and_fused_update_match_the_cpu_bit_for_bit() {
    let Some(g) = cuda_or_skip("noise_and_fused_update_match_the_cpu_bit_for_bit") else {
        return;
    };
    for rng_kind in [RngKind::Chacha20, RngKind::Philox] {
        let (got, want) = (
            op_noise_update(&g, rng_kind),
            op_noise_update(&Cpu, rng_kind),
        );
        assert_eq!(got.len(), want.len());
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert!(bits(a) == bits(b), "{rng_kind}: output {i} differs");
        }
    }
}

#[test]
fn running_out_of_memory_is_an_error() {
    let Some(g) = cuda_or_skip("running_out_of_memory_is_an_error") else {
        return;
    };
    // 2^40 floats = 4 TiB: no GPU has that.
    match g.zeros(1 << 40) {
        Err(Error::OutOfMemory(msg)) => assert!(msg.contains("micro-batch"), "{msg}"),
        other => panic!(
            "expected an out-of-memory error, got {:?}",
            other.map(|_| ())
        ),
    }
}

// ---------------------------------------------------------------------------
// Whole steps on the tiny model, on the shipped defaults
//
// The model's forward and backward GEMMs run in TF32 there (10-bit mantissa inputs:
// ≈2.4e-4 relative per GEMM, 3e-3 worst case in `gemm_copies_and_patches...`), and
// the errors compound through the layers before reaching the loss and the captured
// X and G. The clipped sums themselves are strict FP32, so what differs from the
// CPU is the model's activations and gradients, not the DP arithmetic. These
// tolerances are first estimates from that analysis, to be tightened once measured
// on a GPU.

/// Relative loss difference allowed: TF32 logits, averaged over tokens.
const TF32_STEP_LOSS: f64 = 1e-3;
/// Error of a clipped sum relative to its largest entry: TF32 X and G captures.
const TF32_STEP_SUM: f32 = 1e-2;
/// An updated weight differs when off by more than this times the tensor's scale.
const TF32_STEP_WEIGHT: f32 = 1e-3;
/// Fraction of updated weights that may differ: AdamW's first step moves a weight by
/// ≈ lr·sign(g), so a coordinate whose (noisy) gradient is within the TF32 error of
/// 0, or one at the top-k threshold, may move the other way on one backend.
const TF32_STEP_DIFFER: f64 = 0.01;

fn data() -> Dataset {
    Dataset::generate(Split::Private, 24, 7, 32).unwrap()
}

fn lora() -> ModelSpec {
    ModelSpec {
        preset: "tiny".into(),
        lora_rank: Some(4),
        lora_alpha: 8.0,
        full_groups: vec![],
    }
}

/// The same model on any backend: seeded init, then every trainable tensor nudged
/// by ChaCha20 noise (LoRA B starts at zero), which is identical on both backends.
fn model<B: DpBackend>(be: &B) -> Mllm<B> {
    let (c, m) = lora().build().unwrap();
    let mut model = Mllm::new(be, &c, &m, 1).unwrap();
    let ids: Vec<u32> = model.trainable().iter().map(|p| p.id).collect();
    for id in ids {
        let key = NoiseKey {
            stream: StreamKey::from_insecure_seed(RngKind::Chacha20, 99),
            tensor_id: id,
            step: 0,
        };
        be.noise_axpy(model.param_mut(id), key, 0.02).unwrap();
    }
    model
}

fn cfg(method: Method, d: &Dataset) -> TrainConfig {
    let dual = method == Method::Dualpriv;
    TrainConfig {
        method,
        batch: 8,
        micro_batch: 4,
        sampling: Sampling::Poisson,
        steps: 2,
        opt: if method == Method::Dpzo {
            OptConfig::sgd(1e-3)
        } else {
            OptConfig::adamw(1e-3)
        },
        clip_norm: 0.1,
        epsilon: None,
        delta: 1e-5,
        noise_multiplier: method.is_private().then_some(0.8),
        accountant: dualpriv::dp::accountant::AccountantKind::Rdp,
        // All 16 patches kept: the selection kernels run, but a randomly initialised
        // ViT's near-uniform CLS attention would let f32 rounding reorder near-tied
        // patches between backends. Pruned selection on identical inputs is checked
        // by `token_selection_matches_the_cpu`.
        keep_tokens: dual.then_some(16),
        context_tokens: 0,
        fuse_noise_std: 0.0,
        keep_frac: if dual { 0.8 } else { 1.0 },
        prune_scope: PruneScope::Tensor,
        dpzo_lambda: 1e-2,
        rng: RngKind::Chacha20,
        log_private_stats: false,
        eval_every: 0,
        public_size: None,
        text_len: d.max_text_len(),
    }
}

/// The pinned (public) key of the step tests.
fn key() -> RunKey {
    RunKey::from_insecure_seed(11)
}

fn params<B: DpBackend>(be: &B, m: &Mllm<B>) -> Vec<Vec<f32>> {
    m.trainable()
        .iter()
        .map(|p| be.download(m.param(p.id)).unwrap())
        .collect()
}

#[test]
fn clipped_sums_match_the_cpu_for_every_method() {
    let Some(g) = cuda_or_skip("clipped_sums_match_the_cpu_for_every_method") else {
        return;
    };
    let d = data();
    let idx: Vec<usize> = (0..8).collect();
    let (mc, mg) = (model(&Cpu), model(&g));
    for method in [
        Method::Nonprivate,
        Method::Dpsgd,
        Method::Ghost,
        Method::Dualpriv,
    ] {
        let c = cfg(method, &d);
        let sc = gradient_sums(&Cpu, &mc, &key(), &c, &d, &idx).unwrap();
        let sg = gradient_sums(&g, &mg, &key(), &c, &d, &idx).unwrap();
        let rel = (sc.loss_sum - sg.loss_sum).abs() / sc.loss_sum.abs();
        assert!(
            rel < TF32_STEP_LOSS,
            "{method}: loss {} vs {}",
            sg.loss_sum,
            sc.loss_sum
        );
        assert_eq!(sc.grads.len(), sg.grads.len());
        for (id, cv) in &sc.grads {
            let gv = g.download(&sg.grads[id]).unwrap();
            let e = scaled_err(&gv, cv);
            assert!(
                e < TF32_STEP_SUM,
                "{method}: tensor {id} clipped sum error {e:.3e}"
            );
        }
    }
}

#[test]
fn one_step_matches_the_cpu_for_every_method() {
    let Some(g) = cuda_or_skip("one_step_matches_the_cpu_for_every_method") else {
        return;
    };
    let d = data();
    let idx: Vec<usize> = (0..8).collect();
    for method in [
        Method::Nonprivate,
        Method::Dpsgd,
        Method::Ghost,
        Method::Dualpriv,
        Method::Dpzo,
    ] {
        let c = cfg(method, &d);
        // One key for both: the same batches and noise on both backends.
        let mut tc = Trainer::with_key(&Cpu, model(&Cpu), lora(), c.clone(), &d, key()).unwrap();
        let mut tg = Trainer::with_key(&g, model(&g), lora(), c, &d, key()).unwrap();
        let oc = tc.one_step(&d, &idx).unwrap();
        let og = tg.one_step(&d, &idx).unwrap();
        assert!(
            (oc.loss - og.loss).abs() < TF32_STEP_LOSS * oc.loss.abs().max(1.0),
            "{method}: loss {} vs {}",
            og.loss,
            oc.loss
        );
        assert_eq!(oc.coords, og.coords, "{method}");
        let (pc, pg) = (params(&Cpu, &tc.model), params(&g, &tg.model));
        let (mut differ, mut total) = (0usize, 0usize);
        for (a, b) in pg.iter().zip(&pc) {
            let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-12);
            total += a.len();
            differ += a
                .iter()
                .zip(b)
                .filter(|(x, y)| (*x - *y).abs() > TF32_STEP_WEIGHT * scale)
                .count();
        }
        let allowed = (total as f64 * TF32_STEP_DIFFER) as usize;
        assert!(
            differ <= allowed,
            "{method}: {differ} of {total} updated weights differ (allowed {allowed})"
        );
    }
}

#[test]
fn the_memory_plan_is_reused_after_the_first_step() {
    let Some(g) = cuda_or_skip("the_memory_plan_is_reused_after_the_first_step") else {
        return;
    };
    let d = data();
    let idx: Vec<usize> = (0..8).collect();
    let mut t = Trainer::new(&g, model(&g), lora(), cfg(Method::Dualpriv, &d), &d).unwrap();
    t.one_step(&d, &idx).unwrap();
    let after_first = g.memory();
    t.one_step(&d, &idx).unwrap();
    t.one_step(&d, &idx).unwrap();
    let later = g.memory();
    assert_eq!(
        later.allocations, after_first.allocations,
        "steps after the first allocated device memory: {after_first:?} -> {later:?}"
    );
    assert!(later.peak_bytes > 0);
}
