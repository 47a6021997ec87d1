//! `dualpriv bench` and `dualpriv bench-kernels`: step time, memory and
//! throughput of each training method on a fixed batch ([`methods`]), and
//! micro-benchmarks of each mechanism on the CPU reference or the CUDA kernels
//! ([`kernels`], also run by `cargo bench`).
//!
//! Every kernel row reports the median of several timed repetitions after a
//! warm-up, and the throughput implied by the bytes the kernel must move or the
//! flops it must do.
use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::demo::demo_train_config;
use crate::backend::dp::DpBackend;
use crate::data::synthetic::{Dataset, Split};
use crate::dp::clip::{self, LinearShape, NormMethod};
use crate::dp::noise::{NoiseKey, RngKind, StreamKey};
use crate::dp::prune::{self, Optimizer, TensorState, UpdateConfig};
use crate::model::flops::step_flops;
use crate::model::Mllm;
use crate::model::ModelConfig;
use crate::train::checkpoint::ModelSpec;
use crate::train::method::Method;
use crate::train::Trainer;
use crate::vision::tokens::{self, TokenSelectConfig, TokenShape};
use crate::{Error, Result};

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
    /// Heap allocation calls per timed step (CPU, counting allocator), the GEMM's
    /// and the pool misses' included.
    pub allocs_per_step: Option<f64>,
    /// Of [`Self::allocs_per_step`], the calls made inside GEMMs
    /// ([`crate::mem::gemm_scope`]: `matrixmultiply`'s packing buffers).
    pub gemm_allocs_per_step: Option<f64>,
    /// Buffers the CPU backend's pool had to allocate per timed step (0 in steady
    /// state; each is also one of [`Self::allocs_per_step`]).
    pub pool_misses_per_step: Option<f64>,
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
    /// Time per op (`--profile`, CPU only), largest first.
    pub profile: Option<Vec<OpProfile>>,
}

/// One op's share of a step (`dualpriv bench --profile`): its time with every
/// thread of the pool and on one thread, so that serial phases show as a speed-up
/// near 1.
#[derive(Clone, Debug, serde::Serialize)]
pub struct OpProfile {
    /// The op, or [`BETWEEN_OPS`] for the model and training code between ops.
    pub op: String,
    /// Outermost calls per step.
    pub calls_per_step: f64,
    /// Milliseconds per step with the whole pool.
    pub ms: f64,
    /// Fraction of the step's time (with the whole pool).
    pub share: f64,
    /// Milliseconds per step in a one-thread pool.
    pub ms_one_thread: f64,
}

/// [`OpProfile::op`] of the time outside every backend op.
pub const BETWEEN_OPS: &str = "(between ops)";

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
    /// Also profile `steps` more steps per method, op by op (CPU backend only).
    pub profile: bool,
    /// Go round the methods one timed step at a time, each with its own model
    /// ([`methods`]), instead of timing each method's steps in a block.
    pub interleave: bool,
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

/// Times one training step of each method on a fixed batch (`dualpriv bench`).
///
/// In turn (the default), one model is built and handed from method to method
/// (its values do not change the work), so a 7B preset is initialised once; each
/// method runs its warm-up and timed steps before the next starts. With
/// [`BenchArgs::interleave`] (host memory only: a device peak would include every
/// method's model), every method gets its own model and the timed steps go round
/// the methods one step at a time, each round starting one method later, so a slow
/// spell of a shared machine (seconds to minutes on these VMs) falls on every
/// method alike and their ratios come from one run.
pub fn methods<B: DpBackend>(backend: &B, a: &BenchArgs) -> Result<Vec<MethodBench>> {
    let spec = bench_spec(&a.preset, a.lora_rank);
    let (mcfg, mode) = spec.build()?;
    let data = bench_data(&mcfg, a.batch)?;
    let idx: Vec<usize> = (0..data.len()).collect();
    let (default_keep, default_context) = mcfg.vision.default_token_select();
    let cfg = |method| {
        bench_config(
            method,
            a.batch,
            a.keep_frac,
            a.keep_tokens,
            data.max_text_len(),
            (default_keep, default_context),
        )
    };
    let steps = a.steps.max(1);
    let mut rows = Vec::new();
    if a.interleave {
        let mut runs = Vec::with_capacity(a.methods.len());
        for &method in &a.methods {
            let m = Mllm::new(backend, &mcfg, &mode, 0)?;
            let t = Trainer::new(backend, m, spec.clone(), cfg(method), &data)?;
            runs.push((method, t, Tally::with_capacity(steps)));
        }
        // Three times the warm-up, as the first method gets in turn (allocator,
        // page cache and pools warm for all of them).
        for _ in 0..3 * a.warmup {
            for (_, t, _) in runs.iter_mut() {
                t.one_step(&data, &idx)?;
            }
        }
        // Each round starts one method later, so no method always follows the same
        // one (whose buffers have just left the caches) and pays for it every step.
        let n = runs.len();
        for round in 0..steps {
            for k in 0..n {
                let (_, t, tally) = &mut runs[(round + k) % n];
                tally.step(backend, t, &data, &idx)?;
            }
        }
        for (method, t, tally) in runs.iter_mut() {
            let mut row = tally.row(backend, *method, a, &mcfg, t.cfg.text_len);
            if a.profile {
                row.profile = Some(profile_steps(t, &data, &idx, steps)?);
            }
            rows.push(row);
        }
        return Ok(rows);
    }
    let mut model = Some(Mllm::new(backend, &mcfg, &mode, 0)?);
    for &method in &a.methods {
        let m = model.take().ok_or_else(|| {
            Error::Internal("the bench model was not handed back after a method".into())
        })?;
        let mut t = Trainer::new(backend, m, spec.clone(), cfg(method), &data)?;
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
        let mut tally = Tally::with_capacity(steps);
        for _ in 0..steps {
            tally.step(backend, &mut t, &data, &idx)?;
        }
        let mut row = tally.row(backend, method, a, &mcfg, t.cfg.text_len);
        if a.profile {
            row.profile = Some(profile_steps(&mut t, &data, &idx, steps)?);
        }
        rows.push(row);
        model = Some(t.model);
    }
    Ok(rows)
}

/// What one method's timed steps measured, step by step: each step's time, and its
/// peak and allocation counts from counters read just around it (so neither the
/// bench's own bookkeeping nor another method's step is billed to it). The peak is
/// the largest of one step above what was live when that step began: memory kept
/// from step to step shows as allocations per step, not in it.
struct Tally {
    times: Vec<f64>,
    peak: usize,
    allocs: usize,
    gemm_allocs: usize,
    misses: u64,
    device: Option<crate::backend::DeviceMemory>,
    visual_tokens: usize,
}

