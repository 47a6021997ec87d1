//! One logical training step, written once for every backend and method.
//!
//! Gradient methods run forward + backward per micro-batch; the model hands over,
//! for every trainable linear and as soon as its layer's backward has run, its
//! input X and output gradient G (never a weight gradient), which are reduced on
//! arrival so the layer's activations can be freed:
//! * `nonprivate`: summed at once, Σ_i G_iᵀX_i / B (c_i = 1, no noise);
//! * `ghost` / `dualpriv`: c_i = min(1, C/‖g_i‖) from per-example norms. A layer
//!   whose per-example gradients are no larger than its X and G (every LoRA
//!   factor) has them instantiated on arrival, its norms taken from them and its
//!   clipped sum formed as Σ_i c_i ∇W ℓ_i; the others keep (X, G) for the ghost
//!   norm (or the instantiated one, by fastDP's mixed rule) and the book-keeping
//!   clipped sum Σ c_i G_iᵀX_i;
//! * `dpsgd`: every per-example gradient G_iᵀX_i materialised, their norms, the
//!   weighted sum (what Opacus does without ghost clipping).
//!
//! The clipped sums get N(0, σ²C²) noise (regenerated, never stored), are divided
//! by B_expected, pruned to the top `keep_frac` by noisy magnitude (`dualpriv`
//! only), and applied by the optimizer. With one micro-batch and per-tensor scope,
//! each tensor's sum is noised, applied and freed as soon as it is formed.
//! `dpzo` instead evaluates per-example losses at θ ± λz.
use std::collections::HashMap;

use crate::backend::dp::{DpBackend, TensorUpdate};
use crate::data::DataSource;
use crate::dp::clip::LinearShape;
use crate::dp::key::{Domain, RunKey};
use crate::dp::noise::{NoiseKey, RngKind};
use crate::dp::prune::{PruneReport, UpdateConfig};
use crate::mem::Recycled;
use crate::model::{Capture, Mllm};
use crate::train::method::Method;
use crate::train::{PruneScope, TrainConfig};
use crate::{Error, Result};

/// Tensor id of DPZO's scalar noise stream (in the [`Domain::Noise`] key; no
/// trainable tensor has this id).
pub const DPZO_SCALAR_ID: u32 = 0xD0_2E20;

/// DPZO's direction z for tensor `tensor_id` at draw `draw`: its own key domain,
/// so directions never correlate with the DP noise.
pub fn dpzo_direction(key: &RunKey, rng: RngKind, tensor_id: u32, draw: u32) -> NoiseKey {
    NoiseKey {
        stream: key.stream(Domain::Direction, rng),
        tensor_id,
        step: draw,
    }
}

/// DPZO's released scalar (Σ d_i + σC·z) / B_expected, z the standard normal of
/// (noise key, [`DPZO_SCALAR_ID`], `draw`).
pub fn dpzo_noisy_scalar(
    key: &RunKey,
    rng: RngKind,
    draw: u32,
    clipped_sum: f64,
    noise_std: f64,
    batch: usize,
) -> f64 {
    let z = NoiseKey {
        stream: key.stream(Domain::Noise, rng),
        tensor_id: DPZO_SCALAR_ID,
        step: draw,
    }
    .normal(0);
    (clipped_sum + noise_std * z) / batch as f64
}

/// First and second moments of one parameter.
pub struct Moments<B: DpBackend> {
    /// SGD momentum or AdamW first moment.
    pub m: Option<B::Buf>,
    /// AdamW second moment.
    pub v: Option<B::Buf>,
}

/// Optimizer state of every trainable parameter, created on first use.
pub struct OptState<B: DpBackend> {
    /// Moments by parameter id.
    pub moments: HashMap<u32, Moments<B>>,
}

impl<B: DpBackend> Default for OptState<B> {
    fn default() -> Self {
        Self {
            moments: HashMap::new(),
        }
    }
}

/// What one step did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepOutcome {
    /// Examples in the logical batch.
    pub batch_size: usize,
    /// Mean per-example loss (before the update); NaN for an empty batch.
    pub loss: f64,
    /// Visual tokens per example fed to the LLM.
    pub visual_tokens: usize,
    /// Coordinates updated.
    pub kept: u64,
    /// Coordinates that received noise.
    pub coords: u64,
    /// Examples whose loss or gradient norm was not finite; they got clip factor 0
    /// (their contribution is dropped) and the step went on.
    pub nonfinite: usize,
}

