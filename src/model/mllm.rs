//! The whole model: images and text in, per-example losses and captures out.
//!
//! ```text
//! images → vision tower (layer −2) → [token selection] → projector ─┐
//! input_ids → embedding ─────────────────────────────────────────────┴→ sequence
//!   → Llama decoder (positions 0..L) → RMSNorm → lm_head at the T text positions
//!   → cross-entropy at masked positions
//! ```
//!
//! **Sequence.** `[visual, text]` (L = V + T) for the built-in task, or, when the
//! batch marks an `<image>` placeholder ([`Batch::image_pos`]), the text with the V
//! visual tokens spliced in place of the placeholder (L = V + T − 1), as
//! transformers' LLaVA does; a text-only example in such a batch is its text alone
//! (positions 0..T, as transformers runs a prompt without `pixel_values`). Padding
//! is on the right only, so the causal decoder never lets a real token see a pad.
//!
//! **Text-only examples and DP.** Their rows of the visual tokens are never copied
//! into the sequence, so the backward leaves their projector output gradients at
//! exactly 0: such an example adds nothing to the projector's per-example norm or
//! clipped sum, and its norm is that of the decoder tensors it touches. Its image
//! slot is zeroed before the vision tower (its pixels are never read).
//!
//! **Loss.** ℓ_i is the mean cross-entropy over example i's positions with
//! `loss_mask = 1` (0 if it has none). The backward differentiates Σ_i ℓ_i (a sum
//! over examples, not a mean), so the part of each capture that belongs to example i
//! is exactly example i's own gradient ∇ℓ_i.
//!
//! **Visual tokens.** Without token selection the projector sees the patches only
//! (N − 1 tokens, LLaVA's `patch` feature) or, with [`VisionFeature::ClsPatch`], all N
//! tokens. With token selection it sees `[CLS, K dominant, M contextual]`.
use crate::mem::{Recycled, Shared};
use std::collections::HashMap;
use std::path::Path;

use super::config::{FullGroup, ModelConfig, TrainMode, VisionFeature};
use super::llama::{LayerCache, Llama};
use super::projector::{ProjCache, Projector};
use super::vit::{VisionOut, VisionTower};
use super::weights::{read_checkpoint, Builder, Store};
use super::{Capture, ForwardBackward, TrainableParam};
use crate::backend::{Backend, Blocks, MatmulSpec, RowShape};
use crate::data::Batch;
use crate::error::ensure_shape;
use crate::vision::tokens::{TokenSelectConfig, TokenShape};
use crate::{Error, Result};

/// A LLaVA-style multimodal LLM on backend `B`.
pub struct Mllm<B: Backend> {
    cfg: ModelConfig,
    mode: TrainMode,
    seed: u64,
    store: Store<B>,
    trainable: Vec<TrainableParam>,
    train_idx: Vec<usize>,
    vit: VisionTower,
    proj: Projector,
    llm: Llama,
}

/// Activations of one forward pass.
struct Fwd<B: Backend> {
    b: usize,
    v: usize,
    t: usize,
    lay: SeqLayout,
    /// The projector's activations; `None` when the forward started from
    /// projected features (forward only).
    proj: Option<ProjCache<B>>,
    layers: Recycled<LayerCache<B>>,
    x_final: B::Buf,
    rstd_f: B::Buf,
    /// `[b, L, D]` after the final norm.
    hf: B::Buf,
    /// `[b·T, D]` text rows of `hf` (lm_head input), when the loss was computed.
    ht: Option<B::Buf>,
    dlogits: Option<B::Buf>,
    per_ex: Option<B::Buf>,
}

/// Where each example's visual and text tokens sit in the decoder's sequence of
/// `l` tokens (see [`Batch::image_pos`]).
///
/// * `[visual, text]` (`spliced = false`): V visual tokens, then the T text tokens.
/// * Spliced (HF LLaVA): text `[0, p)`, the V visual tokens, then text `[p + 1, T)`
///   for an example whose placeholder is at p; text `[0, T)` alone for a text-only
///   example. `l = T + max(V, 1) − 1`, the same whichever examples have images, so
///   neither the step's cost nor another example's positions depend on it; the
///   rows past an example's own tokens are zero and, the decoder being causal, no
///   real token reads them.
struct SeqLayout {
    b: usize,
    v: usize,
    t: usize,
    l: usize,
    spliced: bool,
    /// Per example: the placeholder's position, `None` for text-only (spliced
    /// only; empty otherwise, see [`Self::pos`]).
    pos: Vec<Option<usize>>,
}

impl SeqLayout {
    fn new(batch: &Batch, v: usize) -> Self {
        let (b, t) = (batch.size, batch.text_len);
        let (spliced, pos, l) = match &batch.image_pos {
            // Unspliced: every example's image first (`Self::pos`), no list.
            None => (false, Vec::new(), v + t),
            Some(p) => (true, p.clone(), t + v.max(1) - 1),
        };
        Self {
            b,
            v,
            t,
            l,
            spliced,
            pos,
        }
    }

    /// One block copy per run of consecutive rows, `d` values per row.
    fn rows(count: usize, src: usize, dst: usize, d: usize) -> Blocks {
        Blocks {
            count: 1,
            len: count * d,
            src_off: src * d,
            src_stride: 0,
            dst_off: dst * d,
            dst_stride: 0,
        }
    }