impl Tally {
    /// Room for `steps` times: the list is the bench's, allocated before any step.
    fn with_capacity(steps: usize) -> Self {
        Self {
            times: Vec::with_capacity(steps),
            peak: 0,
            allocs: 0,
            gemm_allocs: 0,
            misses: 0,
            device: None,
            visual_tokens: 0,
        }
    }

    /// Runs and measures one step of `t`.
    fn step<B: DpBackend>(
        &mut self,
        backend: &B,
        t: &mut Trainer<'_, B>,
        data: &Dataset,
        idx: &[usize],
    ) -> Result<()> {
        crate::mem::reset_peak();
        backend.reset_device_peak();
        let base = crate::mem::current_bytes();
        let calls = crate::mem::allocation_calls();
        let gemm_calls = crate::mem::gemm_allocation_calls();
        let misses = crate::backend::cpu::pool_stats().allocations;
        let mut vis = 0;
        let t0 = Instant::now();
        let dev = backend.device_time_ms(&mut || {
            vis = t.one_step(data, idx)?.visual_tokens;
            Ok(())
        })?;
        let ms = dev.unwrap_or_else(|| t0.elapsed().as_secs_f64() * 1e3);
        self.allocs += crate::mem::allocation_calls() - calls;
        self.gemm_allocs += crate::mem::gemm_allocation_calls() - gemm_calls;
        self.misses += crate::backend::cpu::pool_stats().allocations - misses;
        self.peak = self.peak.max(crate::mem::peak_bytes().saturating_sub(base));
        if let Some(d) = backend.device_memory() {
            let peak = self.device.map_or(0, |p| p.peak_bytes).max(d.peak_bytes);
            self.device = Some(crate::backend::DeviceMemory {
                peak_bytes: peak,
                used_bytes: d.used_bytes,
            });
        }
        self.times.push(ms);
        self.visual_tokens = vis;
        Ok(())
    }

    /// The method's row (median time; no profile).
    fn row<B: DpBackend>(
        &mut self,
        backend: &B,
        method: Method,
        a: &BenchArgs,
        mcfg: &ModelConfig,
        text_len: usize,
    ) -> MethodBench {
        let steps = self.times.len().max(1) as f64;
        let host = self.device.is_none() && crate::mem::tracking();
        self.times.sort_by(f64::total_cmp);
        let median_ms = self
            .times
            .get(self.times.len() / 2)
            .copied()
            .unwrap_or(f64::NAN);
        let vis = self.visual_tokens;
        let tokens = (a.batch * (vis + text_len)) as f64;
        let flops = step_flops(mcfg, method, a.batch, vis, text_len);
        let peak = backend
            .device_name()
            .and_then(|n| peak_tflops(&n, backend.tf32_gemms()));
        MethodBench {
            method: method.to_string(),
            median_ms,
            peak_bytes: host.then_some(self.peak),
            allocs_per_step: host.then(|| self.allocs as f64 / steps),
            gemm_allocs_per_step: host.then(|| self.gemm_allocs as f64 / steps),
            pool_misses_per_step: (backend.name() == "cpu").then(|| self.misses as f64 / steps),
            device_peak_bytes: self.device.map(|m| m.peak_bytes),
            device_used_bytes: self.device.map(|m| m.used_bytes),
            tokens_per_s: tokens / (median_ms / 1e3),
            visual_tokens: vis,
            step_flops: flops,
            peak_fraction: peak.map(|p| flops / (median_ms / 1e3) / (p * 1e12)),
            profile: None,
        }
    }
}

/// One timed op of [`op_rows`].
type OpFn<'a> = Box<dyn FnMut() -> Result<()> + Send + 'a>;