/// Everything a step needs besides the batch.
pub struct StepContext<'a, B: DpBackend> {
    /// The backend.
    pub backend: &'a B,
    /// The model being trained.
    pub model: &'a mut Mllm<B>,
    /// Its optimizer state.
    pub opt: &'a mut OptState<B>,
    /// The training data.
    pub data: &'a dyn DataSource,
    /// The run's configuration.
    pub cfg: &'a TrainConfig,
    /// The noise multiplier σ (0 for non-private runs).
    pub sigma: f64,
    /// The run's key: noise, DPZO directions and fused-token noise derive from it.
    pub key: &'a RunKey,
}

/// Runs logical step `step` (0-based; the optimizer's clock) on the examples
/// `indices`, with the noise of draw `draw`. The raw mechanism: it neither checks
/// the config nor accounts; [`super::Trainer`] does both and never repeats a draw.
pub fn train_step<B: DpBackend>(
    ctx: &mut StepContext<'_, B>,
    step: u32,
    draw: u32,
    indices: &[usize],
) -> Result<StepOutcome> {
    train_step_audited(ctx, step, draw, indices, None)
}

/// What a privacy audit ([`crate::audit`]) changes in one step; crate-only, set
/// by the audit alone (never by a flag, a config or a checkpoint).
#[derive(Clone, Debug)]
pub(crate) struct AuditHook {
    /// White-box (Dirac) canaries sampled in this step: (parameter id, index,
    /// value), added to the clipped sum before the noise. A value of ±C is one
    /// example's clipped gradient C·e_j, so the sensitivity stays C.
    pub inject: Vec<(u32, usize, f32)>,
    /// Factor on the noise std: 1 for the real mechanism; the audit's broken
    /// variant (a test of the audit's power) sets 0.1.
    pub noise_scale: f64,
}

/// [`train_step`] with an audit's additions.
pub(crate) fn train_step_audited<B: DpBackend>(
    ctx: &mut StepContext<'_, B>,
    step: u32,
    draw: u32,
    indices: &[usize],
    hook: Option<&AuditHook>,
) -> Result<StepOutcome> {
    match ctx.cfg.method {
        Method::Dpzo => dpzo_step(ctx, draw, indices, hook),
        _ => gradient_step(ctx, step, draw, indices, hook),
    }
}

/// Adds the hook's canary gradients of tensor `id` to its clipped sum `g`.
fn inject<B: DpBackend>(be: &B, hook: Option<&AuditHook>, id: u32, g: &mut B::Buf) -> Result<()> {
    let Some(h) = hook else { return Ok(()) };
    if !h.inject.iter().any(|c| c.0 == id) {
        return Ok(());
    }
    let mut add = vec![0.0f32; be.len(g)];
    for &(_, i, v) in h.inject.iter().filter(|c| c.0 == id) {
        let slot = add.get_mut(i).ok_or_else(|| {
            Error::Internal(format!("audit canary index {i} outside tensor {id}"))
        })?;
        *slot += v;
    }
    be.axpy(g, 1.0, &be.upload(&add)?)
}

fn update_config(
    ctx: &StepContext<'_, impl DpBackend>,
    step: u32,
    draw: u32,
    batch: usize,
) -> Result<UpdateConfig> {
    let cfg = ctx.cfg;
    let private = cfg.method.is_private();
    Ok(UpdateConfig {
        keep_frac: if cfg.method == Method::Dualpriv {
            cfg.keep_frac
        } else {
            1.0
        },
        noise_std: noise_std(private, ctx.sigma, cfg.clip_norm),
        noise: ctx.key.stream(Domain::Noise, cfg.rng),
        step: draw,
        // DP-SGD divides by the expected batch size so the sum's sensitivity is C.
        inv_batch: 1.0
            / if private {
                cfg.batch as f32
            } else {
                batch.max(1) as f32
            },
        opt: cfg.opt.at_step(step + 1)?,
    })
}

