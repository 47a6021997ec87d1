//! `dualpriv train`: one DP fine-tune (or a non-private one, for comparison) of a
//! pretrained checkpoint on the built-in private task, or of a transformers LLaVA
//! folder on LLaVA conversation data ([`HfData`]), or the resume of one.
//!
//! [`prepare`] builds the run (data, config, model, key, trainer) and the caller
//! runs it with [`TrainJob::run`], so a front end can report the run's σ and size
//! before the first step.
use std::path::{Path, PathBuf};

use crate::backend::dp::DpBackend;
use crate::data::builtin;
use crate::data::synthetic::Split;
use crate::data::DataSource;
use crate::dp::accountant::AccountantKind;
use crate::dp::key::RunKey;
use crate::dp::noise::RngKind;
use crate::hf::conversation::Template;
use crate::hf::dataset::{DataOptions, LlavaDataset};
use crate::hf::image::{AspectMode, ImageProcessor};
use crate::hf::load::{apply_adapter, load_llava};
use crate::hf::peft::{read_adapter, read_config};
use crate::hf::tokenizer::Tokenizer;
use crate::model::Mllm;
use crate::train::checkpoint::{self, ModelSpec};
use crate::train::method::Method;
use crate::train::optim::OptConfig;
use crate::train::sampler::Sampling;
use crate::train::{InitAdapter, PruneScope, RunSummary, TrainConfig, Trainer};
use crate::{Error, Result};

/// A transformers LLaVA folder and LLaVA conversation data to train on instead of
/// the built-in task and preset.
#[derive(Clone, Debug, PartialEq)]
pub struct HfData {
    /// The model folder: config.json, safetensors, tokenizer.json,
    /// preprocessor_config.json.
    pub model: PathBuf,
    /// The conversation JSON.
    pub data: PathBuf,
    /// The folder the records' image paths are relative to.
    pub image_folder: Option<PathBuf>,
    /// The prompt template.
    pub template: Template,
    /// How images become squares.
    pub aspect: AspectMode,
    /// Longer records are truncated to this many tokens (and counted).
    pub max_text_len: usize,
    /// A public dataset size for the sampling rate q = batch / N (one that does not
    /// depend on the private records); `None` uses the record count, which the run
    /// then publishes (the trainer warns).
    pub public_size: Option<usize>,
    /// A PEFT LoRA adapter to start the LoRA from instead of PEFT's init (A
    /// Kaiming-uniform, B zero). It must be **public**: ε covers only the private
    /// data this run trains on, so an adapter trained on private data without its
    /// own accounting would leak that data through the released model. Its rank and
    /// α must be the run's ([`lora_from_adapter`]), it must cover every decoder
    /// linear of every layer, and it may not have `modules_to_save` (those would be
    /// missing from the exported adapter). Recorded in the run's state
    /// ([`crate::train::InitAdapter`]); a resume checks that the same one is given.
    pub init_adapter: Option<PathBuf>,
}

/// Takes the LoRA rank and α for `spec` from the adapter in `dir` where the caller
/// did not choose them (`rank_given`, `alpha_given`), and checks they agree where
/// it did. A full fine-tune (`lora_rank` `None`) cannot start from an adapter.
pub fn lora_from_adapter(
    spec: &mut ModelSpec,
    dir: &Path,
    rank_given: bool,
    alpha_given: bool,
) -> Result<()> {
    let cfg = read_config(dir)?;
    let shown = dir.join("adapter_config.json");
    let Some(rank) = spec.lora_rank else {
        return Err(Error::Config(format!(
            "{}: an initial adapter needs a LoRA run, but this run fine-tunes {:?} in full; \
             give a LoRA rank (or none, to take the adapter's r = {})",
            shown.display(),
            spec.full_groups,
            cfg.r
        )));
    };
    if rank_given && rank != cfg.r {
        return Err(Error::Config(format!(
            "{}: the adapter has r = {}, but the run asks for LoRA rank {rank}; drop the rank \
             setting to take the adapter's, or pass another adapter",
            shown.display(),
            cfg.r
        )));
    }
    let alpha = cfg.lora_alpha as f32;
    if alpha_given && (f64::from(spec.lora_alpha) - cfg.lora_alpha).abs() > 1e-6 {
        return Err(Error::Config(format!(
            "{}: the adapter has lora_alpha = {}, but the run asks for LoRA alpha {}; drop \
             the alpha setting to take the adapter's, or pass another adapter",
            shown.display(),
            cfg.lora_alpha,
            spec.lora_alpha
        )));
    }
    spec.lora_rank = Some(cfg.r);
    spec.lora_alpha = alpha;
    Ok(())
}

