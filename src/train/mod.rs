//! The DP training driver: configuration, the run loop with privacy accounting,
//! checkpoints that resume exactly, and metrics.
pub mod checkpoint;
pub mod eval;
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
use crate::data::DataSource;
use crate::dp::accountant::ledger::{self, Ledger, LedgerEntry, LedgerLock};
use crate::dp::accountant::{self, AccountantKind};
use crate::dp::key::{Domain, RunKey};
use crate::dp::noise::{RngKind, MAX_ABS_NORMAL};
use crate::error::Setting;
use crate::model::Mllm;
use crate::vision::tokens::TokenSelectConfig;
use crate::{Error, Result};
use method::Method;
use optim::OptConfig;
use sampler::{Sampler, Sampling};
use step::{OptState, StepContext, StepOutcome};

/// Whether the top-k threshold is taken per tensor or over all trainable tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
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
    /// δ of the guarantee; must be below 1/N.
    pub delta: f64,
    /// A fixed noise multiplier σ (> 0 for DP methods) instead of calibration.
    pub noise_multiplier: Option<f64>,
    /// The accountant.
    pub accountant: AccountantKind,
    /// Visual token pruning: K dominant patches (None: off).
    pub keep_tokens: Option<usize>,
    /// Visual token pruning: M contextual tokens.
    pub context_tokens: usize,
    /// Heuristic noise on fused tokens, non-private runs only (refused for DP
    /// methods: it is keyed by batch slot, which breaks the sensitivity bound).
    pub fuse_noise_std: f32,
    /// Fraction of coordinates updated per step (`dualpriv` only).
    pub keep_frac: f64,
    /// Scope of the top-k threshold.
    pub prune_scope: PruneScope,
    /// DPZO's perturbation scale λ.
    pub dpzo_lambda: f32,
    /// The noise generator: ChaCha20 (default, cryptographic) or Philox (faster,
    /// not cryptographic: its outputs may be predictable from each other).
    #[serde(default)]
    pub rng: RngKind,
    /// Also log the statistics of the private batches (loss, batch size,
    /// non-finite examples). NOT covered by ε.
    #[serde(default)]
    pub log_private_stats: bool,
    /// Evaluate on the held-out split every N steps (0: never).
    #[serde(default)]
    pub eval_every: u32,
    /// The dataset size N declared public: q = batch / N, the δ < 1/N check and σ use
    /// it. `None` uses the training set's length, which q, σ and ε then publish (under
    /// add/remove adjacency N itself differs between neighbours, so it is not covered).
    #[serde(default)]
    pub public_size: Option<usize>,
    /// Text tokens per example after padding.
    pub text_len: usize,
    /// The public PEFT adapter the LoRA started from (`train --init-adapter`), for
    /// the record: every checkpoint holds the LoRA weights, so a resume reads them
    /// from there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_adapter: Option<InitAdapter>,
}

/// A PEFT adapter a run's LoRA was initialised from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitAdapter {
    /// The adapter folder as given.
    pub path: PathBuf,
    /// BLAKE3 of `adapter_config.json` then `adapter_model.safetensors` (hex).
    pub digest: String,
}

impl TrainConfig {
    /// A config of `method` with expected batch `batch` (also the micro-batch) and
    /// `text_len` text tokens, and plain defaults for the rest: one step of SGD at
    /// lr 0.01, C = 1, σ = 1 (no ε target), δ = 1e-5, RDP, no pruning, ChaCha20.
    /// Override fields with struct-update syntax.
    pub fn new(method: Method, batch: usize, text_len: usize) -> Self {
        Self {
            method,
            batch,
            micro_batch: batch,
            sampling: Sampling::Poisson,
            steps: 1,
            opt: OptConfig::sgd(1e-2),
            clip_norm: 1.0,
            epsilon: None,
            delta: 1e-5,
            noise_multiplier: method.is_private().then_some(1.0),
            accountant: AccountantKind::Rdp,
            keep_tokens: None,
            context_tokens: 0,
            fuse_noise_std: 0.0,
            keep_frac: 1.0,
            prune_scope: PruneScope::Tensor,
            dpzo_lambda: 1e-3,
            rng: RngKind::Chacha20,
            log_private_stats: false,
            eval_every: 0,
            public_size: None,
            text_len,
            init_adapter: None,
        }
    }

    /// The token-selection config, when pruning is on, without the fused-token
    /// noise (evaluation and prediction are deterministic).
    pub fn token_select(&self) -> Option<TokenSelectConfig> {
        self.keep_tokens.map(|k| TokenSelectConfig {
            keep: k,
            context: self.context_tokens,
            fuse_noise_std: 0.0,
            noise: crate::dp::noise::StreamKey {
                rng: self.rng,
                key: [0; 8],
            },
        })
    }

