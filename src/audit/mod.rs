//! Empirical privacy auditing in one training run (Steinke, Nasr & Jagielski,
//! NeurIPS 2023, arXiv 2305.08846): an ε lower bound that a correct DP run must
//! stay under, and that a broken one exceeds.
//!
//! One audited run ([`audit_run`]) trains a fresh copy of the model once on the
//! base data plus canaries, each included by an independent fair coin:
//! * **white-box (Dirac) canaries** (gradient methods): canary j owns one LoRA
//!   `A` coordinate c_j (whose data gradient is zero at the start, B being 0) and,
//!   when included and Poisson-sampled in a step, adds its clipped gradient C·e_j
//!   to the clipped sum before the noise (`canary::Injector`). Score: the
//!   model's change along −e_j (SGD without momentum or weight decay, so the
//!   change is linear in the noisy sums);
//! * **black-box canaries** (every method): examples of the task with a random
//!   wrong answer ([`canary::Relabeled`]) added to the training data
//!   ([`canary::WithCanaries`]). Score: loss before − loss after training (the
//!   loss before is the public pretrained model's). They also give the
//!   loss-threshold membership-inference AUC (score −loss after).
//!
//! The auditor guesses "in" for the k highest and "out" for the k lowest scores,
//! for a few k fixed in advance (Bonferroni over them), and [`bound`] turns the
//! correct guesses into the ε lower bound at 95 % confidence.
//!
//! An audited run persists nothing (no `out_dir`, no ledger): its ε lower bound
//! concerns this audit run only, trained on the built-in task, not any real run.
pub mod bound;
pub mod canary;

use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::Serialize;

use crate::backend::dp::DpBackend;
use crate::data::DataSource;
use crate::dp::accountant::AccountantKind;
use crate::dp::key::RunKey;
use crate::model::Mllm;
use crate::train::checkpoint::ModelSpec;
use crate::train::method::Method;
use crate::train::optim::OptConfig;
use crate::train::{TrainConfig, Trainer};
use crate::{Error, Result};
use canary::{Injector, Relabeled, WithCanaries};

/// Confidence of the bound: 1 − β with β = 0.05.
pub const BETA: f64 = 0.05;

/// One audited run's settings.
#[derive(Clone, Debug)]
pub struct AuditConfig {
    /// The method audited.
    pub method: Method,
    /// The claimed ε (σ is calibrated to it); `None` for nonprivate.
    pub epsilon: Option<f64>,
    /// δ of the claim and of the bound.
    pub delta: f64,
    /// m: canaries of each kind used (white-box and black-box).
    pub canaries: usize,
    /// Whether to insert white-box gradient canaries (gradient methods only).
    pub white_box: bool,
    /// Expected batch size B (q = B / (base + 2m)).
    pub batch: usize,
    /// Training steps T.
    pub steps: u32,
    /// SGD learning rate of the gradient methods.
    pub lr: f32,
    /// SGD learning rate of dpzo.
    pub dpzo_lr: f32,
    /// Per-example clip norm C.
    pub clip: f32,
    /// `None`: coins, canary choices and the run key from the OS (a real audit).
    /// `Some(s)`: all from the public seed s, for reproducible tests.
    pub seed: Option<u64>,
    /// σ, when already calibrated to (q, T, ε) by [`calibrate_sigma`] (a cache: runs
    /// of several methods at one ε share it); `None` calibrates here.
    pub sigma: Option<f64>,
    /// TEST-ONLY: divide the noise std by 10, a deliberately broken mechanism that
    /// shows the audit's power. The binary never sets it; it is not serialised.
    #[doc(hidden)]
    pub broken_noise: bool,
}

impl AuditConfig {
    /// The default audited run of `method` at claimed ε (`None`: nonprivate).
    pub fn new(method: Method, epsilon: Option<f64>) -> Self {
        Self {
            method,
            epsilon,
            delta: 1e-5,
            canaries: 1000,
            white_box: method != Method::Dpzo,
            batch: 100,
            // q = 100 / (500 + 2·1000) = 0.04: each included canary is sampled
            // qT = 3.2 times on average (never, with probability e^−3.2 ≈ 4 %).
            steps: 80,
            lr: 0.5,
            dpzo_lr: 2e-3,
            clip: 1.0,
            seed: None,
            sigma: None,
            broken_noise: false,
        }
    }