/// BLAKE3 of an adapter folder's two files, for [`InitAdapter::digest`].
fn adapter_digest(dir: &Path) -> Result<String> {
    let mut h = blake3::Hasher::new();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        let p = dir.join(f);
        let bytes = std::fs::read(&p).map_err(|e| Error::io(&p, e))?;
        h.update(&(bytes.len() as u64).to_le_bytes());
        h.update(&bytes);
    }
    Ok(h.finalize().to_hex().to_string())
}

/// Copies the initial adapter in `dir` into `model`'s LoRA tensors, after the
/// checks of [`HfData::init_adapter`].
fn init_from_adapter<B: DpBackend>(be: &B, model: &mut Mllm<B>, dir: &Path) -> Result<InitAdapter> {
    let ad = read_adapter(dir)?;
    if !ad.config.modules_to_save.is_empty() {
        return Err(Error::Config(format!(
            "{}: the adapter also saves {:?} in full (modules_to_save); a LoRA run trains and \
             exports only the LoRA tensors, so that part would be lost: start from an adapter \
             without modules_to_save",
            dir.join("adapter_config.json").display(),
            ad.config.modules_to_save
        )));
    }
    apply_adapter(be, model, &ad, dir)?;
    Ok(InitAdapter {
        path: dir.to_path_buf(),
        digest: adapter_digest(dir)?,
    })
}

