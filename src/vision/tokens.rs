//! Visual token selection in the style of VisionZip (Yang et al., 2024), the first
//! Dual-Priv mechanism: shrink a ViT's N = 1 + P tokens to 1 + K + M before the
//! projector, so the LLM sees far fewer visual tokens.
//!
//! For each image b, from one vision layer (LLaVA: the penultimate CLIP layer):
//!
//! 1. **Scores.** `score_j = mean_h attn_cls[b, h, j]` for the patches j = 1..N−1.
//! 2. **Dominant tokens.** The K patches with the highest score; ties go to the lower
//!    index. They are emitted after CLS in their original order.
//! 3. **Contextual tokens.** The other R = P − K patches, in original order, are
//!    merged into M tokens. Centers are the remaining positions 0, s, 2s, … (the
//!    first M, s = ⌊R / M⌋); they are not chosen from the data. Every other remaining
//!    token joins the center whose normalised head-averaged key is most cosine-similar
//!    to its own (ties → the lowest center). Contextual token m is
//!    `hidden[center_m] + mean(hidden[members of m])`, with an empty cluster's count
//!    clamped to 1, so it is then the center alone.
//! 4. **Optional noise** on the contextual tokens, see [`TokenSelectConfig::fuse_noise_std`].
//!
//! Output: `[B, 1 + K + M, D]` = CLS, the K dominant patches, the M contextual tokens,
//! plus the kept token indices `[B, 1 + K]` (CLS = 0 first).
//!
//! # Floating point, and why the CPU and GPU agree bit for bit
//!
//! Every reduction here is an f32 sum in a fixed sequential order (heads in order,
//! key dimensions in order, cluster members in original token order), with every
//! product rounded before it is added. `kernels/tokens.cu` performs exactly the same
//! operations in the same order (with `__fmul_rn` / `__fadd_rn` so nvcc cannot fuse
//! them into FMAs), so the scores, similarities, and therefore every selection and
//! assignment are identical on both, not merely close. f64 accumulation would not
//! improve agreement, only cost bandwidth on the GPU, so it is not used.
//!
//! # Non-finite inputs
//!
//! A NaN score ranks below every other score (it is treated as −∞), so the dominant
//! set is always exactly K patches. A NaN similarity never wins a center unless it is
//! the first center's. Neither case panics; the values simply propagate.

use rayon::prelude::*;

use crate::dp::noise::{NoiseKey, RngKind, StreamKey};
use crate::error::{ensure_shape, Setting};
use crate::mem::Recycled;
use crate::{Error, Result};

/// The noise `tensor_id` of the optional contextual-token noise
/// (see [`TokenSelectConfig::fuse_noise_std`]). It is distinct from every gradient
/// noise stream, so enabling this heuristic never reuses DP-SGD noise.
pub const TOKENS_NOISE_TENSOR_ID: u32 = 0xF05E_0001;

/// The assignment of a remaining token that belongs to no cluster: the centers
/// themselves, and every remaining token when M = 0.
pub const NOT_A_MEMBER: u32 = u32::MAX;

/// Normalising a key by `max(‖k‖, KEY_NORM_EPS)`, as `torch.nn.functional.normalize`
/// does, keeps an all-zero key finite (it becomes the zero vector).
pub const KEY_NORM_EPS: f32 = 1e-12;

/// The sizes of one vision layer's tensors, for a batch of images.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenShape {
    /// B: images in the batch.
    pub batch: usize,
    /// N = 1 + P: tokens per image, CLS first (577 for CLIP ViT-L/14-336).
    pub tokens: usize,
    /// H: attention heads (16 for CLIP ViT-L).
    pub heads: usize,
    /// hd: dimension of one head's key (64 for CLIP ViT-L).
    pub head_dim: usize,
    /// D: hidden size of a token (1024 for CLIP ViT-L).
    pub hidden: usize,
}

impl TokenShape {
    /// P = N − 1: patch tokens per image (everything but CLS).
    pub fn patches(&self) -> usize {
        self.tokens.saturating_sub(1)
    }