    /// Per example: the placeholder's position (every unspliced example's image
    /// comes first, at 0), `None` for text-only.
    fn pos(&self, i: usize) -> Option<usize> {
        if self.spliced {
            self.pos[i]
        } else {
            Some(0)
        }
    }

    /// Text embeddings `[b, T, d]` into the sequence `[b, l, d]` (the placeholder
    /// row, if any, is dropped): hands each copy to `f`, so no list is allocated.
    fn text_into_seq(&self, d: usize, mut f: impl FnMut(Blocks) -> Result<()>) -> Result<()> {
        let (t, l, v) = (self.t, self.l, self.v);
        if !self.spliced {
            return f(Blocks {
                count: self.b,
                len: t * d,
                src_off: 0,
                src_stride: t * d,
                dst_off: v * d,
                dst_stride: l * d,
            });
        }
        for (i, p) in self.pos.iter().enumerate() {
            match *p {
                Some(p) => {
                    if p > 0 {
                        f(Self::rows(p, i * t, i * l, d))?;
                    }
                    if t > p + 1 {
                        f(Self::rows(t - p - 1, i * t + p + 1, i * l + p + v, d))?;
                    }
                }
                None if t > 0 => f(Self::rows(t, i * t, i * l, d))?,
                None => {}
            }
        }
        Ok(())
    }

    /// Visual tokens `[b, V, d]` into the sequence (text-only examples' rows of
    /// the visual tokens go nowhere, so their backward gradient stays exactly 0).
    fn vis_into_seq(&self, d: usize, mut f: impl FnMut(Blocks) -> Result<()>) -> Result<()> {
        let (l, v) = (self.l, self.v);
        if !self.spliced {
            return f(Blocks {
                count: self.b,
                len: v * d,
                src_off: 0,
                src_stride: v * d,
                dst_off: 0,
                dst_stride: l * d,
            });
        }
        if v == 0 {
            return Ok(());
        }
        for (i, p) in self.pos.iter().enumerate() {
            if let Some(p) = *p {
                f(Self::rows(v, i * v, i * l + p, d))?;
            }
        }
        Ok(())
    }

    /// The sequence row whose output gives the logits of text position j: text
    /// before the image (and all of a text-only example) reads its own row; the
    /// placeholder reads the last visual token's; text after it its shifted row.
    fn readout_row(&self, i: usize, j: usize) -> usize {
        match self.pos(i) {
            None => j,
            Some(p) if j < p => j,
            Some(_) if self.spliced => j + self.v - 1,
            Some(_) => j + self.v,
        }
    }

    /// Sequence rows `[b, l, d]` to the T readout rows `[b, T, d]`, each copy
    /// handed to `f`.
    fn readout(&self, d: usize, mut f: impl FnMut(Blocks) -> Result<()>) -> Result<()> {
        let (t, l) = (self.t, self.l);
        if !self.spliced {
            return f(Blocks {
                count: self.b,
                len: t * d,
                src_off: self.v * d,
                src_stride: l * d,
                dst_off: 0,
                dst_stride: t * d,
            });
        }
        for (i, p) in self.pos.iter().enumerate() {
            let p = p.unwrap_or(t);
            if p > 0 {
                f(Self::rows(p, i * l, i * t, d))?;
            }
            if t > p {
                f(Self::rows(
                    t - p,
                    i * l + self.readout_row(i, p),
                    i * t + p,
                    d,
                ))?;
            }
        }
        Ok(())
    }

    /// `images` `[b, 3, S, S]` with text-only examples' slots set to zero (`None`
    /// when there are none): their pixels must not reach the vision tower, where a
    /// NaN would poison the projector's captures, yet the tower runs on every slot
    /// so the step's cost does not reveal how many sampled examples have images.
    fn blank_text_only(&self, images: &[f32]) -> Option<Vec<f32>> {
        if !self.spliced || self.pos.iter().all(Option::is_some) {
            return None;
        }
        let per = images.len() / self.b.max(1);
        let mut out = images.to_vec();
        for (i, p) in self.pos.iter().enumerate() {
            if p.is_none() {
                out[i * per..][..per].fill(0.0);
            }
        }
        Some(out)
    }
}

/// The same copies in the other direction (scatter instead of gather).
fn swap(b: Blocks) -> Blocks {
    Blocks {
        src_off: b.dst_off,
        src_stride: b.dst_stride,
        dst_off: b.src_off,
        dst_stride: b.src_stride,
        ..b
    }
}

impl<B: Backend> Mllm<B> {
    /// A randomly initialised model, deterministic in `seed` (each tensor has its
    /// own stream keyed by its name, see [`super::weights`]). Fails with a config
    /// error naming the preset if its weights do not fit in the backend's memory.
    pub fn new(backend: &B, cfg: &ModelConfig, mode: &TrainMode, seed: u64) -> Result<Self> {
        Self::build(backend, cfg, mode, seed, false)
    }