/// Settings of `dualpriv train`. [`Default`] gives the command's defaults: a
/// `dualpriv` LoRA (r = 8) fine-tune of `assets/tiny-pretrained`, 25 steps of 128
/// examples from 8000, AdamW at lr 0.01, the PLD accountant at δ = 1e-5 (a target ε
/// or a σ must still be set).
#[derive(Clone, Debug, PartialEq)]
pub struct TrainArgs {
    /// The method.
    pub method: Method,
    /// The model and what of it is trained.
    pub model: ModelSpec,
    /// The pretrained LLaVA folder the built-in task fine-tunes (its sizes,
    /// weights, tokenizer and image processor; [`crate::data::builtin`]).
    pub init: PathBuf,
    /// Output folder of a new run: checkpoints, `metrics.jsonl`, `state.json`.
    pub out: Option<PathBuf>,
    /// Continue the run saved in this folder instead (same data; ε keeps
    /// accumulating). Only `steps`, the data settings, `eval_examples` and
    /// `checkpoint_every` apply then; the rest comes from the checkpoint.
    pub resume: Option<PathBuf>,
    /// Target ε (σ is calibrated for `steps`; training stops before exceeding it).
    pub epsilon: Option<f64>,
    /// δ.
    pub delta: f64,
    /// Fixed noise multiplier σ instead of a target ε.
    pub noise_multiplier: Option<f64>,
    /// The accountant.
    pub accountant: AccountantKind,
    /// Planned logical steps (for a resume: the new planned total).
    pub steps: u32,
    /// Expected batch size (Poisson rate q = batch / N).
    pub batch: usize,
    /// Largest physical micro-batch.
    pub micro_batch: usize,
    /// How batches are drawn.
    pub sampling: Sampling,
    /// The optimizer.
    pub opt: OptConfig,
    /// Per-example clipping norm C.
    pub clip_norm: f32,
    /// Visual token pruning on (`dualpriv` prunes by default, the others when
    /// `keep_tokens` is given).
    pub token_pruning: bool,
    /// K dominant patches kept (`None`: the preset's default for `dualpriv`).
    pub keep_tokens: Option<usize>,
    /// M contextual tokens (`None`: the preset's default).
    pub context_tokens: Option<usize>,
    /// Heuristic noise on fused tokens (NOT part of the DP guarantee).
    pub fuse_noise_std: f32,
    /// Fraction of coordinates updated per step (`dualpriv`; 1: no update pruning).
    pub keep_frac: f64,
    /// Scope of the top-k threshold.
    pub prune_scope: PruneScope,
    /// DPZO perturbation scale λ.
    pub dpzo_lambda: f32,
    /// Private training examples of the built-in task (declared public as N).
    pub train_examples: usize,
    /// Seed of the built-in private data (public: batches and noise come from the
    /// run's secret key).
    pub seed: u64,
    /// NOT PRIVATE: derive the run key from this number instead of OS entropy; the
    /// run reports ε = ∞.
    pub insecure_seed: Option<u64>,
    /// The noise generator.
    pub rng: RngKind,
    /// Also log the private batches' statistics. NOT covered by ε.
    pub log_private_stats: bool,
    /// Evaluate on the held-out test split every N steps (0: never).
    pub eval_every: u32,
    /// Held-out test examples for `eval_every`.
    pub eval_examples: usize,
    /// Checkpoint every N steps (0: only at the end).
    pub checkpoint_every: u32,
    /// Draw a progress bar.
    pub progress: bool,
    /// Train a transformers LLaVA on conversation data instead (`model.preset`,
    /// `init`, `train_examples` and `seed` do not apply then).
    pub hf: Option<HfData>,
}

impl Default for TrainArgs {
    fn default() -> Self {
        Self {
            method: Method::Dualpriv,
            model: ModelSpec {
                preset: format!("{}assets/tiny-pretrained", checkpoint::HF_PRESET),
                lora_rank: Some(8),
                lora_alpha: 16.0,
                full_groups: ["projector", "attention", "mlp", "lm_head"]
                    .map(String::from)
                    .to_vec(),
            },
            init: "assets/tiny-pretrained".into(),
            out: None,
            resume: None,
            epsilon: None,
            delta: 1e-5,
            noise_multiplier: None,
            accountant: AccountantKind::Pld,
            steps: 25,
            batch: 128,
            micro_batch: 128,
            sampling: Sampling::Poisson,
            opt: OptConfig::adamw(1e-2),
            clip_norm: 1.0,
            token_pruning: true,
            keep_tokens: None,
            context_tokens: None,
            fuse_noise_std: 0.0,
            keep_frac: 0.8,
            prune_scope: PruneScope::Tensor,
            dpzo_lambda: 1e-2,
            train_examples: 8000,
            seed: 1,
            insecure_seed: None,
            rng: RngKind::Chacha20,
            log_private_stats: false,
            eval_every: 0,
            eval_examples: 1000,
            checkpoint_every: 0,
            progress: false,
            hf: None,
        }
    }
}

/// A prepared run of `dualpriv train`.
pub struct TrainJob<'a, B: DpBackend> {
    /// The trainer, before its first step of this invocation.
    pub trainer: Trainer<'a, B>,
    /// The private training data.
    pub data: Box<dyn DataSource>,
    /// Checkpoint every N steps (0: only at the end).
    pub checkpoint_every: u32,
}

impl<B: DpBackend> TrainJob<'_, B> {
    /// Trains until the planned steps are done or the ε budget would be exceeded.
    pub fn run(&mut self) -> Result<RunSummary> {
        self.trainer.run(self.data.as_ref(), self.checkpoint_every)
    }
}

