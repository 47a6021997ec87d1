//! The DP mechanisms as backend operations, so the training loop is written once:
//! per-example norms (ghost, instantiated, or from materialised per-example
//! gradients as Opacus does), clip factors, book-keeping clipped sums, and the fused
//! noise + top-k + masked update. The CPU implementation (`backend/cpu/dp.rs`)
//! calls the references in [`crate::dp`]; the CUDA one (`backend/cuda/dp.rs`) calls
//! the kernels.
use super::{check, Backend};
use crate::dp::clip::{LinearShape, NormMethod, NormTotals};
use crate::dp::noise::NoiseKey;
use crate::dp::prune::{PruneReport, UpdateConfig};
use crate::{Error, Result};

/// One tensor of a noise + prune + update call.
pub struct TensorUpdate<'a, B: Backend + ?Sized> {
    /// Stable tensor id: part of the noise counter.
    pub tensor_id: u32,
    /// The clipped sum (or plain gradient sum).
    pub grad: &'a B::Buf,
    /// The parameters, updated in place.
    pub param: &'a mut B::Buf,
    /// First-moment buffer, when the optimizer has one.
    pub m: Option<&'a mut B::Buf>,
    /// Second-moment buffer, when the optimizer has one.
    pub v: Option<&'a mut B::Buf>,
}

/// DP operations of a backend. As in [`Backend`], each op is a provided method that
/// runs its check from [`check`] and then the backend's `*_unchecked` implementation.
pub trait DpBackend: Backend {
    /// Per-example f64 accumulators of squared gradient norms and of the rounding
    /// bounds of the clipped sums ([`crate::dp::clip::layer_rounding_bounds`]).
    type Norms;

    /// `b` zeroed accumulators. `rows_cap` is a public bound on the micro-batch size
    /// (the config's), used by the rounding bounds instead of the sampled b, so that
    /// one more sampled example never changes the other examples' clip factors.
    fn norms_zeros(&self, b: usize, rows_cap: usize) -> Result<Self::Norms>;
    /// The accumulated squared norms and rounding bounds.
    fn norms_download(&self, n: &Self::Norms) -> Result<NormTotals>;
    /// The number of examples (slots) of an accumulator, for the checks; an
    /// accumulator whose two parts disagree is a shape error.
    fn norms_len(&self, n: &Self::Norms) -> Result<usize>;
    /// Clip factors c_i = min(1, C/(‖g_i‖ + E_i + 1e-6)), E_i the accumulated
    /// rounding bound, and the number of examples with a non-finite norm or bound,
    /// which get c_i = 0. Every clipped sum below treats a
    /// factor-0 example as absent even when its rows hold NaN or Inf.
    fn clip_factors(&self, total: &Self::Norms, clip_norm: f32) -> Result<(Self::Buf, usize)>;
    /// `y ← (f64(y) + a · noise(0..len)) as f32` for the stream `key` (DPZO's
    /// perturbation direction): [`NoiseKey::add_scaled`] at offset 0.
    fn noise_axpy(&self, y: &mut Self::Buf, key: NoiseKey, a: f64) -> Result<()>;
    /// [`Self::noise_axpy`] on several buffers, each with its own stream, all with
    /// the same `a` (DPZO perturbs every trainable tensor at once). The default
    /// runs them in turn; the CPU backend runs them in parallel.
    fn noise_axpy_many(&self, ys: &mut [(&mut Self::Buf, NoiseKey)], a: f64) -> Result<()> {
        let _op = super::profile::op("noise_axpy_many");
        ys.iter_mut()
            .try_for_each(|(y, key)| self.noise_axpy(y, *key, a))
    }

    // -----------------------------------------------------------------------
    // Checked: what the training loop calls.

