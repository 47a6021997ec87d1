//! The DP mechanisms as backend operations, so the training loop is written once:
//! per-example norms (ghost, instantiated, or from materialised per-example
//! gradients as Opacus does), clip factors, book-keeping clipped sums, and the fused
//! noise + top-k + masked update. The CPU implementation calls the references in
//! [`crate::dp`]; the CUDA one calls the kernels.
use super::cpu::Cpu;
use super::{check, Backend};
use crate::dp::clip::{self, LinearShape, NormMethod, NormTotals};
use crate::dp::noise::NoiseKey;
use crate::dp::prune::{self, PruneReport, TensorState, UpdateConfig};
use crate::error::ensure_shape;
use crate::linalg::{gemm_f32, View};
use crate::Result;

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
    /// bounds of the clipped sums ([`clip::layer_rounding_bounds`]).
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
        // SAFETY: checked just above.
        unsafe { self.per_example_weight_grads_unchecked(x, g, s) }
    }
    /// Every example's bias gradient Σ_t G_i,t: a b×p buffer.
    fn per_example_bias_grads(&self, g: &Self::Buf, s: LinearShape) -> Result<Self::Buf> {
        check::per_example_bias_grads(self.len(g), s)?;
        // SAFETY: checked just above.
        unsafe { self.per_example_bias_grads_unchecked(g, s) }
    }
    /// Adds the squared norm of each of the `rows` rows of `per_example` to `total`,
    /// and the bound [`clip::row_gamma`]·‖row‖ on the rounding of their weighted sum.
    fn add_row_sq_norms(
        &self,
        per_example: &Self::Buf,
        rows: usize,
        total: &mut Self::Norms,
    ) -> Result<()> {
        check::add_row_sq_norms(self.len(per_example), rows, self.norms_len(total)?)?;
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
        // SAFETY: checked just above.
        unsafe { self.weighted_row_sum_unchecked(per_example, factors, rows, out, accumulate) }
    }
    /// Noise, exact top-k over the whole set, masked optimizer update.
    fn noise_prune_update(
        &self,
        set: &mut [TensorUpdate<'_, Self>],
        cfg: &UpdateConfig,
    ) -> Result<PruneReport> {
        let lens: Vec<check::UpdateLens> = set
            .iter()
            .map(|t| {
                (
                    t.tensor_id,
                    self.len(t.grad),
                    self.len(t.param),
                    t.m.as_deref().map(|b| self.len(b)),
                    t.v.as_deref().map(|b| self.len(b)),
                )
            })
            .collect();
        check::noise_prune_update(&lens, cfg)?;
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

impl DpBackend for Cpu {
    type Norms = NormTotals;

    fn norms_zeros(&self, b: usize, rows_cap: usize) -> Result<NormTotals> {
        Ok(NormTotals::zeros(b, rows_cap))
    }

    fn norms_download(&self, n: &NormTotals) -> Result<NormTotals> {
        Ok(n.clone())
    }

    fn norms_len(&self, n: &NormTotals) -> Result<usize> {
        ensure_shape(n.sq.len() == n.bound.len(), || {
            format!(
                "norm accumulators disagree: {} squared norms but {} rounding bounds",
                n.sq.len(),
                n.bound.len()
            )
        })?;
        Ok(n.sq.len())
    }

    fn clip_factors(&self, total: &NormTotals, clip_norm: f32) -> Result<(Vec<f32>, usize)> {
        clip::clip_factors(&total.sq, &total.bound, f64::from(clip_norm))
    }

    fn noise_axpy(&self, y: &mut Vec<f32>, key: NoiseKey, a: f64) -> Result<()> {
        key.add_scaled(0, a, y);
        Ok(())
    }

    unsafe fn add_layer_sq_norms_unchecked(
        &self,
        x: &Vec<f32>,
        g: &Vec<f32>,
        s: LinearShape,
        method: NormMethod,
        has_bias: bool,
        total: &mut NormTotals,
    ) -> Result<()> {
        for (t, n) in total
            .sq
            .iter_mut()
            .zip(clip::layer_sq_norms(x, g, s, method, has_bias)?)
        {
            *t += n;
        }
        for (t, e) in total.bound.iter_mut().zip(clip::layer_rounding_bounds(
            x,
            g,
            s,
            has_bias,
            total.rows_cap,
        )?) {
            *t += e;
        }
        Ok(())
    }

    unsafe fn clipped_weight_sum_unchecked(
        &self,
        x: &Vec<f32>,
        g: &Vec<f32>,
        factors: &Vec<f32>,
        s: LinearShape,
        out: &mut Vec<f32>,
        accumulate: bool,
    ) -> Result<()> {
        if !accumulate {
            out.fill(0.0);
        }
        clip::clipped_weight_sum_f32(x, g, factors, s, out)
    }

    unsafe fn clipped_bias_sum_unchecked(
        &self,
        g: &Vec<f32>,
        factors: &Vec<f32>,
        s: LinearShape,
        out: &mut Vec<f32>,
        accumulate: bool,
    ) -> Result<()> {
        if !accumulate {
            out.fill(0.0);
        }
        clip::clipped_bias_sum(g, factors, s, out)
    }

    unsafe fn per_example_weight_grads_unchecked(
        &self,
        x: &Vec<f32>,
        g: &Vec<f32>,
        s: LinearShape,
    ) -> Result<Vec<f32>> {
        let (t, d, p) = (s.t, s.d, s.p);
        let mut out = vec![0.0f32; s.b * p * d];
        for (i, w) in out.chunks_mut((p * d).max(1)).enumerate().take(s.b) {
            let xi = View::row_major(&x[i * t * d..(i + 1) * t * d], t, d);
            let gi = View::row_major(&g[i * t * p..(i + 1) * t * p], t, p);
            gemm_f32(1.0, gi.t(), xi, 0.0, w, d);
        }
        Ok(out)
    }

    unsafe fn per_example_bias_grads_unchecked(
        &self,
        g: &Vec<f32>,
        s: LinearShape,
    ) -> Result<Vec<f32>> {
        let mut out = vec![0.0f32; s.b * s.p];
        for i in 0..s.b {
            for t in 0..s.t {
                let row = &g[(i * s.t + t) * s.p..(i * s.t + t + 1) * s.p];
                for (o, &v) in out[i * s.p..(i + 1) * s.p].iter_mut().zip(row) {
                    *o += v;
                }
            }
        }
        Ok(out)
    }

    unsafe fn add_row_sq_norms_unchecked(
        &self,
        per_example: &Vec<f32>,
        rows: usize,
        total: &mut NormTotals,
    ) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        let cols = per_example.len() / rows;
        // The weighted sum Σ_i c_i row_i: example i's terms carry at most
        // γ·c_i‖row_i‖ of its rounding (the norm is of the same f32 row it sums).
        let gamma = clip::row_gamma(rows.max(total.rows_cap), cols);
        for ((t, e), row) in total
            .sq
            .iter_mut()
            .zip(total.bound.iter_mut())
            .zip(per_example.chunks(cols.max(1)))
        {
            let sq = row
                .iter()
                .map(|&v| f64::from(v) * f64::from(v))
                .sum::<f64>();
            *t += sq;
            *e += gamma * sq.sqrt();
        }
        Ok(())
    }

    unsafe fn weighted_row_sum_unchecked(
        &self,
        per_example: &Vec<f32>,
        factors: &Vec<f32>,
        _rows: usize,
        out: &mut Vec<f32>,
        accumulate: bool,
    ) -> Result<()> {
        let cols = out.len();
        let mut acc: Vec<f64> = if accumulate {
            out.iter().map(|&v| f64::from(v)).collect()
        } else {
            vec![0.0; cols]
        };
        // A factor-0 row is absent: skipped, not multiplied (0·NaN = NaN).
        for (c, row) in factors
            .iter()
            .zip(per_example.chunks(cols.max(1)))
            .filter(|(&c, _)| c != 0.0)
        {
            for (a, &v) in acc.iter_mut().zip(row) {
                *a += f64::from(*c) * f64::from(v);
            }
        }
        for (o, a) in out.iter_mut().zip(acc) {
            *o = a as f32;
        }
        Ok(())
    }

    unsafe fn noise_prune_update_unchecked(
        &self,
        set: &mut [TensorUpdate<'_, Self>],
        cfg: &UpdateConfig,
    ) -> Result<PruneReport> {
        let mut states: Vec<TensorState<'_>> = set
            .iter_mut()
            .map(|t| TensorState {
                tensor_id: t.tensor_id,
                grad: t.grad.as_slice(),
                param: t.param.as_mut_slice(),
                m: t.m.as_deref_mut().map_or(&mut [][..], |m| m.as_mut_slice()),
                v: t.v.as_deref_mut().map_or(&mut [][..], |v| v.as_mut_slice()),
            })
            .collect();
        prune::noise_prune_update(&mut states, cfg)
    }
}