/// Builds the run `a` describes: a resume of `a.resume`, or a new run from `a.init`
/// with a fresh secret key (or the public key of `a.insecure_seed`).
///
/// Without [`TrainArgs::hf`] this is the built-in task: `a.init` is a LLaVA folder
/// (the shipped `assets/tiny-pretrained`) and the private split is rendered in
/// memory as LLaVA records ([`builtin::load`]), so the run goes through the same
/// loader, tokenizer, image processor and dataset as a real LLaVA's.
pub fn prepare<'a, B: DpBackend>(be: &'a B, a: &TrainArgs) -> Result<TrainJob<'a, B>> {
    if let Some(h) = &a.hf {
        let spec = hf_spec(a, &h.model);
        let (mcfg, _) = spec.build()?;
        let tok = Tokenizer::from_file(h.model.join("tokenizer.json"))?;
        let processor = ImageProcessor::from_file(h.model.join("preprocessor_config.json"))?;
        let opts = DataOptions {
            template: h.template,
            max_len: h.max_text_len,
            aspect: h.aspect,
        };
        let data = LlavaDataset::load(
            &h.data,
            h.image_folder.as_deref(),
            &tok,
            processor,
            mcfg.vision.image_size,
            opts,
        )?;
        let run = LlavaRun {
            model_dir: &h.model,
            spec,
            public_size: h.public_size,
            init_adapter: h.init_adapter.as_deref(),
            text_len: h.max_text_len,
        };
        return prepare_llava(be, a, run, data, None);
    }
    // A resume reads the task through the folder the run was started from.
    let init = match &a.resume {
        Some(dir) => {
            let (st, _) = checkpoint::load_state(dir)?;
            match st.model.preset.strip_prefix(checkpoint::HF_PRESET) {
                Some(d) => PathBuf::from(d),
                None => {
                    return Err(Error::Config(format!(
                        "{}: the run trained the crate preset {:?}, which this version no \
                         longer trains; start a new run from a LLaVA folder (--init)",
                        dir.display(),
                        st.model.preset
                    )))
                }
            }
        }
        None => a.init.clone(),
    };
    let spec = hf_spec(a, &init);
    let image = spec
        .build()
        .map_err(|e| {
            Error::Config(format!(
                "{e}. The built-in task trains a LLaVA folder such as assets/tiny-pretrained \
             (write one with `dualpriv pretrain --out DIR`)"
            ))
        })?
        .0
        .vision
        .image_size;
    let (data, _) = builtin::load(&init, Split::Private, a.train_examples, a.seed, image)?;
    let (held_out, _) = builtin::load(&init, Split::Test, a.eval_examples.max(1), 2, image)?;
    let run = LlavaRun {
        model_dir: &init,
        spec,
        // The built-in data's size is a setting, so public; q and σ derive from it.
        public_size: Some(a.train_examples),
        init_adapter: None,
        text_len: builtin::MAX_TEXT_LEN,
    };
    prepare_llava(be, a, run, data, Some(held_out))
}

/// The run's model: the LLaVA folder `dir` with what `a` trains of it.
fn hf_spec(a: &TrainArgs, dir: &Path) -> ModelSpec {
    ModelSpec {
        preset: format!("{}{}", checkpoint::HF_PRESET, dir.display()),
        ..a.model.clone()
    }
}

/// What a run on a LLaVA folder needs besides the data.
struct LlavaRun<'p> {
    model_dir: &'p Path,
    spec: ModelSpec,
    /// A public dataset size for q, or `None` (the trainer then warns).
    public_size: Option<usize>,
    init_adapter: Option<&'p Path>,
    /// The public padding length.
    text_len: usize,
}