    /// [`Self::new`] for a model whose non-LoRA tensors are all about to be read
    /// from a checkpoint: those are allocated as zeros instead of drawn from their
    /// init streams (for a 7B model, billions of normals nobody would read). LoRA
    /// tensors get their seeded init as in [`Self::new`].
    pub(crate) fn new_for_load(
        backend: &B,
        cfg: &ModelConfig,
        mode: &TrainMode,
        seed: u64,
    ) -> Result<Self> {
        Self::build(backend, cfg, mode, seed, true)
    }

    fn build(
        backend: &B,
        cfg: &ModelConfig,
        mode: &TrainMode,
        seed: u64,
        for_load: bool,
    ) -> Result<Self> {
        cfg.validate()?;
        mode.validate()?;
        let values = cfg.base_params()
            + match mode {
                TrainMode::Lora { .. } => cfg.trainable_params(mode),
                TrainMode::Full { .. } => 0,
            };
        let bytes = values.saturating_mul(backend.value_bytes() as u64);
        if let Some(avail) = backend.available_memory() {
            if bytes > avail {
                return Err(Error::Config(format!(
                    "model preset '{}' needs {:.2} GiB for its {} weights on the {} backend, \
                     but only {:.2} GiB is available; use a smaller preset or a larger device",
                    cfg.name,
                    bytes as f64 / (1u64 << 30) as f64,
                    values,
                    backend.name(),
                    avail as f64 / (1u64 << 30) as f64
                )));
            }
        }
        let mut bd = Builder::new(backend, seed);
        bd.for_load = for_load;
        let vit = VisionTower::build(&mut bd, &cfg.vision)?;
        let proj = Projector::build(
            &mut bd,
            cfg.vision.hidden,
            cfg.llm.hidden,
            cfg.projector,
            mode.has_group(FullGroup::Projector),
        )?;
        let llm = Llama::build(&mut bd, &cfg.llm, mode)?;
        Ok(Self {
            cfg: cfg.clone(),
            mode: mode.clone(),
            seed,
            store: bd.store,
            trainable: bd.trainable,
            train_idx: bd.train_idx,
            vit,
            proj,
            llm,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The training mode.
    pub fn mode(&self) -> &TrainMode {
        &self.mode
    }

    /// The trainable tensors, indexed by id.
    pub fn trainable(&self) -> &[TrainableParam] {
        &self.trainable
    }

    /// A trainable tensor's values.
    ///
    /// # Panics
    /// If `id` is not an id from [`Self::trainable`] (a programming error).
    pub fn param(&self, id: u32) -> &B::Buf {
        self.store.buf(self.train_idx[id as usize])
    }

    /// A trainable tensor's values, mutably (for the optimizer).
    ///
    /// # Panics
    /// If `id` is not an id from [`Self::trainable`] (a programming error).
    pub fn param_mut(&mut self, id: u32) -> &mut B::Buf {
        &mut self.store.tensors[self.train_idx[id as usize]].buf
    }

    /// Several trainable tensors at once, mutably, in the order of `ids` (the
    /// optimizer's global-scope update touches them together).
    pub fn params_mut(&mut self, ids: &[u32]) -> Result<Vec<&mut B::Buf>> {
        let mut want: Vec<(usize, usize)> = Vec::with_capacity(ids.len());
        for (pos, &id) in ids.iter().enumerate() {
            let idx = *self
                .train_idx
                .get(id as usize)
                .ok_or_else(|| Error::Config(format!("no trainable parameter with id {id}")))?;
            want.push((idx, pos));
        }
        want.sort_unstable();
        if want.windows(2).any(|w| w[0].0 == w[1].0) {
            return Err(Error::Config(format!("parameter ids {ids:?} repeat")));
        }
        let mut out: Vec<Option<&mut B::Buf>> = (0..ids.len()).map(|_| None).collect();
        let mut it = want.into_iter().peekable();
        for (i, t) in self.store.tensors.iter_mut().enumerate() {
            if let Some(&(idx, pos)) = it.peek() {
                if idx == i {
                    out[pos] = Some(&mut t.buf);
                    it.next();
                }
            }
        }
        Ok(out
            .into_iter()
            .map(|b| b.expect("every id was found"))
            .collect())
    }

    /// Every trainable tensor, mutably, each paired with `f(id)`, in tensor order
    /// (DPZO's perturbation, which keys each tensor by its id). One allocation.
    pub fn trainable_mut_with<T>(
        &mut self,
        mut f: impl FnMut(u32) -> T,
    ) -> Recycled<(&mut B::Buf, T)> {
        let mut out = Recycled::with_capacity(self.train_idx.len());
        for (i, t) in self.store.tensors.iter_mut().enumerate() {
            // A linear search: a few hundred trainable tensors at most, and no
            // reverse map to allocate.
            if let Some(id) = self.train_idx.iter().position(|&k| k == i) {
                out.push((&mut t.buf, f(id as u32)));
            }
        }
        out
    }

    /// Names of all tensors (frozen and trainable), in checkpoint order.
    pub fn tensor_names(&self) -> Vec<&str> {
        self.store.tensors.iter().map(|t| t.name.as_str()).collect()
    }

    /// Any tensor by name.
    pub fn tensor(&self, name: &str) -> Option<&B::Buf> {
        self.store.index.get(name).map(|&i| self.store.buf(i))
    }

    /// A tensor's shape by name.
    pub fn tensor_shape(&self, name: &str) -> Option<&[usize]> {
        self.store
            .index
            .get(name)
            .map(|&i| self.store.tensors[i].shape.as_slice())
    }

    /// Any tensor by name, mutably (tests, weight surgery).
    pub fn tensor_mut(&mut self, name: &str) -> Option<&mut B::Buf> {
        let i = *self.store.index.get(name)?;
        Some(&mut self.store.tensors[i].buf)
    }

    /// Visual tokens per example fed to the LLM under `tokens`.
    pub fn visual_tokens(&self, tokens: Option<&TokenSelectConfig>) -> usize {
        match (tokens, self.cfg.vision.feature) {
            (Some(c), _) => c.out_tokens(),
            (None, VisionFeature::Patch) => self.cfg.vision.patches(),
            (None, VisionFeature::ClsPatch) => self.cfg.vision.tokens(),
        }
    }

    /// Checks a batch against the model; returns (B, T).
    /// Checks a collated batch against the model (image size, lengths, token ids,
    /// loss mask); returns (batch size, text length).
    pub fn check_batch(&self, batch: &Batch) -> Result<(usize, usize)> {
        let (b, t, s) = (batch.size, batch.text_len, self.cfg.vision.image_size);
        ensure_shape(batch.image_size == s, || {
            format!(
                "batch images are {}×{} but model '{}' expects {s}×{s}",
                batch.image_size, batch.image_size, self.cfg.name
            )
        })?;
        let img = b
            .checked_mul(3 * s * s)
            .ok_or_else(|| Error::Shape(format!("batch size {b} overflows")))?;
        ensure_shape(batch.images.len() == img, || {
            format!(
                "batch images hold {} values, expected B·3·S·S = {b}·3·{s}·{s}",
                batch.images.len()
            )
        })?;
        let bt = b
            .checked_mul(t)
            .ok_or_else(|| Error::Shape(format!("batch {b}×{t} overflows")))?;
        for (name, len) in [
            ("input_ids", batch.input_ids.len()),
            ("targets", batch.targets.len()),
            ("loss_mask", batch.loss_mask.len()),
        ] {
            ensure_shape(len == bt, || {
                format!("batch {name} has {len} values, expected B·T = {b}·{t}")
            })?;
        }
        if let Some(pos) = &batch.image_pos {
            ensure_shape(pos.len() == b, || {
                format!("batch image_pos has {} entries for {b} examples", pos.len())
            })?;
            if let Some((i, p)) = pos
                .iter()
                .enumerate()
                .find_map(|(i, p)| p.filter(|&p| p >= t).map(|p| (i, p)))
            {
                return Err(Error::Shape(format!(
                    "example {i}: the <image> placeholder at position {p} is outside its {t} text tokens"
                )));
            }
        }
        let vocab = self.cfg.llm.vocab;
        if let Some((i, id)) = batch
            .input_ids
            .iter()
            .enumerate()
            .find(|(_, &id)| id as usize >= vocab)
        {
            return Err(Error::Shape(format!(
                "input token id {id} at example {}, position {} is out of range for vocabulary {vocab}",
                i / t.max(1),
                i % t.max(1)
            )));
        }
        for (i, (&m, &tg)) in batch.loss_mask.iter().zip(&batch.targets).enumerate() {
            ensure_shape(m == 0.0 || m == 1.0, || {
                format!("loss_mask value {m} at index {i} must be 0 or 1")
            })?;
            ensure_shape(m == 0.0 || (tg as usize) < vocab, || {
                format!("target id {tg} at index {i} is out of range for vocabulary {vocab}")
            })?;
        }
        Ok((b, t))
    }

    /// Layer −2 features → the visual tokens `[b, V, Dv]`.
    fn select(
        &self,
        be: &B,
        vo: VisionOut<B>,
        b: usize,
        tokens: Option<&TokenSelectConfig>,
    ) -> Result<B::Buf> {
        let vc = &self.cfg.vision;
        let (n, d) = (vc.tokens(), vc.hidden);
        match (tokens, vc.feature) {
            (Some(tc), _) => {
                let shape = TokenShape {
                    batch: b,
                    tokens: n,
                    heads: vc.heads,
                    head_dim: d / vc.heads,
                    hidden: d,
                };
                be.select_tokens(&vo.attn_cls, &vo.keys, &vo.hidden, &shape, tc)
            }
            (None, VisionFeature::ClsPatch) => Ok(vo.hidden),
            (None, VisionFeature::Patch) => {
                let mut out = be.zeros(b * (n - 1) * d)?;
                let blocks = Blocks {
                    count: b,
                    len: (n - 1) * d,
                    src_off: d,
                    src_stride: n * d,
                    dst_off: 0,
                    dst_stride: (n - 1) * d,
                };
                be.copy_blocks(&mut out, &vo.hidden, blocks)?;
                Ok(out)
            }
        }
    }

    /// The selected vision features `[b, V, D_vision]` of a batch (vision tower and
    /// token selection), the projector's input. The tower is frozen, so they do not
    /// depend on anything training changes: callers that evaluate one batch at
    /// several parameter values (DPZO's θ ± λz) compute them once
    /// ([`Self::per_example_loss_from`]).
    pub fn vision_features(
        &self,
        be: &B,
        batch: &Batch,
        tokens: Option<&TokenSelectConfig>,
    ) -> Result<B::Buf> {
        let (b, _) = self.check_batch(batch)?;
        let v = self.visual_tokens(tokens);
        let lay = SeqLayout::new(batch, v);
        let blanked = lay.blank_text_only(&batch.images);
        let images = be.upload(blanked.as_deref().unwrap_or(&batch.images))?;
        let vo = self.vit.forward(be, &self.store, &images, b)?;
        self.select(be, vo, b, tokens)
    }

    fn forward(
        &self,
        be: &B,
        batch: &Batch,
        tokens: Option<&TokenSelectConfig>,
        train: bool,
        with_loss: bool,
    ) -> Result<Fwd<B>> {
        let feats = self.vision_features(be, batch, tokens)?;
        self.forward_from(be, batch, tokens, feats, train, with_loss)
    }

    /// The forward from the vision features on (projector, sequence, decoder, loss).
    fn forward_from(
        &self,
        be: &B,
        batch: &Batch,
        tokens: Option<&TokenSelectConfig>,
        feats: B::Buf,
        train: bool,
        with_loss: bool,
    ) -> Result<Fwd<B>> {
        let (b, _) = self.check_batch(batch)?;
        let st = &self.store;
        let v = self.visual_tokens(tokens);
        let want = b * v * self.cfg.vision.hidden;
        if be.len(&feats) != want {
            return Err(Error::Shape(format!(
                "vision features hold {} values; the batch needs {b} × {v} × {} = {want}",
                be.len(&feats),
                self.cfg.vision.hidden
            )));
        }
        let (vis, proj) = self.proj.forward(be, st, feats, b * v)?;
        self.forward_from_projected(be, batch, tokens, vis, Some(proj), train, with_loss)
    }

    /// The forward from the projected visual tokens `[b·v, d]` on (sequence,
    /// decoder, loss); `proj` is the projector's cache when the backward needs it.
    #[allow(clippy::too_many_arguments)]
    fn forward_from_projected(
        &self,
        be: &B,
        batch: &Batch,
        tokens: Option<&TokenSelectConfig>,
        vis: B::Buf,
        proj: Option<ProjCache<B>>,
        train: bool,
        with_loss: bool,
    ) -> Result<Fwd<B>> {
        let (b, t) = self.check_batch(batch)?;
        let st = &self.store;
        let lc = &self.cfg.llm;
        let d = lc.hidden;
        let v = self.visual_tokens(tokens);
        let lay = SeqLayout::new(batch, v);
        if be.len(&vis) != b * v * d {
            return Err(Error::Shape(format!(
                "projected visual tokens hold {} values; the batch needs {b} × {v} × {d}",
                be.len(&vis)
            )));
        }
        // Text embedding and the sequence [visual, text].
        let ids = be.upload_ids(&batch.input_ids)?;
        let mut txt = be.zeros(b * t * d)?;
        be.embedding_fwd(
            &mut txt,
            st.buf(self.llm.embed),
            &ids,
            RowShape {
                rows: b * t,
                dim: d,
            },
            lc.vocab,
        )?;
        let l = lay.l;
        let mut x = be.zeros(b * l * d)?;
        lay.vis_into_seq(d, |b| be.copy_blocks(&mut x, &vis, b))?;
        lay.text_into_seq(d, |b| be.copy_blocks(&mut x, &txt, b))?;
        // Decoder.
        let mut layers = Recycled::with_capacity(lc.layers);
        for i in 0..lc.layers {
            let (y, cache) = self.llm.layer_forward(be, st, i, x, (b, l), train)?;
            layers.extend(cache);
            x = y;
        }
        let mut hf = be.zeros(b * l * d)?;
        let mut rstd_f = be.zeros(b * l)?;
        be.rmsnorm_fwd(
            &mut hf,
            &mut rstd_f,
            &x,
            st.buf(self.llm.norm),
            RowShape {
                rows: b * l,
                dim: d,
            },
            lc.rms_eps,
        )?;
        let mut fwd = Fwd {
            b,
            v,
            t,
            lay,
            proj,
            layers,
            x_final: x,
            rstd_f,
            hf,
            ht: None,
            dlogits: None,
            per_ex: None,
        };
        if with_loss {
            let mut ht = be.zeros(b * t * d)?;
            fwd.lay
                .readout(d, |b| be.copy_blocks(&mut ht, &fwd.hf, b))?;
            let (logits, _) = self.llm.lm_head.forward(be, st, &ht, b * t)?;
            // Row weights: mask / (masked positions of the example), so Σ_rows = Σ_i ℓ_i.
            let mut w = Recycled::filled(b * t, 0.0f32);
            for i in 0..b {
                let m = &batch.loss_mask[i * t..][..t];
                let cnt: f32 = m.iter().sum();
                if cnt > 0.0 {
                    for j in 0..t {
                        w[i * t + j] = m[j] / cnt;
                    }
                }
            }
            let weights = be.upload(&w)?;
            let targets = be.upload_ids(&batch.targets)?;
            let mut losses = be.zeros(b * t)?;
            let mut dlogits = be.zeros(b * t * lc.vocab)?;
            be.cross_entropy(
                &mut losses,
                &mut dlogits,
                &logits,
                &targets,
                &weights,
                RowShape {
                    rows: b * t,
                    dim: lc.vocab,
                },
            )?;
            let ones = be.upload(&Recycled::filled(t, 1.0f32))?;
            let mut per_ex = be.zeros(b)?;
            be.matmul(&mut per_ex, &losses, &ones, MatmulSpec::nn(b, 1, t))?;
            fwd.ht = Some(ht);
            fwd.dlogits = Some(dlogits);
            fwd.per_ex = Some(per_ex);
        }
        Ok(fwd)
    }

    /// Forward and backward of Σ_i ℓ_i: per-example losses and, for every trainable
    /// linear, its [`Capture`]. Weight gradients are not formed. An empty batch gives
    /// no losses and no captures.
    pub fn forward_backward(
        &self,
        backend: &B,
        batch: &Batch,
        tokens: Option<&TokenSelectConfig>,
    ) -> Result<ForwardBackward<B>> {
        let mut caps = Vec::new();
        let mut fb = self.forward_backward_with(backend, batch, tokens, &mut |c| {
            caps.push(c);
            Ok(())
        })?;
        fb.captures = caps;
        Ok(fb)
    }

    /// [`Self::forward_backward`], handing each [`Capture`] to `sink` as soon as
    /// its layer's backward has formed it, and dropping each layer's saved
    /// activations right after its backward; the result's `captures` is empty. A
    /// caller that reduces captures on arrival (to norms, per-example gradients or
    /// sums) thus never holds every layer's activations and gradients at once.
    pub fn forward_backward_with(
        &self,
        backend: &B,
        batch: &Batch,
        tokens: Option<&TokenSelectConfig>,
        sink: &mut dyn FnMut(Capture<B>) -> Result<()>,
    ) -> Result<ForwardBackward<B>> {
        let be = backend;
        let visual_tokens = self.visual_tokens(tokens);
        if batch.size == 0 {
            self.check_batch(batch)?;
            return Ok(ForwardBackward {
                per_example_loss: Recycled::default(),
                captures: vec![],
                dense_grads: vec![],
                visual_tokens,
            });
        }
        let mut f = self.forward(be, batch, tokens, true, true)?;
        let st = &self.store;
        let d = self.cfg.llm.hidden;
        let (b, v, t) = (f.b, f.v, f.t);
        let l = f.lay.l;
        let mut dense = Vec::new();
        let need_bottom = self.proj.trainable() || self.llm.embed_id.is_some();
        let lowest = self.llm.lowest_backward_layer(need_bottom);
        let (ht, dlogits) = match (f.ht.take(), f.dlogits.take()) {
            (Some(h), Some(g)) => (h, g),
            _ => return Err(Error::Shape("forward kept no loss activations".into())),
        };
        let dht = self.llm.lm_head.backward(
            be,
            st,
            &Shared::new(ht),
            None,
            Shared::new(dlogits),
            (b, t),
            lowest.is_some(),
            sink,
        )?;
        if let (Some(lo), Some(dht)) = (lowest, dht) {
            let mut dhf = be.zeros(b * l * d)?;
            f.lay
                .readout(d, |b| be.copy_blocks(&mut dhf, &dht, swap(b)))?;
            let mut dx = be.zeros(b * l * d)?;
            let mut dw = be.zeros(d)?;
            be.rmsnorm_bwd(
                &mut dx,
                &mut dw,
                &dhf,
                &f.x_final,
                st.buf(self.llm.norm),
                &f.rstd_f,
                RowShape {
                    rows: b * l,
                    dim: d,
                },
            )?;
            let mut grad = Some(dx);
            for i in (lo..self.cfg.llm.layers).rev() {
                let need = i > lo || need_bottom;
                let g = grad
                    .take()
                    .ok_or_else(|| Error::Shape("lost the decoder gradient".into()))?;
                // Layer i's cache is the last one left; its backward consumes it.
                let cache = f
                    .layers
                    .pop()
                    .ok_or_else(|| Error::Shape("lost a decoder layer's cache".into()))?;
                grad = self
                    .llm
                    .layer_backward(be, st, i, cache, g, (b, l), need, sink)?;
            }
            if let (true, Some(dx0)) = (need_bottom, grad) {
                if let Some(eid) = self.llm.embed_id {
                    let mut dtxt = be.zeros(b * t * d)?;
                    f.lay
                        .text_into_seq(d, |b| be.copy_blocks(&mut dtxt, &dx0, swap(b)))?;
                    let vocab = self.cfg.llm.vocab;
                    let mut dtable = be.zeros(vocab * d)?;
                    let ids = be.upload_ids(&batch.input_ids)?;
                    be.embedding_bwd(
                        &mut dtable,
                        &dtxt,
                        &ids,
                        RowShape {
                            rows: b * t,
                            dim: d,
                        },
                        vocab,
                    )?;
                    dense.push((eid, dtable));
                }
                if self.proj.trainable() {
                    let mut dvis = be.zeros(b * v * d)?;
                    f.lay
                        .vis_into_seq(d, |b| be.copy_blocks(&mut dvis, &dx0, swap(b)))?;
                    let cache = f.proj.as_ref().ok_or_else(|| {
                        Error::Internal("the projector's backward ran without its cache".into())
                    })?;
                    self.proj.backward(be, st, cache, dvis, (b, v), sink)?;
                }
            }
        }
        let per_ex = f
            .per_ex
            .take()
            .ok_or_else(|| Error::Shape("no losses".into()))?;
        Ok(ForwardBackward {
            per_example_loss: be.download(&per_ex)?,
            captures: vec![],
            dense_grads: dense,
            visual_tokens,
        })
    }

    /// Per-example losses ℓ_i as a device buffer (forward only).
    pub fn per_example_loss_buf(
        &self,
        backend: &B,
        batch: &Batch,
        tokens: Option<&TokenSelectConfig>,
    ) -> Result<B::Buf> {
        if batch.size == 0 {
            self.check_batch(batch)?;
            return backend.zeros(0);
        }
        let f = self.forward(backend, batch, tokens, false, true)?;
        f.per_ex.ok_or_else(|| Error::Shape("no losses".into()))
    }

    /// Per-example losses ℓ_i from the batch's [`Self::vision_features`] (forward
    /// only; DPZero's two evaluations share one vision forward).
    pub fn per_example_loss_from(
        &self,
        backend: &B,
        batch: &Batch,
        tokens: Option<&TokenSelectConfig>,
        feats: &B::Buf,
    ) -> Result<Recycled<f32>> {
        self.losses_of(backend, batch, feats, |f| {
            self.forward_from(backend, batch, tokens, f, false, true)
        })
    }

    /// The per-example losses of `run` on a copy of `input` (the caller's buffer
    /// serves both of DPZO's forwards); none for an empty batch.
    fn losses_of(
        &self,
        backend: &B,
        batch: &Batch,
        input: &B::Buf,
        run: impl FnOnce(B::Buf) -> Result<Fwd<B>>,
    ) -> Result<Recycled<f32>> {
        if batch.size == 0 {
            self.check_batch(batch)?;
            return Ok(Recycled::default());
        }
        let f = run(backend.duplicate(input)?)?;
        let buf = f.per_ex.ok_or_else(|| Error::Shape("no losses".into()))?;
        backend.download(&buf)
    }

    /// Whether the projector has trainable tensors (otherwise its output depends
    /// on the images only, and DPZO computes it once for θ ± λz).
    pub fn projector_trainable(&self) -> bool {
        self.proj.trainable()
    }

    /// The projected visual tokens `[b·v, d]` of a batch: vision tower, token
    /// selection and projector, forward only.
    pub fn projected_features(
        &self,
        be: &B,
        batch: &Batch,
        tokens: Option<&TokenSelectConfig>,
    ) -> Result<B::Buf> {
        let (b, _) = self.check_batch(batch)?;
        let feats = self.vision_features(be, batch, tokens)?;
        let v = self.visual_tokens(tokens);
        Ok(self.proj.forward(be, &self.store, feats, b * v)?.0)
    }

    /// [`Self::per_example_loss_from`] from [`Self::projected_features`].
    pub fn per_example_loss_from_projected(
        &self,
        backend: &B,
        batch: &Batch,
        tokens: Option<&TokenSelectConfig>,
        vis: &B::Buf,
    ) -> Result<Recycled<f32>> {
        self.losses_of(backend, batch, vis, |v| {
            self.forward_from_projected(backend, batch, tokens, v, None, false, true)
        })
    }

    /// Per-example losses ℓ_i (forward only: evaluation, DPZero).
    pub fn per_example_loss(
        &self,
        backend: &B,
        batch: &Batch,
        tokens: Option<&TokenSelectConfig>,
    ) -> Result<Recycled<f32>> {
        let buf = self.per_example_loss_buf(backend, batch, tokens)?;
        backend.download(&buf)
    }

    /// Logits `[B, T, vocab]` at every text position (forward only). Text position
    /// j holds the prediction of token j + 1, as in transformers' `logits` once the
    /// image positions are taken out (see [`Batch::image_pos`]).
    pub fn logits(
        &self,
        backend: &B,
        batch: &Batch,
        tokens: Option<&TokenSelectConfig>,
    ) -> Result<Vec<f32>> {
        let be = backend;
        let (b, t) = self.check_batch(batch)?;
        if b == 0 {
            return Ok(vec![]);
        }
        let f = self.forward(be, batch, tokens, false, false)?;
        let d = self.cfg.llm.hidden;
        let mut ht = be.zeros(b * t * d)?;
        f.lay.readout(d, |b| be.copy_blocks(&mut ht, &f.hf, b))?;
        let (logits, _) = self.llm.lm_head.forward(be, &self.store, &ht, b * t)?;
        Ok(be.download(&logits)?.into_vec())
    }

    /// The vision tower's layer −2 output `[B, N, Dv]` (CLS first) and the
    /// projected visual tokens `[B, V, D]` fed to the decoder, for `b` images
    /// `[b, 3, S, S]`.
    pub fn image_features(
        &self,
        backend: &B,
        images: &[f32],
        b: usize,
        tokens: Option<&TokenSelectConfig>,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let be = backend;
        let s = self.cfg.vision.image_size;
        ensure_shape(images.len() == b * 3 * s * s, || {
            format!("{} image values for {b} images of 3×{s}×{s}", images.len())
        })?;
        let img = be.upload(images)?;
        let vo = self.vit.forward(be, &self.store, &img, b)?;
        let hidden = be.download(&vo.hidden)?.into_vec();
        let feats = self.select(be, vo, b, tokens)?;
        let v = self.visual_tokens(tokens);
        let (vis, _) = self.proj.forward(be, &self.store, feats, b * v)?;
        Ok((hidden, be.download(&vis)?.into_vec()))
    }

    /// The argmax token at each example's first masked position (the answer). An
    /// example without a masked position is an error.
    pub fn predict(
        &self,
        backend: &B,
        batch: &Batch,
        tokens: Option<&TokenSelectConfig>,
    ) -> Result<Vec<u32>> {
        Ok(self
            .predict_masked(backend, batch, tokens)?
            .into_iter()
            .map(|p| p[0])
            .collect())
    }

    /// The argmax token at every masked position of each example, in position order
    /// (teacher-forced: each from the reference text before it). All of them equal
    /// the targets exactly when greedy decoding from the prompt reproduces the
    /// answer tokens, so this is exact-match accuracy in one forward. An example
    /// without a masked position is an error. Ties go to the lowest id, as
    /// `torch.argmax`.
    pub fn predict_masked(
        &self,
        backend: &B,
        batch: &Batch,
        tokens: Option<&TokenSelectConfig>,
    ) -> Result<Vec<Vec<u32>>> {
        let be = backend;
        let (b, t) = self.check_batch(batch)?;
        let mut masked = Vec::with_capacity(b);
        for i in 0..b {
            let ps: Vec<usize> = (0..t)
                .filter(|&p| batch.loss_mask[i * t + p] != 0.0)
                .collect();
            if ps.is_empty() {
                return Err(Error::Shape(format!(
                    "predict: example {i} has no masked (answer) position"
                )));
            }
            masked.push(ps);
        }
        if b == 0 {
            return Ok(vec![]);
        }
        let f = self.forward(be, batch, tokens, false, false)?;
        let d = self.cfg.llm.hidden;
        let l = f.lay.l;
        let n: usize = masked.iter().map(Vec::len).sum();
        let mut rows = be.zeros(n * d)?;
        let mut r = 0;
        for (i, ps) in masked.iter().enumerate() {
            for &p in ps {
                let blk = Blocks {
                    count: 1,
                    len: d,
                    src_off: (i * l + f.lay.readout_row(i, p)) * d,
                    src_stride: 0,
                    dst_off: r * d,
                    dst_stride: 0,
                };
                be.copy_blocks(&mut rows, &f.hf, blk)?;
                r += 1;
            }
        }
        let (logits, _) = self.llm.lm_head.forward(be, &self.store, &rows, n)?;
        let logits = be.download(&logits)?;
        let vocab = self.cfg.llm.vocab;
        let mut best = logits.chunks(vocab).map(|row| {
            let mut k = 0;
            for (j, &x) in row.iter().enumerate() {
                if x > row[k] {
                    k = j;
                }
            }
            k as u32
        });
        Ok(masked
            .iter()
            .map(|ps| ps.iter().filter_map(|_| best.next()).collect())
            .collect())
    }

    /// Writes all weights (frozen, trainable, LoRA) as f32 safetensors; the header
    /// records the preset and the seed.
    pub fn save(&self, backend: &B, path: &Path) -> Result<()> {
        self.save_tagged(backend, path, HashMap::new())
    }

    /// [`Self::save`] with extra metadata entries (a checkpoint's id and step).
    pub fn save_tagged(
        &self,
        backend: &B,
        path: &Path,
        mut meta: HashMap<String, String>,
    ) -> Result<()> {
        meta.insert("format".to_string(), "dualpriv".to_string());
        meta.insert("preset".to_string(), self.cfg.name.clone());
        meta.insert("seed".to_string(), self.seed.to_string());
        self.store.save(backend, path, meta)
    }

    /// Loads a checkpoint written by [`Self::save`]. LoRA tensors absent from the
    /// file (a pretrained full checkpoint loaded into a LoRA mode) get a fresh init
    /// seeded by the checkpoint's seed (0 if it has none), so DP fine-tuning can start
    /// from the public pretrained model. Any other missing tensor, an unknown tensor
    /// or a wrong shape is an error naming the tensor.
    pub fn load(backend: &B, cfg: &ModelConfig, mode: &TrainMode, path: &Path) -> Result<Self> {
        let (file, meta) = read_checkpoint(path)?;
        let seed = meta.get("seed").and_then(|s| s.parse().ok()).unwrap_or(0);
        let mut m = Self::new_for_load(backend, cfg, mode, seed)?;
        m.store.load(backend, &file, path, |name| {
            name.contains(".lora_A.") || name.contains(".lora_B.")
        })?;
        Ok(m)
    }
}
