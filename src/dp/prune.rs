//! Noisy-gradient update pruning (Dual-Priv's second mechanism), the CPU reference.
//!
//! For a selection set of tensors (one tensor in per-tensor scope, many in global
//! scope) the released gradient is ñ_j = (f64(S_j) + σC·z_j) as f32: the clipped
//! sum plus regenerable Gaussian noise z_j from the step's [`StreamKey`] (ChaCha20
//! by default, see [`crate::dp::noise`]), formed in f64 with a plain product and a
//! plain sum so the GPU rounds it the same way. Only the k = ⌈keep_frac·N⌉ coordinates with the
//! largest |ñ_j| are updated; every other coordinate keeps its parameter and its
//! optimizer moments. The mask depends on the released ñ alone, so it is
//! post-processing and costs no privacy; a mask from clean gradients would not be.
//!
//! The threshold is exact. Magnitudes are ordered by the key bits(ñ) & 0x7fffffff,
//! and a three-pass radix select (11, 11, 10 bits, [`radix_select`]) finds the
//! k-th largest key τ, as `kernels/prune.cu` does. Coordinates with key > τ
//! are kept; of those with key = τ, the first ones in set order (tensor order, then
//! index) are kept until exactly k are. A NaN or Inf in ñ aborts the step before
//! anything is written.
use crate::backend::cpu::pool::HostBuf;
use crate::backend::cpu::Cpu;
use crate::backend::Backend;
use crate::dp::noise::{NoiseKey, StreamKey};
use crate::error::Setting;
use crate::{Error, Result};

/// The magnitude key: for finite floats, `key(a) < key(b)` iff `|a| < |b|`.
pub fn magnitude_key(x: f32) -> u32 {
    x.to_bits() & 0x7fff_ffff
}

/// Number of coordinates kept out of `n`: ⌈keep_frac·n⌉.
pub fn keep_count(keep_frac: f64, n: u64) -> Result<u64> {
    if !(0.0..=1.0).contains(&keep_frac) {
        return Err(Error::Setting {
            setting: Setting::KeepFrac,
            message: format!("keep fraction {keep_frac} must be in [0, 1] (e.g. 0.8)"),
        });
    }
    Ok(((keep_frac * n as f64).ceil() as u64).min(n))
}

/// Result of the radix select: the threshold key τ and how its ties are split.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Threshold {
    /// The k-th largest key.
    pub key: u32,
    /// Keys strictly greater than τ (all kept).
    pub count_gt: u64,
    /// Keys equal to τ.
    pub count_eq: u64,
    /// How many of the keys equal to τ are kept (the first in set order).
    pub ties_to_keep: u64,
}

/// Radix widths of the three passes, from the top bit down.
pub const RADIX_PASSES: [(u32, u32); 3] = [(21, 11), (10, 11), (0, 10)];

/// Exact k-th largest key (1 ≤ k ≤ n) by three histogram passes, the algorithm
/// the GPU runs. `keys` is called once per pass and must yield the same sequence
/// each time (the GPU regenerates the noise rather than storing it).
pub fn radix_select<I: Iterator<Item = u32>>(mut keys: impl FnMut() -> I, k: u64) -> Threshold {
    assert!(k >= 1, "radix_select needs k >= 1");
    let (mut prefix, mut mask, mut rank) = (0u32, 0u32, k);
    let mut count_eq = 0;
    // One histogram on the stack (16 KiB), cleared per pass: no allocation.
    let mut hist_store = [0u64; 1 << 11];
    for (shift, width) in RADIX_PASSES {
        let bins = 1usize << width;
        let hist = &mut hist_store[..bins];
        hist.fill(0);
        for key in keys() {
            if key & mask == prefix {
                hist[((key >> shift) as usize) & (bins - 1)] += 1;
            }
        }
        // Walk buckets from the largest magnitude down to the one holding rank.
        let mut b = bins - 1;
        while rank > hist[b] {
            rank -= hist[b];
            b -= 1;
        }
        prefix |= (b as u32) << shift;
        mask |= ((bins - 1) as u32) << shift;
        count_eq = hist[b];
    }
    Threshold {
        key: prefix,
        count_gt: k - rank,
        count_eq,
        ties_to_keep: rank,
    }
}

/// The same threshold by a plain `select_nth_unstable`: the check on [`radix_select`].
pub fn select_nth_threshold(keys: &[u32], k: u64) -> u32 {
    let mut v = keys.to_vec();
    let n = v.len();
    let idx = n - k as usize;
    *v.select_nth_unstable(idx).1
}

