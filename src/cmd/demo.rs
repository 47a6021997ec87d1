//! `dualpriv demo`, the README's main job: fine-tunes the shipped tiny pretrained
//! model on the built-in private task with nonprivate, dpsgd, dualpriv and dpzo at
//! one (ε, δ), evaluates each, and reports one row per method.
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::pretrain::{default_pretrain_args, is_model_folder, pretrain};
use crate::backend::dp::DpBackend;
use crate::data::builtin;
use crate::data::synthetic::{majority_baseline, Split};
use crate::data::DataSource;
use crate::dp::accountant::AccountantKind;
use crate::hf::load::load_llava;
use crate::model::Mllm;
use crate::train::checkpoint::{ModelSpec, HF_PRESET};
use crate::train::eval::evaluate;
use crate::train::method::Method;
use crate::train::optim::OptConfig;
use crate::train::{TrainConfig, Trainer};
use crate::Result;

/// One method's row in the demo table.
#[derive(Clone, Debug)]
pub struct DemoRow {
    /// The method.
    pub method: Method,
    /// Test accuracy.
    pub accuracy: f64,
    /// ε spent (∞ for non-private).
    pub epsilon: f64,
    /// Peak heap bytes during the fine-tune (CPU, counting allocator).
    pub peak_bytes: Option<usize>,
    /// Fine-tune wall time, seconds.
    pub seconds: f64,
    /// Visual tokens per example.
    pub visual_tokens: usize,
}

/// Settings of the demo's fine-tunes, shared by all methods.
#[derive(Clone, Debug)]
pub struct DemoArgs {
    /// The pretrained LLaVA folder (config.json, model.safetensors, tokenizer.json,
    /// preprocessor_config.json); pretrained first if missing.
    pub pretrained: PathBuf,
    /// Where the fine-tunes write checkpoints and metrics: each demo makes a new
    /// folder `OUT/<time>-<id>/<method>`, and all demos share the ledger
    /// `OUT/privacy-ledger.json` (they train on the same private split).
    pub out: PathBuf,
    /// Private training examples.
    pub train_examples: usize,
    /// Test examples.
    pub test_examples: usize,
    /// Target ε.
    pub epsilon: f64,
    /// δ.
    pub delta: f64,
    /// Show progress bars.
    pub progress: bool,
}

/// The fine-tuning config every demo method uses (same data, steps, optimizer).
pub fn demo_train_config(method: Method, epsilon: f64, delta: f64, text_len: usize) -> TrainConfig {
    let dpzo = method == Method::Dpzo;
    // Few large batches: DP noise on the mean gradient shrinks as σ/B, and the
    // whole demo must fit a few minutes on 2 CPU cores.
    TrainConfig {
        steps: 25,
        opt: if dpzo {
            OptConfig::sgd(2e-3)
        } else {
            OptConfig::adamw(1e-2)
        },
        epsilon: method.is_private().then_some(epsilon),
        delta,
        noise_multiplier: None,
        accountant: AccountantKind::Pld,
        // The tiny preset's default (K, M) = (6, 2): 9 visual tokens instead of 16.
        keep_tokens: (method == Method::Dualpriv).then_some(6),
        context_tokens: if method == Method::Dualpriv { 2 } else { 0 },
        keep_frac: 0.8,
        dpzo_lambda: 1e-2,
        ..TrainConfig::new(method, 256, text_len)
    }
}

/// The LoRA model the demo fine-tunes: the LLaVA folder `pretrained`.
pub fn demo_spec(pretrained: &Path) -> ModelSpec {
    ModelSpec {
        preset: format!("{HF_PRESET}{}", pretrained.display()),
        lora_rank: Some(8),
        lora_alpha: 16.0,
        full_groups: vec![],
    }
}

