//! The whole model: captured gradients against finite differences (f64, on the
//! [`Cpu64`] backend running the same model code), per-example exactness, token
//! pruning, LoRA at init, checkpoints, preset parameter counts and bad inputs.
mod common;

use std::collections::HashMap;

use dualpriv::backend::cpu::{Cpu, Cpu64};
use dualpriv::backend::Backend;
use dualpriv::data::Batch;
use dualpriv::dp::noise::{RngKind, StreamKey};
use dualpriv::model::{
    Capture, FullGroup, LlmConfig, LoraTarget, Mllm, ModelConfig, ProjectorAct, ProjectorConfig,
    TrainMode, VisionConfig, VisionFeature,
};
use dualpriv::vision::tokens::TokenSelectConfig;
use rand::Rng;

/// A shrunken model, small enough for coordinate-wise finite differences.
fn small_cfg(feature: VisionFeature) -> ModelConfig {
    ModelConfig {
        name: "small-test".into(),
        vision: VisionConfig {
            image_size: 8,
            patch_size: 4,
            hidden: 8,
            layers: 3,
            heads: 2,
            mlp: 16,
            ln_eps: 1e-5,
            feature,
            patch_bias: true,
        },
        projector: ProjectorConfig::PRESET,
        llm: LlmConfig {
            hidden: 16,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            mlp: 24,
            vocab: 11,
            rms_eps: 1e-5,
            rope_theta: 10000.0,
        },
    }
}

/// Random batch; example 1 has no masked position when `with_empty`.
fn batch(cfg: &ModelConfig, b: usize, t: usize, seed: u64, with_empty: bool) -> Batch {
    let mut r = common::rng(seed);
    let s = cfg.vision.image_size;
    let vocab = cfg.llm.vocab as u32;
    let mut mask = vec![0.0f32; b * t];
    for i in 0..b {
        let n = if with_empty && i == 1 { 0 } else { 1 + i % 3 };
        for j in t - n..t {
            mask[i * t + j] = 1.0;
        }
    }
    Batch {
        size: b,
        image_size: s,
        images: (0..b * 3 * s * s)
            .map(|_| r.random_range(-1.0..1.0))
            .collect(),
        text_len: t,
        input_ids: (0..b * t).map(|_| r.random_range(0..vocab)).collect(),
        targets: (0..b * t).map(|_| r.random_range(0..vocab)).collect(),
        loss_mask: mask,
        example_ids: (0..b).collect(),
        image_pos: None,
    }
}

fn example(bt: &Batch, i: usize) -> Batch {
    let (s, t) = (bt.image_size, bt.text_len);
    let img = 3 * s * s;
    Batch {
        size: 1,
        image_size: s,
        images: bt.images[i * img..][..img].to_vec(),
        text_len: t,
        input_ids: bt.input_ids[i * t..][..t].to_vec(),
        targets: bt.targets[i * t..][..t].to_vec(),
        loss_mask: bt.loss_mask[i * t..][..t].to_vec(),
        example_ids: vec![i],
        image_pos: bt.image_pos.as_ref().map(|p| vec![p[i]]),
    }
}

/// Example `i`'s weight gradient G_iᵀ X_i (p×d) and bias gradient Σ_t G_i,t.
fn grads_of(c: &Capture<Cpu64>, i: usize) -> (Vec<f64>, Vec<f64>) {
    let s = c.shape;
    let mut w = vec![0.0; s.p * s.d];
    let mut b = vec![0.0; s.p];
    for tt in 0..s.t {
        let row = i * s.t + tt;
        let (x, g) = (&c.x[row * s.d..][..s.d], &c.g[row * s.p..][..s.p]);
        for pi in 0..s.p {
            b[pi] += g[pi];
            for di in 0..s.d {
                w[pi * s.d + di] += g[pi] * x[di];
            }
        }
    }
    (w, b)
}

/// Batch gradient Σ_i G_iᵀ X_i by trainable id, from the captures.
fn capture_grads(caps: &[Capture<Cpu64>]) -> HashMap<u32, Vec<f64>> {
    let mut out: HashMap<u32, Vec<f64>> = HashMap::new();
    for c in caps {
        assert!(
            !out.contains_key(&c.weight_id),
            "weight {} captured twice",
            c.weight_id
        );
        assert_eq!(c.x.len(), c.shape.b * c.shape.t * c.shape.d);
        assert_eq!(c.g.len(), c.shape.b * c.shape.t * c.shape.p);
        let (mut w, mut b) = (vec![0.0; c.shape.p * c.shape.d], vec![0.0; c.shape.p]);
        for i in 0..c.shape.b {
            let (wi, bi) = grads_of(c, i);
            w.iter_mut().zip(wi).for_each(|(a, v)| *a += v);
            b.iter_mut().zip(bi).for_each(|(a, v)| *a += v);
        }
        out.insert(c.weight_id, w);
        if let Some(bid) = c.bias_id {
            out.insert(bid, b);
        }
    }
    out
}