/// σ·C, with σ = 0 meaning no noise even when C = ∞ (the σ = 0, C = ∞ check of
/// the raw mechanism; the trainer refuses σ = 0 for DP methods).
fn noise_std(private: bool, sigma: f64, clip: f32) -> f64 {
    if !private || sigma == 0.0 {
        0.0
    } else {
        sigma * f64::from(clip)
    }
}

/// Noises, prunes and applies one selection set of (param id, gradient) pairs.
fn apply<B: DpBackend>(
    ctx: &mut StepContext<'_, B>,
    grads: &[(u32, &B::Buf)],
    ucfg: &UpdateConfig,
) -> Result<PruneReport> {
    let (needs_m, needs_v) = (ucfg.opt.needs_m(), ucfg.opt.needs_v());
    for &(id, _) in grads {
        if !ctx.opt.moments.contains_key(&id) {
            let len = ctx.backend.len(ctx.model.param(id));
            let m = if needs_m {
                Some(ctx.backend.zeros(len)?)
            } else {
                None
            };
            let v = if needs_v {
                Some(ctx.backend.zeros(len)?)
            } else {
                None
            };
            ctx.opt.moments.insert(id, Moments { m, v });
        }
    }
    if let [(id, grad)] = *grads {
        // One tensor (per-tensor scope): direct borrows, no lists (no allocation).
        let mo = ctx
            .opt
            .moments
            .get_mut(&id)
            .ok_or_else(|| Error::Internal(format!("parameter {id} has no moments")))?;
        let mut set = [TensorUpdate {
            tensor_id: id,
            grad,
            param: ctx.model.param_mut(id),
            m: mo.m.as_mut(),
            v: mo.v.as_mut(),
        }];
        return ctx.backend.noise_prune_update(&mut set, ucfg);
    }
    let ids: Vec<u32> = grads.iter().map(|g| g.0).collect();
    let params = ctx.model.params_mut(&ids)?;
    let mut moments: Vec<&mut Moments<B>> = Vec::with_capacity(ids.len());
    // Disjoint mutable borrows of the moments map, in `ids` order.
    let mut by_id: HashMap<u32, &mut Moments<B>> =
        ctx.opt.moments.iter_mut().map(|(k, v)| (*k, v)).collect();
    for id in &ids {
        moments.push(
            by_id
                .remove(id)
                .ok_or_else(|| Error::Internal(format!("parameter {id} listed twice")))?,
        );
    }
    let mut set: Vec<TensorUpdate<'_, B>> = params
        .into_iter()
        .zip(moments)
        .zip(grads)
        .map(|((param, mo), &(id, grad))| TensorUpdate {
            tensor_id: id,
            grad,
            param,
            m: mo.m.as_mut(),
            v: mo.v.as_mut(),
        })
        .collect();
    ctx.backend.noise_prune_update(&mut set, ucfg)
}

/// Batches kept for reuse: a step collates into one its predecessor used
/// ([`DataSource::collate_into`] overwrites every field). Process-wide rather
/// than per thread, because a step runs on whichever rayon worker takes it.
static FREE_BATCHES: std::sync::Mutex<Vec<crate::data::Batch>> = std::sync::Mutex::new(Vec::new());

/// Most batches [`FREE_BATCHES`] keeps (a DPZO step holds one per micro-batch).
const BATCHES_KEEP: usize = 16;

/// Largest batch [`FREE_BATCHES`] keeps, in bytes of images (a LLaVA micro-batch
/// of 336-pixel images is 1.35 MB per example): a larger one is freed.
const BATCH_KEEP_BYTES: usize = 64 << 20;

/// A reusable batch, put back when dropped; a fresh one when none is free (the
/// first step, or more micro-batches alive at once than before).
struct BatchLease(crate::data::Batch);

impl BatchLease {
    fn take() -> Self {
        let mut free = FREE_BATCHES.lock().unwrap_or_else(|e| e.into_inner());
        Self(free.pop().unwrap_or_default())
    }
}

impl std::ops::Deref for BatchLease {
    type Target = crate::data::Batch;
    fn deref(&self) -> &crate::data::Batch {
        &self.0
    }
}

impl std::ops::DerefMut for BatchLease {
    fn deref_mut(&mut self) -> &mut crate::data::Batch {
        &mut self.0
    }
}