    /// The token-selection config of training: with the fused-token noise, keyed by
    /// the run's key.
    pub fn train_token_select(&self, key: &RunKey) -> Option<TokenSelectConfig> {
        self.token_select().map(|mut t| {
            t.fuse_noise_std = self.fuse_noise_std;
            t.noise = key.stream(Domain::Tokens, self.rng);
            t
        })
    }

    /// The sampler of this config on `data` (its rate from the public size when
    /// declared), after every check that needs the data: [`Self::validate`], δ < 1/N.
    pub fn check(&self, data: &dyn DataSource, key: &RunKey) -> Result<Sampler> {
        self.validate()?;
        let sampler = match self.public_size {
            Some(n) => Sampler::with_public(data.len(), self.batch, self.sampling, key, n)?,
            None => Sampler::new(data.len(), self.batch, self.sampling, key)?,
        };
        let n = self.public_size.unwrap_or(data.len());
        if self.method.is_private() && self.delta >= 1.0 / n as f64 {
            return Err(Error::Config(format!(
                "δ = {} is not below 1/N = 1/{n}: a mechanism that publishes one random example \
                 outright meets such a δ. Use δ ≤ {:.1e} (1/(10·N))",
                self.delta,
                0.1 / n as f64
            )));
        }
        Ok(sampler)
    }

    /// Checks ranges before any work is done.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.batch == 0 {
            return bad("the batch size must be at least 1".into());
        }
        if self.micro_batch == 0 {
            return bad("the micro-batch size must be at least 1".into());
        }
        if self.clip_norm.is_nan() || self.clip_norm <= 0.0 {
            return bad(format!("clip norm {} must be > 0", self.clip_norm));
        }
        if !(0.0..=1.0).contains(&self.keep_frac) {
            return Err(Error::Setting {
                setting: Setting::KeepFrac,
                message: format!("keep fraction {} must be in [0, 1]", self.keep_frac),
            });
        }
        if self.method == Method::Dpzo && !(self.dpzo_lambda > 0.0 && self.dpzo_lambda.is_finite())
        {
            return bad(format!("DPZO λ {} must be > 0", self.dpzo_lambda));
        }
        if !(self.fuse_noise_std.is_finite() && self.fuse_noise_std >= 0.0) {
            return bad(format!(
                "fused-token noise std {} must be ≥ 0",
                self.fuse_noise_std
            ));
        }
        if self.method.is_private() {
            if !(self.delta > 0.0 && self.delta < 1.0) {
                return bad(format!("δ = {} must be in (0, 1)", self.delta));
            }
            match (self.epsilon, self.noise_multiplier) {
                (None, None) => {
                    return bad(
                        "a DP method needs a target ε (or a fixed noise multiplier σ)".into(),
                    )
                }
                (_, Some(s)) if !(s > 0.0 && s.is_finite()) => {
                    return bad(format!(
                        "noise multiplier σ = {s}: a DP method needs σ > 0 (σ = 0 adds no noise, \
                         so nothing is private); use the nonprivate method for that"
                    ));
                }
                (Some(e), _) if e.is_nan() || e <= 0.0 => {
                    return bad(format!("target ε = {e} must be > 0"))
                }
                _ => {}
            }
            if self.fuse_noise_std > 0.0 {
                return bad(
                    "fused-token noise is keyed by the example's slot in the micro-batch, so adding \
                     an example changes the noise of the others and the sensitivity exceeds C; \
                     it is refused for DP methods (set it to 0)"
                        .into(),
                );
            }
        }
        self.opt.at_step(1)?;
        Ok(())
    }
}

/// One line of `metrics.jsonl`: only what ε covers (and public facts) unless
/// [`TrainConfig::log_private_stats`] is set.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StepRecord {
    /// 1-based step number.
    pub step: u32,
    /// ε spent after this step; null when the run is not covered (ε = ∞).
    pub epsilon: Option<f64>,
    /// The noise multiplier σ.
    pub sigma: f64,
    /// Visual tokens per example (fixed by the config).
    pub visual_tokens: usize,
    /// Fraction of coordinates updated (⌈keep_frac·n⌉ / n, fixed by the config).
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
    /// Accuracy on the held-out split (with `eval_every`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_accuracy: Option<f64>,
    /// Mean loss on the held-out split (with `eval_every`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    /// PRIVATE: mean loss of the private batch (only with `log_private_stats`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// PRIVATE: examples in the private batch (only with `log_private_stats`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    /// PRIVATE: examples whose loss or gradient norm was not finite and got clip
    /// factor 0 (only with `log_private_stats`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonfinite_examples: Option<usize>,
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

    /// Steps recorded.
    pub fn steps(&self) -> u64 {
        self.history.iter().map(|h| h.2).sum()
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
    /// ε spent in total; ∞ for runs that are not covered (non-private methods,
    /// shuffled batches, `--insecure-seed`).
    pub epsilon: f64,
    /// Why the run is not covered by ε, when it is not.
    pub not_private: Option<&'static str>,
    /// The noise multiplier used.
    pub sigma: f64,
    /// PRIVATE: mean loss over the last up-to-10 non-empty steps (only with
    /// `log_private_stats` or for non-private runs).
    pub final_loss: Option<f64>,
    /// The last held-out evaluation, when `eval_every` is set.
    pub eval: Option<eval::EvalResult>,
    /// Wall time of this invocation, seconds.
    pub seconds: f64,
    /// Peak heap bytes (CPU backend with the counting allocator).
    pub peak_bytes: Option<usize>,
    /// Why training stopped.
    pub stop_reason: String,
}