fn loss_sum(m: &Mllm<Cpu64>, bt: &Batch, tok: Option<&TokenSelectConfig>) -> f64 {
    m.per_example_loss_buf(&Cpu64, bt, tok)
        .unwrap()
        .iter()
        .sum()
}

/// Sets every trainable tensor (incl. LoRA B) to random values so that no
/// gradient vanishes by construction.
fn randomize_trainable(m: &mut Mllm<Cpu64>, seed: u64, scale: f64) {
    let mut r = common::rng(seed);
    for p in m.trainable().to_vec() {
        for v in m.param_mut(p.id).iter_mut() {
            *v = r.random_range(-scale..scale);
        }
    }
}

/// The small model as an HF LLaVA checkpoint has it: exact GELU in the projector,
/// no patch-embedding bias.
fn hf_style(mut cfg: ModelConfig) -> ModelConfig {
    cfg.projector = ProjectorConfig {
        act: ProjectorAct::Gelu,
        bias: true,
    };
    cfg.vision.patch_bias = false;
    cfg
}

/// `<image>` placeholders at the start, inside and at the end of the 5 text tokens.
fn splice() -> Option<Vec<Option<usize>>> {
    Some(vec![Some(0), Some(2), Some(4)])
}

/// A mixed batch: example 0 is text-only (with loss), example 1 has an image and no
/// masked position, example 2 an image inside its text.
fn mixed() -> Option<Vec<Option<usize>>> {
    Some(vec![None, Some(2), Some(3)])
}

fn fd_check_model(mode: TrainMode, feature: VisionFeature, tok: Option<TokenSelectConfig>) {
    fd_check_model_with(small_cfg(feature), None, mode, tok)
}

fn fd_check_model_with(
    cfg: ModelConfig,
    image_pos: Option<Vec<Option<usize>>>,
    mode: TrainMode,
    tok: Option<TokenSelectConfig>,
) {
    let mut m = Mllm::new(&Cpu64, &cfg, &mode, 7).unwrap();
    randomize_trainable(&mut m, 99, 0.3);
    let mut bt = batch(&cfg, 3, 5, 11, true);
    bt.image_pos = image_pos;
    let fb = m.forward_backward(&Cpu64, &bt, tok.as_ref()).unwrap();
    assert_eq!(fb.per_example_loss.len(), 3);
    assert_eq!(
        fb.per_example_loss[1], 0.0,
        "an example with no masked position has ℓ = 0"
    );
    let grads = capture_grads(&fb.captures);
    // Every trainable tensor is covered by a capture.
    for p in m.trainable() {
        assert!(grads.contains_key(&p.id), "no capture for {}", p.name);
        assert_eq!(grads[&p.id].len(), p.len, "{}", p.name);
    }
    let h = 1e-5;
    let mut r = common::rng(5);
    let mut checked = 0;
    for p in m.trainable().to_vec() {
        let g = &grads[&p.id];
        let scale = g.iter().fold(0.0f64, |a, v| a.max(v.abs()));
        assert!(scale > 1e-8, "{}: gradient vanishes", p.name);
        // The largest coordinate and three random ones.
        let argmax = (0..g.len())
            .max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs()))
            .unwrap();
        let mut coords = vec![argmax];
        coords.extend((0..3).map(|_| r.random_range(0..g.len())));
        for j in coords {
            let old = m.param(p.id)[j];
            m.param_mut(p.id)[j] = old + h;
            let lp = loss_sum(&m, &bt, tok.as_ref());
            m.param_mut(p.id)[j] = old - h;
            let lm = loss_sum(&m, &bt, tok.as_ref());
            m.param_mut(p.id)[j] = old;
            let fd = (lp - lm) / (2.0 * h);
            let err = (fd - g[j]).abs() / scale;
            assert!(
                err < 1e-6,
                "{}[{j}]: captured {} vs finite difference {fd} (rel err {err:e})",
                p.name,
                g[j]
            );
            checked += 1;
        }
    }
    assert!(checked >= 4 * m.trainable().len());
}