impl Drop for BatchLease {
    fn drop(&mut self) {
        if self.0.images.capacity() * std::mem::size_of::<f32>() > BATCH_KEEP_BYTES {
            return; // freed
        }
        let mut free = FREE_BATCHES.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < BATCHES_KEEP {
            // Room for all of them at the first push: no later push allocates.
            let room = BATCHES_KEEP - free.len();
            free.reserve_exact(room);
            free.push(std::mem::take(&mut self.0));
        }
    }
}

/// A capture reduced as it arrives from the backward
/// ([`Mllm::forward_backward_with`]), so its layer's activations and output
/// gradient can be freed at once instead of being held until every layer is done.
enum Reduced<B: DpBackend> {
    /// Kept whole for the book-keeping sum Σ c_i G_iᵀX_i once the clip factors
    /// exist; its norms (ghost or instantiated, by the mixed rule) were added on
    /// arrival.
    Factored(Capture<B>),
    /// Per-example gradients (b×p×d, bias b×p), their squared norms added on
    /// arrival: every layer for `dpsgd`, and for the ghost methods the layers whose
    /// per-example gradients are no larger than the capture ([`instantiate`]).
    PerExample {
        weight_id: u32,
        bias_id: Option<u32>,
        shape: LinearShape,
        w: B::Buf,
        bias: Option<B::Buf>,
    },
    /// The batch sums Σ_i G_iᵀX_i and Σ_i Σ_t G_i,t (`nonprivate`, c_i = 1).
    Summed {
        weight_id: u32,
        bias_id: Option<u32>,
        w: B::Buf,
        bias: Option<B::Buf>,
    },
}

/// Whether the ghost methods instantiate a layer's per-example gradients: when
/// b·p·d values are no more than the b·T·(p + d) of its X and G. The same test
/// says the instantiated norm (T·p·d per example) costs no more than the ghost
/// norm (T²·(p + d)); LoRA's rank-r factors always pass it.
fn instantiate(s: LinearShape) -> bool {
    s.p * s.d <= s.t * (s.p + s.d)
}

/// Reduces one capture for `method`, adding its per-example squared norms to
/// `norms` (DP methods) or summing it with the all-ones `ones` (nonprivate).
fn reduce<B: DpBackend>(
    be: &B,
    method: Method,
    c: Capture<B>,
    norms: &mut B::Norms,
    ones: &B::Buf,
) -> Result<Reduced<B>> {
    let s = c.shape;
    let per_example = match method {
        Method::Nonprivate => {
            let mut w = be.zeros(s.p * s.d)?;
            be.clipped_weight_sum(&c.x, &c.g, ones, s, &mut w, false)?;
            let bias = match c.bias_id {
                Some(_) => {
                    let mut bias = be.zeros(s.p)?;
                    be.clipped_bias_sum(&c.g, ones, s, &mut bias, false)?;
                    Some(bias)
                }
                None => None,
            };
            return Ok(Reduced::Summed {
                weight_id: c.weight_id,
                bias_id: c.bias_id,
                w,
                bias,
            });
        }
        Method::Dpsgd => true,
        Method::Ghost | Method::Dualpriv => instantiate(s),
        Method::Dpzo => return Err(Error::Internal("dpzo has no backward".into())),
    };
    if !per_example {
        be.add_layer_sq_norms(
            &c.x,
            &c.g,
            s,
            s.preferred_method(),
            c.bias_id.is_some(),
            norms,
        )?;
        return Ok(Reduced::Factored(c));
    }
    let w = be.per_example_weight_grads(&c.x, &c.g, s)?;
    be.add_row_sq_norms(&w, s.b, norms)?;
    let bias = match c.bias_id {
        Some(_) => {
            let bg = be.per_example_bias_grads(&c.g, s)?;
            be.add_row_sq_norms(&bg, s.b, norms)?;
            Some(bg)
        }
        None => None,
    };
    Ok(Reduced::PerExample {
        weight_id: c.weight_id,
        bias_id: c.bias_id,
        shape: s,
        w,
        bias,
    })
}