    /// Checks every dimension is at least 1 and every tensor size fits in `usize`.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("batch", self.batch),
            ("tokens (N, CLS included)", self.tokens),
            ("heads", self.heads),
            ("head_dim", self.head_dim),
            ("hidden", self.hidden),
        ] {
            ensure_shape(v >= 1, || {
                format!("token selection: {name} must be ≥ 1, got 0")
            })?;
        }
        self.attn_len()?;
        self.keys_len()?;
        self.hidden_len()?;
        Ok(())
    }

    /// Elements of `attn_cls`: B·H·N.
    pub fn attn_len(&self) -> Result<usize> {
        product(&[self.batch, self.heads, self.tokens], "attn_cls")
    }

    /// Elements of `keys`: B·N·H·hd.
    pub fn keys_len(&self) -> Result<usize> {
        product(
            &[self.batch, self.tokens, self.heads, self.head_dim],
            "keys",
        )
    }

    /// Elements of `hidden`: B·N·D.
    pub fn hidden_len(&self) -> Result<usize> {
        product(&[self.batch, self.tokens, self.hidden], "hidden")
    }
}

/// Multiplies dimensions, failing with a [`Error::Shape`] on overflow.
fn product(dims: &[usize], what: &str) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::Shape(format!("{what}: size {dims:?} overflows usize")))
}

/// How many tokens to keep and how to merge the rest.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenSelectConfig {
    /// K: dominant patches kept, not counting CLS (VisionZip's "54" is CLS + 53).
    pub keep: usize,
    /// M: contextual tokens merged from the patches that were not kept.
    pub context: usize,
    /// Standard deviation σ of Gaussian noise added to every element of the
    /// contextual tokens; 0 disables it.
    ///
    /// Element i of the `[B, M, D]` contextual block, of value v, becomes
    /// `(f64(v) + f64(σ) · z_i) as f32` (plain f64 product and sum) with
    /// `z_i = NoiseKey { stream: noise, tensor_id: TOKENS_NOISE_TENSOR_ID, step: 0 }.normal(i)`,
    /// so the GPU regenerates the same noise and rounds the same way.
    ///
    /// **This noise is a heuristic, not part of the formal DP guarantee.** Token
    /// selection is a per-example computation that happens before per-example
    /// gradient clipping, so DP-SGD's clipping and noise already cover whatever it
    /// does; this noise adds no accounted privacy and must not be counted in ε.
    pub fuse_noise_std: f32,
    /// Key of the contextual-token noise domain.
    pub noise: StreamKey,
}

impl TokenSelectConfig {
    /// VisionZip's LLaVA-1.5 default: CLS + 53 dominant + 10 contextual = 64 tokens.
    pub const LLAVA_DEFAULT: Self = Self {
        keep: 53,
        context: 10,
        fuse_noise_std: 0.0,
        noise: StreamKey {
            rng: RngKind::Chacha20,
            key: [0; 8],
        },
    };

    /// Tokens per image in the output: 1 + K + M.
    pub fn out_tokens(&self) -> usize {
        1 + self.keep + self.context
    }

    /// R = P − K: patches left for merging (call after [`Self::validate`]).
    pub fn remaining(&self, shape: &TokenShape) -> usize {
        shape.patches().saturating_sub(self.keep)
    }

    /// The noise stream of [`Self::fuse_noise_std`].
    pub fn noise_key(&self) -> NoiseKey {
        NoiseKey {
            stream: self.noise,
            tensor_id: TOKENS_NOISE_TENSOR_ID,
            step: 0,
        }
    }

    /// Checks the config against a shape: K ≤ P, M ≤ R and a finite σ ≥ 0.
    pub fn validate(&self, shape: &TokenShape) -> Result<()> {
        shape.validate()?;
        let p = shape.patches();
        if self.keep > p {
            return Err(Error::Setting {
                setting: Setting::KeepTokens,
                message: format!(
                    "token selection keeps {} dominant patches but an image has only {p} \
                     (N = {} tokens incl. CLS); keep at most {p}",
                    self.keep, shape.tokens
                ),
            });
        }
        let r = p - self.keep;
        if self.context > r {
            return Err(Error::Setting {
                setting: Setting::ContextTokens,
                message: format!(
                    "token selection asks for {} contextual tokens but only {r} patches \
                     remain after keeping {} of {p}; ask for at most {r}, or keep fewer \
                     dominant patches",
                    self.context, self.keep
                ),
            });
        }
        if !(self.fuse_noise_std.is_finite() && self.fuse_noise_std >= 0.0) {
            return Err(Error::Config(format!(
                "token fuse noise std must be a finite value ≥ 0, got {}",
                self.fuse_noise_std
            )));
        }
        Ok(())
    }
}

/// Checks that a buffer has the length its shape implies.
fn ensure_len(name: &str, got: usize, want: usize, layout: &str) -> Result<()> {
    ensure_shape(got == want, || {
        format!("{name} has {got} elements, expected {want} = {layout}")
    })
}

