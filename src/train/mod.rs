//! The DP training driver: configuration, the run loop with privacy accounting,
//! checkpoints that resume exactly, and metrics.
pub mod checkpoint;
pub mod method;
pub mod optim;
pub mod sampler;
pub mod step;

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::backend::dp::DpBackend;
use crate::data::synthetic::Dataset;
use crate::dp::accountant::ledger::{Ledger, LedgerEntry};
use crate::dp::accountant::{self, AccountantKind};
use crate::model::Mllm;
use crate::vision::tokens::TokenSelectConfig;
use crate::{Error, Result};
use method::Method;
use optim::OptConfig;
use sampler::{Sampler, Sampling};
use step::{OptState, StepContext, StepOutcome};

/// Whether the top-k threshold is taken per tensor or over all trainable tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PruneScope {
    /// One threshold per tensor; each tensor is applied and freed as soon as formed.
    Tensor,
    /// One threshold over every trainable coordinate.
    Global,
}

/// Everything that defines a training run. Saved in every checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// The method.
    pub method: Method,
    /// Expected logical batch size B_expected (q = B_expected / N).
    pub batch: usize,
    /// Largest physical micro-batch; clipped sums accumulate across micro-batches.
    pub micro_batch: usize,
    /// How batches are drawn.
    pub sampling: Sampling,
    /// Planned number of logical steps.
    pub steps: u32,
    /// The optimizer.
    pub opt: OptConfig,
    /// Per-example clipping norm C (DPZO: the clip on the scalar finite difference).
    pub clip_norm: f32,
    /// Target ε; σ is calibrated to reach it in `steps` steps, and training stops
    /// before exceeding it. `None` with a fixed `noise_multiplier`.
    pub epsilon: Option<f64>,
    /// δ of the guarantee.
    pub delta: f64,
    /// A fixed noise multiplier σ instead of calibration.
    pub noise_multiplier: Option<f64>,
    /// The accountant: "rdp" or "pld".
    pub accountant: String,
    /// Visual token pruning: K dominant patches (None: off).
    pub keep_tokens: Option<usize>,
    /// Visual token pruning: M contextual tokens.
    pub context_tokens: usize,
    /// Heuristic noise on fused tokens; not part of the DP guarantee.
    pub fuse_noise_std: f32,
    /// Fraction of coordinates updated per step (`dualpriv` only).
    pub keep_frac: f64,
    /// Scope of the top-k threshold.
    pub prune_scope: PruneScope,
    /// DPZO's perturbation scale λ.
    pub dpzo_lambda: f32,
    /// Seed of sampling and model initialisation.
    pub seed: u64,
    /// Secret seed of the DP noise (and DPZO directions).
    pub noise_seed: u64,
    /// Text tokens per example after padding.
    pub text_len: usize,
}

impl TrainConfig {
    /// The token-selection config, when pruning is on.
    pub fn token_select(&self) -> Option<TokenSelectConfig> {
        self.keep_tokens.map(|k| TokenSelectConfig {
            keep: k,
            context: self.context_tokens,
            fuse_noise_std: self.fuse_noise_std,
            noise: crate::dp::noise::StreamKey::from_insecure_seed(
                crate::dp::noise::RngKind::Chacha20,
                self.noise_seed ^ 0x70CE_5EED,
            ),
        })
    }

    /// The parsed accountant kind.
    pub fn accountant_kind(&self) -> Result<AccountantKind> {
        self.accountant.parse()
    }

