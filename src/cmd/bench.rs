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
    /// Heap allocation calls per timed step (CPU, counting allocator; 0 once the
    /// buffer pool is warm).
    pub allocs_per_step: Option<f64>,
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

/// Times one training step of each method on a fixed batch (`dualpriv bench`).
///
/// One model is built and handed from method to method (its values do not change
/// the work), so a 7B preset is initialised once.
pub fn methods<B: DpBackend>(backend: &B, a: &BenchArgs) -> Result<Vec<MethodBench>> {
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
        let m = model.take().ok_or_else(|| {
            Error::Internal("the bench model was not handed back after a method".into())
        })?;
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
        let calls = crate::mem::allocation_calls();
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
        let allocs = crate::mem::allocation_calls() - calls;
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
            allocs_per_step: (device.is_none() && crate::mem::tracking())
                .then(|| allocs as f64 / a.steps.max(1) as f64),
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
        let ms = time_cpu(3, || {
            let mut t = [TensorState {
                tensor_id: 0,
                grad: &grad,
                param: &mut p,
                m: &mut m,
                v: &mut v,
            }];
            prune::noise_prune_update(&mut t, &cfg).map(|_| ())
        })?;
        rows.push(KernelBench {
            name: format!("noise + top-k + AdamW ({})", rng_label(rng)),
            shape: format!("N={n} keep=0.8"),
            median_ms: ms,
            throughput: (n as f64 / ms / 1e3, "Mcoord/s"),
        });
    }
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