/// The result of [`select_tokens`].
#[derive(Clone, Debug, PartialEq)]
pub struct TokenSelection {
    /// `[B, 1 + K + M, D]`: CLS, the K dominant patches in original order, then the
    /// M contextual tokens.
    pub tokens: Recycled<f32>,
    /// `[B, 1 + K]`: token indices of CLS (0) and the dominant patches, ascending.
    pub kept: Recycled<u32>,
}

/// Which tokens go where: everything [`select_tokens`] decides before it touches
/// `hidden`. The GPU computes the same plan, so tests can compare it exactly.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenPlan {
    /// `[B, 1 + K]`: CLS (0), then the dominant patch indices, ascending.
    pub kept: Recycled<u32>,
    /// `[B, R]`: the token indices of the remaining patches, ascending.
    pub remaining: Recycled<u32>,
    /// `[B, M]`: the token index of each cluster center.
    pub centers: Recycled<u32>,
    /// `[B, R]`: for each remaining token, the cluster m it joins, or
    /// [`NOT_A_MEMBER`] for the centers themselves (and for all when M = 0).
    pub assign: Recycled<u32>,
}

/// The CLS attention scores `[B, P]`: `score[b, j−1] = mean_h attn_cls[b, h, j]`.
///
/// The mean is an f32 sum over heads in order, divided by H.
pub fn cls_scores(attn_cls: &[f32], shape: &TokenShape) -> Result<Recycled<f32>> {
    shape.validate()?;
    ensure_len("attn_cls", attn_cls.len(), shape.attn_len()?, "B·H·N")?;
    let (n, h) = (shape.tokens, shape.heads);
    let mut out = Recycled::with_capacity(shape.batch * shape.patches());
    for a in attn_cls.chunks_exact(h * n) {
        out.extend((1..n).map(|j| head_mean(a, h, n, j)));
    }
    Ok(out)
}

/// Mean over `heads` rows of length `stride` of column `col`, summed in head order.
fn head_mean(rows: &[f32], heads: usize, stride: usize, col: usize) -> f32 {
    let mut acc = 0.0f32;
    for h in 0..heads {
        acc += rows[h * stride + col];
    }
    acc / heads as f32
}

/// Maps a score to a key whose `total_cmp` order is the IEEE `>` order the GPU
/// uses, with NaN ranked lowest: NaN → −∞ and −0 → +0.
fn rank_key(s: f32) -> f32 {
    if s.is_nan() {
        f32::NEG_INFINITY
    } else if s == 0.0 {
        0.0
    } else {
        s
    }
}

/// The kept token indices of one image: CLS (0), then the `keep` patches with the
/// highest scores, ascending. `scores[j − 1]` is the score of token j; ties go to
/// the lower index and NaN ranks lowest.
pub fn dominant_indices(scores: &[f32], keep: usize) -> Result<Vec<u32>> {
    if keep > scores.len() {
        return Err(Error::Setting {
            setting: Setting::KeepTokens,
            message: format!(
                "cannot keep {keep} dominant patches out of {}; keep fewer",
                scores.len()
            ),
        });
    }
    ensure_shape(u32::try_from(scores.len()).is_ok(), || {
        format!("{} patches do not fit u32 token indices", scores.len())
    })?;
    let mut order = Vec::with_capacity(scores.len());
    let mut kept = vec![0; 1 + keep];
    dominant_into(scores, &mut order, &mut kept);
    Ok(kept)
}

/// [`dominant_indices`] into `kept` (1 + keep values, keep ≤ scores.len(), as the
/// caller checked), with `order` as scratch: no allocation once `order` holds
/// `scores.len()` values.
fn dominant_into(scores: &[f32], order: &mut Vec<usize>, kept: &mut [u32]) {
    let keep = kept.len() - 1;
    order.clear();
    order.extend(0..scores.len());
    // Highest score first; equal scores by lower index, so the choice is
    // deterministic (and no two entries compare equal, so an unstable sort, which
    // needs no buffer, gives the stable order).
    order.sort_unstable_by(|&a, &b| {
        rank_key(scores[b])
            .total_cmp(&rank_key(scores[a]))
            .then(a.cmp(&b))
    });
    let top = &mut order[..keep];
    top.sort_unstable();
    kept[0] = 0;
    for (k, &j) in kept[1..].iter_mut().zip(top.iter()) {
        *k = (j + 1) as u32;
    }
}