/// One reduced capture's clipped weight sum Σ_i c_i ∇W ℓ_i and, with a bias, its
/// clipped bias sum, as `(id, sum)` pairs (an array, not a `Vec`: a step calls
/// this once per capture and should allocate nothing).
fn clipped_sums<B: DpBackend>(
    be: &B,
    factors: &B::Buf,
    r: Reduced<B>,
) -> Result<impl Iterator<Item = (u32, B::Buf)>> {
    let mut out = Pair([None, None]);
    match r {
        Reduced::Summed {
            weight_id,
            bias_id,
            w,
            bias,
        } => {
            out.push((weight_id, w));
            if let (Some(id), Some(bg)) = (bias_id, bias) {
                out.push((id, bg));
            }
        }
        Reduced::Factored(c) => {
            let s = c.shape;
            let mut w = be.zeros(s.p * s.d)?;
            be.clipped_weight_sum(&c.x, &c.g, factors, s, &mut w, false)?;
            out.push((c.weight_id, w));
            if let Some(id) = c.bias_id {
                let mut bg = be.zeros(s.p)?;
                be.clipped_bias_sum(&c.g, factors, s, &mut bg, false)?;
                out.push((id, bg));
            }
        }
        Reduced::PerExample {
            weight_id,
            bias_id,
            shape: s,
            w: per,
            bias,
        } => {
            let mut w = be.zeros(s.p * s.d)?;
            be.weighted_row_sum(&per, factors, s.b, &mut w, false)?;
            out.push((weight_id, w));
            if let (Some(id), Some(per)) = (bias_id, bias) {
                let mut bg = be.zeros(s.p)?;
                be.weighted_row_sum(&per, factors, s.b, &mut bg, false)?;
                out.push((id, bg));
            }
        }
    }
    Ok(out.0.into_iter().flatten())
}

/// At most two `(id, sum)` pairs: a weight's and its bias's.
struct Pair<T>([Option<T>; 2]);

impl<T> Pair<T> {
    fn push(&mut self, v: T) {
        let slot = if self.0[0].is_none() { 0 } else { 1 };
        self.0[slot] = Some(v);
    }
}

/// The summed (clipped, for DP methods) gradients of a batch, by parameter id:
/// Σ_i c_i ∇θ ℓ_i, accumulated over micro-batches; no noise, no update.
pub struct Sums<B: DpBackend> {
    /// Gradient sums by trainable parameter id (only parameters the batch reached).
    pub grads: HashMap<u32, B::Buf>,
    /// Σ_i ℓ_i.
    pub loss_sum: f64,
    /// Visual tokens per example.
    pub visual_tokens: usize,
    /// Examples dropped with clip factor 0 because their norm was not finite.
    pub nonfinite: usize,
}

/// Forms the gradient sums of `indices` without updating anything (the clipped
/// sum S(D) that the noise is added to; `key` only matters for fused-token noise).
pub fn gradient_sums<B: DpBackend>(
    backend: &B,
    model: &Mllm<B>,
    key: &RunKey,
    cfg: &TrainConfig,
    data: &dyn DataSource,
    indices: &[usize],
) -> Result<Sums<B>> {
    let mut sums = Sums {
        grads: HashMap::new(),
        loss_sum: 0.0,
        visual_tokens: 0,
        nonfinite: 0,
    };
    for mb in indices.chunks(cfg.micro_batch.max(1)) {
        let (mut reduced, factors) = forward_clip(backend, model, cfg, key, data, mb, &mut sums)?;
        for r in reduced.drain(..) {
            for (id, g) in clipped_sums(backend, &factors, r)? {
                add_into(backend, &mut sums.grads, id, g)?;
            }
        }
    }
    Ok(sums)
}