/// The optimizer applied to kept coordinates. Gradients are ñ / B_expected.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Optimizer {
    /// SGD with (optional) heavy-ball momentum and coupled weight decay:
    /// g ← g + wd·θ; m ← μ·m + g; θ ← θ − lr·m (m is g when μ = 0).
    Sgd {
        /// Learning rate.
        lr: f32,
        /// Momentum μ (0 disables the momentum buffer).
        momentum: f32,
        /// Coupled L2 weight decay.
        weight_decay: f32,
    },
    /// AdamW (decoupled weight decay) with bias correction at step `t` (≥ 1).
    AdamW {
        /// Learning rate.
        lr: f32,
        /// First-moment decay β1.
        beta1: f32,
        /// Second-moment decay β2.
        beta2: f32,
        /// Denominator ε.
        eps: f32,
        /// Decoupled weight decay.
        weight_decay: f32,
        /// 1-based optimizer step for bias correction.
        t: u32,
    },
}

impl Optimizer {
    /// Checks the hyper-parameters; the kernels assume these hold.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str, v: f32| {
            Err(Error::Config(format!(
                "optimizer {what} = {v} is out of range"
            )))
        };
        match *self {
            Optimizer::Sgd {
                lr,
                momentum,
                weight_decay,
            } => {
                if !lr.is_finite() || lr < 0.0 {
                    return bad("learning rate", lr);
                }
                if !(0.0..1.0).contains(&momentum) {
                    return bad("momentum (must be in [0, 1))", momentum);
                }
                if !weight_decay.is_finite() || weight_decay < 0.0 {
                    return bad("weight decay", weight_decay);
                }
            }
            Optimizer::AdamW {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
                t,
            } => {
                if !lr.is_finite() || lr < 0.0 {
                    return bad("learning rate", lr);
                }
                if !(0.0..1.0).contains(&beta1) || !(0.0..1.0).contains(&beta2) {
                    return bad(
                        "beta (must be in [0, 1))",
                        if (0.0..1.0).contains(&beta1) {
                            beta2
                        } else {
                            beta1
                        },
                    );
                }
                if !(eps > 0.0 && eps.is_finite()) {
                    return bad("eps", eps);
                }
                if !weight_decay.is_finite() || weight_decay < 0.0 {
                    return bad("weight decay", weight_decay);
                }
                if t == 0 {
                    return Err(Error::Config("AdamW step t must start at 1".into()));
                }
            }
        }
        Ok(())
    }

    /// Whether the optimizer needs the first-moment buffer.
    pub fn needs_m(&self) -> bool {
        match *self {
            Optimizer::Sgd { momentum, .. } => momentum != 0.0,
            Optimizer::AdamW { .. } => true,
        }
    }

    /// Whether the optimizer needs the second-moment buffer.
    pub fn needs_v(&self) -> bool {
        matches!(self, Optimizer::AdamW { .. })
    }

    /// Updates coordinate `j` with noisy gradient `noisy`, in the exact operation
    /// order of `update_one` in the kernel (fused multiply-adds included).
    pub fn update(
        &self,
        noisy: f32,
        inv_batch: f32,
        p: &mut f32,
        m: Option<&mut f32>,
        v: Option<&mut f32>,
    ) {
        let g = noisy * inv_batch;
        let w = *p;
        match *self {
            Optimizer::Sgd {
                lr,
                momentum,
                weight_decay,
            } => {
                let mut g = weight_decay.mul_add(w, g);
                if momentum != 0.0 {
                    let m = m.expect("momentum buffer checked by caller");
                    *m = momentum.mul_add(*m, g);
                    g = *m;
                }
                *p = (-lr).mul_add(g, w);
            }
            Optimizer::AdamW {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
                t,
            } => {
                let (m, v) = (m.expect("checked"), v.expect("checked"));
                *m = beta1.mul_add(*m, (1.0 - beta1) * g);
                *v = beta2.mul_add(*v, (1.0 - beta2) * g * g);
                let (bc1, bc2) = self.bias_corrections(t, beta1, beta2);
                let upd = (*m / bc1) / ((*v / bc2).sqrt() + eps);
                *p = (-lr).mul_add(weight_decay.mul_add(w, upd), w);
            }
        }
    }

    fn bias_corrections(&self, t: u32, beta1: f32, beta2: f32) -> (f32, f32) {
        let t = t as i32;
        (
            (1.0 - f64::from(beta1).powi(t)) as f32,
            (1.0 - f64::from(beta2).powi(t)) as f32,
        )
    }

    /// (1 − β1ᵗ, 1 − β2ᵗ) for AdamW, (1, 1) for SGD; computed once per step on the host.
    pub fn bias_corr(&self) -> (f32, f32) {
        match *self {
            Optimizer::AdamW {
                beta1, beta2, t, ..
            } => self.bias_corrections(t, beta1, beta2),
            Optimizer::Sgd { .. } => (1.0, 1.0),
        }
    }
}