#[test]
fn captures_match_finite_differences_full() {
    let mode = TrainMode::Full {
        groups: vec![
            FullGroup::Projector,
            FullGroup::Attention,
            FullGroup::Mlp,
            FullGroup::LmHead,
        ],
    };
    fd_check_model(mode.clone(), VisionFeature::Patch, None);
    // HF LLaVA's layout: visual tokens spliced at an <image> placeholder, exact GELU.
    let cfg = hf_style(small_cfg(VisionFeature::Patch));
    fd_check_model_with(cfg.clone(), splice(), mode.clone(), None);
    // A batch mixing text-only and image examples.
    fd_check_model_with(cfg, mixed(), mode, None);
}

#[test]
fn captures_match_finite_differences_lora_with_pruning() {
    let tok = TokenSelectConfig {
        keep: 2,
        context: 1,
        fuse_noise_std: 0.0,
        noise: StreamKey::from_insecure_seed(RngKind::Chacha20, 0),
    };
    fd_check_model(TrainMode::lora(3, 6.0), VisionFeature::Patch, Some(tok));
    let cfg = hf_style(small_cfg(VisionFeature::Patch));
    fd_check_model_with(cfg.clone(), splice(), TrainMode::lora(3, 6.0), Some(tok));
    fd_check_model_with(cfg, mixed(), TrainMode::lora(3, 6.0), Some(tok));
    // LoRA on a subset of linears, with the CLS token kept.
    let mode = TrainMode::Lora {
        rank: 2,
        alpha: 4.0,
        targets: vec![LoraTarget::V, LoraTarget::Down],
    };
    fd_check_model(mode, VisionFeature::ClsPatch, None);
}

#[test]
fn embeddings_dense_grad_matches_finite_differences() {
    let cfg = small_cfg(VisionFeature::Patch);
    let mode = TrainMode::Full {
        groups: vec![FullGroup::Embeddings],
    };
    for image_pos in [
        None,
        Some(vec![Some(1), Some(3)]),
        Some(vec![None, Some(2)]),
    ] {
        embeddings_fd(&cfg, &mode, image_pos);
    }
}

fn embeddings_fd(cfg: &ModelConfig, mode: &TrainMode, image_pos: Option<Vec<Option<usize>>>) {
    let mut m = Mllm::new(&Cpu64, cfg, mode, 3).unwrap();
    randomize_trainable(&mut m, 4, 0.5);
    let mut bt = batch(cfg, 2, 4, 12, false);
    bt.image_pos = image_pos;
    let fb = m.forward_backward(&Cpu64, &bt, None).unwrap();
    assert!(fb.captures.is_empty());
    assert_eq!(fb.dense_grads.len(), 1);
    let (id, g) = &fb.dense_grads[0];
    let h = 1e-5;
    let tok = bt.input_ids[0] as usize;
    for j in [tok * 16, tok * 16 + 5, (bt.input_ids[5] as usize) * 16 + 3] {
        let old = m.param(*id)[j];
        m.param_mut(*id)[j] = old + h;
        let lp = loss_sum(&m, &bt, None);
        m.param_mut(*id)[j] = old - h;
        let lm = loss_sum(&m, &bt, None);
        m.param_mut(*id)[j] = old;
        let fd = (lp - lm) / (2.0 * h);
        assert!(
            (fd - g[j]).abs() < 1e-8 + 1e-6 * fd.abs(),
            "embedding[{j}]: {} vs {fd}",
            g[j]
        );
    }
}

#[test]
fn per_example_captures_are_per_example_gradients() {
    let cfg = small_cfg(VisionFeature::Patch);
    let mode = TrainMode::Full {
        groups: vec![
            FullGroup::Projector,
            FullGroup::Attention,
            FullGroup::LmHead,
        ],
    };
    for mode in [mode, TrainMode::lora(2, 4.0)] {
        let mut m = Mllm::new(&Cpu64, &cfg, &mode, 21).unwrap();
        randomize_trainable(&mut m, 22, 0.3);
        let bt = batch(&cfg, 4, 6, 23, true);
        let fb = m.forward_backward(&Cpu64, &bt, None).unwrap();
        for i in 0..4 {
            let one = m.forward_backward(&Cpu64, &example(&bt, i), None).unwrap();
            let l1 = one.per_example_loss[0];
            assert!((fb.per_example_loss[i] - l1).abs() <= 1e-6 * l1.abs().max(1e-6));
            assert_eq!(one.captures.len(), fb.captures.len(), "example {i}");
            for c1 in &one.captures {
                let cb = fb
                    .captures
                    .iter()
                    .find(|c| c.weight_id == c1.weight_id)
                    .unwrap();
                let (wb, bb) = grads_of(cb, i);
                let (w1, b1) = grads_of(c1, 0);
                let scale = w1.iter().chain(&wb).fold(1e-12f64, |a, v| a.max(v.abs()));
                for (a, b) in wb.iter().zip(&w1).chain(bb.iter().zip(&b1)) {
                    assert!(
                        (a - b).abs() <= 1e-10 * scale,
                        "example {i}, weight {}",
                        c1.weight_id
                    );
                }
                if i == 1 {
                    assert_eq!(
                        scale, 1e-12,
                        "an example without masked positions has zero gradient"
                    );
                }
            }
        }
    }
}