/// Forward + backward of one micro-batch, each capture reduced as it arrives, and
/// the clip factors (all ones for nonprivate). Losses, visual tokens and dense
/// (embedding) gradients go into `sums`.
fn forward_clip<B: DpBackend>(
    be: &B,
    model: &Mllm<B>,
    cfg: &TrainConfig,
    key: &RunKey,
    data: &dyn DataSource,
    mb: &[usize],
    sums: &mut Sums<B>,
) -> Result<(Recycled<Reduced<B>>, B::Buf)> {
    let mut batch = BatchLease::take();
    data.collate_into(mb, cfg.text_len, &mut batch)?;
    let tokens = cfg.train_token_select(key);
    let b = mb.len();
    let mut norms = be.norms_zeros(b, cfg.micro_batch)?;
    let ones = be.upload(&Recycled::filled(b, 1.0f32))?;
    // One capture per trainable tensor at most (weights; biases ride along).
    let mut reduced = Recycled::with_capacity(model.trainable().len());
    let fb = model.forward_backward_with(be, &batch, tokens.as_ref(), &mut |c| {
        reduced.push(reduce(be, cfg.method, c, &mut norms, &ones)?);
        Ok(())
    })?;
    // A non-finite loss is a private statistic's outlier, not a reason to stop:
    // it is left out of the sum (its gradient norm is non-finite too, so its clip
    // factor is 0 and it contributes nothing).
    sums.loss_sum += fb
        .per_example_loss
        .iter()
        .filter(|l| l.is_finite())
        .map(|&l| f64::from(l))
        .sum::<f64>();
    sums.visual_tokens = fb.visual_tokens;
    if !fb.dense_grads.is_empty() && cfg.method.is_private() {
        return Err(Error::Config(
            "trainable embeddings are only supported for non-private pretraining".into(),
        ));
    }
    // Plain batch-summed gradients (embeddings in non-private pretraining).
    for (id, g) in fb.dense_grads {
        add_into(be, &mut sums.grads, id, g)?;
    }
    if !cfg.method.is_private() {
        return Ok((reduced, ones));
    }
    let (factors, bad) = be.clip_factors(&norms, cfg.clip_norm)?;
    sums.nonfinite += bad;
    Ok((reduced, factors))
}

fn add_into<B: DpBackend>(
    be: &B,
    grads: &mut HashMap<u32, B::Buf>,
    id: u32,
    g: B::Buf,
) -> Result<()> {
    match grads.get_mut(&id) {
        Some(acc) => be.axpy(acc, 1.0, &g),
        None => {
            grads.insert(id, g);
            Ok(())
        }
    }
}

fn gradient_step<B: DpBackend>(
    ctx: &mut StepContext<'_, B>,
    step: u32,
    draw: u32,
    indices: &[usize],
    hook: Option<&AuditHook>,
) -> Result<StepOutcome> {
    let cfg = ctx.cfg;
    let be = ctx.backend;
    let params: Recycled<(u32, usize)> = ctx
        .model
        .trainable()
        .iter()
        .map(|p| (p.id, p.len))
        .collect();
    let mut ucfg = update_config(ctx, step, draw, indices.len())?;
    if let Some(h) = hook {
        ucfg.noise_std *= h.noise_scale;
    }
    let mut out = StepOutcome {
        batch_size: indices.len(),
        loss: f64::NAN,
        ..Default::default()
    };
    if indices.is_empty() && !cfg.method.is_private() && hook.is_none_or(|h| h.inject.is_empty()) {
        return Ok(out);
    }
    let micro: Recycled<&[usize]> = indices.chunks(cfg.micro_batch.max(1)).collect();
    // Streaming: each tensor is noised, applied and freed as soon as its clipped sum
    // exists, so no full gradient buffer is ever held. Possible only when the step
    // has one micro-batch (otherwise sums must accumulate) and a per-tensor scope.
    let streaming = micro.len() == 1 && cfg.prune_scope == PruneScope::Tensor;
    let mut sums = Sums {
        grads: HashMap::new(),
        loss_sum: 0.0,
        visual_tokens: 0,
        nonfinite: 0,
    };
    let mut applied: Recycled<u32> = Recycled::with_capacity(params.len());
    for mb in &micro {
        let (mut reduced, factors) =
            forward_clip(be, &*ctx.model, cfg, ctx.key, ctx.data, mb, &mut sums)?;
        for r in reduced.drain(..) {
            for (id, mut g) in clipped_sums(be, &factors, r)? {
                if streaming {
                    // Noised, applied and dropped before the next tensor's sum exists.
                    inject(be, hook, id, &mut g)?;
                    let r = apply(ctx, &[(id, &g)], &ucfg)?;
                    out.kept += r.kept;
                    out.coords += r.n;
                    applied.push(id);
                } else {
                    add_into(be, &mut sums.grads, id, g)?;
                }
            }
        }
    }
    out.visual_tokens = sums.visual_tokens;
    out.nonfinite = sums.nonfinite;
    let mut grads = sums.grads;
    // Every trainable tensor is released with noise, even without a gradient (an
    // empty batch, or a layer the batch did not reach).
    for &(id, len) in &params {
        if !applied.contains(&id) && !grads.contains_key(&id) {
            grads.insert(id, be.zeros(len)?);
        }
    }
    for (id, g) in grads.iter_mut() {
        inject(be, hook, *id, g)?;
    }
    if !grads.is_empty() {
        let mut order: Vec<u32> = grads.keys().copied().collect();
        order.sort_unstable();
        let sets: Vec<Vec<u32>> = match cfg.prune_scope {
            PruneScope::Global => vec![order],
            PruneScope::Tensor => order.into_iter().map(|id| vec![id]).collect(),
        };
        for set in sets {
            let pairs: Vec<(u32, &B::Buf)> = set.iter().map(|id| (*id, &grads[id])).collect();
            let r = apply(ctx, &pairs, &ucfg)?;
            out.kept += r.kept;
            out.coords += r.n;
        }
    }
    let finite = indices.len() - sums.nonfinite;
    if finite > 0 {
        out.loss = sums.loss_sum / finite as f64;
    }
    Ok(out)
}