/// The merge metric `[B, N, hd]`: keys averaged over heads, then L2-normalised
/// (divided by `max(‖k‖, KEY_NORM_EPS)`). Sums run in order, in f32.
pub fn key_metric(keys: &[f32], shape: &TokenShape) -> Result<Recycled<f32>> {
    shape.validate()?;
    ensure_len("keys", keys.len(), shape.keys_len()?, "B·N·H·hd")?;
    let (h, hd) = (shape.heads, shape.head_dim);
    let mut out = Recycled::zeros(shape.batch * shape.tokens * hd);
    out.par_chunks_mut(hd)
        .zip(keys.par_chunks(h * hd))
        .for_each(|(m, k)| {
            for (e, v) in m.iter_mut().enumerate() {
                *v = head_mean(k, h, hd, e);
            }
            let norm = dot(m, m).sqrt().max(KEY_NORM_EPS);
            for v in m.iter_mut() {
                *v /= norm;
            }
        });
    Ok(out)
}

/// Σ a_e·b_e in order, each product rounded before the add (no FMA), as on the GPU.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = 0.0f32;
    for (x, y) in a.iter().zip(b) {
        acc += x * y;
    }
    acc
}

/// Decides, per image, which tokens are kept, which are centers, and which center
/// every other remaining token joins. Validates `cfg` against `shape`.
pub fn plan_tokens(
    attn_cls: &[f32],
    keys: &[f32],
    shape: &TokenShape,
    cfg: &TokenSelectConfig,
) -> Result<TokenPlan> {
    cfg.validate(shape)?;
    let scores = cls_scores(attn_cls, shape)?;
    ensure_len("keys", keys.len(), shape.keys_len()?, "B·N·H·hd")?;
    // The metric is only needed to assign members; skip it when nothing merges.
    let metric = if cfg.context > 0 {
        key_metric(keys, shape)?
    } else {
        Recycled::default()
    };
    let (p, n, hd, m) = (shape.patches(), shape.tokens, shape.head_dim, cfg.context);
    ensure_shape(u32::try_from(n).is_ok(), || {
        format!("{n} tokens do not fit u32 token indices")
    })?;
    let (k1, r) = (1 + cfg.keep, p - cfg.keep);
    let mut plan = TokenPlan {
        kept: Recycled::filled(shape.batch * k1, 0),
        remaining: Recycled::filled(shape.batch * r, 0),
        centers: Recycled::filled(shape.batch * m, 0),
        assign: Recycled::filled(shape.batch * r, NOT_A_MEMBER),
    };
    // Kept, remaining and centers one image at a time, into the plan's slices (a
    // sort of a few hundred scores each); a per-image Vec of each (as before) was
    // ~300 allocations per tiny step at B = 32.
    let mut order = Recycled::with_capacity(p);
    for b in 0..shape.batch {
        let kept = &mut plan.kept[b * k1..(b + 1) * k1];
        dominant_into(&scores[b * p..(b + 1) * p], &mut order, kept);
        // Kept indices are ascending, so one merge-walk yields the rest in order.
        let remaining = &mut plan.remaining[b * r..(b + 1) * r];
        let (mut next, mut i) = (1, 0);
        for t in 1..n as u32 {
            if next < k1 && kept[next] == t {
                next += 1;
            } else {
                remaining[i] = t;
                i += 1;
            }
        }
        // step = ⌊R / M⌋ ≥ 1 (validated M ≤ R); no step when M = 0: nothing merges.
        if let Some(step) = r.checked_div(m) {
            for (c, ct) in plan.centers[b * m..(b + 1) * m].iter_mut().enumerate() {
                *ct = remaining[c * step];
            }
        }
    }
    // The assignments (R·M dot products per image) in parallel over images; with
    // M = 0 every remaining token stays NOT_A_MEMBER.
    if let Some(step) = r.checked_div(m) {
        let (remaining, centers) = (&plan.remaining, &plan.centers);
        plan.assign
            .par_chunks_mut(r)
            .enumerate()
            .for_each(|(b, assign)| {
                let centers = &centers[b * m..(b + 1) * m];
                let row = |t: u32| {
                    let off = (b * n + t as usize) * hd;
                    &metric[off..off + hd]
                };
                for (ri, (&t, a)) in remaining[b * r..(b + 1) * r]
                    .iter()
                    .zip(assign.iter_mut())
                    .enumerate()
                {
                    if ri % step == 0 && ri / step < m {
                        continue; // a center: NOT_A_MEMBER
                    }
                    // Argmax of cosine similarity; a strict `>` keeps the lowest
                    // center on ties (and never lets a NaN win).
                    let mut best = 0usize;
                    let mut best_sim = dot(row(t), row(centers[0]));
                    for (c, &ct) in centers.iter().enumerate().skip(1) {
                        let sim = dot(row(t), row(ct));
                        if sim > best_sim {
                            best = c;
                            best_sim = sim;
                        }
                    }
                    *a = best as u32;
                }
            });
    }
    Ok(plan)
}

