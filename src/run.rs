//! The commands behind the CLI, as library functions: evaluation, non-private
//! pretraining, DP fine-tuning, and the demo that compares every method.
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::backend::dp::DpBackend;
use crate::data::synthetic::{Dataset, Split};
use crate::dp::accountant::AccountantKind;
use crate::dp::key::RunKey;
use crate::model::config::ModelConfig;
use crate::model::Mllm;
use crate::train::checkpoint::ModelSpec;
use crate::train::method::Method;
use crate::train::optim::OptConfig;
use crate::train::sampler::Sampling;
use crate::train::{RunSummary, TrainConfig, Trainer};
use crate::Result;

/// Image side of the built-in task for the `tiny` preset.
pub const TINY_IMAGE: usize = 32;

pub use crate::train::eval::evaluate;

/// Settings of `dualpriv pretrain`.
#[derive(Clone, Debug)]
pub struct PretrainArgs {
    /// Model preset.
    pub preset: String,
    /// Output folder: `model.safetensors` is written there.
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

/// Non-private pretraining on the public split; returns (summary, public test accuracy).
pub fn pretrain<B: DpBackend>(backend: &B, a: &PretrainArgs) -> Result<(RunSummary, f64)> {
    let spec = pretrain_spec(&a.preset);
    let (mcfg, mode) = spec.build()?;
    let image = mcfg.vision.image_size;
    let data = Dataset::generate(Split::Public, a.examples, a.seed, image)?;
    let held_out = Dataset::generate(Split::Public, 500, a.seed ^ 0x5eed, image)?;
    let text_len = data.max_text_len().max(held_out.max_text_len());
    let model = Mllm::new(backend, &mcfg, &mode, a.seed)?;
    let cfg = TrainConfig {
        sampling: Sampling::Shuffle,
        steps: a.steps,
        opt: OptConfig::adamw(a.lr),
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
    // The checkpoint's recorded config: no pruning (0 further steps, just the save).
    t.cfg.keep_tokens = None;
    t.cfg.context_tokens = 0;
    let mut summary = t.run(&data, 0)?;
    summary.seconds = started.elapsed().as_secs_f64();
    std::fs::create_dir_all(&a.out).map_err(|e| crate::train::io_err(&a.out, e))?;
    t.model.save(backend, &a.out.join("model.safetensors"))?;
    let acc = evaluate(backend, &t.model, &held_out, None, text_len)?;
    Ok((summary, acc))
}

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
    /// Pretrained checkpoint folder (model.safetensors); pretrained first if missing.
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

/// The LoRA model the demo fine-tunes.
pub fn demo_spec() -> ModelSpec {
    ModelSpec {
        preset: "tiny".into(),
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
    let ckpt = crate::train::checkpoint::model_path(&a.pretrained)?;
    if !ckpt.exists() {
        eprintln!(
            "demo: no pretrained checkpoint at {}; pretraining one now",
            ckpt.display()
        );
        let (s, acc) = pretrain(backend, &default_pretrain_args(&a.pretrained, a.progress))?;
        eprintln!(
            "demo: pretrained {} steps in {:.0} s, public accuracy {acc:.3}",
            s.steps, s.seconds
        );
    }
    let spec = demo_spec();
    let (mcfg, mode) = spec.build()?;
    let image = mcfg.vision.image_size;
    let train = Dataset::generate(Split::Private, a.train_examples, 1, image)?;
    let test = Dataset::generate(Split::Test, a.test_examples, 2, image)?;
    let text_len = train.max_text_len().max(test.max_text_len());
    let pretrained_accuracy = evaluate(
        backend,
        &Mllm::load(backend, &mcfg, &mode, &ckpt)?,
        &test,
        None,
        text_len,
    )?;
    let majority_baseline = crate::data::synthetic::majority_baseline(&test);
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
        let model = Mllm::load(backend, &mcfg, &mode, &ckpt)?;
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
    train: &Dataset,
    text_len: usize,
    session: &Path,
) -> Result<Trainer<'a, B>> {
    let mut cfg = demo_train_config(method, a.epsilon, a.delta, text_len);
    // The split's size is a flag of the demo: public.
    cfg.public_size = Some(a.train_examples);
    let mut t = Trainer::new(backend, model, demo_spec(), cfg, train)?;
    t.out_dir = Some(session.join(method.to_string()));
    t.ledger = Some(a.out.join("privacy-ledger.json"));
    t.progress = a.progress;
    Ok(t)
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

/// One row of `dualpriv bench`: a method's step time and memory.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MethodBench {
    /// The method.
    pub method: String,
    /// Median step time, milliseconds (CUDA events on the GPU, wall clock on the CPU).
    pub median_ms: f64,
    /// Peak heap bytes above the model and data during the timed steps (CPU,
    /// counting allocator; `None` when the allocator is not installed or on the GPU).
    pub peak_bytes: Option<usize>,
    /// Peak bytes of live device buffers during the timed steps (GPU).
    pub device_peak_bytes: Option<u64>,
    /// Bytes in use on the whole device after the timed steps (GPU, `cuMemGetInfo`).
    pub device_used_bytes: Option<u64>,
    /// Training tokens (visual + text) per second.
    pub tokens_per_s: f64,
    /// Visual tokens per example.
    pub visual_tokens: usize,
    /// Estimated model FLOPs of one step ([`step_flops`]).
    pub step_flops: f64,
    /// Achieved fraction of the device's dense peak (TF32 or FP32, [`peak_tflops`]).
    pub peak_fraction: Option<f64>,
}

/// Settings of `dualpriv bench`.
#[derive(Clone, Debug)]
pub struct BenchArgs {
    /// Model preset.
    pub preset: String,
    /// Methods to time.
    pub methods: Vec<Method>,
    /// Examples per step (a fixed batch, so every method sees the same work).
    pub batch: usize,
    /// Visual tokens kept by `dualpriv` (K); None uses the preset default.
    pub keep_tokens: Option<usize>,
    /// Update fraction of `dualpriv`.
    pub keep_frac: f64,
    /// LoRA rank.
    pub lora_rank: usize,
    /// Warm-up steps.
    pub warmup: usize,
    /// Timed steps.
    pub steps: usize,
}

/// Dense peak TFLOP/s of a known GPU for f32 GEMMs, by device name: TF32 tensor
/// cores when `tf32`, plain FP32 otherwise (vendor datasheet figures, SXM parts,
/// without sparsity). `None` for devices not in the table.
pub fn peak_tflops(device: &str, tf32: bool) -> Option<f64> {
    // Longest names first: "H200" also contains "H20".
    let table = [
        ("H200", 494.7, 66.9),
        ("H100", 494.7, 66.9),
        ("H20", 74.0, 44.0),
        ("A100", 156.0, 19.5),
    ];
    table
        .iter()
        .find(|(n, _, _)| device.contains(n))
        .map(|&(_, t, f)| if tf32 { t } else { f })
}

/// Estimated model FLOPs of one training step (2 per multiply-add), the usual MFU
/// convention: the frozen vision tower and projector forward once; the decoder
/// forward plus a backward of twice its cost for gradient methods, or two forward
/// passes (all three parts) for `dpzo`. Attention counts the full T×T products.
pub fn step_flops(
    cfg: &ModelConfig,
    method: Method,
    batch: usize,
    visual: usize,
    text: usize,
) -> f64 {
    let (v, l) = (&cfg.vision, &cfg.llm);
    let (b, n, dv, d) = (
        batch as f64,
        v.tokens() as f64,
        v.hidden as f64,
        l.hidden as f64,
    );
    let vit_layer = 4.0 * dv * dv + 2.0 * dv * v.mlp as f64;
    let vit = 2.0 * b * v.patches() as f64 * v.patch_dim() as f64 * dv
        + v.layers_run() as f64 * (2.0 * b * n * vit_layer + 4.0 * b * n * n * dv);
    let proj = 2.0 * b * visual as f64 * (dv * d + d * d);
    let llm = llm_forward_flops(cfg, batch, visual, text);
    if method == Method::Dpzo {
        2.0 * (vit + proj + llm)
    } else {
        vit + proj + 3.0 * llm
    }
}

/// Model FLOPs of the decoder's forward pass over `visual + text` tokens per example:
/// every linear (2 per multiply-add), the full T×T attention products, and the LM head
/// on the text positions.
pub fn llm_forward_flops(cfg: &ModelConfig, batch: usize, visual: usize, text: usize) -> f64 {
    let l = &cfg.llm;
    let (b, d, seq) = (batch as f64, l.hidden as f64, (visual + text) as f64);
    let layer: f64 = crate::model::config::LoraTarget::ALL
        .iter()
        .map(|&t| {
            let (i, o) = l.linear_dims(t);
            (i * o) as f64
        })
        .sum();
    l.layers as f64 * (2.0 * b * seq * layer + 4.0 * b * seq * seq * d)
        + 2.0 * b * text as f64 * d * l.vocab as f64
}

/// Times one training step of each method on a fixed batch (`dualpriv bench`).
///
/// One model is built and handed from method to method (its values do not change
/// the work), so a 7B preset is initialised once.
pub fn bench_methods<B: DpBackend>(backend: &B, a: &BenchArgs) -> Result<Vec<MethodBench>> {
    let spec = ModelSpec {
        preset: a.preset.clone(),
        lora_rank: Some(a.lora_rank),
        lora_alpha: 2.0 * a.lora_rank as f32,
        full_groups: vec![],
    };
    let (mcfg, mode) = spec.build()?;
    let data = Dataset::generate(Split::Private, a.batch.max(1), 1, mcfg.vision.image_size)?;
    let idx: Vec<usize> = (0..data.len()).collect();
    let (default_keep, default_context) = mcfg.vision.default_token_select();
    let peak = backend
        .device_name()
        .and_then(|n| peak_tflops(&n, backend.tf32_gemms()));
    let mut model = Some(Mllm::new(backend, &mcfg, &mode, 0)?);
    let mut rows = Vec::new();
    for &method in &a.methods {
        let mut cfg = demo_train_config(method, 3.0, 1e-5, data.max_text_len());
        cfg.batch = a.batch;
        cfg.micro_batch = a.batch;
        cfg.noise_multiplier = method.is_private().then_some(1.0);
        cfg.epsilon = None;
        cfg.keep_frac = a.keep_frac;
        if method == Method::Dualpriv {
            cfg.keep_tokens = Some(a.keep_tokens.unwrap_or(default_keep));
            cfg.context_tokens = default_context;
        }
        let m = model
            .take()
            .expect("the model is handed back after each method");
        let mut t = Trainer::new(backend, m, spec.clone(), cfg, &data)?;
        // The first method also warms the allocator, page cache and GPU pools,
        // which would otherwise be billed to whichever method runs first.
        let warm = if rows.is_empty() {
            3 * a.warmup
        } else {
            a.warmup
        };
        for _ in 0..warm {
            t.one_step(&data, &idx)?;
        }
        crate::mem::reset_peak();
        backend.reset_device_peak();
        let base = crate::mem::current_bytes();
        let mut times = Vec::with_capacity(a.steps);
        let mut vis = 0;
        for _ in 0..a.steps.max(1) {
            let t0 = Instant::now();
            let dev = backend.device_time_ms(&mut || {
                vis = t.one_step(&data, &idx)?.visual_tokens;
                Ok(())
            })?;
            times.push(dev.unwrap_or_else(|| t0.elapsed().as_secs_f64() * 1e3));
        }
        times.sort_by(f64::total_cmp);
        let median_ms = times[times.len() / 2];
        let tokens = (a.batch * (vis + t.cfg.text_len)) as f64;
        let flops = step_flops(&mcfg, method, a.batch, vis, t.cfg.text_len);
        let device = backend.device_memory();
        rows.push(MethodBench {
            method: method.to_string(),
            median_ms,
            peak_bytes: (device.is_none() && crate::mem::tracking())
                .then(|| crate::mem::peak_bytes().saturating_sub(base)),
            device_peak_bytes: device.map(|m| m.peak_bytes),
            device_used_bytes: device.map(|m| m.used_bytes),
            tokens_per_s: tokens / (median_ms / 1e3),
            visual_tokens: vis,
            step_flops: flops,
            peak_fraction: peak.map(|p| flops / (median_ms / 1e3) / (p * 1e12)),
        });
        model = Some(t.model);
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_table_matches_names() {
        assert_eq!(peak_tflops("NVIDIA H200", true), Some(494.7));
        assert_eq!(peak_tflops("NVIDIA H20", true), Some(74.0));
        assert_eq!(peak_tflops("NVIDIA A100-SXM4-80GB", false), Some(19.5));
        assert_eq!(peak_tflops("NVIDIA GeForce RTX 4090", true), None);
    }

    #[test]
    fn llm_flops_match_the_reference_figures() {
        // REFERENCE.md §7: llava-7b, 64 text + ~35 prompt tokens: 8.88 TFLOP with 576
        // visual tokens, 2.13 TFLOP with 64.
        let cfg = ModelConfig::preset("llava-7b").unwrap();
        for (visual, want) in [(576, 8.88e12), (64, 2.13e12)] {
            let got = llm_forward_flops(&cfg, 1, visual, 99);
            assert!(
                (got / want - 1.0).abs() < 0.03,
                "{visual}: {got:e} vs {want:e}"
            );
        }
    }
}