    /// Checks ranges before any work is done.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.batch == 0 {
            return bad("--batch must be at least 1".into());
        }
        if self.micro_batch == 0 {
            return bad("--micro-batch must be at least 1".into());
        }
        if self.clip_norm.is_nan() || self.clip_norm <= 0.0 {
            return bad(format!("--clip-norm {} must be > 0", self.clip_norm));
        }
        if !(0.0..=1.0).contains(&self.keep_frac) {
            return bad(format!("--keep-frac {} must be in [0, 1]", self.keep_frac));
        }
        if self.method == Method::Dpzo && !(self.dpzo_lambda > 0.0 && self.dpzo_lambda.is_finite())
        {
            return bad(format!("--dpzo-lambda {} must be > 0", self.dpzo_lambda));
        }
        self.accountant_kind()?;
        if self.method.is_private() {
            if !(self.delta > 0.0 && self.delta < 1.0) {
                return bad(format!("--delta {} must be in (0, 1)", self.delta));
            }
            match (self.epsilon, self.noise_multiplier) {
                (None, None) => {
                    return bad("a DP method needs --epsilon (or --noise-multiplier)".into())
                }
                (_, Some(s)) if !(s >= 0.0 && s.is_finite()) => {
                    return bad(format!("--noise-multiplier {s} must be ≥ 0"));
                }
                (Some(e), _) if e.is_nan() || e <= 0.0 => {
                    return bad(format!("--epsilon {e} must be > 0"))
                }
                _ => {}
            }
        }
        self.opt.at_step(1)?;
        Ok(())
    }
}

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StepRecord {
    /// 1-based step number.
    pub step: u32,
    /// Mean per-example loss (null for an empty batch).
    pub loss: Option<f64>,
    /// Examples in the batch.
    pub batch_size: usize,
    /// ε spent after this step (null for non-private runs).
    pub epsilon: Option<f64>,
    /// Visual tokens per example.
    pub visual_tokens: usize,
    /// Fraction of coordinates updated.
    pub kept_frac: f64,
    /// Wall time of the step in milliseconds.
    pub step_ms: f64,
    /// Peak heap bytes so far in this run (CPU backend with the counting allocator).
    pub peak_bytes: Option<usize>,
    /// Peak bytes of the backend's device buffers during this step (GPU only).
    #[serde(default)]
    pub device_peak_bytes: Option<u64>,
    /// Bytes in use on the whole device after this step, from `cuMemGetInfo` (GPU only).
    #[serde(default)]
    pub device_used_bytes: Option<u64>,
}

/// The privacy state of a run: what has been spent.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PrivacyState {
    /// (q, σ, steps) entries, in order.
    pub history: Vec<(f64, f64, u64)>,
}

impl PrivacyState {
    /// Records one more step at (q, σ), merging with the last entry when equal.
    pub fn record(&mut self, q: f64, sigma: f64) {
        match self.history.last_mut() {
            Some(last) if last.0 == q && last.1 == sigma => last.2 += 1,
            _ => self.history.push((q, sigma, 1)),
        }
    }

    /// ε spent so far.
    pub fn epsilon(&self, kind: AccountantKind, delta: f64) -> Result<f64> {
        accountant::epsilon(kind, &self.history, delta)
    }

    /// The largest number of further steps at (q, σ) that keeps ε ≤ target.
    pub fn steps_left(
        &self,
        kind: AccountantKind,
        q: f64,
        sigma: f64,
        target: f64,
        delta: f64,
    ) -> Result<u64> {
        let eps_after = |k: u64| -> Result<f64> {
            let mut h = self.history.clone();
            h.push((q, sigma, k));
            accountant::epsilon(kind, &h, delta)
        };
        if eps_after(1)? > target {
            return Ok(0);
        }
        let mut lo = 1u64;
        let mut hi = 2u64;
        while eps_after(hi)? <= target {
            lo = hi;
            hi *= 2;
            if hi > 1 << 40 {
                return Ok(lo);
            }
        }
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if eps_after(mid)? <= target {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        Ok(lo)
    }
}

/// The outcome of a training run.
#[derive(Clone, Debug)]
pub struct RunSummary {
    /// Steps taken in total (including before a resume).
    pub steps: u32,
    /// ε spent in total (∞ for non-private).
    pub epsilon: f64,
    /// The noise multiplier used.
    pub sigma: f64,
    /// Mean loss over the last up-to-10 non-empty steps.
    pub final_loss: f64,
    /// Wall time of this invocation, seconds.
    pub seconds: f64,
    /// Peak heap bytes (CPU backend with the counting allocator).
    pub peak_bytes: Option<usize>,
    /// Why training stopped.
    pub stop_reason: String,
}

/// A training run in progress: model, optimizer state, privacy state, step counter.
pub struct Trainer<'a, B: DpBackend> {
    /// The backend.
    pub backend: &'a B,
    /// The model.
    pub model: Mllm<B>,
    /// Which model this is, for checkpoints.
    pub model_spec: checkpoint::ModelSpec,
    /// Fingerprint of the training data, for checkpoints and the ledger.
    pub data_fingerprint: String,
    /// The optimizer state.
    pub opt: OptState<B>,
    /// The configuration.
    pub cfg: TrainConfig,
    /// The privacy spent.
    pub privacy: PrivacyState,
    /// Logical steps done.
    pub step: u32,
    /// σ of this run (0 for non-private).
    pub sigma: f64,
    /// Where checkpoints and metrics go.
    pub out_dir: Option<PathBuf>,
    /// Whether to draw a progress bar.
    pub progress: bool,
    /// The privacy ledger file (default: `privacy-ledger.json` beside `out_dir`).
    pub ledger: Option<PathBuf>,
}