/// The model's row and elementwise ops through the CPU backend, on the tiny
/// preset's B = 32 shapes (992 decoder rows of 128, MLP 352; 544 vision rows of
/// 64), run as a training step runs them ([`crate::backend::cpu::hot::run_hot`]).
fn op_rows(r: &mut ChaCha8Rng, rows: &mut Vec<KernelBench>) -> Result<()> {
    use crate::backend::cpu::{hot::run_hot, Cpu};
    use crate::backend::{AttnShape, Backend, RopeShape, RowShape};
    let be = Cpu;
    let (n, d, f) = (992, 128, 352);
    let up = |r: &mut ChaCha8Rng, len: usize| be.upload(&random(r, len));
    let (x, w, g, u) = (up(r, n * d)?, up(r, d)?, up(r, n * f)?, up(r, n * f)?);
    let (mut o, mut rs, mut h) = (be.zeros(n * d)?, be.zeros(n)?, be.zeros(n * f)?);
    let (mut dx, mut dw, mut dg, mut du) = (
        be.zeros(n * d)?,
        be.zeros(d)?,
        be.zeros(n * f)?,
        be.zeros(n * f)?,
    );
    let rsh = RowShape { rows: n, dim: d };
    let att = AttnShape {
        b: 32,
        t: 31,
        hq: 4,
        hkv: 2,
        hd: 32,
        causal: true,
    };
    let (q, k, v) = (
        up(r, att.q_len())?,
        up(r, att.kv_len())?,
        up(r, att.kv_len())?,
    );
    let (mut ao, mut p) = (be.zeros(att.q_len())?, be.zeros(att.probs_len())?);
    let (mut dq, mut dk, mut dv) = (
        be.zeros(att.q_len())?,
        be.zeros(att.kv_len())?,
        be.zeros(att.kv_len())?,
    );
    // The backwards read the forwards' statistics and probabilities.
    let (mut rs0, mut p0) = (be.zeros(n)?, be.zeros(att.probs_len())?);
    be.rmsnorm_fwd(&mut o, &mut rs0, &x, &w, rsh, 1e-5)?;
    be.attention_fwd(&mut ao, &mut p0, &q, &k, &v, att)?;
    let (rs0, p0) = (rs0, p0);
    let mut rq = up(r, att.q_len())?;
    let (vn, vd) = (544, 64);
    let (vx, vw, vb) = (up(r, vn * vd)?, up(r, vd)?, up(r, vd)?);
    let (mut vo, mut vm, mut vr) = (be.zeros(vn * vd)?, be.zeros(vn)?, be.zeros(vn)?);
    let (vg, mut vgo) = (up(r, vn * 4 * vd)?, be.zeros(vn * 4 * vd)?);
    let bytes = |v: usize| (v * 4) as f64;
    // (name, shape, bytes moved, the op)
    let mut ops: Vec<(&str, String, f64, OpFn<'_>)> = vec![
        (
            "rmsnorm_fwd",
            format!("{n}×{d}"),
            bytes(2 * n * d),
            Box::new(|| be.rmsnorm_fwd(&mut o, &mut rs, &x, &w, rsh, 1e-5)),
        ),
        (
            "rmsnorm_bwd",
            format!("{n}×{d}"),
            bytes(3 * n * d),
            Box::new(|| be.rmsnorm_bwd(&mut dx, &mut dw, &x, &x, &w, &rs0, rsh)),
        ),
        (
            "layernorm_fwd",
            format!("{vn}×{vd}"),
            bytes(2 * vn * vd),
            Box::new(|| {
                be.layernorm_fwd(
                    &mut vo,
                    &mut vm,
                    &mut vr,
                    &vx,
                    &vw,
                    &vb,
                    RowShape { rows: vn, dim: vd },
                    1e-5,
                )
            }),
        ),
        (
            "swiglu_fwd",
            format!("{n}×{f}"),
            bytes(3 * n * f),
            Box::new(|| be.swiglu_fwd(&mut h, &g, &u)),
        ),
        (
            "swiglu_bwd",
            format!("{n}×{f}"),
            bytes(5 * n * f),
            Box::new(|| be.swiglu_bwd(&mut dg, &mut du, &g, &g, &u)),
        ),
        (
            "quick_gelu_fwd",
            format!("{vn}×{}", 4 * vd),
            bytes(2 * vn * 4 * vd),
            Box::new(|| be.quick_gelu_fwd(&mut vgo, &vg)),
        ),
        (
            "rope_fwd",
            format!("32×31×{d}"),
            bytes(2 * att.q_len()),
            Box::new(|| {
                be.rope_fwd(
                    &mut rq,
                    RopeShape {
                        b: 32,
                        t: 31,
                        heads: 4,
                        hd: 32,
                        theta: 10000.0,
                    },
                )
            }),
        ),
        (
            "attention_fwd",
            "b 32, t 31, 4/2 heads of 32".into(),
            bytes(att.q_len() * 2 + att.kv_len() * 2 + att.probs_len()),
            Box::new(|| be.attention_fwd(&mut ao, &mut p, &q, &k, &v, att)),
        ),
        (
            "attention_bwd",
            "b 32, t 31, 4/2 heads of 32".into(),
            bytes(att.q_len() * 4 + att.kv_len() * 4 + att.probs_len()),
            Box::new(|| be.attention_bwd(&mut dq, &mut dk, &mut dv, &q, &q, &k, &v, &p0, att)),
        ),
    ];
    for (name, shape, moved, op) in ops.iter_mut() {
        let ms = run_hot(|| {
            time_cpu(5, || {
                (0..20).try_for_each(|_| op())?;
                Ok(())
            })
        })? / 20.0;
        rows.push(KernelBench {
            name: format!("op {name} (tiny B=32)"),
            shape: shape.clone(),
            median_ms: ms,
            throughput: (*moved / ms / 1e6, "GB/s"),
        });
    }
    Ok(())
}

/// The ghost methods' per-example row ops on one LoRA factor of the tiny preset at
/// B = 128 (q_proj's A: 8×128 values per example), and its noise + AdamW update
/// (all kept), through the CPU backend as a streaming step runs them: one tensor
/// at a time, under [`crate::backend::cpu::hot::run_hot`].
fn lora_rows(r: &mut ChaCha8Rng, rows: &mut Vec<KernelBench>) -> Result<()> {
    use crate::backend::cpu::{hot::run_hot, Cpu};
    use crate::backend::Backend;
    let be = Cpu;
    let (b, cols) = (128, 8 * 128);
    let per = be.upload(&random(r, b * cols))?;
    let factors = be.upload(&random(r, b).iter().map(|v| v.abs()).collect::<Vec<_>>())?;
    let mut norms = be.norms_zeros(b, b)?;
    let mut out = be.zeros(cols)?;
    let grad = random(r, cols);
    let (mut p, mut m, mut v) = (vec![0.0f32; cols], vec![0.0f32; cols], vec![0.0f32; cols]);
    let cfg = prune_config(1.0, RngKind::Chacha20);
    let shape = format!("B={b} × {cols}");
    let bytes = (b * cols * 4) as f64;
    // q_proj's LoRA factors at T = 31: A (8×128) from X and its gradient G·B, B
    // (128×8) from U = X·Aᵀ and dY.
    let t = 31;
    let sa = LinearShape { b, t, d: 128, p: 8 };
    let sb = LinearShape { b, t, d: 8, p: 128 };
    let (xa, ga) = (
        be.upload(&random(r, b * t * 128))?,
        be.upload(&random(r, b * t * 8))?,
    );
    let flops = |s: LinearShape| 2.0 * (s.b * s.t * s.d * s.p) as f64;
    let mut ops: Vec<(&str, f64, &'static str, OpFn<'_>)> = vec![
        (
            "per_example_weight_grads, LoRA A",
            flops(sa),
            "GFLOP/s",
            Box::new(|| be.per_example_weight_grads(&xa, &ga, sa).map(drop)),
        ),
        (
            "per_example_weight_grads, LoRA B",
            flops(sb),
            "GFLOP/s",
            Box::new(|| be.per_example_weight_grads(&ga, &xa, sb).map(drop)),
        ),
        (
            "add_row_sq_norms",
            bytes,
            "GB/s",
            Box::new(|| be.add_row_sq_norms(&per, b, &mut norms)),
        ),
        (
            "weighted_row_sum",
            bytes,
            "GB/s",
            Box::new(|| be.weighted_row_sum(&per, &factors, b, &mut out, false)),
        ),
        (
            "noise + AdamW, all kept",
            cols as f64 * 1e3,
            "Mcoord/s",
            Box::new(|| update_once(&grad, &mut p, &mut m, &mut v, &cfg)),
        ),
    ];
    for (name, moved, unit, op) in ops.iter_mut() {
        let ms = run_hot(|| {
            time_cpu(5, || {
                (0..100).try_for_each(|_| op())?;
                Ok(())
            })
        })? / 100.0;
        let shape = match *unit {
            "GB/s" => shape.clone(),
            "GFLOP/s" => format!("B={b} T={t}"),
            _ => format!("N={cols}"),
        };
        rows.push(KernelBench {
            name: format!("{name} (tiny B=128 LoRA factor)"),
            shape,
            median_ms: ms,
            throughput: (*moved / ms / 1e6, unit),
        });
    }
    Ok(())
}