/// θ += scale·z for every trainable tensor, z regenerated from the draw's direction key.
fn perturb<B: DpBackend>(ctx: &mut StepContext<'_, B>, draw: u32, scale: f32) -> Result<()> {
    perturb64(ctx, draw, f64::from(scale))
}

fn perturb64<B: DpBackend>(ctx: &mut StepContext<'_, B>, draw: u32, scale: f64) -> Result<()> {
    let (key, rng) = (ctx.key, ctx.cfg.rng);
    let mut pairs = ctx
        .model
        .trainable_mut_with(|id| dpzo_direction(key, rng, id, draw));
    ctx.backend.noise_axpy_many(&mut pairs, scale)
}

/// One micro-batch of DPZO's: the collated batch and its vision features, which
/// θ ± λz share (the vision tower is frozen); projected once too when the
/// projector is frozen.
struct ZoBatch<B: DpBackend> {
    batch: BatchLease,
    feats: B::Buf,
    projected: bool,
}

fn zo_batches<B: DpBackend>(
    ctx: &StepContext<'_, B>,
    micro: &[&[usize]],
) -> Result<Recycled<ZoBatch<B>>> {
    let tokens = ctx.cfg.train_token_select(ctx.key);
    // A loop, not `collect::<Result<_>>()`: that one cannot size the list first.
    let mut out = Recycled::with_capacity(micro.len());
    for mb in micro {
        let mut batch = BatchLease::take();
        ctx.data.collate_into(mb, ctx.cfg.text_len, &mut batch)?;
        let projected = !ctx.model.projector_trainable();
        let feats = if projected {
            ctx.model
                .projected_features(ctx.backend, &batch, tokens.as_ref())?
        } else {
            ctx.model
                .vision_features(ctx.backend, &batch, tokens.as_ref())?
        };
        out.push(ZoBatch {
            batch,
            feats,
            projected,
        });
    }
    Ok(out)
}

fn losses<B: DpBackend>(ctx: &StepContext<'_, B>, batches: &[ZoBatch<B>]) -> Result<Recycled<f32>> {
    let tokens = ctx.cfg.train_token_select(ctx.key);
    let n: usize = batches.iter().map(|zb| zb.batch.size).sum();
    let mut all = Recycled::with_capacity(n);
    for zb in batches {
        let (be, tok) = (ctx.backend, tokens.as_ref());
        let l = if zb.projected {
            ctx.model
                .per_example_loss_from_projected(be, &zb.batch, tok, &zb.feats)?
        } else {
            ctx.model
                .per_example_loss_from(be, &zb.batch, tok, &zb.feats)?
        };
        all.extend_from_slice(&l);
    }
    Ok(all)
}

/// DPZO's clipped sum of one batch: Σ_i clip((ℓ_i(θ+λz) − ℓ_i(θ−λz)) / 2λ, ±C),
/// with z the draw's direction; θ is perturbed in place and put back.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DpzoSum {
    /// Σ_i d_i over the finite differences (the value the noise is added to).
    pub sum: f64,
    /// Examples whose difference was not finite (dropped, like clip factor 0).
    pub nonfinite: usize,
    /// Mean of ½(ℓ⁺ + ℓ⁻) over the finite examples; NaN when there are none.
    pub loss: f64,
    /// Visual tokens per example.
    pub visual_tokens: usize,
}