    /// The Poisson rate q of a run on `base` examples: B over every record the
    /// run could hold (the base, the black-box and the white-box canaries), so q
    /// does not depend on the coins.
    pub fn rate(&self, base: usize) -> f64 {
        self.batch as f64 / (base + 2 * self.canaries) as f64
    }
}

/// The σ that reaches the claimed ε in `a.steps` steps at q = [`AuditConfig::rate`]
/// (PLD accountant, as the runs use); `None` for nonprivate.
pub fn calibrate_sigma(a: &AuditConfig, base: usize) -> Result<Option<f64>> {
    match (a.method.is_private(), a.epsilon) {
        (false, _) => Ok(None),
        (true, Some(e)) => crate::dp::accountant::calibrate_sigma(
            AccountantKind::Pld,
            a.rate(base),
            u64::from(a.steps),
            e,
            a.delta,
        )
        .map(Some),
        (true, None) => Err(Error::Config(format!(
            "auditing {} needs a claimed ε",
            a.method
        ))),
    }
}

/// The result of one canary set.
#[derive(Clone, Debug, Serialize)]
pub struct CanaryResult {
    /// `white-box` or `black-box`.
    pub kind: &'static str,
    /// m.
    pub canaries: usize,
    /// Canaries included by their coin.
    pub included: usize,
    /// k of the best guess count.
    pub k: usize,
    /// Guesses r = 2k.
    pub guesses: usize,
    /// Correct guesses v.
    pub correct: usize,
    /// ε lower bound at 95 % confidence.
    pub epsilon_lower_bound: f64,
    /// AUC of the score (members higher), ties ½.
    pub score_auc: f64,
}

/// One audited run: a line of `audit.jsonl`.
#[derive(Clone, Debug, Serialize)]
pub struct AuditRow {
    /// The method.
    pub method: String,
    /// The claimed ε (null: nonprivate, ∞).
    pub claimed_epsilon: Option<f64>,
    /// δ.
    pub delta: f64,
    /// σ used (after the broken variant's division, if any).
    pub sigma: f64,
    /// Poisson rate q.
    pub q: f64,
    /// Steps T.
    pub steps: u32,
    /// Whether this was the deliberately broken (σ/10) variant.
    pub broken: bool,
    /// The canary set the bound comes from: white-box when used, else black-box.
    pub primary: CanaryResult,
    /// The black-box set (also when white-box is primary).
    pub black_box: CanaryResult,
    /// Loss-threshold membership-inference AUC on the black-box canaries.
    pub mia_auc: f64,
    /// Whether the coins and key came from a public seed (tests).
    pub insecure_seed: bool,
    /// Wall time, seconds.
    pub seconds: f64,
}

/// Per-example losses of `data` under `model` (forward only), in order.
fn losses<B: DpBackend>(
    be: &B,
    model: &Mllm<B>,
    data: &dyn DataSource,
    cfg: &TrainConfig,
) -> Result<Vec<f64>> {
    let tokens = cfg.token_select();
    let idx: Vec<usize> = (0..data.len()).collect();
    let mut out = Vec::with_capacity(idx.len());
    for chunk in idx.chunks(64) {
        let b = data.collate(chunk, cfg.text_len)?;
        out.extend(
            model
                .per_example_loss(be, &b, tokens.as_ref())?
                .iter()
                .map(|&l| f64::from(l)),
        );
    }
    Ok(out)
}

/// The values of the canaries' coordinates.
fn coord_values<B: DpBackend>(
    be: &B,
    model: &Mllm<B>,
    coords: &[(u32, usize)],
) -> Result<Vec<f64>> {
    let mut cache: std::collections::HashMap<u32, Vec<f32>> = Default::default();
    coords
        .iter()
        .map(|&(id, i)| {
            let vals = match cache.entry(id) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(be.download(model.param(id))?.into_vec())
                }
            };
            Ok(f64::from(vals[i]))
        })
        .collect()
}