/// A batch mixing text-only and image examples: every example's loss and
/// gradients are those it has alone (so neither its padding nor its pixels reach
/// the others), a text-only example's projector rows carry exactly zero gradient,
/// whatever its image slot holds (NaN included), and its loss is that of its text
/// alone, which does not depend on the vision tower at all.
#[test]
fn text_only_examples_in_a_mixed_batch() {
    let cfg = hf_style(small_cfg(VisionFeature::Patch));
    let mode = TrainMode::Full {
        groups: vec![FullGroup::Projector, FullGroup::Attention, FullGroup::Mlp],
    };
    let tok = TokenSelectConfig {
        keep: 2,
        context: 1,
        fuse_noise_std: 0.0,
        noise: StreamKey::from_insecure_seed(RngKind::Chacha20, 0),
    };
    for (mode, tok) in [(mode, None), (TrainMode::lora(2, 4.0), Some(tok))] {
        let mut m = Mllm::new(&Cpu64, &cfg, &mode, 31).unwrap();
        randomize_trainable(&mut m, 32, 0.3);
        let mut bt = batch(&cfg, 4, 6, 33, true);
        let text_only = [false, false, true, true];
        bt.image_pos = Some(vec![Some(1), Some(5), None, None]);
        let fb = m.forward_backward(&Cpu64, &bt, tok.as_ref()).unwrap();
        // The text-only slots' pixels are never read: NaN there changes nothing.
        let per = 3 * cfg.vision.image_size * cfg.vision.image_size;
        let mut poisoned = bt.clone();
        for i in [2, 3] {
            poisoned.images[i * per..][..per].fill(f32::NAN);
        }
        let fp = m.forward_backward(&Cpu64, &poisoned, tok.as_ref()).unwrap();
        assert_eq!(fp.per_example_loss, fb.per_example_loss);
        for (a, b) in fp.captures.iter().zip(&fb.captures) {
            assert_eq!(a.x, b.x, "weight {}", a.weight_id);
            assert_eq!(a.g, b.g, "weight {}", a.weight_id);
        }
        let proj_ids: Vec<u32> = m
            .trainable()
            .iter()
            .filter(|p| p.name.starts_with("projector."))
            .map(|p| p.id)
            .collect();
        for (i, &text_only) in text_only.iter().enumerate() {
            let one = m
                .forward_backward(&Cpu64, &example(&bt, i), tok.as_ref())
                .unwrap();
            let l1 = one.per_example_loss[0];
            assert!(
                (fb.per_example_loss[i] - l1).abs() <= 1e-10 * l1.abs().max(1e-6),
                "example {i}: loss {} in the batch, {l1} alone",
                fb.per_example_loss[i]
            );
            for c1 in &one.captures {
                let cb = fb
                    .captures
                    .iter()
                    .find(|c| c.weight_id == c1.weight_id)
                    .unwrap();
                let (wb, bb) = grads_of(cb, i);
                let (w1, b1) = grads_of(c1, 0);
                let scale = w1.iter().chain(&wb).fold(1e-12f64, |a, v| a.max(v.abs()));
                for (a, b) in wb.iter().zip(&w1).chain(bb.iter().zip(&b1)) {
                    assert!(
                        (a - b).abs() <= 1e-10 * scale,
                        "example {i}, weight {}",
                        c1.weight_id
                    );
                }
                if text_only && proj_ids.contains(&cb.weight_id) {
                    let s = cb.shape;
                    let rows = &cb.g[i * s.t * s.p..][..s.t * s.p];
                    assert!(
                        rows.iter().all(|&g| g == 0.0),
                        "text-only example {i}: projector weight {} has a gradient",
                        cb.weight_id
                    );
                }
            }
        }
        // Some projector gradient exists in the batch (from the image examples), so
        // the zero rows above are not vacuous.
        if !proj_ids.is_empty() {
            let c = fb
                .captures
                .iter()
                .find(|c| proj_ids.contains(&c.weight_id))
                .unwrap();
            assert!(c.g.iter().any(|&g| g != 0.0));
        }
        // A text-only example's loss does not depend on the vision tower or the
        // projector: zeroing the projector leaves it unchanged and moves the others.
        let mut m0 = Mllm::new(&Cpu64, &cfg, &TrainMode::frozen(), 31).unwrap();
        let l_a = m0.per_example_loss(&Cpu64, &bt, tok.as_ref()).unwrap();
        for name in ["projector.linear_2.weight", "projector.linear_2.bias"] {
            m0.tensor_mut(name)
                .unwrap()
                .iter_mut()
                .for_each(|v| *v = 0.0);
        }
        let l_b = m0.per_example_loss(&Cpu64, &bt, tok.as_ref()).unwrap();
        assert_eq!((l_a[2], l_a[3]), (l_b[2], l_b[3]));
        assert_ne!(l_a[0], l_b[0]);
    }
}