/// Builds the output tokens `[B, 1 + K + M, D]` from `hidden` and a plan: copies the
/// kept tokens, forms each contextual token as center + mean(members) (empty
/// cluster: count clamped to 1), then adds the optional noise.
pub fn gather_fuse(
    hidden: &[f32],
    shape: &TokenShape,
    cfg: &TokenSelectConfig,
    plan: &TokenPlan,
) -> Result<Recycled<f32>> {
    cfg.validate(shape)?;
    ensure_len("hidden", hidden.len(), shape.hidden_len()?, "B·N·D")?;
    let (bsz, n, d) = (shape.batch, shape.tokens, shape.hidden);
    let (k, m, r) = (cfg.keep, cfg.context, cfg.remaining(shape));
    ensure_len("plan.kept", plan.kept.len(), bsz * (1 + k), "B·(1+K)")?;
    ensure_len("plan.remaining", plan.remaining.len(), bsz * r, "B·R")?;
    ensure_len("plan.centers", plan.centers.len(), bsz * m, "B·M")?;
    ensure_len("plan.assign", plan.assign.len(), bsz * r, "B·R")?;
    let bad = |what: &str, v: u32, lim: usize| {
        Error::Shape(format!("plan.{what} holds {v}, out of range 0..{lim}"))
    };
    for (what, idx) in [
        ("kept", &plan.kept),
        ("remaining", &plan.remaining),
        ("centers", &plan.centers),
    ] {
        if let Some(&v) = idx.iter().find(|&&v| v as usize >= n) {
            return Err(bad(what, v, n));
        }
    }
    if let Some(&v) = plan
        .assign
        .iter()
        .find(|&&v| v != NOT_A_MEMBER && v as usize >= m)
    {
        return Err(bad("assign", v, m));
    }

    let o = cfg.out_tokens();
    let mut out = Recycled::zeros(bsz * o * d);
    out.par_chunks_mut(o * d)
        .enumerate()
        .for_each(|(b, img_out)| {
            let img = &hidden[b * n * d..(b + 1) * n * d];
            let tok = |t: u32| &img[t as usize * d..(t as usize + 1) * d];
            let (kept_out, ctx_out) = img_out.split_at_mut((1 + k) * d);
            for (dst, &t) in kept_out.chunks_exact_mut(d).zip(&plan.kept[b * (1 + k)..]) {
                dst.copy_from_slice(tok(t));
            }
            let remaining = &plan.remaining[b * r..(b + 1) * r];
            let assign = &plan.assign[b * r..(b + 1) * r];
            for (c, dst) in ctx_out.chunks_exact_mut(d).enumerate() {
                // Members summed in original token order, as the kernel does, in
                // dst itself (then dst = center + sum / count).
                dst.fill(0.0);
                let mut count = 0usize;
                for (&t, _) in remaining.iter().zip(assign).filter(|(_, &a)| a == c as u32) {
                    for (s, &x) in dst.iter_mut().zip(tok(t)) {
                        *s += x;
                    }
                    count += 1;
                }
                let count = count.max(1) as f32;
                for (y, &x) in dst.iter_mut().zip(tok(plan.centers[b * m + c])) {
                    *y = x + *y / count;
                }
            }
            if cfg.fuse_noise_std > 0.0 {
                // Flat index within the [B, M, D] contextual block.
                cfg.noise_key().add_scaled(
                    (b * m * d) as u64,
                    f64::from(cfg.fuse_noise_std),
                    ctx_out,
                );
            }
        });
    Ok(out)
}

/// VisionZip token selection for a batch: [`plan_tokens`] then [`gather_fuse`].
///
/// `attn_cls` is `[B, H, N]` (the CLS query's attention row per head), `keys` is
/// `[B, N, H·hd]` and `hidden` is `[B, N, D]`, all row-major. With K = P and M = 0
/// the output equals `hidden` exactly.
pub fn select_tokens(
    attn_cls: &[f32],
    keys: &[f32],
    hidden: &[f32],
    shape: &TokenShape,
    cfg: &TokenSelectConfig,
) -> Result<TokenSelection> {
    cfg.validate(shape)?;
    ensure_len("hidden", hidden.len(), shape.hidden_len()?, "B·N·D")?;
    let plan = plan_tokens(attn_cls, keys, shape, cfg)?;
    let tokens = gather_fuse(hidden, shape, cfg, &plan)?;
    Ok(TokenSelection {
        tokens,
        kept: plan.kept,
    })
}