/// Profiles `steps` steps op by op, with the whole rayon pool and then in a
/// one-thread pool (the same ops, so a serial op has a speed-up near 1).
fn profile_steps<B: DpBackend>(
    t: &mut Trainer<'_, B>,
    data: &Dataset,
    idx: &[usize],
    steps: usize,
) -> Result<Vec<OpProfile>> {
    let run = |t: &mut Trainer<'_, B>| -> Result<(f64, Vec<crate::backend::profile::OpTime>)> {
        t.one_step(data, idx)?;
        crate::backend::profile::start();
        let t0 = Instant::now();
        let res = (0..steps).try_for_each(|_| t.one_step(data, idx).map(|_| ()));
        let total = t0.elapsed().as_secs_f64();
        let ops = crate::backend::profile::stop();
        res.map(|()| (total, ops))
    };
    let (total, ops) = run(t)?;
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .map_err(|e| Error::Internal(format!("a one-thread pool for --profile: {e}")))?;
    let (total1, ops1) = one.install(|| run(t))?;
    let per = |s: f64| 1e3 * s / steps as f64;
    let in_ops = |o: &[crate::backend::profile::OpTime]| o.iter().map(|o| o.seconds).sum::<f64>();
    let mut rows: Vec<OpProfile> = ops
        .iter()
        .map(|o| OpProfile {
            op: o.name.to_string(),
            calls_per_step: o.calls as f64 / steps as f64,
            ms: per(o.seconds),
            share: o.seconds / total,
            ms_one_thread: per(ops1
                .iter()
                .find(|p| p.name == o.name)
                .map_or(0.0, |p| p.seconds)),
        })
        .collect();
    let between = (total - in_ops(&ops)).max(0.0);
    rows.push(OpProfile {
        op: BETWEEN_OPS.into(),
        calls_per_step: 0.0,
        ms: per(between),
        share: between / total,
        ms_one_thread: per((total1 - in_ops(&ops1)).max(0.0)),
    });
    rows.sort_by(|a, b| b.ms.total_cmp(&a.ms));
    Ok(rows)
}

/// Noise multiplier σ of every private method in `dualpriv bench`: a fixed σ, not
/// one calibrated for an ε (the step's work does not depend on σ).
pub const BENCH_SIGMA: f64 = 1.0;

/// The bench's model spec: `preset` with LoRA rank `r`, α = 2r, nothing in full.
pub fn bench_spec(preset: &str, r: usize) -> ModelSpec {
    ModelSpec {
        preset: preset.to_string(),
        lora_rank: Some(r),
        lora_alpha: 2.0 * r as f32,
        full_groups: vec![],
    }
}

/// The bench's fixed batch: `batch` examples of the built-in task's private split.
pub(crate) fn bench_data(mcfg: &ModelConfig, batch: usize) -> Result<Dataset> {
    Dataset::generate(Split::Private, batch.max(1), 1, mcfg.vision.image_size)
}

/// The training config `dualpriv bench` (and `inspect --plan`) runs `method` with:
/// the demo's optimizer and clipping, one micro-batch of `batch`, σ =
/// [`BENCH_SIGMA`], update fraction `keep_frac`, and for `dualpriv` token
/// selection with `keep_tokens` (default `keep`) and `context` visual tokens.
pub(crate) fn bench_config(
    method: Method,
    batch: usize,
    keep_frac: f64,
    keep_tokens: Option<usize>,
    text_len: usize,
    (keep, context): (usize, usize),
) -> crate::train::TrainConfig {
    let mut cfg = demo_train_config(method, 3.0, 1e-5, text_len);
    cfg.batch = batch;
    cfg.micro_batch = batch;
    cfg.noise_multiplier = method.is_private().then_some(BENCH_SIGMA);
    cfg.epsilon = None;
    cfg.keep_frac = keep_frac;
    if method == Method::Dualpriv {
        cfg.keep_tokens = Some(keep_tokens.unwrap_or(keep));
        cfg.context_tokens = context;
    } else {
        cfg.keep_tokens = None;
        cfg.context_tokens = 0;
    }
    cfg
}

/// The vision tower as `dualpriv bench --describe` prints it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct VisionDescription {
    /// Square RGB image side, pixels.
    pub image_size: usize,
    /// Patch side, pixels.
    pub patch_size: usize,
    /// Patches per image.
    pub patches: usize,
    /// Values per flattened patch, 3·p·p.
    pub patch_dim: usize,
    /// Whether the patch linear has a bias.
    pub patch_bias: bool,
    /// Tokens per image: CLS + patches, each with a learned position embedding.
    pub tokens: usize,
    /// Hidden size.
    pub hidden: usize,
    /// Layers of the full tower.
    pub layers: usize,
    /// Layers run and allocated: features are layer −2's output.
    pub layers_run: usize,
    /// Attention heads (non-causal, q/k/v/out with biases).
    pub heads: usize,
    /// MLP inner size (fc1 → quick_gelu → fc2, with biases).
    pub mlp: usize,
    /// LayerNorm epsilon (pre_layrnorm, and pre-norm layers).
    pub ln_eps: f32,
    /// Tokens passed on without token selection: "patch" (N − 1) or "cls_patch" (N).
    pub feature: &'static str,
}

/// The decoder as `dualpriv bench --describe` prints it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LlmDescription {
    /// Hidden size.
    pub hidden: usize,
    /// Decoder layers (RMSNorm, RoPE rotate-half, causal GQA, SwiGLU; no biases).
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// SwiGLU inner size.
    pub mlp: usize,
    /// Vocabulary (embedding and an untied lm_head).
    pub vocab: usize,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// RoPE base.
    pub rope_theta: f32,
}

/// One LoRA-adapted linear of every decoder layer.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LinearDescription {
    /// HF module name.
    pub module: &'static str,
    /// Input size.
    pub d_in: usize,
    /// Output size.
    pub d_out: usize,
}