#[test]
fn full_pruning_equals_no_pruning_with_cls() {
    let mut cfg = ModelConfig::preset("tiny").unwrap();
    cfg.vision.feature = VisionFeature::ClsPatch;
    let m = Mllm::new(&Cpu, &cfg, &TrainMode::lora(4, 8.0), 1).unwrap();
    let bt = batch(&cfg, 3, 6, 2, false);
    let all = TokenSelectConfig {
        keep: cfg.vision.patches(),
        context: 0,
        fuse_noise_std: 0.0,
        noise: StreamKey::from_insecure_seed(RngKind::Chacha20, 0),
    };
    let l0 = m.per_example_loss(&Cpu, &bt, None).unwrap();
    let l1 = m.per_example_loss(&Cpu, &bt, Some(&all)).unwrap();
    assert_eq!(l0, l1);
    let n = cfg.vision.tokens();
    assert_eq!(m.visual_tokens(None), n);
    assert_eq!(m.visual_tokens(Some(&all)), n);
    // Real pruning changes the loss and the visual token count.
    let pruned = TokenSelectConfig {
        keep: 6,
        context: 2,
        fuse_noise_std: 0.0,
        noise: StreamKey::from_insecure_seed(RngKind::Chacha20, 0),
    };
    let fb = m.forward_backward(&Cpu, &bt, Some(&pruned)).unwrap();
    assert_eq!(fb.visual_tokens, 9);
    assert_ne!(fb.per_example_loss, l0);
    assert!(!fb.captures.is_empty() && fb.captures.iter().all(|c| c.shape.t == 9 + 6));
    // The default (LLaVA "patch" feature) drops CLS when not pruning.
    let m2 = Mllm::new(
        &Cpu,
        &ModelConfig::preset("tiny").unwrap(),
        &TrainMode::frozen(),
        1,
    )
    .unwrap();
    assert_eq!(m2.visual_tokens(None), n - 1);
}

#[test]
fn lora_at_init_equals_base_model() {
    let cfg = ModelConfig::preset("tiny").unwrap();
    let base = Mllm::new(&Cpu, &cfg, &TrainMode::frozen(), 5).unwrap();
    let mut lora = Mllm::new(&Cpu, &cfg, &TrainMode::lora(8, 16.0), 5).unwrap();
    assert!(base.trainable().is_empty());
    assert_eq!(lora.trainable().len(), 2 * 7 * 2);
    let bt = batch(&cfg, 4, 8, 6, false);
    let lb = base.per_example_loss(&Cpu, &bt, None).unwrap();
    let ll = lora.per_example_loss(&Cpu, &bt, None).unwrap();
    assert_eq!(lb, ll);
    assert_eq!(
        base.predict(&Cpu, &bt, None).unwrap(),
        lora.predict(&Cpu, &bt, None).unwrap()
    );
    // A non-zero B changes the output.
    let b_id = lora
        .trainable()
        .iter()
        .find(|p| p.name.contains("lora_B"))
        .unwrap()
        .id;
    lora.param_mut(b_id).iter_mut().for_each(|v| *v = 0.05);
    assert_ne!(lora.per_example_loss(&Cpu, &bt, None).unwrap(), lb);
}