impl<'a, B: DpBackend> Trainer<'a, B> {
    /// A fresh run: calibrates σ for the planned steps when a target ε is given.
    pub fn new(
        backend: &'a B,
        model: Mllm<B>,
        model_spec: checkpoint::ModelSpec,
        cfg: TrainConfig,
        data: &Dataset,
    ) -> Result<Self> {
        cfg.validate()?;
        let sampler = Sampler::new(data.len(), cfg.batch, cfg.sampling, cfg.seed)?;
        let sigma = match (cfg.method.is_private(), cfg.noise_multiplier, cfg.epsilon) {
            (false, ..) => 0.0,
            (true, Some(s), _) => s,
            (true, None, Some(eps)) => accountant::calibrate_sigma(
                cfg.accountant_kind()?,
                sampler.rate(),
                u64::from(cfg.steps),
                eps,
                cfg.delta,
            )?,
            (true, None, None) => unreachable!("validated"),
        };
        Ok(Self {
            backend,
            model,
            model_spec,
            data_fingerprint: data.fingerprint(),
            opt: OptState::default(),
            cfg,
            privacy: PrivacyState::default(),
            step: 0,
            sigma,
            out_dir: None,
            progress: false,
            ledger: None,
        })
    }

    /// Continues the run saved in `dir` on `data`, which must be the same data
    /// (same fingerprint). The privacy history continues; ε is never reset.
    /// `steps`, when given, replaces the planned total (to train longer).
    pub fn resume(backend: &'a B, dir: &Path, data: &Dataset, steps: Option<u32>) -> Result<Self> {
        let st = checkpoint::load_state(dir)?;
        if st.data_fingerprint != data.fingerprint() {
            return Err(Error::Config(format!(
                "{}: the checkpoint was trained on data {} but this data is {}; resume with the same data",
                dir.display(),
                st.data_fingerprint,
                data.fingerprint()
            )));
        }
        let (mcfg, mode) = st.model.build()?;
        let model = Mllm::load(backend, &mcfg, &mode, &dir.join("model.safetensors"))?;
        let mut cfg = st.train;
        if let Some(s) = steps {
            cfg.steps = s;
        }
        Ok(Self {
            backend,
            model,
            model_spec: st.model,
            data_fingerprint: st.data_fingerprint,
            opt: checkpoint::load_optim(backend, dir)?,
            cfg,
            privacy: st.privacy,
            step: st.step,
            sigma: st.sigma,
            out_dir: Some(dir.to_path_buf()),
            progress: false,
            ledger: None,
        })
    }