/// One method's settings as `dualpriv bench` runs it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MethodDescription {
    /// The method.
    pub method: String,
    /// Visual tokens per example reaching the projector and the decoder.
    pub visual_tokens: usize,
    /// Sequence length of the decoder, visual + text.
    pub seq_len: usize,
    /// Optimizer family ("adamw" or "sgd").
    pub optimizer: String,
    /// Learning rate.
    pub lr: f32,
    /// AdamW β1, β2 and ε (ignored by SGD).
    pub betas_eps: [f32; 3],
    /// Weight decay (decoupled for AdamW).
    pub weight_decay: f32,
    /// Per-example clipping norm C (`dpzo`: the clip of the scalar difference);
    /// `None` for `nonprivate`.
    pub clip_norm: Option<f32>,
    /// Noise multiplier σ; the noise on the clipped sum is N(0, σ²C²).
    pub noise_multiplier: Option<f64>,
    /// How per-example norms are formed, or "none".
    pub norms: &'static str,
    /// Backward passes per step.
    pub backward_passes: usize,
    /// Forward passes per step.
    pub forward_passes: usize,
    /// Fraction of coordinates updated (`dualpriv`'s update pruning; 1 otherwise).
    pub keep_frac: f64,
    /// DPZO's perturbation scale λ (θ ± λz).
    pub dpzo_lambda: Option<f32>,
}

/// What a peer needs to build the model and step `dualpriv bench` runs
/// (`dualpriv bench --describe`). Everything here is public: sizes and settings.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchDescription {
    /// Model preset.
    pub preset: String,
    /// Examples per step (one fixed batch, one micro-batch, no sampling).
    pub batch: usize,
    /// Warm-up steps before timing (the first method of a run warms 3× as long).
    pub warmup: usize,
    /// Timed steps; the row reports their median.
    pub steps: usize,
    /// The vision tower (frozen, forward only).
    pub vision: VisionDescription,
    /// The projector: Linear(vision.hidden → llm.hidden) → act → Linear(llm.hidden →
    /// llm.hidden), frozen.
    pub projector_act: &'static str,
    /// Whether both projector linears have biases.
    pub projector_bias: bool,
    /// The decoder (frozen apart from LoRA).
    pub llm: LlmDescription,
    /// LoRA rank r.
    pub lora_rank: usize,
    /// LoRA alpha; the adapter's output is scaled by alpha / r.
    pub lora_alpha: f32,
    /// The adapted linears of every decoder layer, h = W x + (alpha/r)·B(A x), A r×d
    /// Kaiming-uniform (bound 1/√d), B zeros.
    pub lora_targets: Vec<LinearDescription>,
    /// Trainable values (LoRA A and B of every target of every layer).
    pub trainable_params: u64,
    /// Frozen values (everything allocated except LoRA).
    pub frozen_params: u64,
    /// Text tokens per example (the built-in data padded to its longest example).
    pub text_len: usize,
    /// Visual tokens without token selection.
    pub visual_tokens: usize,
    /// How the loss is formed.
    pub loss: &'static str,
    /// One entry per method of the run.
    pub methods: Vec<MethodDescription>,
}

/// The model and step settings `dualpriv bench` would time with `a`, without
/// building the model (`dualpriv bench --describe`).
pub fn describe(a: &BenchArgs) -> Result<BenchDescription> {
    let spec = bench_spec(&a.preset, a.lora_rank);
    let (mcfg, mode) = spec.build()?;
    // The same data as `methods`: only its padded text length matters here.
    let data = bench_data(&mcfg, a.batch)?;
    let text_len = data.max_text_len();
    let v = &mcfg.vision;
    let l = &mcfg.llm;
    let plain_tokens = match v.feature {
        crate::model::VisionFeature::Patch => v.patches(),
        crate::model::VisionFeature::ClsPatch => v.tokens(),
    };
    let defaults = v.default_token_select();
    let mut methods = Vec::new();
    for &m in &a.methods {
        let cfg = bench_config(m, a.batch, a.keep_frac, a.keep_tokens, text_len, defaults);
        cfg.validate()?;
        let vis = cfg
            .keep_tokens
            .map_or(plain_tokens, |k| 1 + k + cfg.context_tokens);
        let private = m.is_private();
        methods.push(MethodDescription {
            method: m.to_string(),
            visual_tokens: vis,
            seq_len: vis + text_len,
            optimizer: match cfg.opt.kind {
                crate::train::optim::OptKind::Adamw => "adamw".into(),
                crate::train::optim::OptKind::Sgd => "sgd".into(),
            },
            lr: cfg.opt.lr,
            betas_eps: [cfg.opt.beta1, cfg.opt.beta2, cfg.opt.eps],
            weight_decay: cfg.opt.weight_decay,
            clip_norm: private.then_some(cfg.clip_norm),
            noise_multiplier: cfg.noise_multiplier,
            norms: match m {
                Method::Nonprivate | Method::Dpzo => "none",
                Method::Dpsgd => "materialised per-example gradients",
                Method::Ghost | Method::Dualpriv => {
                    "per layer: ghost <XX^T, GG^T> when 2T^2 < p*d, else instantiated; \
                     book-keeping clipped sum, one GEMM per layer"
                }
            },
            backward_passes: usize::from(m != Method::Dpzo),
            forward_passes: if m == Method::Dpzo { 2 } else { 1 },
            keep_frac: if m == Method::Dualpriv {
                cfg.keep_frac
            } else {
                1.0
            },
            dpzo_lambda: (m == Method::Dpzo).then_some(cfg.dpzo_lambda),
        });
    }
    let (rank, alpha) = match &mode {
        crate::model::TrainMode::Lora { rank, alpha, .. } => (*rank, *alpha),
        crate::model::TrainMode::Full { .. } => (0, 0.0),
    };
    Ok(BenchDescription {
        preset: a.preset.clone(),
        batch: a.batch,
        warmup: a.warmup,
        steps: a.steps.max(1),
        vision: VisionDescription {
            image_size: v.image_size,
            patch_size: v.patch_size,
            patches: v.patches(),
            patch_dim: v.patch_dim(),
            patch_bias: v.patch_bias,
            tokens: v.tokens(),
            hidden: v.hidden,
            layers: v.layers,
            layers_run: v.layers_run(),
            heads: v.heads,
            mlp: v.mlp,
            ln_eps: v.ln_eps,
            feature: match v.feature {
                crate::model::VisionFeature::Patch => "patch",
                crate::model::VisionFeature::ClsPatch => "cls_patch",
            },
        },
        projector_act: match mcfg.projector.act {
            crate::model::ProjectorAct::Gelu => "gelu",
            crate::model::ProjectorAct::GeluTanh => "gelu_tanh",
        },
        projector_bias: mcfg.projector.bias,
        llm: LlmDescription {
            hidden: l.hidden,
            layers: l.layers,
            heads: l.heads,
            kv_heads: l.kv_heads,
            head_dim: l.head_dim(),
            mlp: l.mlp,
            vocab: l.vocab,
            rms_eps: l.rms_eps,
            rope_theta: l.rope_theta,
        },
        lora_rank: rank,
        lora_alpha: alpha,
        lora_targets: crate::model::LoraTarget::ALL
            .iter()
            .map(|&t| {
                let (d_in, d_out) = l.linear_dims(t);
                LinearDescription {
                    module: t.module(),
                    d_in,
                    d_out,
                }
            })
            .collect(),
        trainable_params: mcfg.trainable_params(&mode),
        frozen_params: mcfg.base_params(),
        text_len,
        visual_tokens: plain_tokens,
        loss: "sequence [visual, text], positions 0..seq_len; logits of the text_len text \
               rows; per example the mean cross-entropy over its answer positions (one on \
               the built-in data); the step differentiates the sum over examples and \
               divides the (clipped, noised) sum by the batch",
        methods,
    })
}