#[test]
fn trainable_ids_are_stable_and_named() {
    let cfg = ModelConfig::preset("tiny").unwrap();
    let a = Mllm::new(&Cpu, &cfg, &TrainMode::lora(4, 8.0), 1).unwrap();
    let b = Mllm::new(&Cpu, &cfg, &TrainMode::lora(4, 8.0), 2).unwrap();
    assert_eq!(a.trainable(), b.trainable());
    assert_eq!(
        a.trainable()[0].name,
        "llm.layers.0.self_attn.q_proj.lora_A.weight"
    );
    assert_eq!(
        a.trainable()[1].name,
        "llm.layers.0.self_attn.q_proj.lora_B.weight"
    );
    for (i, p) in a.trainable().iter().enumerate() {
        assert_eq!(p.id as usize, i);
    }
    let full = Mllm::new(
        &Cpu,
        &cfg,
        &TrainMode::Full {
            groups: vec![FullGroup::LmHead, FullGroup::Projector],
        },
        1,
    )
    .unwrap();
    let names: Vec<_> = full.trainable().iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "projector.linear_1.weight",
            "projector.linear_1.bias",
            "projector.linear_2.weight",
            "projector.linear_2.bias",
            "llm.lm_head.weight"
        ]
    );
    let total: u64 = full.trainable().iter().map(|p| p.len as u64).sum();
    assert_eq!(
        total,
        cfg.trainable_params(&TrainMode::Full {
            groups: vec![FullGroup::LmHead, FullGroup::Projector]
        })
    );
}

#[test]
fn checkpoint_roundtrip_and_errors() {
    let cfg = ModelConfig::preset("tiny").unwrap();
    let mode = TrainMode::lora(4, 8.0);
    let mut m = Mllm::new(&Cpu, &cfg, &mode, 9).unwrap();
    let mut r = common::rng(1);
    for p in m.trainable().to_vec() {
        m.param_mut(p.id)
            .iter_mut()
            .for_each(|v| *v = r.random_range(-0.05..0.05));
    }
    let dir = common::tmp_dir("checkpoint_roundtrip_and_errors");
    let path = dir.join("lora.safetensors");
    m.save(&Cpu, &path).unwrap();
    let m2 = Mllm::load(&Cpu, &cfg, &mode, &path).unwrap();
    let bt = batch(&cfg, 3, 7, 4, false);
    assert_eq!(
        m.per_example_loss(&Cpu, &bt, None).unwrap(),
        m2.per_example_loss(&Cpu, &bt, None).unwrap()
    );
    for name in m.tensor_names() {
        assert_eq!(m.tensor(name), m2.tensor(name), "{name}");
    }

    // A pretrained full checkpoint loads into LoRA mode with fresh adapters (B = 0),
    // so the loss is the base model's.
    let base = Mllm::new(&Cpu, &cfg, &TrainMode::frozen(), 77).unwrap();
    let base_path = dir.join("base.safetensors");
    base.save(&Cpu, &base_path).unwrap();
    let fresh = Mllm::load(&Cpu, &cfg, &mode, &base_path).unwrap();
    assert_eq!(
        fresh.per_example_loss(&Cpu, &bt, None).unwrap(),
        base.per_example_loss(&Cpu, &bt, None).unwrap()
    );
    // A LoRA checkpoint does not load silently into a model without adapters.
    let err = Mllm::load(&Cpu, &cfg, &TrainMode::frozen(), &path)
        .err()
        .unwrap();
    assert!(err.to_string().contains(".lora_"), "{err}");

    // A checkpoint with a missing tensor is an error naming it.
    let bytes = std::fs::read(&base_path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<_> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != "llm.layers.1.mlp.up_proj.weight")
        .collect();
    let cut = dir.join("cut.safetensors");
    safetensors::serialize_to_file(kept, None, &cut).unwrap();
    let err = Mllm::load(&Cpu, &cfg, &TrainMode::frozen(), &cut)
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("llm.layers.1.mlp.up_proj.weight"),
        "{err}"
    );
    // A mis-shaped tensor (different config) is an error naming a tensor.
    let mut other = cfg.clone();
    other.llm.mlp = 256;
    let err = Mllm::load(&Cpu, &other, &TrainMode::frozen(), &base_path)
        .err()
        .unwrap();
    assert!(err.to_string().contains("shape"), "{err}");
    // Not a file / not safetensors.
    assert!(Mllm::load(&Cpu, &cfg, &mode, &dir.join("nope")).is_err());
    std::fs::write(dir.join("junk"), b"junk").unwrap();
    assert!(Mllm::load(&Cpu, &cfg, &mode, &dir.join("junk")).is_err());
}

