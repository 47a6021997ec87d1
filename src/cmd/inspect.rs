//! `dualpriv inspect`: what a model costs in memory, without training it.
//!
//! * [`load`]: loads a transformers LLaVA folder on the CPU backend through the
//!   same loader as `train --model` ([`crate::hf::load::load_llava`]), and reports
//!   the parameter counts by group, the bytes of the converted f32 model, and the
//!   process's peak resident set (`VmHWM`) and peak heap ([`crate::mem`]), so the
//!   loader's host-memory bound (peak ≤ 1.1× the converted model) can be checked
//!   on any checkpoint.
//! * [`plan`]: the device memory one training step of each method needs, from
//!   [`crate::backend::meter`] (the model code run on buffer sizes only), for any
//!   config — llava-7b included — on a machine without a GPU.
//!
//! Privacy: both read only the model's config and weights, never training data.
use std::collections::BTreeMap;
use std::path::Path;

use super::bench::{bench_config, bench_data};
use crate::backend::cpu::Cpu;
use crate::backend::meter::Meter;
use crate::hf::load::load_llava;
use crate::model::{Mllm, TrainMode};
use crate::train::checkpoint::ModelSpec;
use crate::train::method::Method;
use crate::train::Trainer;
use crate::{Error, Result};

/// What [`load`] measured.
#[derive(Clone, Debug)]
pub struct LoadInspect {
    /// The loader's one-line summary ([`crate::hf::load::LoadReport::summary`]).
    pub summary: String,
    /// Values by group (`vision`, `projector`, `llm.embed_tokens`, `llm.layers`,
    /// `llm.lm_head`, `llm.norm`, `lora`), in the crate's allocation.
    pub groups: BTreeMap<String, u64>,
    /// Bytes of every tensor of the loaded model as f32.
    pub f32_bytes: u64,
    /// Bytes of the checkpoint's tensor files on disk.
    pub file_bytes: u64,
    /// Peak resident set of the process (`VmHWM` of `/proc/self/status`), bytes;
    /// `None` where the file does not exist (not Linux).
    pub peak_rss: Option<u64>,
    /// Peak heap bytes during the load ([`crate::mem::peak_bytes`]), when the
    /// counting allocator is installed.
    pub peak_heap: Option<u64>,
    /// Wall time of the load, seconds.
    pub seconds: f64,
}

/// The group a crate tensor name is counted under.
pub fn group_of(name: &str) -> &'static str {
    if name.contains(".lora_A.") || name.contains(".lora_B.") {
        "lora"
    } else if name.starts_with("vision.") {
        "vision"
    } else if name.starts_with("projector.") {
        "projector"
    } else if name.starts_with("llm.embed_tokens.") {
        "llm.embed_tokens"
    } else if name.starts_with("llm.layers.") {
        "llm.layers"
    } else if name.starts_with("llm.lm_head.") {
        "llm.lm_head"
    } else {
        "llm.norm"
    }
}