/// One kernel micro-benchmark result.
#[derive(Clone, Debug)]
pub struct KernelBench {
    /// What was measured.
    pub name: String,
    /// Problem size, human readable.
    pub shape: String,
    /// Median time per call, milliseconds.
    pub median_ms: f64,
    /// Throughput: value and unit ("GB/s", "GFLOP/s", ...).
    pub throughput: (f64, &'static str),
}

/// Where to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// The CPU reference implementations.
    Cpu,
    /// The CUDA kernels (needs the `cuda` feature and a GPU).
    Cuda,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Times `f` `reps` times after one warm-up call; returns the median in ms.
fn time_cpu(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(t))
}

fn random(r: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| r.random_range(-1.0f32..1.0)).collect()
}

/// Problem sizes: small on the CPU (2 cores must finish in seconds), LLaVA-7B scale
/// on the GPU.
struct Sizes {
    clip: LinearShape,
    coords: usize,
    token_batch: usize,
}

fn sizes(dev: Device) -> Sizes {
    match dev {
        Device::Cpu => Sizes {
            clip: LinearShape {
                b: 4,
                t: 128,
                d: 512,
                p: 512,
            },
            coords: 1 << 20,
            token_batch: 2,
        },
        // q_proj of llava-7b at batch 4 with 576 visual + 99 text tokens; 320M LoRA
        // coordinates (r = 128 on all Vicuna-7B linears).
        Device::Cuda => Sizes {
            clip: LinearShape {
                b: 4,
                t: 675,
                d: 4096,
                p: 4096,
            },
            coords: 319_815_680,
            token_batch: 16,
        },
    }
}

fn norm_flops(s: LinearShape, m: NormMethod) -> f64 {
    let (b, t, d, p) = (s.b as f64, s.t as f64, s.d as f64, s.p as f64);
    match m {
        NormMethod::Ghost => b * t * t * (d + p), // two Gram halves (symmetric)
        NormMethod::Instantiated => 2.0 * b * t * d * p,
    }
}

/// The noise + top-k + AdamW step both devices time (σC = 1, B = 64).
fn prune_config(keep_frac: f64, rng: RngKind) -> UpdateConfig {
    UpdateConfig {
        keep_frac,
        noise_std: 1.0,
        noise: StreamKey::from_insecure_seed(rng, 3),
        step: 1,
        inv_batch: 1.0 / 64.0,
        opt: Optimizer::AdamW {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            t: 1,
        },
    }
}

/// One noise + top-k + optimizer update of a single tensor (the CPU reference).
fn update_once(
    grad: &[f32],
    param: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    cfg: &UpdateConfig,
) -> Result<()> {
    let mut t = [TensorState {
        tensor_id: 0,
        grad,
        param,
        m,
        v,
    }];
    prune::noise_prune_update(&mut t, cfg).map(|_| ())
}

/// Runs every kernel micro-benchmark on `dev` (`dualpriv bench-kernels`, `cargo bench`).
pub fn kernels(dev: Device) -> Result<Vec<KernelBench>> {
    match dev {
        Device::Cpu => run_cpu(),
        Device::Cuda => run_cuda(),
    }
}

fn llava_tokens(batch: usize) -> (TokenShape, TokenSelectConfig) {
    (
        TokenShape {
            batch,
            tokens: 577,
            heads: 16,
            head_dim: 64,
            hidden: 1024,
        },
        TokenSelectConfig {
            keep: 53,
            context: 10,
            fuse_noise_std: 0.0,
            noise: StreamKey::from_insecure_seed(RngKind::Chacha20, 0),
        },
    )
}

fn rng_label(rng: RngKind) -> &'static str {
    match rng {
        RngKind::Chacha20 => "ChaCha20",
        RngKind::Philox => "Philox",
    }
}

fn shape_str(s: LinearShape) -> String {
    format!("B={} T={} d={} p={}", s.b, s.t, s.d, s.p)
}