/// The run's settings that do not depend on the data source.
fn train_config(
    a: &TrainArgs,
    keep_tokens: Option<usize>,
    context: usize,
    text_len: usize,
) -> TrainConfig {
    TrainConfig {
        micro_batch: a.micro_batch,
        sampling: a.sampling,
        steps: a.steps,
        opt: a.opt,
        clip_norm: a.clip_norm,
        epsilon: a.epsilon,
        delta: a.delta,
        noise_multiplier: a.noise_multiplier,
        accountant: a.accountant,
        keep_tokens,
        context_tokens: if keep_tokens.is_some() { context } else { 0 },
        fuse_noise_std: a.fuse_noise_std,
        keep_frac: a.keep_frac,
        prune_scope: a.prune_scope,
        dpzo_lambda: a.dpzo_lambda,
        rng: a.rng,
        log_private_stats: a.log_private_stats,
        eval_every: a.eval_every,
        ..TrainConfig::new(a.method, a.batch, text_len)
    }
}

/// Builds the trainer of a run on a LLaVA folder: a resume, or a new run.
fn prepare_llava<'a, B: DpBackend>(
    be: &'a B,
    a: &TrainArgs,
    run: LlavaRun<'_>,
    data: LlavaDataset,
    held_out: Option<LlavaDataset>,
) -> Result<TrainJob<'a, B>> {
    let mut trainer = match &a.resume {
        Some(dir) => {
            // Before the resume takes the run over in the ledger.
            let (st, _) = checkpoint::load_state(dir)?;
            check_resumed_init(dir, st.train.init_adapter.as_ref(), run.init_adapter)?;
            Trainer::resume(be, dir, &data, Some(a.steps))?
        }
        None => {
            let (mcfg, mode) = run.spec.build()?;
            let (default_keep, default_context) = mcfg.vision.default_token_select();
            let keep_tokens = match (a.token_pruning, a.keep_tokens, a.method) {
                (false, ..) => None,
                (true, Some(k), _) => Some(k),
                (true, None, Method::Dualpriv) => Some(default_keep),
                _ => None,
            };
            let context = a.context_tokens.unwrap_or(default_context);
            let (mut model, _) = load_llava(be, run.model_dir, &mode, 0)?;
            let init_adapter = run
                .init_adapter
                .map(|dir| init_from_adapter(be, &mut model, dir))
                .transpose()?;
            // Padded to the public limit, never to the longest record: the text
            // length is published (state.json, step time), the longest record is private.
            let cfg = TrainConfig {
                public_size: run.public_size,
                init_adapter,
                ..train_config(a, keep_tokens, context, run.text_len)
            };
            let key = match a.insecure_seed {
                Some(s) => RunKey::from_insecure_seed(s),
                None => RunKey::from_os()?,
            };
            let mut t = Trainer::with_key(be, model, run.spec, cfg, &data, key)?;
            t.out_dir = a.out.clone();
            t
        }
    };
    trainer.progress = a.progress;
    trainer.eval_data = held_out.map(|h| Box::new(h) as Box<dyn DataSource>);
    Ok(TrainJob {
        trainer,
        data: Box::new(data),
        checkpoint_every: a.checkpoint_every,
    })
}

/// A resume continues from the checkpoint's LoRA, which already started from the
/// recorded adapter; an `init_adapter` given again must be that one.
fn check_resumed_init(
    run: &Path,
    recorded: Option<&InitAdapter>,
    given: Option<&Path>,
) -> Result<()> {
    let Some(given) = given else { return Ok(()) };
    let digest = adapter_digest(given)?;
    match recorded {
        Some(r) if r.digest == digest => Ok(()),
        Some(r) => Err(Error::Config(format!(
            "{}: the run started from the adapter {} (BLAKE3 {}), not {} (BLAKE3 {digest}); \
             a resume continues from the checkpoint, so leave the initial adapter out",
            run.display(),
            r.path.display(),
            &r.digest[..16],
            given.display()
        ))),
        None => Err(Error::Config(format!(
            "{}: the run did not start from an adapter, so {} cannot be its initial adapter; \
             a resume continues from the checkpoint, so leave the initial adapter out",
            run.display(),
            given.display()
        ))),
    }
}