fn set_result(kind: &'static str, scores: &[f64], members: &[bool], delta: f64) -> CanaryResult {
    let m = scores.len();
    let g = bound::best_bound(scores, members, &bound::default_ks(m), delta, BETA);
    CanaryResult {
        kind,
        canaries: m,
        included: members.iter().filter(|&&b| b).count(),
        k: g.k,
        guesses: g.guesses,
        correct: g.correct,
        epsilon_lower_bound: g.epsilon,
        score_auc: bound::auc(scores, members),
    }
}

/// Runs one audit: trains `model` (a fresh copy of the public starting point,
/// `spec` its description) once on `base` plus canaries and returns the bounds.
/// The black-box canaries are the first m examples of `pool` with random wrong
/// answers. Nothing is written to disk.
pub fn audit_run<B: DpBackend>(
    backend: &B,
    model: Mllm<B>,
    spec: ModelSpec,
    base: &dyn DataSource,
    pool: &dyn DataSource,
    a: &AuditConfig,
) -> Result<AuditRow> {
    let t0 = std::time::Instant::now();
    let m = a.canaries;
    if m < 2 || pool.len() < m {
        return Err(Error::Config(format!(
            "the audit needs at least 2 canaries and as many canary examples: {m} canaries, {} \
             examples to draw them from",
            pool.len()
        )));
    }
    let white = a.white_box && a.method != Method::Dpzo;
    if a.white_box && !white {
        return Err(Error::Config(
            "dpzo has no per-coordinate gradient for white-box canaries; audit it with black-box \
             canaries (no --white-box)"
                .into(),
        ));
    }
    let (mut rng, key) = match a.seed {
        Some(s) => (ChaCha20Rng::seed_from_u64(s), RunKey::from_insecure_seed(s)),
        None => {
            let mut seed = [0u8; 32];
            getrandom::fill(&mut seed).map_err(Error::entropy)?;
            (ChaCha20Rng::from_seed(seed), RunKey::from_os()?)
        }
    };
    let coins_bb: Vec<bool> = (0..m).map(|_| rng.random::<bool>()).collect();
    let coins_wb: Vec<bool> = (0..m).map(|_| rng.random::<bool>()).collect();
    let pool_m = FirstN { inner: pool, n: m };
    let canaries = Relabeled::random_wrong(&pool_m, &mut rng)?;
    let included: Vec<usize> = (0..m).filter(|&j| coins_bb[j]).collect();
    let data = WithCanaries::new(base, &canaries, included)?;
    let dpzo = a.method == Method::Dpzo;
    let cfg = TrainConfig {
        steps: a.steps,
        opt: OptConfig::sgd(if dpzo { a.dpzo_lr } else { a.lr }),
        clip_norm: a.clip,
        epsilon: if a.method.is_private() {
            a.epsilon
        } else {
            None
        },
        delta: a.delta,
        noise_multiplier: match a.sigma {
            Some(s) if a.method.is_private() => Some(s),
            _ => None,
        },
        accountant: AccountantKind::Pld,
        keep_tokens: (a.method == Method::Dualpriv).then_some(6),
        context_tokens: if a.method == Method::Dualpriv { 2 } else { 0 },
        keep_frac: 0.8,
        dpzo_lambda: 1e-2,
        // Every record the run could hold: the base, the black-box and the white-box
        // canaries (q does not depend on the coins).
        public_size: Some(base.len() + 2 * m),
        ..TrainConfig::new(
            a.method,
            a.batch,
            base.max_text_len().max(data.max_text_len()),
        )
    };
    if a.method.is_private() && a.epsilon.is_none() {
        return Err(Error::Config(format!(
            "auditing {} needs a claimed ε",
            a.method
        )));
    }
    let q = cfg.check(&data, &key)?.rate();
    // Dirac coordinates: distinct, drawn from the LoRA A factors (zero data
    // gradient while B = 0), else from every trainable tensor.
    let pool_params: Vec<(u32, usize)> = {
        let lora: Vec<(u32, usize)> = model
            .trainable()
            .iter()
            .filter(|p| p.name.contains("lora_A"))
            .map(|p| (p.id, p.len))
            .collect();
        if lora.is_empty() {
            model.trainable().iter().map(|p| (p.id, p.len)).collect()
        } else {
            lora
        }
    };
    let total: usize = pool_params.iter().map(|p| p.1).sum();
    let coords: Vec<(u32, usize)> = if white {
        if total < m {
            return Err(Error::Config(format!(
                "{m} white-box canaries need {m} trainable coordinates; the model has {total}"
            )));
        }
        let mut picks = sample(&mut rng, total, m).into_vec();
        picks.sort_unstable();
        picks
            .into_iter()
            .map(|mut g| {
                let mut it = pool_params.iter();
                loop {
                    let &(id, len) = it.next().expect("g < total");
                    if g < len {
                        break (id, g);
                    }
                    g -= len;
                }
            })
            .collect()
    } else {
        vec![]
    };
    let noise_scale = if a.broken_noise { 0.1 } else { 1.0 };
    let before = coord_values(backend, &model, &coords)?;
    let loss_before = losses(backend, &model, &canaries, &cfg)?;
    let mut t = Trainer::with_key(backend, model, spec, cfg, &data, key)?;
    let mut ikey = [0u8; 32];
    rng.fill(&mut ikey);
    // The permutation of coins over coordinates is already random (coins are iid).
    t.audit = Some(Injector {
        coords: coords.clone(),
        included: coins_wb.clone(),
        rate: q,
        clip: a.clip,
        key: ikey,
        noise_scale,
    });
    // The steps of `Trainer::run` (Poisson batches from the run key, each step
    // charged before it runs) without what an audit does not publish: per-step ε,
    // metrics, evaluations, checkpoints and the ledger.
    let sampler = t.cfg.check(&data, t.key())?;
    for _ in 0..a.steps {
        let idx = sampler.batch(t.draws());
        t.one_step(&data, &idx)?;
        t.step += 1;
    }
    let after = coord_values(backend, &t.model, &coords)?;
    let loss_after = losses(backend, &t.model, &canaries, &t.cfg)?;
    // SGD moves θ_j by −lr·(C + noise + data)/B when canary j is sampled.
    let wb_scores: Vec<f64> = before.iter().zip(&after).map(|(b, a)| b - a).collect();
    let bb_scores: Vec<f64> = loss_before
        .iter()
        .zip(&loss_after)
        .map(|(b, a)| b - a)
        .collect();
    let neg_loss: Vec<f64> = loss_after.iter().map(|l| -l).collect();
    let black_box = set_result("black-box", &bb_scores, &coins_bb, a.delta);
    let primary = if white {
        set_result("white-box", &wb_scores, &coins_wb, a.delta)
    } else {
        black_box.clone()
    };
    Ok(AuditRow {
        method: a.method.to_string(),
        claimed_epsilon: a.method.is_private().then_some(a.epsilon).flatten(),
        delta: a.delta,
        sigma: t.sigma * noise_scale,
        q,
        steps: t.step,
        broken: a.broken_noise,
        primary,
        black_box,
        mia_auc: bound::auc(&neg_loss, &coins_bb),
        insecure_seed: a.seed.is_some(),
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// The first `n` examples of a data source.
struct FirstN<'a> {
    inner: &'a dyn DataSource,
    n: usize,
}

impl DataSource for FirstN<'_> {
    fn len(&self) -> usize {
        self.n
    }
    fn collate(&self, indices: &[usize], text_len: usize) -> Result<crate::data::Batch> {
        if let Some(&i) = indices.iter().find(|&&i| i >= self.n) {
            return Err(Error::Shape(format!(
                "example index {i} is out of range for {}",
                self.n
            )));
        }
        self.inner.collate(indices, text_len)
    }
    fn max_text_len(&self) -> usize {
        self.inner.max_text_len()
    }
    fn fingerprint(&self, key: &[u8; 32]) -> String {
        format!("{}:{}", self.inner.fingerprint(key), self.n)
    }
    fn identity(&self) -> String {
        format!("{}[..{}]", self.inner.identity(), self.n)
    }
}