fn run_cpu() -> Result<Vec<KernelBench>> {
    let sz = sizes(Device::Cpu);
    let mut r = ChaCha8Rng::seed_from_u64(0);
    let s = sz.clip;
    let x = random(&mut r, s.b * s.t * s.d);
    let g = random(&mut r, s.b * s.t * s.p);
    let mut rows = Vec::new();
    for m in [NormMethod::Ghost, NormMethod::Instantiated] {
        let ms = time_cpu(3, || clip::layer_sq_norms(&x, &g, s, m, false).map(|_| ()))?;
        rows.push(KernelBench {
            name: format!("per-example norms ({m:?}, f64)"),
            shape: shape_str(s),
            median_ms: ms,
            throughput: (norm_flops(s, m) / ms / 1e6, "GFLOP/s"),
        });
    }
    let c = vec![0.5f32; s.b];
    let mut out = vec![0.0f32; s.p * s.d];
    let ms = time_cpu(3, || clip::clipped_weight_sum(&x, &g, &c, s, &mut out))?;
    rows.push(KernelBench {
        name: "BK clipped sum (f64)".into(),
        shape: shape_str(s),
        median_ms: ms,
        throughput: (2.0 * (s.b * s.t * s.d * s.p) as f64 / ms / 1e6, "GFLOP/s"),
    });
    let n = sz.coords;
    let grad = random(&mut r, n);
    for rng in [RngKind::Chacha20, RngKind::Philox] {
        let key = NoiseKey {
            stream: StreamKey::from_insecure_seed(rng, 1),
            tensor_id: 0,
            step: 0,
        };
        let mut z = vec![0.0f64; n];
        let ms = time_cpu(5, || {
            key.fill(0, &mut z);
            Ok(())
        })?;
        rows.push(KernelBench {
            name: format!("{} noise (f64 normals)", rng_label(rng)),
            shape: format!("N={n}"),
            median_ms: ms,
            throughput: (n as f64 / ms / 1e3, "Mnormal/s"),
        });
        let mut y = vec![0.0f32; n];
        let ms = time_cpu(5, || {
            key.add_scaled(0, 1.0, &mut y);
            Ok(())
        })?;
        rows.push(KernelBench {
            name: format!("{} noise axpy (f32 += f64 noise)", rng_label(rng)),
            shape: format!("N={n}"),
            median_ms: ms,
            throughput: (n as f64 / ms / 1e3, "Mnormal/s"),
        });
    }
    for rng in [RngKind::Chacha20, RngKind::Philox] {
        let (mut p, mut m, mut v) = (vec![0.0f32; n], vec![0.0f32; n], vec![0.0f32; n]);
        let cfg = prune_config(0.8, rng);
        let ms = time_cpu(3, || update_once(&grad, &mut p, &mut m, &mut v, &cfg))?;
        rows.push(KernelBench {
            name: format!("noise + top-k + AdamW ({})", rng_label(rng)),
            shape: format!("N={n} keep=0.8"),
            median_ms: ms,
            throughput: (n as f64 / ms / 1e3, "Mcoord/s"),
        });
    }
    gemm_rows(&mut r, &mut rows)?;
    op_rows(&mut r, &mut rows)?;
    lora_rows(&mut r, &mut rows)?;
    let (ts, tc) = llava_tokens(sz.token_batch);
    let attn = random(&mut r, ts.attn_len()?)
        .iter()
        .map(|x| x.abs())
        .collect::<Vec<_>>();
    let keys = random(&mut r, ts.keys_len()?);
    let hidden = random(&mut r, ts.hidden_len()?);
    let ms = time_cpu(3, || {
        tokens::select_tokens(&attn, &keys, &hidden, &ts, &tc).map(|_| ())
    })?;
    rows.push(KernelBench {
        name: "token selection (K=53, M=10)".into(),
        shape: format!("B={} N=577 D=1024", ts.batch),
        median_ms: ms,
        throughput: (ts.batch as f64 / ms * 1e3, "images/s"),
    });
    Ok(rows)
}