/// Everything one noise + prune + update call needs besides the tensors.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct UpdateConfig {
    /// Fraction of the set's coordinates to update, in [0, 1].
    pub keep_frac: f64,
    /// Noise standard deviation σ·C on the clipped sum (0 for non-private runs).
    pub noise_std: f64,
    /// The secret key of the gradient-noise domain (tensor id and step complete
    /// each tensor's stream).
    pub noise: StreamKey,
    /// The logical step: part of every tensor's noise counter.
    pub step: u32,
    /// 1 / B_expected: DP-SGD divides by the expected, not the actual, batch size.
    pub inv_batch: f32,
    /// The optimizer for kept coordinates.
    pub opt: Optimizer,
}

impl UpdateConfig {
    /// Checks the optimizer and the noise scale; both backends call it first.
    pub fn validate(&self) -> Result<()> {
        self.opt.validate()?;
        if !self.noise_std.is_finite() || self.noise_std < 0.0 {
            return Err(Error::Config(format!(
                "noise std σ·C = {} must be ≥ 0 and finite",
                self.noise_std
            )));
        }
        keep_count(self.keep_frac, 0).map(|_| ())
    }
}

/// One trainable tensor with its clipped-sum gradient and optimizer state.
pub struct TensorState<'a> {
    /// Stable id, part of the noise counter; unique within a run.
    pub tensor_id: u32,
    /// The clipped sum Σ c_i g_i for this tensor.
    pub grad: &'a [f32],
    /// The parameters, updated in place.
    pub param: &'a mut [f32],
    /// First moment (SGD momentum or AdamW m); empty when unused.
    pub m: &'a mut [f32],
    /// Second moment (AdamW v); empty when unused.
    pub v: &'a mut [f32],
}

/// What one call did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PruneReport {
    /// Coordinates in the selection set.
    pub n: u64,
    /// Coordinates that had to be kept, ⌈keep_frac·n⌉.
    pub k: u64,
    /// Coordinates actually updated (equals k).
    pub kept: u64,
    /// |ñ| at the threshold (0 when k ∈ {0, n}).
    pub threshold: f32,
}