/// A field of `/proc/self/status` in bytes (`VmHWM`, `VmRSS`), if present.
pub fn proc_status_bytes(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line
        .trim_start_matches(field)
        .trim_start_matches(':')
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Loads `dir` on the CPU backend with LoRA rank `rank` on every decoder linear
/// (α = 2r) and reports what it cost. Meant to be the only work of its process, so
/// that the peak RSS is the load's.
pub fn load(dir: &Path, rank: usize) -> Result<LoadInspect> {
    let file_bytes = std::fs::read_dir(dir)
        .map_err(|e| Error::Io {
            path: dir.display().to_string(),
            message: format!("{e}; point --model at a transformers LLaVA folder"),
        })?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    let mode = TrainMode::lora(rank, 2.0 * rank as f32);
    crate::mem::reset_peak();
    let t0 = std::time::Instant::now();
    let (model, report) = load_llava(&Cpu, dir, &mode, 0)?;
    let seconds = t0.elapsed().as_secs_f64();
    let peak_heap = crate::mem::tracking().then(|| crate::mem::peak_bytes() as u64);
    let peak_rss = proc_status_bytes("VmHWM");
    let mut groups = BTreeMap::new();
    for name in model.tensor_names() {
        let n: usize = model.tensor_shape(name).unwrap_or(&[]).iter().product();
        *groups.entry(group_of(name).to_string()).or_insert(0) += n as u64;
    }
    let f32_bytes = 4 * groups.values().sum::<u64>();
    Ok(LoadInspect {
        summary: report.summary(),
        groups,
        f32_bytes,
        file_bytes,
        peak_rss,
        peak_heap,
        seconds,
    })
}

/// One method's row of [`plan`].
#[derive(Clone, Debug)]
pub struct PlanRow {
    /// The method.
    pub method: Method,
    /// Peak device bytes over two training steps (the second has the optimizer
    /// state), at the CUDA pool's size classes, weights included.
    pub peak_bytes: u64,
    /// The same peak in requested bytes (no size-class rounding).
    pub requested_peak_bytes: u64,
    /// Bytes live after the steps: weights, LoRA and optimizer state.
    pub resident_bytes: u64,
}

/// What [`plan`] found.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The config's name (a preset, or `hf:DIR`).
    pub model: String,
    /// Base (frozen or trained) parameters, [`crate::model::ModelConfig::base_params`].
    pub base_params: u64,
    /// Trainable parameters, [`crate::model::ModelConfig::trainable_params`].
    pub trainable_params: u64,
    /// Bytes the built model holds on the device (f32, pool size classes).
    pub weight_bytes: u64,
    /// Examples per step.
    pub batch: usize,
    /// Text tokens per example (the synthetic task's length) and visual tokens of
    /// the full image.
    pub text_len: usize,
    /// One row per method.
    pub rows: Vec<PlanRow>,
}

/// The device memory of one training step of each of `methods` for the model
/// `spec` names, at `batch` examples per step (one micro-batch), measured by
/// running the crate's own model and step code on [`Meter`] (sizes only). The
/// batch is the synthetic task's (`bench`'s); the optimizer AdamW as `train`'s
/// default (SGD for dpzo, as in the demo).
pub fn plan(spec: &ModelSpec, batch: usize, methods: &[Method]) -> Result<Plan> {
    let (mcfg, mode) = spec.build()?;
    let meter = Meter::new();
    let mut model = Some(Mllm::new_for_load(&meter, &mcfg, &mode, 0)?);
    let weight_bytes = meter.stats().live_bytes;
    let data = bench_data(&mcfg, batch)?;
    let idx: Vec<usize> = (0..data.len()).collect();
    let defaults = mcfg.vision.default_token_select();
    let mut rows = Vec::new();
    for &method in methods {
        // bench's settings (its default update fraction), so the plan is of the
        // step `dualpriv bench` times.
        let cfg = bench_config(method, batch, 0.8, None, data.max_text_len(), defaults);
        let m = model
            .take()
            .ok_or_else(|| Error::Internal("the plan's model was not handed back".into()))?;
        let mut t = Trainer::new(&meter, m, spec.clone(), cfg, &data)?;
        meter.reset_peak();
        for _ in 0..2 {
            t.one_step(&data, &idx)?;
        }
        let s = meter.stats();
        rows.push(PlanRow {
            method,
            peak_bytes: s.peak_bytes,
            requested_peak_bytes: s.requested_peak_bytes,
            resident_bytes: s.live_bytes,
        });
        // The next method starts from the bare model, as a fresh run would.
        model = Some(t.model);
    }
    Ok(Plan {
        model: spec.preset.clone(),
        base_params: mcfg.base_params(),
        trainable_params: mcfg.trainable_params(&mode),
        weight_bytes,
        batch,
        text_len: data.max_text_len(),
        rows,
    })
}
