//! The seam between the study and the training code: [`StudyContext`] (the data
//! and the starting checkpoint) and [`run_one`], which trains and evaluates one
//! [`RunSpec`]. Everything else in [`crate::study`] sees runs only through
//! [`RunSpec`] and [`RunOutcome`], so pointing the study at another task means
//! changing this file alone.
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::spec::RunSpec;
use crate::backend::dp::DpBackend;
use crate::cmd::demo::{demo_spec, demo_train_config};
use crate::cmd::pretrain::{default_pretrain_args, is_model_folder, pretrain};
use crate::data::builtin;
use crate::data::synthetic::Split;
use crate::dp::accountant::calibrate_sigma;
use crate::dp::key::RunKey;
use crate::hf::dataset::LlavaDataset;
use crate::hf::load::load_llava;
use crate::train::checkpoint::ModelSpec;
use crate::train::eval::evaluate_full;
use crate::train::optim::OptConfig;
use crate::train::{io_err, StepRecord, Trainer};
use crate::{Error, Result};

/// The data-independent settings of a study: every run of it shares them, and a
/// resume must use the same ones (they are saved as `DIR/study.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// Private training examples of the built-in task (declared public size N).
    pub train_examples: usize,
    /// Test examples.
    pub test_examples: usize,
    /// δ of every DP run.
    pub delta: f64,
}

/// What every run shares: the starting checkpoint, the private training split, the
/// test split, and where runs write their folders and the privacy ledger.
pub struct StudyContext {
    /// The pretrained LLaVA folder every run starts from.
    pub pretrained: PathBuf,
    /// The private training split (the built-in task as LLaVA records).
    pub train: LlavaDataset,
    /// The held-out test split.
    pub test: LlavaDataset,
    /// Accuracy of always answering the test split's most frequent answer of the
    /// question's kind.
    pub majority_baseline: f64,
    /// Text tokens per example after padding.
    pub text_len: usize,
    /// The study's settings.
    pub settings: Settings,
    /// Run folders go in `runs_dir/<label>-<id>`.
    pub runs_dir: PathBuf,
    /// The privacy ledger every run records its spend in (they all use one split).
    pub ledger: PathBuf,
    /// Calibrated noise multipliers by (q, steps, target ε) bits: calibration costs
    /// seconds and many runs share its inputs.
    sigmas: std::cell::RefCell<Vec<(SigmaKey, f64)>>,
    /// [`RunOutcome::accountant_peak_bytes`] by (privacy history, δ bits).
    accountant_peaks: std::cell::RefCell<Vec<(AccountantKey, u64)>>,
}

/// The bits of q, the planned steps and the bits of the target ε.
type SigmaKey = (u64, u32, u64);

/// A privacy history ((q, σ, steps) entries) and δ's bits.
type AccountantKey = (Vec<(f64, f64, u64)>, u64);

impl StudyContext {
    /// Loads (pretraining first, when missing) the checkpoint in `pretrained` and
    /// generates the splits of `settings`; runs write under `out`.
    pub fn new<B: DpBackend>(
        backend: &B,
        pretrained: &Path,
        settings: &Settings,
        out: &Path,
    ) -> Result<Self> {
        if !is_model_folder(pretrained) {
            eprintln!(
                "study: no pretrained LLaVA folder at {}; pretraining one now",
                pretrained.display()
            );
            pretrain(backend, &default_pretrain_args(pretrained, true))?;
        }
        let (mcfg, _) = demo_spec(pretrained).build()?;
        let image = mcfg.vision.image_size;
        // The demo's splits and seeds: the study measures the demo's task.
        let (train, _) = builtin::load(
            pretrained,
            Split::Private,
            settings.train_examples,
            1,
            image,
        )?;
        let (test, task) =
            builtin::load(pretrained, Split::Test, settings.test_examples, 2, image)?;
        Ok(Self {
            pretrained: pretrained.to_path_buf(),
            train,
            test,
            majority_baseline: crate::data::synthetic::majority_baseline(&task),
            text_len: builtin::MAX_TEXT_LEN,
            settings: settings.clone(),
            runs_dir: out.join("runs"),
            ledger: out.join("privacy-ledger.json"),
            sigmas: Default::default(),
            accountant_peaks: Default::default(),
        })
    }
}