#[test]
fn preset_parameter_counts() {
    let lora = TrainMode::lora(128, 256.0);
    let l7 = ModelConfig::preset("llava-7b").unwrap();
    let t1 = ModelConfig::preset("tinyllava-1b").unwrap();
    let (a, b) = (l7.trainable_params(&lora), t1.trainable_params(&lora));
    assert_eq!(a, 319_815_680);
    assert_eq!(b, 100_925_440);
    assert!((a as f64 / 319.8e6 - 1.0).abs() < 1e-3);
    assert!((b as f64 / 100.9e6 - 1.0).abs() < 1e-3);
    // With the lm_head as well it would be 324.4M / 105.3M: not the paper's figure.
    let lm = |c: &ModelConfig| 128 * (c.llm.hidden + c.llm.vocab) as u64;
    assert!(((a + lm(&l7)) as f64 / 319.8e6 - 1.0).abs() > 1e-2);
    assert!(((b + lm(&t1)) as f64 / 100.9e6 - 1.0).abs() > 1e-2);
    // Base sizes: Vicuna-7B 6.74B, TinyLlama 1.10B, plus CLIP-L up to layer −2
    // (~0.29B) and the projector.
    let llm7 = l7.base_params();
    assert!(llm7 > 7_000_000_000 && llm7 < 7_100_000_000, "{llm7}");
    assert!(
        t1.base_params() > 1_390_000_000 && t1.base_params() < 1_420_000_000,
        "{}",
        t1.base_params()
    );
    // Tiny: analytic counts equal what is allocated.
    let tiny = ModelConfig::preset("tiny").unwrap();
    let m = Mllm::new(&Cpu, &tiny, &TrainMode::lora(4, 8.0), 0).unwrap();
    let all: u64 = m
        .tensor_names()
        .iter()
        .map(|n| m.tensor(n).unwrap().len() as u64)
        .sum();
    assert_eq!(
        all,
        tiny.base_params() + tiny.trainable_params(&TrainMode::lora(4, 8.0))
    );
    let err = ModelConfig::preset("gpt-5").err().unwrap().to_string();
    assert!(
        err.contains("tiny")
            && err.contains("small")
            && err.contains("llava-7b")
            && err.contains("tinyllava-1b"),
        "{err}"
    );
}

/// The `small` preset (the second CPU bench size) has the sizes its doc states,
/// allocates what its analytic counts say, and runs one example forward and
/// backward with a finite loss and a capture for every LoRA tensor.
#[test]
fn small_preset_builds_and_steps() {
    let cfg = ModelConfig::preset("small").unwrap();
    let (v, l) = (&cfg.vision, &cfg.llm);
    assert_eq!((v.image_size, v.patch_size, v.patches()), (64, 8, 64));
    assert_eq!(
        (v.hidden, v.layers, v.layers_run(), v.heads),
        (256, 4, 3, 4)
    );
    assert_eq!((l.hidden, l.layers, l.heads, l.kv_heads), (512, 4, 8, 4));
    assert_eq!((l.mlp, l.vocab, l.head_dim()), (1408, 1024, 64));
    let mode = TrainMode::lora(8, 16.0);
    // r·(d_in + d_out) summed over q, k, v, o, gate, up, down, times 4 layers.
    let per_layer = 8 * ((512 + 512) + 2 * (512 + 256) + (512 + 512) + 3 * (512 + 1408));
    assert_eq!(cfg.trainable_params(&mode), 4 * per_layer as u64);
    let m = Mllm::new(&Cpu, &cfg, &mode, 0).unwrap();
    let all: u64 = m
        .tensor_names()
        .iter()
        .map(|n| m.tensor(n).unwrap().len() as u64)
        .sum();
    assert_eq!(all, cfg.base_params() + cfg.trainable_params(&mode));
    let fb = m
        .forward_backward(&Cpu, &batch(&cfg, 1, 6, 7, false), None)
        .unwrap();
    assert_eq!(fb.per_example_loss.len(), 1);
    let loss = fb.per_example_loss[0];
    // Random init over 1024 tokens: the loss is near ln(1024) = 6.93.
    assert!(loss.is_finite() && (loss - 6.93).abs() < 1.0, "{loss}");
    assert_eq!(fb.captures.len(), 4 * 7 * 2);
    assert_eq!(fb.visual_tokens, 64);
}

#[test]
fn oversized_model_is_an_error_naming_the_preset() {
    let cfg = ModelConfig::preset("llava-7b").unwrap();
    let need = cfg.base_params() * 4;
    match Cpu.available_memory() {
        Some(avail) if avail < need => {
            let err = Mllm::new(&Cpu, &cfg, &TrainMode::frozen(), 0)
                .err()
                .unwrap();
            assert!(err.to_string().contains("llava-7b"), "{err}");
        }
        _ => println!("skipped: this machine could hold llava-7b, not allocating it in a test"),
    }
}