/// What the demo measured: a row per method, plus the reference points that say
/// what the accuracies mean.
#[derive(Clone, Debug)]
pub struct DemoReport {
    /// One row per fine-tuned method.
    pub rows: Vec<DemoRow>,
    /// Accuracy of the pretrained checkpoint before any fine-tuning.
    pub pretrained_accuracy: f64,
    /// Accuracy of always answering the most frequent answer of the question's kind.
    pub majority_baseline: f64,
}

/// Runs the demo: pretrain if needed, fine-tune every method, evaluate.
pub fn demo<B: DpBackend>(backend: &B, a: &DemoArgs) -> Result<DemoReport> {
    if !is_model_folder(&a.pretrained) {
        eprintln!(
            "demo: no pretrained model folder at {}; pretraining one now",
            a.pretrained.display()
        );
        let (s, acc) = pretrain(backend, &default_pretrain_args(&a.pretrained, a.progress))?;
        eprintln!(
            "demo: pretrained {} steps in {:.0} s, public accuracy {acc:.3}",
            s.steps, s.seconds
        );
    }
    let spec = demo_spec(&a.pretrained);
    let (mcfg, mode) = spec.build()?;
    let image = mcfg.vision.image_size;
    let (train, _) = builtin::load(&a.pretrained, Split::Private, a.train_examples, 1, image)?;
    let (test, test_task) = builtin::load(&a.pretrained, Split::Test, a.test_examples, 2, image)?;
    let text_len = builtin::MAX_TEXT_LEN;
    let load = || -> Result<Mllm<B>> { Ok(load_llava(backend, &a.pretrained, &mode, 0)?.0) };
    let pretrained_accuracy = evaluate(backend, &load()?, &test, None, text_len)?;
    let majority_baseline = majority_baseline(&test_task);
    let session = a.out.join(format!(
        "{}-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        &crate::train::checkpoint::random_id()?[..8]
    ));
    let mut rows = Vec::new();
    // `ghost` is `dualpriv` without its two pruning mechanisms; the demo leaves it
    // out to stay within a few minutes (`dualpriv bench` and `train` have it).
    for method in [
        Method::Nonprivate,
        Method::Dpsgd,
        Method::Dualpriv,
        Method::Dpzo,
    ] {
        let model = load()?;
        crate::mem::reset_peak();
        let t0 = Instant::now();
        let mut t = demo_trainer(backend, model, method, a, &train, text_len, &session)?;
        let tokens = t.cfg.token_select();
        let s = t.run(&train, 0)?;
        let seconds = t0.elapsed().as_secs_f64();
        let accuracy = evaluate(backend, &t.model, &test, tokens.as_ref(), text_len)?;
        rows.push(DemoRow {
            method,
            accuracy,
            epsilon: s.epsilon,
            peak_bytes: s.peak_bytes,
            seconds,
            visual_tokens: t.model.visual_tokens(tokens.as_ref()),
        });
    }
    Ok(DemoReport {
        rows,
        pretrained_accuracy,
        majority_baseline,
    })
}

/// The demo's trainer for one method, writing to `session/<method>` and the shared
/// ledger `a.out/privacy-ledger.json`. [`Trainer::new`] draws a fresh secret key
/// from the OS, so no two methods (and no two demos) share batches or noise.
pub fn demo_trainer<'a, B: DpBackend>(
    backend: &'a B,
    model: Mllm<B>,
    method: Method,
    a: &DemoArgs,
    train: &dyn DataSource,
    text_len: usize,
    session: &Path,
) -> Result<Trainer<'a, B>> {
    let mut cfg = demo_train_config(method, a.epsilon, a.delta, text_len);
    // The split's size is a flag of the demo: public.
    cfg.public_size = Some(a.train_examples);
    let mut t = Trainer::new(backend, model, demo_spec(&a.pretrained), cfg, train)?;
    t.out_dir = Some(session.join(method.to_string()));
    t.ledger = Some(a.out.join("privacy-ledger.json"));
    t.progress = a.progress;
    Ok(t)
}
