//! `dualpriv pretrain`: non-private pretraining on the public split, which builds
//! the public starting checkpoint as a transformers LLaVA folder (the recipe of the
//! shipped one is `assets/tiny-pretrained/RECIPE.md`).
//!
//! The folder is an ordinary LLaVA: `config.json`, `model.safetensors` in
//! transformers' names, a WordLevel `tokenizer.json` and a `preprocessor_config.json`
//! ([`crate::data::builtin::write_model_files`]). The model is the preset's sizes
//! with what transformers' LLaVA has: no patch-embedding bias and the exact (erf)
//! GELU in the projector. Fine-tuning, evaluation and generation then read it
//! through the same loader and data pipeline as `llava-hf/llava-1.5-7b-hf`.
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::backend::dp::DpBackend;
use crate::data::builtin;
use crate::data::synthetic::Split;
use crate::dp::key::RunKey;
use crate::model::Mllm;
use crate::train::checkpoint::ModelSpec;
use crate::train::eval::evaluate;
use crate::train::method::Method;
use crate::train::optim::OptConfig;
use crate::train::sampler::Sampling;
use crate::train::{RunSummary, TrainConfig, Trainer};
use crate::Result;

/// Settings of `dualpriv pretrain`.
#[derive(Clone, Debug)]
pub struct PretrainArgs {
    /// Model preset (its sizes; see the module doc for what differs).
    pub preset: String,
    /// Output folder: the LLaVA folder is written there.
    pub out: PathBuf,
    /// Public examples.
    pub examples: usize,
    /// Optimizer steps.
    pub steps: u32,
    /// Batch size.
    pub batch: usize,
    /// AdamW learning rate.
    pub lr: f32,
    /// Seed of data and initialisation.
    pub seed: u64,
    /// Show a progress bar.
    pub progress: bool,
}

/// The groups pretraining trains: everything but the frozen vision tower and norms.
pub fn pretrain_spec(preset: &str) -> ModelSpec {
    ModelSpec {
        preset: preset.into(),
        lora_rank: None,
        lora_alpha: 0.0,
        full_groups: ["projector", "attention", "mlp", "lm_head", "embeddings"]
            .map(String::from)
            .to_vec(),
    }
}

/// Steps per block of [`pretrain`]'s alternation between all and pruned visual tokens.
pub const PRETRAIN_BLOCK: u32 = 50;

/// Non-private pretraining on the public split; writes the LLaVA folder `a.out` and
/// returns (summary, held-out public accuracy).
pub fn pretrain<B: DpBackend>(backend: &B, a: &PretrainArgs) -> Result<(RunSummary, f64)> {
    let spec = pretrain_spec(&a.preset);
    let (_, mode) = spec.build()?;
    let mcfg = builtin::model_config(&a.preset)?;
    let image = mcfg.vision.image_size;
    builtin::write_model_files(&a.out, &mcfg)?;
    let (data, _) = builtin::load(&a.out, Split::Public, a.examples, a.seed, image)?;
    let (held_out, _) = builtin::load(&a.out, Split::Public, 500, a.seed ^ 0x5eed, image)?;
    let text_len = builtin::MAX_TEXT_LEN;
    let model = Mllm::new(backend, &mcfg, &mode, a.seed)?;
    let cfg = TrainConfig {
        sampling: Sampling::Shuffle,
        steps: a.steps,
        opt: OptConfig::adamw(a.lr),
        // The built-in data's size is a setting: public.
        public_size: Some(a.examples),
        ..TrainConfig::new(Method::Nonprivate, a.batch, text_len)
    };
    // Public data, non-private method: a key from the public seed keeps the
    // shipped checkpoint reproducible (the shuffle order follows the seed).
    let mut t = Trainer::with_key(
        backend,
        model,
        spec,
        cfg,
        &data,
        RunKey::from_insecure_seed(a.seed),
    )?;
    t.progress = a.progress;
    // Alternate blocks of steps with all visual tokens and with the pruned view
    // (CLS + K + M) that `dualpriv` fine-tunes on, so the public model reads both
    // and token pruning does not meet a distribution it has never seen.
    let (k, m) = mcfg.vision.default_token_select();
    let started = Instant::now();
    let mut done = 0;
    while done < a.steps {
        let pruned = (done / PRETRAIN_BLOCK) % 2 == 1;
        t.cfg.keep_tokens = pruned.then_some(k);
        t.cfg.context_tokens = if pruned { m } else { 0 };
        t.cfg.steps = (done + PRETRAIN_BLOCK).min(a.steps);
        t.run(&data, 0)?;
        done = t.cfg.steps;
    }
    t.cfg.keep_tokens = None;
    t.cfg.context_tokens = 0;
    let mut summary = t.run(&data, 0)?;
    summary.seconds = started.elapsed().as_secs_f64();
    crate::hf::write::save_weights(backend, &t.model, &a.out.join("model.safetensors"))?;
    let acc = evaluate(backend, &t.model, &held_out, None, text_len)?;
    Ok((summary, acc))
}

/// Whether `dir` holds a model folder (its `config.json` and weights).
pub fn is_model_folder(dir: &Path) -> bool {
    dir.join("config.json").is_file()
        && (dir.join("model.safetensors").is_file()
            || dir.join("model.safetensors.index.json").is_file())
}

/// The pretraining recipe that produced the shipped checkpoint.
pub fn default_pretrain_args(out: &Path, progress: bool) -> PretrainArgs {
    PretrainArgs {
        preset: "tiny".into(),
        out: out.to_path_buf(),
        examples: 40_000,
        steps: 2000,
        batch: 32,
        lr: 1e-3,
        seed: 0,
        progress,
    }
}