/// The f32 GEMM on the step's real shapes: the crate's path
/// ([`crate::linalg::gemm_f32`], AVX-512 where the CPU has it) against
/// `matrixmultiply`, on the rayon pool the step runs on. `X·Wᵀ` is a linear
/// layer's forward (W stored d_out × d_in), `dY·W` its input gradient; the LoRA
/// rows are rank 8; `Q·Kᵀ` is one head of one example (run whole on one thread, as
/// attention runs it inside a job per (example, head)).
fn gemm_rows(r: &mut ChaCha8Rng, rows: &mut Vec<KernelBench>) -> Result<()> {
    use crate::linalg::{gemm_f32, gemm_f32_matrixmultiply, View};
    type Gemm = fn(f32, View<'_, f32>, View<'_, f32>, f32, &mut [f32], usize);
    // (label, M, K, N, A stored transposed, B stored transposed): tiny B = 128 (31
    // tokens), small B = 8 (78 tokens); the LoRA weight gradients Gᵀ·X at B = 32.
    let shapes = [
        ("X·Wᵀ tiny q_proj", 3968, 128, 128, false, true),
        ("dY·W tiny q_proj", 3968, 128, 128, false, false),
        ("X·Wᵀ tiny gate_proj", 3968, 128, 352, false, true),
        ("X·Wᵀ tiny q_proj B=32", 992, 128, 128, false, true),
        ("dY·W tiny down_proj B=32", 992, 128, 352, false, false),
        ("X·Wᵀ tiny vision fc1 B=32", 544, 64, 256, false, true),
        ("X·Aᵀ tiny LoRA A", 3968, 128, 8, false, true),
        ("U·Bᵀ tiny LoRA B", 3968, 8, 128, false, true),
        ("Gᵀ·X tiny LoRA A grad B=32", 8, 992, 128, true, false),
        ("Gᵀ·U tiny LoRA B grad B=32", 128, 992, 8, true, false),
        ("Q·Kᵀ tiny head", 31, 32, 31, false, true),
        ("X·Wᵀ small gate_proj", 624, 512, 1408, false, true),
        ("dY·W small down_proj", 624, 512, 1408, false, false),
    ];
    let paths: [(&str, Gemm); 2] = [
        ("crate", gemm_f32),
        ("matrixmultiply", gemm_f32_matrixmultiply),
    ];
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .map_err(|e| Error::Internal(format!("a one-thread pool: {e}")))?;
    // The first AVX-512-heavy milliseconds run slower (clock ramp): warm up on the
    // first shape before any row is timed.
    {
        let (_, m, k, n, ..) = shapes[0];
        let (a, b) = (random(r, m * k), random(r, k * n));
        let mut c = vec![0.0f32; m * n];
        let t0 = Instant::now();
        while t0.elapsed().as_millis() < 200 {
            gemm_f32(
                1.0,
                View::row_major(&a, m, k),
                View::row_major(&b, n, k).t(),
                0.0,
                &mut c,
                n,
            );
        }
    }
    for (label, m, k, n, at, bt) in shapes {
        let a = random(r, m * k);
        let b = random(r, k * n);
        for (path, gemm) in paths {
            let mut c = vec![0.0f32; m * n];
            let mut run = || {
                let bv = if bt {
                    View::row_major(&b, n, k).t()
                } else {
                    View::row_major(&b, k, n)
                };
                let av = if at {
                    View::row_major(&a, k, m).t()
                } else {
                    View::row_major(&a, m, k)
                };
                gemm(1.0, av, bv, 0.0, &mut c, n);
                Ok(())
            };
            let ms = if m * n * k < 1 << 20 {
                // Too short to time one at a time: 1000 per sample, on one thread.
                one.install(|| {
                    time_cpu(5, || {
                        (0..1000).try_for_each(|_| run())?;
                        Ok(())
                    })
                })? / 1000.0
            } else {
                time_cpu(5, run)?
            };
            rows.push(KernelBench {
                name: format!("GEMM {label} ({path})"),
                shape: format!("M={m} K={k} N={n}"),
                median_ms: ms,
                throughput: (2.0 * (m * n * k) as f64 / ms / 1e6, "GFLOP/s"),
            });
        }
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn run_cuda() -> Result<Vec<KernelBench>> {
    Err(Error::Config(
        "this binary was built without CUDA; rebuild with `--features cuda` (see README)".into(),
    ))
}

#[cfg(feature = "cuda")]
fn run_cuda() -> Result<Vec<KernelBench>> {
    use crate::gpu::{self, Gpu};
    let gpu = Gpu::new()?;
    let time = |reps: usize, f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        f()?;
        let mut t = Vec::with_capacity(reps);
        for _ in 0..reps {
            t.push(gpu.time_ms(&mut *f)? as f64);
        }
        Ok(median(t))
    };
    let sz = sizes(Device::Cuda);
    let mut r = ChaCha8Rng::seed_from_u64(0);
    let s = sz.clip;
    let dx = gpu.upload(&random(&mut r, s.b * s.t * s.d))?;
    let dg = gpu.upload(&random(&mut r, s.b * s.t * s.p))?;
    let mut tot = gpu.zeros::<f64>(s.b)?;
    let mut rows = Vec::new();
    for m in [NormMethod::Ghost, NormMethod::Instantiated] {
        let ms = time(5, &mut || {
            gpu::clip::add_layer_sq_norms(&gpu, &dx, &dg, s, m, false, &mut tot)
        })?;
        rows.push(KernelBench {
            name: format!("per-example norms ({m:?})"),
            shape: shape_str(s),
            median_ms: ms,
            throughput: (norm_flops(s, m) / ms / 1e9, "TFLOP/s"),
        });
    }
    let dc = gpu.upload(&vec![0.5f32; s.b])?;
    let mut ws = gpu.zeros::<f32>(gpu::clip::workspace_len(s))?;
    let mut out = gpu.zeros::<f32>(s.p * s.d)?;
    let ms = time(5, &mut || {
        gpu::clip::clipped_weight_sum(&gpu, &dx, &dg, &dc, s, &mut ws, &mut out, true, Some(false))
    })?;
    rows.push(KernelBench {
        name: "BK clipped sum (FP32 cuBLAS)".into(),
        shape: shape_str(s),
        median_ms: ms,
        throughput: (2.0 * (s.b * s.t * s.d * s.p) as f64 / ms / 1e9, "TFLOP/s"),
    });
    drop((dx, dg, ws, out));
    let n = sz.coords;
    let mut z = gpu.zeros::<f32>(n)?;
    for rng in [RngKind::Chacha20, RngKind::Philox] {
        let key = NoiseKey {
            stream: StreamKey::from_insecure_seed(rng, 1),
            tensor_id: 0,
            step: 0,
        };
        let ms = time(5, &mut || {
            gpu::noise::noise_axpy(&gpu, key, 0, 1.0, false, &mut z)
        })?;
        rows.push(KernelBench {
            name: format!("{} noise (write)", rng_label(rng)),
            shape: format!("N={n}"),
            median_ms: ms,
            throughput: (4.0 * n as f64 / ms / 1e6, "GB/s"),
        });
    }
    drop(z);
    let grad = gpu.upload(&random(&mut r, n))?;
    let (mut p, mut m, mut v) = (
        gpu.zeros::<f32>(n)?,
        gpu.zeros::<f32>(n)?,
        gpu.zeros::<f32>(n)?,
    );
    let mut plan = gpu::prune::PrunePlan::new(&gpu, 1, n as u64)?;
    for rng in [RngKind::Chacha20, RngKind::Philox] {
        for keep in [0.8, 1.0] {
            let cfg = prune_config(keep, rng);
            let ms = time(3, &mut || {
                let t = gpu::prune::DeviceTensor::new(
                    &gpu,
                    0,
                    &grad,
                    &mut p,
                    Some(&mut m),
                    Some(&mut v),
                )?;
                plan.run(&gpu, &[t], &cfg).map(|_| ())
            })?;
            rows.push(KernelBench {
                name: format!("noise + top-k + AdamW ({}, keep={keep})", rng_label(rng)),
                shape: format!("N={n}"),
                median_ms: ms,
                throughput: (n as f64 / ms / 1e6, "Gcoord/s"),
            });
        }
    }
    drop((grad, p, m, v, plan));
    gemm_rows(&mut r, &mut rows)?;
    let (ts, tc) = llava_tokens(sz.token_batch);
    let attn = random(&mut r, ts.attn_len()?)
        .iter()
        .map(|x| x.abs())
        .collect::<Vec<_>>();
    let da = gpu.upload(&attn)?;
    let dk = gpu.upload(&random(&mut r, ts.keys_len()?))?;
    let dh = gpu.upload(&random(&mut r, ts.hidden_len()?))?;
    let mut out = gpu.zeros::<f32>(ts.batch * tc.out_tokens() * ts.hidden)?;
    let mut kept = gpu.zeros::<u32>(ts.batch * (1 + tc.keep))?;
    let mut ws = gpu::tokens::TokenWorkspace::new(&gpu, &ts, &tc)?;
    let ms = time(5, &mut || {
        gpu::tokens::select_tokens_dev(
            &gpu,
            &da.as_view(),
            &dk.as_view(),
            &dh.as_view(),
            &ts,
            &tc,
            &mut out.as_view_mut(),
            &mut kept.as_view_mut(),
            &mut ws,
        )
    })?;
    rows.push(KernelBench {
        name: "token selection (K=53, M=10)".into(),
        shape: format!("B={} N=577 D=1024", ts.batch),
        median_ms: ms,
        throughput: (ts.batch as f64 / ms * 1e3, "images/s"),
    });
    Ok(rows)
}

/// ChaCha20 / Philox throughput ratios of the rows that differ only in the generator
/// (their names contain "ChaCha20" and "Philox" at the same place), one line each.
pub fn rng_ratios(rows: &[KernelBench]) -> String {
    let mut s = String::new();
    for c in rows.iter().filter(|r| r.name.contains("ChaCha20")) {
        let twin = c.name.replace("ChaCha20", "Philox");
        if let Some(p) = rows.iter().find(|r| r.name == twin && r.shape == c.shape) {
            s += &format!(
                "ChaCha20 / Philox throughput, {}: {:.2}\n",
                c.name
                    .replacen("ChaCha20", "", 1)
                    .replace("(, ", "(")
                    .replace("()", "")
                    .trim(),
                c.throughput.0 / p.throughput.0
            );
        }
    }
    s
}

/// Formats kernel rows as a markdown table.
pub fn markdown(rows: &[KernelBench]) -> String {
    let mut s = String::from("| kernel | shape | median ms | throughput |\n|---|---|---|---|\n");
    for r in rows {
        s += &format!(
            "| {} | {} | {:.3} | {:.2} {} |\n",
            r.name, r.shape, r.median_ms, r.throughput.0, r.throughput.1
        );
    }
    s
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
}