/// Refuses a σ so small that the sampler's bounded support shows: the noise is
/// truncated at |z| ≤ [`MAX_ABS_NORMAL`], so a neighbour's shift of up to C makes an
/// output impossible under one dataset with probability ≤ q·Φ̄(13.32 − 1/σ) per step
/// (the example must be sampled), which the accountant does not count. Allowed while
/// `steps` of it stay below δ/100.
fn check_truncation(sigma: f64, q: f64, steps: u32, delta: f64) -> Result<()> {
    let leak_at = |s: f64| {
        f64::from(steps.max(1)) * q * accountant::special::norm_cdf(1.0 / s - MAX_ABS_NORMAL)
    };
    let leak = leak_at(sigma);
    if leak > delta / 100.0 {
        // The smallest σ that passes, by bisection on 1/σ.
        let (mut lo, mut hi) = (0.0, 1.0 / sigma);
        for _ in 0..60 {
            let mid = 0.5 * (lo + hi);
            if leak_at(1.0 / mid) > delta / 100.0 {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        return Err(Error::Config(format!(
            "σ = {sigma} is too small for the noise sampler: its normals stop at ±{MAX_ABS_NORMAL:.2}, \
             so over {steps} steps the truncation adds up to {leak:.1e} to δ = {delta}; use σ ≥ {:.3} \
             (a larger ε target or fewer steps)",
            1.0 / lo.max(1e-300)
        )));
    }
    Ok(())
}

/// A privacy history: (q, σ, steps) entries.
type History = Vec<(f64, f64, u64)>;

/// An accountant's ε(history, δ): [`accountant::epsilon`] or its coarse twin.
type EpsilonFn = fn(AccountantKind, &[(f64, f64, u64)], f64) -> Result<f64>;

/// Draws a non-private run reserves in the ledger per durable write (a DP run
/// reserves and charges one per step, see [`Trainer::run`]).
pub const RESERVE_DRAWS: u32 = 64;

/// A training run in progress: model, optimizer state, privacy state, step counter.
///
/// The run's secret key and its draw counter are private: every step takes a
/// fresh draw (batch and noise) from a counter that only advances, so no call
/// sequence can make two steps share noise.
pub struct Trainer<'a, B: DpBackend> {
    /// The backend.
    pub backend: &'a B,
    /// The model.
    pub model: Mllm<B>,
    /// Which model this is, for checkpoints.
    pub model_spec: checkpoint::ModelSpec,
    /// The optimizer state.
    pub opt: OptState<B>,
    /// The configuration.
    pub cfg: TrainConfig,
    /// The privacy spent.
    pub privacy: PrivacyState,
    /// Logical steps done (the model's state).
    pub step: u32,
    /// σ of this run (0 for non-private).
    pub sigma: f64,
    /// Where checkpoints and metrics go; must be empty or absent for a new run.
    pub out_dir: Option<PathBuf>,
    /// Whether to draw a progress bar.
    pub progress: bool,
    /// The privacy ledger file (default: `privacy-ledger.json` beside `out_dir`);
    /// written only by runs with an `out_dir` (without one nothing is persisted, and
    /// the caller accounts for what it publishes from [`Self::epsilon`]).
    pub ledger: Option<PathBuf>,
    /// Held-out examples for `eval_every` (never the private training data).
    pub eval_data: Option<Box<dyn DataSource>>,
    key: RunKey,
    draws: u32,
    /// Draws below this are reserved in the ledger (durably, before use).
    reserved: u32,
    run_id: String,
    /// This process's claim on the run in the ledger (see [`LedgerEntry::session`]).
    session: String,
    fingerprint: Option<String>,
    claimed: bool,
    /// (length, split, seed) of the data [`Self::check_every_example`] last passed.
    checked: Option<String>,
    /// The last coarse ε and the history it is for.
    coarse_eps: std::cell::RefCell<Option<(History, Option<f64>)>>,
    /// A privacy audit's canaries and noise switch ([`crate::audit`]): crate-only,
    /// never saved, `None` after a resume; [`Self::run`] refuses it with an
    /// `out_dir`, so an audited run is never persisted or charged to a ledger.
    pub(crate) audit: Option<crate::audit::canary::Injector>,
}

impl<'a, B: DpBackend> Trainer<'a, B> {
    /// A fresh run with a fresh secret key from the OS; calibrates σ for the
    /// planned steps when a target ε is given.
    pub fn new(
        backend: &'a B,
        model: Mllm<B>,
        model_spec: checkpoint::ModelSpec,
        cfg: TrainConfig,
        data: &dyn DataSource,
    ) -> Result<Self> {
        Self::with_key(backend, model, model_spec, cfg, data, RunKey::from_os()?)
    }

    /// A fresh run with an explicit key (tests; `--insecure-seed`). A key from
    /// [`RunKey::from_insecure_seed`] makes the run report ε = ∞.
    pub fn with_key(
        backend: &'a B,
        model: Mllm<B>,
        model_spec: checkpoint::ModelSpec,
        cfg: TrainConfig,
        data: &dyn DataSource,
        key: RunKey,
    ) -> Result<Self> {
        let sampler = cfg.check(data, &key)?;
        let sigma = match (cfg.method.is_private(), cfg.noise_multiplier, cfg.epsilon) {
            (false, ..) => 0.0,
            (true, Some(s), _) => s,
            (true, None, Some(eps)) => accountant::calibrate_sigma(
                cfg.accountant,
                sampler.rate(),
                u64::from(cfg.steps),
                eps,
                cfg.delta,
            )?,
            (true, None, None) => {
                return Err(Error::Internal(
                    "a validated DP config has neither ε nor σ".into(),
                ))
            }
        };
        if cfg.method.is_private() {
            check_truncation(sigma, sampler.rate(), cfg.steps, cfg.delta)?;
        }
        Ok(Self {
            backend,
            model,
            model_spec,
            opt: OptState::default(),
            cfg,
            privacy: PrivacyState::default(),
            step: 0,
            sigma,
            out_dir: None,
            progress: false,
            ledger: None,
            eval_data: None,
            key,
            draws: 0,
            reserved: 0,
            run_id: checkpoint::random_id()?,
            session: checkpoint::random_id()?,
            fingerprint: None,
            claimed: false,
            checked: None,
            coarse_eps: Default::default(),
            audit: None,
        })
    }

    /// Continues the run saved in `dir` on `data`, which must be the same data
    /// (same keyed fingerprint). The privacy history continues from the ledger,
    /// which counts every step a checkpoint may have released, and the draws
    /// continue after every draw the ledger has seen, so new steps get fresh
    /// noise. `steps`, when given, replaces the planned total (to train longer).
    pub fn resume(
        backend: &'a B,
        dir: &Path,
        data: &dyn DataSource,
        steps: Option<u32>,
    ) -> Result<Self> {
        let (st, folder) = checkpoint::load_state(dir)?;
        let fkey = Ledger::existing_fingerprint_key(&st.ledger)?;
        let fp = data.fingerprint(&fkey);
        if st.data_fingerprint != fp {
            return Err(Error::Config(format!(
                "{}: the checkpoint was trained on other data than this (keyed fingerprints {} and {}); \
                 resume with the same data",
                dir.display(),
                st.data_fingerprint,
                fp
            )));
        }
        let ledger = Ledger::load(&st.ledger)?;
        let entry = ledger.entry(&st.run_id).ok_or_else(|| {
            Error::Config(format!(
                "{}: the privacy ledger {} has no entry for this run ({}), although every checkpoint \
                 is recorded there first; it was replaced or is not this run's ledger. Restore it \
                 rather than resuming without it",
                dir.display(),
                st.ledger.display(),
                st.run_id
            ))
        })?;
        if entry.steps < u64::from(st.step) || !ledger::extends(&st.privacy.history, &entry.history)
        {
            return Err(Error::Config(format!(
                "{}: the privacy ledger {} records {} steps for this run but the checkpoint has {}; \
                 the ledger was rolled back, so resuming is refused",
                dir.display(),
                st.ledger.display(),
                entry.steps,
                st.step
            )));
        }
        let (mcfg, mode) = st.model.build()?;
        let model = Mllm::load(backend, &mcfg, &mode, &folder.join("model.safetensors"))?;
        let mut cfg = st.train;
        if let Some(s) = steps {
            cfg.steps = s;
        }
        let draws = u64::from(st.draws).max(entry.draws);
        let mut t = Self {
            backend,
            model,
            model_spec: st.model,
            opt: checkpoint::load_optim(backend, &folder)?,
            cfg,
            privacy: PrivacyState {
                history: entry.history.clone(),
            },
            step: st.step,
            sigma: st.sigma,
            out_dir: Some(dir.to_path_buf()),
            progress: false,
            ledger: Some(st.ledger),
            eval_data: None,
            // A fresh key for everything after the resume (an insecure key stays, so
            // such runs replay): even a copy of this folder resumed against another
            // copy of the ledger, or a restored backup, draws noise never drawn before.
            key: match st.key {
                Some(k) if k.is_insecure() => k,
                _ => RunKey::from_os()?,
            },
            draws: u32::try_from(draws).map_err(|_| {
                Error::Format(format!("{}: draw counter {draws} overflows", dir.display()))
            })?,
            reserved: 0,
            run_id: st.run_id,
            session: checkpoint::random_id()?,
            fingerprint: Some(fp),
            claimed: true,
            checked: None,
            coarse_eps: Default::default(),
            audit: None,
        };
        // Take the run over in the ledger, under its lock: continue after every draw
        // any process reserved for it, from the history it recorded.
        let (path, fp) = (t.ledger.clone(), t.fingerprint.clone());
        if let (Some(path), Some(fp)) = (path, fp) {
            t.record_ledger(&path, &fp, true, true)?;
        }
        Ok(t)
    }

    /// The run's key (secret unless it came from an insecure seed).
    pub fn key(&self) -> &RunKey {
        &self.key
    }

    /// Draws (batches and noise) used so far; the next step uses draw number `draws()`.
    pub fn draws(&self) -> u32 {
        self.draws
    }

    /// The run's random id (its identity in the ledger).
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// Why this run is not covered by its ε, when it is not.
    pub fn not_private(&self) -> Option<&'static str> {
        if !self.cfg.method.is_private() {
            Some("non-private method")
        } else if self.key.is_insecure() {
            Some("insecure seed: anyone can recompute its batches and noise")
        } else if self.cfg.sampling == Sampling::Shuffle {
            Some("shuffled batches: the accountant assumes Poisson sampling")
        } else {
            None
        }
    }

    /// ε spent so far, `None` (∞) when the run is not covered.
    pub fn epsilon(&self) -> Result<Option<f64>> {
        self.epsilon_with(accountant::epsilon)
    }

    /// The coarse-grid ε (see [`accountant::epsilon_coarse`]), computed once per
    /// history: the write-ahead ledger record and the metrics line of a step share it.
    fn epsilon_coarse(&self) -> Result<Option<f64>> {
        if let Some((h, e)) = self.coarse_eps.borrow().as_ref() {
            if *h == self.privacy.history {
                return Ok(*e);
            }
        }
        let e = self.epsilon_with(accountant::epsilon_coarse)?;
        *self.coarse_eps.borrow_mut() = Some((self.privacy.history.clone(), e));
        Ok(e)
    }

    fn epsilon_with(&self, f: EpsilonFn) -> Result<Option<f64>> {
        if self.not_private().is_some() {
            return Ok(None);
        }
        f(self.cfg.accountant, &self.privacy.history, self.cfg.delta).map(Some)
    }

    /// Collates and checks every training example once, before the first step: a
    /// malformed example must fail the run up front, whether or not it would be
    /// sampled. Failing inside a step would reveal that it was sampled (and when).
    fn check_every_example(&mut self, data: &dyn DataSource) -> Result<()> {
        let id = data.identity();
        if self.checked.as_ref() == Some(&id) {
            return Ok(());
        }
        let idx: Vec<usize> = (0..data.len()).collect();
        for chunk in idx.chunks(256) {
            let batch = data.collate(chunk, self.cfg.text_len).map_err(|e| {
                Error::Config(format!(
                    "the training data has a malformed example ({e}); fix or drop it before training"
                ))
            })?;
            self.model.check_batch(&batch).map_err(|e| {
                Error::Config(format!(
                    "the training data does not fit the model ({e}); fix or drop that example before training"
                ))
            })?;
        }
        self.checked = Some(id);
        Ok(())
    }

    /// Takes the output folder for a new run (it must be empty or absent), and
    /// computes the keyed data fingerprint of the ledger. Idempotent.
    fn claim_out(&mut self, data: &dyn DataSource) -> Result<()> {
        if self.claimed {
            return Ok(());
        }
        if let Some(dir) = &self.out_dir {
            let busy = std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some());
            if busy {
                return Err(Error::Setting {
                    setting: Setting::OutDir,
                    message: format!(
                        "{}: the output folder is not empty; a new run would overwrite an earlier \
                         run's checkpoint and ledger entry. Resume that run (Trainer::resume) or \
                         choose a new folder",
                        dir.display()
                    ),
                });
            }
            std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
            let path = match &self.ledger {
                Some(p) => p.clone(),
                None => {
                    Ledger::default_path(&std::fs::canonicalize(dir).map_err(|e| io_err(dir, e))?)
                }
            };
            let fkey = Ledger::fingerprint_key(&path)?;
            self.fingerprint = Some(data.fingerprint(&fkey));
            self.ledger = Some(path);
        }
        self.claimed = true;
        Ok(())
    }

    /// Trains until `cfg.steps` steps are done or the ε budget would be exceeded.
    /// Checkpoints every `checkpoint_every` steps (and at the end) when `out_dir` is set.
    pub fn run(&mut self, data: &dyn DataSource, checkpoint_every: u32) -> Result<RunSummary> {
        let started = Instant::now();
        if self.audit.is_some() && (self.out_dir.is_some() || self.ledger.is_some()) {
            return Err(Error::Internal(
                "an audited run must not write a checkpoint or a ledger entry".into(),
            ));
        }
        // `cfg` is public: check it again, so no edit after `new` bypasses a refusal.
        let sampler = self.cfg.check(data, &self.key)?;
        let q = sampler.rate();
        if self.cfg.method.is_private() {
            check_truncation(self.sigma, q, self.cfg.steps, self.cfg.delta)?;
        }
        let kind = self.cfg.accountant;
        let private = self.cfg.method.is_private();
        if let (true, Some(why)) = (private, self.not_private()) {
            eprintln!("warning: this run is NOT private ({why}); its ε is reported as ∞");
        }
        if private && self.cfg.public_size.is_none() && self.not_private().is_none() {
            eprintln!(
                "warning: the sampling rate q = {} / N uses the training set's own size N, which \
                 q, σ and ε then publish; under add/remove adjacency N is not protected. Declare a \
                 public dataset size (one that does not depend on the private data) to cover it",
                self.cfg.batch
            );
        }
        if private && self.cfg.rng == RngKind::Philox {
            eprintln!(
                "warning: the Philox noise generator is not cryptographic (64 of the key's bits, \
                 outputs not proven unpredictable); its ε assumes the noise cannot be predicted. \
                 Use ChaCha20 (the default) for private data"
            );
        }
        self.check_every_example(data)?;
        // The peak heap is published: it must not include loading or the check above,
        // whose size depends on the private data (the largest image, the record count).
        crate::mem::reset_peak();
        self.claim_out(data)?;
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
        let show_private = self.cfg.log_private_stats || !private;
        let mut recent = Vec::new();
        let mut last_eval = None;
        for _ in 0..allowed {
            let t0 = Instant::now();
            // Write-ahead: a DP step is charged (in the ledger, durably) before it
            // runs, so a crash or kill can never leave a step that metrics or an
            // evaluation published uncharged.
            if private {
                self.privacy.record(q, self.sigma);
            }
            self.reserve_draw()?;
            self.backend.reset_device_peak();
            let indices = sampler.batch(self.draws);
            let out = self.step_charged(data, &indices)?;
            self.step += 1;
            // Every step's ε, never a stale one: a certified upper bound on a
            // coarse grid, and the fine value at the last step.
            let eps = if self.step == self.cfg.steps {
                self.epsilon()?
            } else {
                self.epsilon_coarse()?
            };
            if out.loss.is_finite() {
                recent.push(out.loss);
                if recent.len() > 10 {
                    recent.remove(0);
                }
            }
            let every = self.cfg.eval_every;
            let eval = match &self.eval_data {
                Some(held_out)
                    if every > 0
                        && (self.step.is_multiple_of(every) || self.step == self.cfg.steps) =>
                {
                    let tokens = self.cfg.token_select();
                    let text_len = self.cfg.text_len.max(held_out.max_text_len());
                    Some(eval::evaluate_full(
                        self.backend,
                        &self.model,
                        held_out.as_ref(),
                        tokens.as_ref(),
                        text_len,
                        true,
                    )?)
                }
                _ => None,
            };
            last_eval = eval.or(last_eval);
            let device = self.backend.device_memory();
            let rec = StepRecord {
                step: self.step,
                epsilon: eps,
                sigma: self.sigma,
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
                eval_accuracy: eval.map(|e| e.accuracy),
                eval_loss: eval.map(|e| e.loss),
                loss: (show_private && out.loss.is_finite()).then_some(out.loss),
                batch_size: show_private.then_some(out.batch_size),
                nonfinite_examples: show_private.then_some(out.nonfinite),
            };
            if let Some(f) = metrics.as_mut() {
                write_line(f, &rec)?;
            }
            if let Some(b) = &bar {
                b.set_position(u64::from(self.step));
                let mut msg = format!(
                    "ε {} | {:.0} ms",
                    eps.map_or("∞".into(), |e| format!("{e:.2}")),
                    rec.step_ms
                );
                if let Some(e) = last_eval {
                    msg += &format!(" | held-out acc {:.3}", e.accuracy);
                }
                if let Some(l) = rec.loss {
                    msg += &format!(" | PRIVATE loss {l:.3}");
                }
                b.set_message(msg);
            }
            if checkpoint_every > 0 && self.step.is_multiple_of(checkpoint_every) {
                self.save_checkpoint()?;
            }
        }
        if let Some(b) = bar {
            b.finish();
        }
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
            epsilon: self.epsilon()?.unwrap_or(f64::INFINITY),
            not_private: self.not_private(),
            sigma: self.sigma,
            final_loss: (show_private && !recent.is_empty())
                .then(|| recent.iter().sum::<f64>() / recent.len() as f64),
            eval: last_eval,
            seconds: started.elapsed().as_secs_f64(),
            peak_bytes: crate::mem::tracking().then(crate::mem::peak_bytes),
            stop_reason,
        })
    }

    /// Runs one logical step on the given examples with the next draw of noise (the
    /// counter advances even when the step fails) and charges it in
    /// [`Self::privacy`] first, so no API call updates the model uncharged. The ε
    /// assumes Poisson-sampled `indices` ([`Self::run`] draws them), and only
    /// [`Self::run`] writes the ledger.
    pub fn one_step(&mut self, data: &dyn DataSource, indices: &[usize]) -> Result<StepOutcome> {
        if self.cfg.method.is_private() {
            let q = self.cfg.check(data, &self.key)?.rate();
            self.privacy.record(q, self.sigma);
        }
        self.step_charged(data, indices)
    }

    /// One step on the next draw; the caller has charged it.
    fn step_charged(&mut self, data: &dyn DataSource, indices: &[usize]) -> Result<StepOutcome> {
        // On the CPU the step runs on a rayon worker, with the other workers
        // polling for its jobs: each parallel op was otherwise injected into the
        // pool from outside and woke sleeping workers, about 20-50 µs per op on a
        // 2-core VM (tiny B = 32: 31 → 25 ms). A GPU step keeps its thread: the
        // pollers would only burn the host's cores while kernels run.
        if self.backend.name() == "cpu" && rayon::current_thread_index().is_none() {
            return crate::backend::cpu::hot::run_hot(|| self.step_on_this_thread(data, indices));
        }
        self.step_on_this_thread(data, indices)
    }

    /// [`Self::step_charged`] where it is called (no hop onto the pool).
    fn step_on_this_thread(
        &mut self,
        data: &dyn DataSource,
        indices: &[usize],
    ) -> Result<StepOutcome> {
        let draw = self.draws;
        self.draws = self.draws.checked_add(1).ok_or_else(|| {
            Error::Config("the run has used all 2³² draws of its key; start a new run".into())
        })?;
        let mut ctx = StepContext {
            backend: self.backend,
            model: &mut self.model,
            opt: &mut self.opt,
            data,
            cfg: &self.cfg,
            sigma: self.sigma,
            key: &self.key,
        };
        let hook = self.audit.as_ref().map(|a| a.hook(draw));
        step::train_step_audited(&mut ctx, self.step, draw, indices, hook.as_ref()).map_err(|e| {
            match e {
                // Out of memory: say which run it was and what micro-batch to try.
                Error::OutOfMemory(m) => Error::OutOfMemory(format!(
                    "{m} [preset {}, batch {}, micro-batch {}: try a micro-batch of {}]",
                    self.model_spec.preset,
                    self.cfg.batch,
                    self.cfg.micro_batch,
                    (self.cfg.micro_batch / 2).max(1)
                )),
                e => e,
            }
        })
    }

    /// Makes sure the next draw is reserved in the ledger before it is used: for a
    /// DP run this draw alone, with its step already charged in the history; for
    /// a non-private run a block of [`RESERVE_DRAWS`]. After a crash, resuming
    /// continues past every draw the lost process may have used, and the ledger
    /// counts every step it may have published (in metrics or an evaluation).
    fn reserve_draw(&mut self) -> Result<()> {
        let private = self.cfg.method.is_private();
        if self.draws < self.reserved && !private {
            return Ok(());
        }
        let (Some(ledger), Some(fp)) = (self.ledger.clone(), self.fingerprint.clone()) else {
            return Ok(());
        };
        let block = if private { 1 } else { RESERVE_DRAWS };
        self.reserved = self.draws.saturating_add(block);
        // Every step writes the ledger: the coarse ε (a certified upper bound, ~20 ms)
        // keeps that cheap; checkpoints record the fine one.
        self.record_ledger(&ledger, &fp, false, false)
    }

    /// Records the steps in the ledger, then writes the checkpoint that releases them.
    fn save_checkpoint(&mut self) -> Result<()> {
        let Some(dir) = self.out_dir.clone() else {
            return Ok(());
        };
        let (ledger, fingerprint) = match (&self.ledger, &self.fingerprint) {
            (Some(l), Some(f)) => (l.clone(), f.clone()),
            _ => {
                return Err(Error::Internal(
                    "checkpoint before the output folder was claimed".into(),
                ))
            }
        };
        self.record_ledger(&ledger, &fingerprint, false, true)?;
        let state = checkpoint::CheckpointState {
            version: checkpoint::VERSION,
            checkpoint_id: checkpoint::random_id()?,
            run_id: self.run_id.clone(),
            model: self.model_spec.clone(),
            train: self.cfg.clone(),
            step: self.step,
            draws: self.draws,
            sigma: self.sigma,
            privacy: self.privacy.clone(),
            data_fingerprint: fingerprint,
            ledger,
            key: self.key.is_insecure().then(|| self.key.clone()),
        };
        checkpoint::save(self, &dir, &state)
    }

    /// Warns when earlier runs already spent privacy on the same data.
    fn warn_prior_spend(&self, kind: AccountantKind) -> Result<()> {
        let (Some(path), Some(fp)) = (&self.ledger, &self.fingerprint) else {
            return Ok(());
        };
        let ledger = Ledger::load(path)?;
        let others: Vec<&LedgerEntry> = ledger.others_on(fp, &self.run_id).collect();
        if !others.is_empty() {
            let total = ledger.cumulative_epsilon(fp, kind, self.cfg.delta)?;
            eprintln!(
                "warning: {} earlier run(s) in {} used this data; together they have spent ε = {} at δ = {}, and this run adds to it. Latest:",
                others.len(),
                path.display(),
                if total.is_finite() { format!("{total:.3}") } else { "∞ (a non-private run used it)".into() },
                self.cfg.delta
            );
            for e in others.iter().rev().take(3) {
                eprintln!(
                    "  {}: {} steps of {}, ε = {}",
                    e.run,
                    e.steps,
                    e.method,
                    e.epsilon.map_or("∞".into(), |v| format!("{v:.3}"))
                );
            }
        }
        Ok(())
    }

    /// Adds or extends this run's entry in the ledger (every run, private or not),
    /// under the ledger's lock. `take_over` (a resume) makes this process the run's
    /// owner and moves the draw counter and history up to what the ledger holds.
    /// `fine_epsilon` records the fine-grid ε (checkpoints, resumes) instead of the
    /// coarse one the per-step write-ahead uses.
    fn record_ledger(
        &mut self,
        path: &Path,
        fingerprint: &str,
        take_over: bool,
        fine_epsilon: bool,
    ) -> Result<()> {
        let kind = self.cfg.accountant;
        let _lock = LedgerLock::acquire(path)?;
        let mut ledger = Ledger::load(path)?;
        if let (true, Some(e)) = (take_over, ledger.entry(&self.run_id)) {
            if ledger::extends(&self.privacy.history, &e.history) {
                self.privacy.history = e.history.clone();
            }
            self.draws = self.draws.max(u32::try_from(e.draws).unwrap_or(u32::MAX));
        }
        let run = self
            .out_dir
            .as_ref()
            .map(|d| std::fs::canonicalize(d).unwrap_or_else(|_| d.clone()))
            .map_or_else(String::new, |d| d.display().to_string());
        let entry = LedgerEntry {
            run_id: self.run_id.clone(),
            run,
            data_fingerprint: fingerprint.to_string(),
            method: self.cfg.method.to_string(),
            history: self.privacy.history.clone(),
            steps: self.privacy.steps().max(u64::from(self.step)),
            draws: u64::from(self.draws.max(self.reserved)),
            delta: self.cfg.delta,
            accountant: kind.to_string(),
            epsilon: if fine_epsilon {
                self.epsilon()?
            } else {
                self.epsilon_coarse()?
            },
            not_private: self.not_private().map(String::from),
            rng: self.cfg.rng.to_string(),
            session: self.session.clone(),
        };
        ledger.record(entry, take_over)?;
        ledger.save(path)
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
        .map_err(|e| Error::Format(format!("serialising metrics: {e}")))?;
    writeln!(f, "{line}").map_err(|e| Error::Io {
        path: "metrics.jsonl".into(),
        message: e.to_string(),
    })
}

/// Maps an I/O error to [`Error::Io`] naming the path.
pub(crate) fn io_err(p: &Path, e: std::io::Error) -> Error {
    Error::Io {
        path: p.display().to_string(),
        message: e.to_string(),
    }
}