/// What one run measured. Only aggregate test metrics and public facts of the run:
/// nothing computed from the private training examples besides the released model
/// (whose test metrics are post-processing) and the resources its steps used.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunOutcome {
    /// Test accuracy.
    pub accuracy: f64,
    /// Mean per-example test loss.
    pub loss: f64,
    /// ε the accountant reports for the steps taken (`None`: ∞, not private).
    pub epsilon_spent: Option<f64>,
    /// The noise multiplier σ (0 for non-private).
    pub sigma: f64,
    /// Steps taken (fewer than planned only if the budget ran out).
    pub steps_done: u32,
    /// Peak heap bytes in use during training (`None` without the counting
    /// allocator). Includes the splits the study holds, the same in every run.
    pub peak_bytes: Option<u64>,
    /// Heap bytes in use before the model was loaded (the splits and the study's
    /// own state): `peak_bytes − base_bytes` is the run's model and training peak.
    /// Both include the training split, whose size in memory follows its token
    /// count: harmless for the built-in task (generated from a public seed), but a
    /// study on private data would have to publish only the difference.
    pub base_bytes: Option<u64>,
    /// Peak heap bytes of one fine ε computation of the run's history above what
    /// was in use (the PLD accountant's arrays; `None` for non-private runs). The
    /// trainer computes ε between steps, so when this is near the run's peak above
    /// its model, the accountant and not the step set the peak.
    pub accountant_peak_bytes: Option<u64>,
    /// Median wall time of one step, seconds.
    pub median_step_seconds: f64,
    /// Wall time of the run (load, train, evaluate), seconds.
    pub wall_seconds: f64,
    /// CPU time of the process during the run (every thread), seconds, where
    /// `/proc/self/stat` exists: with `wall_seconds` it shows how much of the
    /// machine the run had (other jobs on a shared machine stretch wall time only).
    #[serde(default)]
    pub cpu_seconds: Option<f64>,
    /// Visual tokens per example the LLM reads.
    pub visual_tokens: usize,
    /// Trainable parameters.
    pub trainable_params: usize,
}

impl RunOutcome {
    /// The model and training peak: `peak_bytes − base_bytes`.
    pub fn model_peak_bytes(&self) -> Option<u64> {
        Some(self.peak_bytes?.saturating_sub(self.base_bytes?))
    }
}

/// The model spec of `spec`: the demo's tiny LoRA model at rank r (α = 2r, the
/// demo's ratio), or full fine-tuning of the attention projections.
pub fn model_spec(spec: &RunSpec, pretrained: &Path) -> ModelSpec {
    let demo = demo_spec(pretrained);
    match spec.lora_rank {
        Some(r) => ModelSpec {
            lora_rank: Some(r),
            lora_alpha: 2.0 * r as f32,
            ..demo
        },
        None => ModelSpec {
            lora_rank: None,
            lora_alpha: 0.0,
            full_groups: vec!["attention".into()],
            ..demo
        },
    }
}