/// Noise, exact top-k selection and masked update over one selection set.
///
/// Call once with every tensor for the global scope, or once per tensor for the
/// per-tensor scope. Fails without writing anything when a noisy value is not
/// finite, or when shapes and buffers disagree.
pub fn noise_prune_update(
    tensors: &mut [TensorState<'_>],
    cfg: &UpdateConfig,
) -> Result<PruneReport> {
    cfg.validate()?;
    for t in tensors.iter() {
        let n = t.grad.len();
        let bad = t.param.len() != n
            || (cfg.opt.needs_m() && t.m.len() != n)
            || (cfg.opt.needs_v() && t.v.len() != n);
        if bad {
            return Err(Error::Shape(format!(
                "tensor {}: grad has {n} values but param/m/v have {}/{}/{}",
                t.tensor_id,
                t.param.len(),
                t.m.len(),
                t.v.len()
            )));
        }
    }
    // The noisy gradients in buffers of the CPU backend's pool (no allocation once
    // warm); one tensor (per-tensor scope) needs no list either.
    let one: [HostBuf<f32>; 1];
    let many: Vec<HostBuf<f32>>;
    let noisy: &[HostBuf<f32>] = if let [t] = &*tensors {
        one = [noisy_gradient_pooled(t.grad, t.tensor_id, cfg)?];
        &one
    } else {
        many = tensors
            .iter()
            .map(|t| noisy_gradient_pooled(t.grad, t.tensor_id, cfg))
            .collect::<Result<_>>()?;
        &many
    };
    let n: u64 = noisy.iter().map(|v| v.len() as u64).sum();
    if let Some((t, j)) = noisy
        .iter()
        .enumerate()
        .find_map(|(t, v)| v.iter().position(|x| !x.is_finite()).map(|j| (t, j)))
    {
        return Err(Error::NonFinite(format!(
            "noisy gradient of tensor {} is {} at index {j}; the step was not applied",
            tensors[t].tensor_id, noisy[t][j]
        )));
    }
    let k = keep_count(cfg.keep_frac, n)?;
    let thr = (k > 0 && k < n).then(|| {
        radix_select(
            || {
                noisy
                    .iter()
                    .flat_map(|v| v.iter())
                    .map(|&x| magnitude_key(x))
            },
            k,
        )
    });
    if thr.is_none() && k > 0 {
        // Every coordinate is kept: each is independent, so chunks run in parallel.
        for (t, nv) in tensors.iter_mut().zip(noisy) {
            update_all_parallel(&cfg.opt, cfg.inv_batch, nv, t);
        }
        return Ok(PruneReport {
            n,
            k,
            kept: n,
            threshold: 0.0,
        });
    }
    let mut ties_left = thr.map_or(0, |t| t.ties_to_keep);
    let mut kept = 0;
    for (t, nv) in tensors.iter_mut().zip(noisy) {
        for (j, &x) in nv.iter().enumerate() {
            let keep = match thr {
                _ if k == 0 => false,
                None => true,
                Some(th) => {
                    let key = magnitude_key(x);
                    key > th.key
                        || (key == th.key && ties_left > 0 && {
                            ties_left -= 1;
                            true
                        })
                }
            };
            if keep {
                let m = cfg.opt.needs_m().then(|| &mut t.m[j]);
                let v = cfg.opt.needs_v().then(|| &mut t.v[j]);
                cfg.opt.update(x, cfg.inv_batch, &mut t.param[j], m, v);
                kept += 1;
            }
        }
    }
    Ok(PruneReport {
        n,
        k,
        kept,
        threshold: thr.map_or(0.0, |t| f32::from_bits(t.key)),
    })
}

/// Coordinates per parallel job of [`update_all_parallel`].
const UPDATE_CHUNK: usize = 1 << 11;

/// Updates every coordinate of `t` with its noisy gradient `x`, in parallel chunks
/// (each coordinate's arithmetic is that of [`Optimizer::update`]).
fn update_all_parallel(opt: &Optimizer, inv_batch: f32, x: &[f32], t: &mut TensorState<'_>) {
    use rayon::prelude::*;
    let (p, xs) = (
        t.param.par_chunks_mut(UPDATE_CHUNK),
        x.par_chunks(UPDATE_CHUNK),
    );
    if opt.needs_v() {
        p.zip(t.m.par_chunks_mut(UPDATE_CHUNK))
            .zip(t.v.par_chunks_mut(UPDATE_CHUNK))
            .zip(xs)
            .for_each(|(((p, m), v), x)| update_all(opt, inv_batch, x, p, m, v));
    } else if opt.needs_m() {
        p.zip(t.m.par_chunks_mut(UPDATE_CHUNK))
            .zip(xs)
            .for_each(|((p, m), x)| update_all(opt, inv_batch, x, p, m, &mut []));
    } else {
        p.zip(xs)
            .for_each(|(p, x)| update_all(opt, inv_batch, x, p, &mut [], &mut []));
    }
}

crate::backend::cpu::math::simd_fn! {
    /// [`Optimizer::update`] on every coordinate of one chunk; `m`, `v` are empty
    /// when the optimizer has no such state. Compiled with FMA where the CPU has it:
    /// `mul_add` is otherwise a libm call per use.
    fn update_all(opt: &Optimizer, inv_batch: f32, x: &[f32], p: &mut [f32], m: &mut [f32], v: &mut [f32]) {
        let (nm, nv) = (opt.needs_m(), opt.needs_v());
        for (j, (&x, p)) in x.iter().zip(p.iter_mut()).enumerate() {
            let mj = if nm { Some(&mut m[j]) } else { None };
            let vj = if nv { Some(&mut v[j]) } else { None };
            opt.update(x, inv_batch, p, mj, vj);
        }
    }
}

/// ñ_j = (f64(S_j) + σC·z_j) as f32 for one tensor (plain f64 product and sum, as
/// the kernel). With σC = 0 the sum passes through unchanged (−0.0 included).
pub fn noisy_gradient(grad: &[f32], tensor_id: u32, cfg: &UpdateConfig) -> Vec<f32> {
    let mut out = grad.to_vec();
    add_noise(&mut out, tensor_id, cfg);
    out
}

/// [`noisy_gradient`] in a buffer of the CPU backend's pool.
fn noisy_gradient_pooled(grad: &[f32], tensor_id: u32, cfg: &UpdateConfig) -> Result<HostBuf<f32>> {
    // Every value is overwritten by the copy.
    let mut out = Cpu.output(grad.len())?;
    out.copy_from_slice(grad);
    add_noise(&mut out, tensor_id, cfg);
    Ok(out)
}

fn add_noise(out: &mut [f32], tensor_id: u32, cfg: &UpdateConfig) {
    if cfg.noise_std == 0.0 {
        return;
    }
    NoiseKey {
        stream: cfg.noise,
        tensor_id,
        step: cfg.step,
    }
    .add_scaled(0, cfg.noise_std, out);
}