    /// Adds one linear layer's per-example squared norms (plus its bias term) and
    /// the bound on the rounding its clipped sums can add to each example's part.
    fn add_layer_sq_norms(
        &self,
        x: &Self::Buf,
        g: &Self::Buf,
        s: LinearShape,
        method: NormMethod,
        has_bias: bool,
        total: &mut Self::Norms,
    ) -> Result<()> {
        check::add_layer_sq_norms(self.len(x), self.len(g), s, self.norms_len(total)?)?;
        let _op = super::profile::op("add_layer_sq_norms");
        // SAFETY: checked just above.
        unsafe { self.add_layer_sq_norms_unchecked(x, g, s, method, has_bias, total) }
    }
    /// Σ_i c_i G_iᵀ X_i (p×d) over the examples with c_i ≠ 0 into `out`, added when
    /// `accumulate`.
    fn clipped_weight_sum(
        &self,
        x: &Self::Buf,
        g: &Self::Buf,
        factors: &Self::Buf,
        s: LinearShape,
        out: &mut Self::Buf,
        accumulate: bool,
    ) -> Result<()> {
        check::clipped_weight_sum(
            self.len(x),
            self.len(g),
            self.len(factors),
            s,
            self.len(out),
        )?;
        let _op = super::profile::op("clipped_weight_sum");
        // SAFETY: checked just above.
        unsafe { self.clipped_weight_sum_unchecked(x, g, factors, s, out, accumulate) }
    }
    /// Σ_i c_i Σ_t G_i,t (p) over the examples with c_i ≠ 0 into `out`, added when
    /// `accumulate`.
    fn clipped_bias_sum(
        &self,
        g: &Self::Buf,
        factors: &Self::Buf,
        s: LinearShape,
        out: &mut Self::Buf,
        accumulate: bool,
    ) -> Result<()> {
        check::clipped_bias_sum(self.len(g), self.len(factors), s, self.len(out))?;
        let _op = super::profile::op("clipped_bias_sum");
        // SAFETY: checked just above.
        unsafe { self.clipped_bias_sum_unchecked(g, factors, s, out, accumulate) }
    }
    /// Materialises every example's weight gradient G_iᵀX_i: a b×p×d buffer, the
    /// memory DP-SGD without ghost clipping pays.
    fn per_example_weight_grads(
        &self,
        x: &Self::Buf,
        g: &Self::Buf,
        s: LinearShape,
    ) -> Result<Self::Buf> {
        check::per_example_weight_grads(self.len(x), self.len(g), s)?;
        let _op = super::profile::op("per_example_weight_grads");
        // SAFETY: checked just above.
        unsafe { self.per_example_weight_grads_unchecked(x, g, s) }
    }
    /// Every example's bias gradient Σ_t G_i,t: a b×p buffer.
    fn per_example_bias_grads(&self, g: &Self::Buf, s: LinearShape) -> Result<Self::Buf> {
        check::per_example_bias_grads(self.len(g), s)?;
        let _op = super::profile::op("per_example_bias_grads");
        // SAFETY: checked just above.
        unsafe { self.per_example_bias_grads_unchecked(g, s) }
    }
    /// Adds the squared norm of each of the `rows` rows of `per_example` to `total`,
    /// and the bound [`crate::dp::clip::row_gamma`]·‖row‖ on the rounding of their weighted sum.
    fn add_row_sq_norms(
        &self,
        per_example: &Self::Buf,
        rows: usize,
        total: &mut Self::Norms,
    ) -> Result<()> {
        check::add_row_sq_norms(self.len(per_example), rows, self.norms_len(total)?)?;
        let _op = super::profile::op("add_row_sq_norms");
        // SAFETY: checked just above.
        unsafe { self.add_row_sq_norms_unchecked(per_example, rows, total) }
    }
    /// Σ_i c_i row_i over the rows with c_i ≠ 0 into `out` (the clipped sum from
    /// materialised gradients).
    fn weighted_row_sum(
        &self,
        per_example: &Self::Buf,
        factors: &Self::Buf,
        rows: usize,
        out: &mut Self::Buf,
        accumulate: bool,
    ) -> Result<()> {
        check::weighted_row_sum(
            self.len(per_example),
            self.len(factors),
            rows,
            self.len(out),
        )?;
        let _op = super::profile::op("weighted_row_sum");
        // SAFETY: checked just above.
        unsafe { self.weighted_row_sum_unchecked(per_example, factors, rows, out, accumulate) }
    }
    /// Noise, exact top-k over the whole set, masked optimizer update.
    fn noise_prune_update(
        &self,
        set: &mut [TensorUpdate<'_, Self>],
        cfg: &UpdateConfig,
    ) -> Result<PruneReport> {
        // The config once (an empty set is still checked), then tensor by tensor:
        // no list of lengths to allocate. A tensor id twice in one update would
        // draw the same noise for both: refused (pairwise; sets are a few hundred
        // tensors at most).
        cfg.validate()?;
        for (i, t) in set.iter().enumerate() {
            if set[..i].iter().any(|u| u.tensor_id == t.tensor_id) {
                return Err(Error::Internal(format!(
                    "tensor id {} appears twice in one update: its noise would be reused",
                    t.tensor_id
                )));
            }
        }
        for t in set.iter() {
            let lens = (
                t.tensor_id,
                self.len(t.grad),
                self.len(t.param),
                t.m.as_deref().map(|b| self.len(b)),
                t.v.as_deref().map(|b| self.len(b)),
            );
            check::noise_prune_update(&[lens], cfg)?;
        }
        let _op = super::profile::op("noise_prune_update");
        // SAFETY: checked just above.
        unsafe { self.noise_prune_update_unchecked(set, cfg) }
    }

    // -----------------------------------------------------------------------
    // As each device implements them, after the checks.

    /// [`Self::add_layer_sq_norms`] without its checks.
    ///
    /// # Safety
    /// The lengths pass [`check::add_layer_sq_norms`].
    unsafe fn add_layer_sq_norms_unchecked(
        &self,
        x: &Self::Buf,
        g: &Self::Buf,
        s: LinearShape,
        method: NormMethod,
        has_bias: bool,
        total: &mut Self::Norms,
    ) -> Result<()>;
    /// [`Self::clipped_weight_sum`] without its checks.
    ///
    /// # Safety
    /// The lengths pass [`check::clipped_weight_sum`].
    unsafe fn clipped_weight_sum_unchecked(
        &self,
        x: &Self::Buf,
        g: &Self::Buf,
        factors: &Self::Buf,
        s: LinearShape,
        out: &mut Self::Buf,
        accumulate: bool,
    ) -> Result<()>;
    /// [`Self::clipped_bias_sum`] without its checks.
    ///
    /// # Safety
    /// The lengths pass [`check::clipped_bias_sum`].
    unsafe fn clipped_bias_sum_unchecked(
        &self,
        g: &Self::Buf,
        factors: &Self::Buf,
        s: LinearShape,
        out: &mut Self::Buf,
        accumulate: bool,
    ) -> Result<()>;
    /// [`Self::per_example_weight_grads`] without its checks.
    ///
    /// # Safety
    /// The lengths pass [`check::per_example_weight_grads`].
    unsafe fn per_example_weight_grads_unchecked(
        &self,
        x: &Self::Buf,
        g: &Self::Buf,
        s: LinearShape,
    ) -> Result<Self::Buf>;
    /// [`Self::per_example_bias_grads`] without its checks.
    ///
    /// # Safety
    /// The lengths pass [`check::per_example_bias_grads`].
    unsafe fn per_example_bias_grads_unchecked(
        &self,
        g: &Self::Buf,
        s: LinearShape,
    ) -> Result<Self::Buf>;
    /// [`Self::add_row_sq_norms`] without its checks.
    ///
    /// # Safety
    /// The lengths pass [`check::add_row_sq_norms`].
    unsafe fn add_row_sq_norms_unchecked(
        &self,
        per_example: &Self::Buf,
        rows: usize,
        total: &mut Self::Norms,
    ) -> Result<()>;
    /// [`Self::weighted_row_sum`] without its checks.
    ///
    /// # Safety
    /// The lengths pass [`check::weighted_row_sum`].
    unsafe fn weighted_row_sum_unchecked(
        &self,
        per_example: &Self::Buf,
        factors: &Self::Buf,
        rows: usize,
        out: &mut Self::Buf,
        accumulate: bool,
    ) -> Result<()>;
    /// [`Self::noise_prune_update`] without its checks.
    ///
    /// # Safety
    /// The config and the lengths pass [`check::noise_prune_update`].
    unsafe fn noise_prune_update_unchecked(
        &self,
        set: &mut [TensorUpdate<'_, Self>],
        cfg: &UpdateConfig,
    ) -> Result<PruneReport>;
}