/// Trains `spec` from the context's checkpoint with a fresh secret key from the
/// OS, evaluates it on the test split and returns what it measured. The run's
/// folder (`metrics.jsonl`, its final checkpoint) is `ctx.runs_dir/<label>-<id>`
/// and its spend goes into `ctx.ledger`.
pub fn run_one<B: DpBackend>(
    backend: &B,
    spec: &RunSpec,
    ctx: &StudyContext,
) -> Result<RunOutcome> {
    let t0 = Instant::now();
    let cpu0 = process_cpu_seconds();
    let mspec = model_spec(spec, &ctx.pretrained);
    let (_, mode) = mspec.build()?;
    let tracking = crate::mem::tracking();
    let base_bytes = tracking.then(|| crate::mem::current_bytes() as u64);
    let (model, _) = load_llava(backend, &ctx.pretrained, &mode, 0)?;
    let trainable_params = model.trainable().iter().map(|p| p.len).sum();
    let mut cfg = demo_train_config(
        spec.method,
        spec.epsilon.unwrap_or(f64::INFINITY),
        ctx.settings.delta,
        ctx.text_len,
    );
    cfg.steps = spec.steps;
    cfg.batch = spec.batch;
    cfg.micro_batch = spec.batch;
    cfg.keep_tokens = spec.tokens.map(|t| t.keep);
    cfg.context_tokens = spec.tokens.map_or(0, |t| t.context);
    cfg.keep_frac = spec.keep_frac;
    cfg.prune_scope = spec.prune_scope;
    cfg.opt = OptConfig {
        lr: spec.lr as f32,
        ..cfg.opt
    };
    // The split's size is a setting of the study: public.
    cfg.public_size = Some(ctx.settings.train_examples);
    if let (true, Some(eps)) = (spec.method.is_private(), spec.epsilon) {
        // The σ `Trainer::new` would calibrate for the target, computed once per
        // (q, steps, ε) with the same accountant call; the target still caps the run.
        let q = cfg.check(&ctx.train, &RunKey::from_os()?)?.rate();
        let k = (q.to_bits(), cfg.steps, eps.to_bits());
        let cached = ctx
            .sigmas
            .borrow()
            .iter()
            .find(|(c, _)| *c == k)
            .map(|&(_, s)| s);
        let sigma = match cached {
            Some(s) => s,
            None => {
                let s = calibrate_sigma(cfg.accountant, q, u64::from(cfg.steps), eps, cfg.delta)?;
                ctx.sigmas.borrow_mut().push((k, s));
                s
            }
        };
        cfg.noise_multiplier = Some(sigma);
    }
    let tokens = cfg.token_select();
    let mut t = Trainer::new(backend, model, mspec, cfg, &ctx.train)?;
    let dir = ctx.runs_dir.join(format!(
        "{}-{}",
        spec.label(),
        &crate::train::checkpoint::random_id()?[..8]
    ));
    t.out_dir = Some(dir.clone());
    t.ledger = Some(ctx.ledger.clone());
    t.progress = false;
    let summary = t.run(&ctx.train, 0)?;
    let accountant_peak_bytes = match (tracking, spec.method.is_private()) {
        (true, true) => {
            // Runs with the same history (q, σ, steps) share the figure: measured once.
            let k = (t.privacy.history.clone(), t.cfg.delta.to_bits());
            let known = ctx
                .accountant_peaks
                .borrow()
                .iter()
                .find(|(c, _)| *c == k)
                .map(|&(_, b)| b);
            match known {
                Some(b) => Some(b),
                None => {
                    crate::mem::reset_peak();
                    let before = crate::mem::current_bytes();
                    t.epsilon()?;
                    let b = crate::mem::peak_bytes().saturating_sub(before) as u64;
                    ctx.accountant_peaks.borrow_mut().push((k, b));
                    Some(b)
                }
            }
        }
        _ => None,
    };
    let eval = evaluate_full(
        backend,
        &t.model,
        &ctx.test,
        tokens.as_ref(),
        ctx.text_len,
        true,
    )?;
    Ok(RunOutcome {
        accuracy: eval.accuracy,
        loss: eval.loss,
        epsilon_spent: summary.epsilon.is_finite().then_some(summary.epsilon),
        sigma: summary.sigma,
        steps_done: summary.steps,
        peak_bytes: summary.peak_bytes.map(|b| b as u64),
        base_bytes,
        accountant_peak_bytes,
        median_step_seconds: median_step_seconds(&dir.join("metrics.jsonl"))?,
        wall_seconds: t0.elapsed().as_secs_f64(),
        cpu_seconds: process_cpu_seconds().zip(cpu0).map(|(b, a)| b - a),
        visual_tokens: t.model.visual_tokens(tokens.as_ref()),
        trainable_params,
    })
}

/// User + system CPU seconds of this process so far (`/proc/self/stat` fields 14
/// and 15, in clock ticks of 1/100 s, the value of `USER_HZ` on Linux).
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may hold spaces; fields after it follow ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3, so fields 14 and 15 are at 11 and 12.
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// The median `step_ms` of a run's `metrics.jsonl`, in seconds.
fn median_step_seconds(path: &Path) -> Result<f64> {
    let text = std::fs::read_to_string(path).map_err(|e| io_err(path, e))?;
    let mut ms = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let r: StepRecord = serde_json::from_str(line).map_err(|e| {
            Error::Format(format!(
                "{} line {}: not a step record ({e}); the run folder is damaged, delete it",
                path.display(),
                i + 1
            ))
        })?;
        ms.push(r.step_ms);
    }
    Ok(super::stats::median(&mut ms) / 1e3)
}

/// Reference accuracies on the test split: the pretrained checkpoint before any
/// fine-tuning, and always answering the most frequent answer of the question's
/// kind. Both use no private data.
pub fn references<B: DpBackend>(backend: &B, ctx: &StudyContext) -> Result<Vec<(String, f64)>> {
    let (_, mode) = demo_spec(&ctx.pretrained).build()?;
    let (model, _) = load_llava(backend, &ctx.pretrained, &mode, 0)?;
    let pretrained = evaluate_full(backend, &model, &ctx.test, None, ctx.text_len, false)?;
    Ok(vec![
        ("pretrained, before fine-tuning".into(), pretrained.accuracy),
        (
            "majority answer per question kind".into(),
            ctx.majority_baseline,
        ),
    ])
}