/// [`DpzoSum`] of `indices` at draw `draw` (no noise, no update); θ is put back.
pub fn dpzo_clipped_sum<B: DpBackend>(
    ctx: &mut StepContext<'_, B>,
    draw: u32,
    indices: &[usize],
) -> Result<DpzoSum> {
    let s = dpzo_sum_at_minus(ctx, draw, indices)?;
    perturb(ctx, draw, ctx.cfg.dpzo_lambda)?;
    Ok(s)
}

/// [`dpzo_clipped_sum`], leaving θ at θ − λz: the step then moves it to θ − ηgz in
/// one pass instead of two (each pass regenerates z, the bulk of DPZO's own cost).
fn dpzo_sum_at_minus<B: DpBackend>(
    ctx: &mut StepContext<'_, B>,
    draw: u32,
    indices: &[usize],
) -> Result<DpzoSum> {
    let cfg = ctx.cfg;
    let lambda = cfg.dpzo_lambda;
    let micro: Recycled<&[usize]> = indices.chunks(cfg.micro_batch.max(1)).collect();
    let batches = zo_batches(ctx, &micro)?;
    let visual_tokens = if batches.is_empty() {
        0
    } else {
        ctx.model
            .visual_tokens(ctx.cfg.train_token_select(ctx.key).as_ref())
    };
    perturb(ctx, draw, lambda)?;
    let plus = losses(ctx, &batches)?;
    perturb(ctx, draw, -2.0 * lambda)?;
    let minus = losses(ctx, &batches)?;
    let c = f64::from(cfg.clip_norm);
    // A non-finite difference is dropped (contributes 0, like clip factor 0), and
    // counted; aborting would reveal that such an example was sampled.
    let (mut sum, mut nonfinite, mut loss_sum) = (0.0, 0usize, 0.0);
    for (&p, &m) in plus.iter().zip(&minus) {
        let d = (f64::from(p) - f64::from(m)) / (2.0 * f64::from(lambda));
        if d.is_finite() {
            sum += d.clamp(-c, c);
            loss_sum += 0.5 * (f64::from(p) + f64::from(m));
        } else {
            nonfinite += 1;
        }
    }
    let finite = plus.len() - nonfinite;
    Ok(DpzoSum {
        sum,
        nonfinite,
        loss: if finite == 0 {
            f64::NAN
        } else {
            loss_sum / finite as f64
        },
        visual_tokens,
    })
}

/// DPZero (Zhang et al. 2024, arXiv 2310.09639; github.com/Liang137/DPZero):
/// d_i = clip((ℓ(θ+λz) − ℓ(θ−λz)) / 2λ, ±C), g = (Σ d_i + N(0, σ²C²)) / B_expected,
/// θ ← θ − η·g·z with z regenerated.
fn dpzo_step<B: DpBackend>(
    ctx: &mut StepContext<'_, B>,
    draw: u32,
    indices: &[usize],
    hook: Option<&AuditHook>,
) -> Result<StepOutcome> {
    let cfg = ctx.cfg;
    // DPZO has no per-coordinate gradient: its audit uses black-box canaries only,
    // and the hook may only scale the noise.
    if hook.is_some_and(|h| !h.inject.is_empty()) {
        return Err(Error::Internal(
            "white-box canaries need a gradient method; dpzo is audited with black-box ones".into(),
        ));
    }
    let s = dpzo_sum_at_minus(ctx, draw, indices)?;
    let g = dpzo_noisy_scalar(
        ctx.key,
        cfg.rng,
        draw,
        s.sum,
        noise_std(true, ctx.sigma, cfg.clip_norm) * hook.map_or(1.0, |h| h.noise_scale),
        cfg.batch,
    );
    let coords: u64 = ctx.model.trainable().iter().map(|p| p.len as u64).sum();
    // θ − λz → θ − ηgz, as f64 so that λ − ηg is not rounded to f32 first.
    perturb64(
        ctx,
        draw,
        f64::from(cfg.dpzo_lambda) - f64::from(cfg.opt.lr) * g,
    )?;
    Ok(StepOutcome {
        batch_size: indices.len(),
        loss: s.loss,
        visual_tokens: s.visual_tokens,
        kept: coords,
        coords,
        nonfinite: s.nonfinite,
    })
}