    /// Trains until `cfg.steps` steps are done or the ε budget would be exceeded.
    /// Checkpoints every `checkpoint_every` steps (and at the end) when `out_dir` is set.
    pub fn run(&mut self, data: &Dataset, checkpoint_every: u32) -> Result<RunSummary> {
        let started = Instant::now();
        let sampler = Sampler::new(data.len(), self.cfg.batch, self.cfg.sampling, self.cfg.seed)?;
        let q = sampler.rate();
        let kind = self.cfg.accountant_kind()?;
        let private = self.cfg.method.is_private();
        if private && self.cfg.sampling == Sampling::Shuffle {
            eprintln!(
                "warning: --sampling shuffle: the privacy accounting assumes Poisson sampling and does NOT hold for this run"
            );
        }
        if private {
            self.warn_prior_spend(kind)?;
        }
        let budget_left = match (private, self.cfg.epsilon) {
            (true, Some(target)) => {
                Some(
                    self.privacy
                        .steps_left(kind, q, self.sigma, target, self.cfg.delta)?,
                )
            }
            _ => None,
        };
        let todo = self.cfg.steps.saturating_sub(self.step);
        let allowed = budget_left.map_or(u64::from(todo), |b| b.min(u64::from(todo))) as u32;
        let mut metrics = match &self.out_dir {
            Some(d) => {
                std::fs::create_dir_all(d).map_err(|e| io_err(d, e))?;
                let p = d.join("metrics.jsonl");
                Some(
                    OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&p)
                        .map_err(|e| io_err(&p, e))?,
                )
            }
            None => None,
        };
        let bar = self
            .progress
            .then(|| progress_bar(u64::from(self.step), u64::from(self.cfg.steps)));
        let mut last_eps = if private {
            Some(self.privacy.epsilon(kind, self.cfg.delta)?)
        } else {
            None
        };
        let mut recent = Vec::new();
        let log_every = (self.cfg.steps / 20).max(1);
        for _ in 0..allowed {
            let t0 = Instant::now();
            self.backend.reset_device_peak();
            let indices = sampler.batch(self.step);
            let out = self.one_step(data, &indices)?;
            if private {
                self.privacy.record(q, self.sigma);
            }
            self.step += 1;
            if private && (self.step.is_multiple_of(log_every) || self.step == self.cfg.steps) {
                last_eps = Some(self.privacy.epsilon(kind, self.cfg.delta)?);
            }
            if out.loss.is_finite() {
                recent.push(out.loss);
                if recent.len() > 10 {
                    recent.remove(0);
                }
            }
            let device = self.backend.device_memory();
            let rec = StepRecord {
                step: self.step,
                loss: out.loss.is_finite().then_some(out.loss),
                batch_size: out.batch_size,
                epsilon: last_eps,
                visual_tokens: out.visual_tokens,
                kept_frac: if out.coords > 0 {
                    out.kept as f64 / out.coords as f64
                } else {
                    0.0
                },
                step_ms: t0.elapsed().as_secs_f64() * 1e3,
                peak_bytes: crate::mem::tracking().then(crate::mem::peak_bytes),
                device_peak_bytes: device.map(|m| m.peak_bytes),
                device_used_bytes: device.map(|m| m.used_bytes),
            };
            if let Some(f) = metrics.as_mut() {
                write_line(f, &rec)?;
            }
            if let Some(b) = &bar {
                b.set_position(u64::from(self.step));
                b.set_message(format!(
                    "loss {:.3} | ε {} | vis tok {} | {:.0} ms",
                    out.loss,
                    last_eps.map_or("∞".into(), |e| format!("{e:.2}")),
                    out.visual_tokens,
                    rec.step_ms
                ));
            }
            if checkpoint_every > 0 && self.step.is_multiple_of(checkpoint_every) {
                self.save_checkpoint()?;
            }
        }
        if let Some(b) = bar {
            b.finish();
        }
        let epsilon = if private {
            self.privacy.epsilon(kind, self.cfg.delta)?
        } else {
            f64::INFINITY
        };
        let stop_reason = if self.step >= self.cfg.steps {
            "planned steps done".to_string()
        } else {
            format!(
                "stopped at step {}: one more step would exceed ε = {:?}",
                self.step, self.cfg.epsilon
            )
        };
        if self.out_dir.is_some() {
            self.save_checkpoint()?;
        }
        Ok(RunSummary {
            steps: self.step,
            epsilon,
            sigma: self.sigma,
            final_loss: if recent.is_empty() {
                f64::NAN
            } else {
                recent.iter().sum::<f64>() / recent.len() as f64
            },
            seconds: started.elapsed().as_secs_f64(),
            peak_bytes: crate::mem::tracking().then(crate::mem::peak_bytes),
            stop_reason,
        })
    }

    /// Runs one logical step on the given examples (no accounting).
    pub fn one_step(&mut self, data: &Dataset, indices: &[usize]) -> Result<StepOutcome> {
        let mut ctx = StepContext {
            backend: self.backend,
            model: &mut self.model,
            opt: &mut self.opt,
            data,
            cfg: &self.cfg,
            sigma: self.sigma,
        };
        step::train_step(&mut ctx, self.step, indices).map_err(|e| match e {
            // Out of memory: say which run it was and what micro-batch to try.
            Error::OutOfMemory(m) => Error::OutOfMemory(format!(
                "{m} [preset {}, batch {}, micro-batch {}: try --micro-batch {}]",
                self.model_spec.preset,
                self.cfg.batch,
                self.cfg.micro_batch,
                (self.cfg.micro_batch / 2).max(1)
            )),
            e => e,
        })
    }

    fn save_checkpoint(&self) -> Result<()> {
        match &self.out_dir {
            Some(d) => {
                checkpoint::save(self, d)?;
                self.record_ledger()
            }
            None => Ok(()),
        }
    }

    /// The ledger file and this run's key in it, when the run writes to a folder.
    fn ledger_slot(&self) -> Option<(PathBuf, String)> {
        let dir = self.out_dir.as_ref()?;
        let key = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.clone());
        let path = self
            .ledger
            .clone()
            .unwrap_or_else(|| Ledger::default_path(&key));
        Some((path, key.display().to_string()))
    }

    /// Warns when earlier runs already spent privacy on the same data.
    fn warn_prior_spend(&self, kind: AccountantKind) -> Result<()> {
        let Some((path, key)) = self.ledger_slot() else {
            return Ok(());
        };
        let ledger = Ledger::load(&path)?;
        let others: Vec<&LedgerEntry> = ledger.others_on(&self.data_fingerprint, &key).collect();
        if !others.is_empty() {
            let total = ledger.cumulative_epsilon(&self.data_fingerprint, kind, self.cfg.delta)?;
            eprintln!(
                "warning: {} earlier run(s) in {} used this data (fingerprint {}); together they have spent ε = {total:.3} at δ = {}, and this run adds to it:",
                others.len(),
                path.display(),
                self.data_fingerprint,
                self.cfg.delta
            );
            for e in others {
                eprintln!(
                    "  {}: {} steps of {}, ε = {:.3}",
                    e.run, e.steps, e.method, e.epsilon
                );
            }
        }
        Ok(())
    }

    /// Appends or updates this run's entry in the ledger (DP runs only).
    fn record_ledger(&self) -> Result<()> {
        if !self.cfg.method.is_private() {
            return Ok(());
        }
        let Some((path, key)) = self.ledger_slot() else {
            return Ok(());
        };
        let kind = self.cfg.accountant_kind()?;
        let mut ledger = Ledger::load(&path)?;
        ledger.upsert(LedgerEntry {
            run: key,
            data_fingerprint: self.data_fingerprint.clone(),
            method: self.cfg.method.to_string(),
            history: self.privacy.history.clone(),
            steps: u64::from(self.step),
            delta: self.cfg.delta,
            accountant: kind.to_string(),
            epsilon: self.privacy.epsilon(kind, self.cfg.delta)?,
        });
        ledger.save(&path)
    }
}

fn progress_bar(pos: u64, len: u64) -> indicatif::ProgressBar {
    let b = indicatif::ProgressBar::new(len);
    b.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps | {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    b.set_position(pos);
    b
}

fn write_line(f: &mut File, rec: &StepRecord) -> Result<()> {
    let line = serde_json::to_string(rec)
        .map_err(|e| Error::Config(format!("serialising metrics: {e}")))?;
    writeln!(f, "{line}").map_err(|e| Error::Config(format!("writing metrics.jsonl: {e}")))
}

/// Maps an I/O error to [`Error::Io`] naming the path.
pub(crate) fn io_err(p: &Path, e: std::io::Error) -> Error {
    Error::Io {
        path: p.display().to_string(),
        message: e.to_string(),
    }
}
