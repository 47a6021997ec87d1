//! The CUDA backend against the CPU reference beyond the layer families (their
//! GPU-vs-CPU cases are in `tests/{norms,rope,attention,activations,embedding,
//! tensor,rows}.rs`): token selection through the backend, the fused noise, top-k
//! and update bit for bit, running out of memory, then one whole training step per
//! method on `tiny` and the reuse of the memory plan. Without a GPU every test
//! prints `skipped: no CUDA driver` and passes (fails with `DUALPRIV_REQUIRE_GPU=1`).
//!
//! Token selection is judged at FP32 tolerance (1e-5) on a backend whose model GEMMs
//! are strict too (`cuda_strict_or_skip`); the whole-step tests run the shipped
//! defaults (`cuda_or_skip`: `Cuda::new()`, TF32 model GEMMs, DP GEMMs strict), as
//! training does, with the tolerances `TF32_STEP_*` below.
#![cfg(feature = "cuda")]

mod common;

use common::device::{assert_close, down, scaled_err, up};
use common::{rng, tiny_lora, uniform};
use dualpriv::backend::cpu::Cpu;
use dualpriv::backend::cuda::{cuda_or_skip, cuda_strict_or_skip};
use dualpriv::backend::dp::DpBackend;
use dualpriv::backend::Backend;
use dualpriv::data::synthetic::{Dataset, Split};
use dualpriv::dp::key::RunKey;
use dualpriv::dp::noise::{NoiseKey, RngKind, StreamKey};
use dualpriv::model::Mllm;
use dualpriv::train::method::Method;
use dualpriv::train::optim::OptConfig;
use dualpriv::train::step::gradient_sums;
use dualpriv::train::{TrainConfig, Trainer};
use dualpriv::vision::tokens::{TokenSelectConfig, TokenShape};
use dualpriv::Error;

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

/// The same model on any backend: seeded init, then every trainable tensor nudged
/// by ChaCha20 noise (LoRA B starts at zero), which is identical on both backends.
fn model<B: DpBackend>(be: &B) -> Mllm<B> {
    let (c, m) = tiny_lora().build().unwrap();
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
        micro_batch: 4,
        steps: 2,
        opt: if method == Method::Dpzo {
            OptConfig::sgd(1e-3)
        } else {
            OptConfig::adamw(1e-3)
        },
        clip_norm: 0.1,
        noise_multiplier: method.is_private().then_some(0.8),
        accountant: dualpriv::dp::accountant::AccountantKind::Rdp,
        // All 16 patches kept: the selection kernels run, but a randomly initialised
        // ViT's near-uniform CLS attention would let f32 rounding reorder near-tied
        // patches between backends. Pruned selection on identical inputs is checked
        // by `token_selection_matches_the_cpu`.
        keep_tokens: dual.then_some(16),
        keep_frac: if dual { 0.8 } else { 1.0 },
        dpzo_lambda: 1e-2,
        ..TrainConfig::new(method, 8, d.max_text_len())
    }
}

/// The pinned (public) key of the step tests.
fn key() -> RunKey {
    RunKey::from_insecure_seed(11)
}

fn params<B: DpBackend>(be: &B, m: &Mllm<B>) -> Vec<Vec<f32>> {
    m.trainable()
        .iter()
        .map(|p| be.download(m.param(p.id)).unwrap().into_vec())
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
        let mut tc =
            Trainer::with_key(&Cpu, model(&Cpu), tiny_lora(), c.clone(), &d, key()).unwrap();
        let mut tg = Trainer::with_key(&g, model(&g), tiny_lora(), c, &d, key()).unwrap();
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
    let mut t = Trainer::new(&g, model(&g), tiny_lora(), cfg(Method::Dualpriv, &d), &d).unwrap();
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