#[test]
fn bad_inputs_are_errors() {
    let cfg = ModelConfig::preset("tiny").unwrap();
    let m = Mllm::new(&Cpu, &cfg, &TrainMode::lora(2, 4.0), 0).unwrap();
    let good = batch(&cfg, 2, 5, 1, false);
    assert!(m.forward_backward(&Cpu, &good, None).is_ok());
    let mut b = good.clone();
    b.size = 3;
    assert!(m.forward_backward(&Cpu, &b, None).is_err());
    let mut b = good.clone();
    b.images.pop();
    assert!(m.per_example_loss(&Cpu, &b, None).is_err());
    let mut b = good.clone();
    b.image_size = 16;
    b.images.truncate(2 * 3 * 16 * 16);
    assert!(m.per_example_loss(&Cpu, &b, None).is_err());
    let mut b = good.clone();
    b.input_ids[3] = 64;
    assert!(m.forward_backward(&Cpu, &b, None).is_err());
    let mut b = good.clone();
    b.targets[4] = 1000; // masked position (last of example 0)
    assert!(m.forward_backward(&Cpu, &b, None).is_err());
    let mut b = good.clone();
    b.targets[0] = 1000; // unmasked position: never read
    assert!(m.forward_backward(&Cpu, &b, None).is_ok());
    let mut b = good.clone();
    b.loss_mask.push(1.0);
    assert!(m.forward_backward(&Cpu, &b, None).is_err());
    let mut b = good.clone();
    b.loss_mask[0] = 0.5;
    assert!(m.forward_backward(&Cpu, &b, None).is_err());
    let too_many = TokenSelectConfig {
        keep: 60,
        context: 10,
        fuse_noise_std: 0.0,
        noise: StreamKey::from_insecure_seed(RngKind::Chacha20, 0),
    };
    assert!(m.forward_backward(&Cpu, &good, Some(&too_many)).is_err());
    let mut b = good.clone();
    b.loss_mask = vec![0.0; 10];
    assert!(m.predict(&Cpu, &b, None).is_err());
    assert_eq!(m.predict(&Cpu, &good, None).unwrap().len(), 2);
    // Empty batches are legal (Poisson sampling).
    let empty = Batch {
        image_size: 32,
        text_len: 5,
        ..Batch::default()
    };
    let fb = m.forward_backward(&Cpu, &empty, None).unwrap();
    assert!(fb.per_example_loss.is_empty() && fb.captures.is_empty());
    assert!(m.per_example_loss(&Cpu, &empty, None).unwrap().is_empty());
    // Bad configs.
    let mut c = cfg.clone();
    c.llm.kv_heads = 3;
    assert!(Mllm::new(&Cpu, &c, &TrainMode::frozen(), 0).is_err());
    assert!(Mllm::new(&Cpu, &cfg, &TrainMode::lora(0, 1.0), 0).is_err());
    let dup = TrainMode::Lora {
        rank: 2,
        alpha: 1.0,
        targets: vec![LoraTarget::Q, LoraTarget::Q],
    };
    assert!(Mllm::new(&Cpu, &cfg, &dup, 0).is_err());
}

/// `cargo test --release --test model -- --ignored --nocapture tiny_timing`
#[test]
#[ignore]
fn tiny_timing() {
    let cfg = ModelConfig::preset("tiny").unwrap();
    let m = Mllm::new(&Cpu, &cfg, &TrainMode::lora(8, 16.0), 0).unwrap();
    let bt = batch(&cfg, 8, 16, 3, false);
    m.forward_backward(&Cpu, &bt, None).unwrap();
    let n = 10;
    let t0 = std::time::Instant::now();
    for _ in 0..n {
        m.forward_backward(&Cpu, &bt, None).unwrap();
    }
    let dt = t0.elapsed().as_secs_f64() / n as f64;
    println!(
        "tiny forward_backward, LoRA r=8, B=8, T=16 (80 positions): {:.1} ms",
        dt * 1e3
    );
    let full = Mllm::new(
        &Cpu,
        &cfg,
        &TrainMode::Full {
            groups: vec![
                FullGroup::Projector,
                FullGroup::Attention,
                FullGroup::Mlp,
                FullGroup::LmHead,
            ],
        },
        0,
    )
    .unwrap();
    let t0 = std::time::Instant::now();
    for _ in 0..n {
        full.forward_backward(&Cpu, &bt, None).unwrap();
    }
    println!(
        "tiny forward_backward, full fine-tuning, B=8, T=16: {:.1} ms",
        t0.elapsed().as_secs_f64() / n as f64 * 1e3
    );
    let t0 = std::time::Instant::now();
    for _ in 0..n {
        m.per_example_loss(&Cpu, &bt, None).unwrap();
    }
    println!(
        "tiny forward only: {:.1} ms",
        t0.elapsed().as_secs_f64() / n as f64 * 1e3
    );
}
