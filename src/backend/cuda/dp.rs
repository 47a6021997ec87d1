//! The CUDA backend's DP ops ([`DpBackend`]): per-example norms, clip factors and
//! clipped sums through [`crate::gpu::clip`], materialised per-example gradients
//! through strict-FP32 batched GEMMs and [`crate::gpu::rows`], and the fused noise +
//! top-k + update of [`crate::gpu::prune`]. The CPU's are in `backend/cpu/dp.rs`.
use std::sync::atomic::Ordering;

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};

use super::pool::{GpuBuf, ZEROS_NONE, ZEROS_SOME};
use super::Cuda;
use crate::backend::dp::{DpBackend, TensorUpdate};
use crate::backend::Backend;
use crate::dp::clip::{self as dpclip, LinearShape, NormMethod, NormTotals};
use crate::dp::noise::NoiseKey;
use crate::dp::prune::{PruneReport, UpdateConfig};
use crate::gpu;
use crate::gpu::blas::{Precision, RowMajor};
use crate::gpu::prune::{DeviceTensor, PrunePlan};
use crate::Result;

impl Cuda {
    /// Whether some factor is 0: known for factors from `clip_factors` (unchanged
    /// since), otherwise found by downloading them once and remembered.
    fn some_zero(&self, factors: &GpuBuf) -> Result<bool> {
        match factors.zeros.load(Ordering::Relaxed) {
            ZEROS_NONE => Ok(false),
            ZEROS_SOME => Ok(true),
            _ => {
                let z = gpu::clip::any_zero(&self.gpu, &factors.view())?;
                let known = if z { ZEROS_SOME } else { ZEROS_NONE };
                factors.zeros.store(known, Ordering::Relaxed);
                Ok(z)
            }
        }
    }
}

/// Per-example f64 squared-norm and rounding-bound accumulators on the device, with
/// their logical length (an empty batch still owns one-element allocations).
pub struct GpuNorms {
    slice: CudaSlice<f64>,
    bound: CudaSlice<f64>,
    len: usize,
    rows_cap: usize,
}

// SAFETY (every `*_unchecked` op below): the buffers passed the op's check in
// `backend::check`, which is what the launchers and GEMMs they call need.
impl DpBackend for Cuda {
    type Norms = GpuNorms;

    fn norms_zeros(&self, b: usize, rows_cap: usize) -> Result<GpuNorms> {
        Ok(GpuNorms {
            slice: self.gpu.zeros(b.max(1))?,
            bound: self.gpu.zeros(b.max(1))?,
            len: b,
            rows_cap,
        })
    }

    fn norms_download(&self, n: &GpuNorms) -> Result<NormTotals> {
        if n.len == 0 {
            return Ok(NormTotals::default());
        }
        Ok(NormTotals {
            sq: self.gpu.download(&n.slice)?.into(),
            bound: self.gpu.download(&n.bound)?.into(),
            rows_cap: n.rows_cap,
        })
    }

    fn norms_len(&self, n: &GpuNorms) -> Result<usize> {
        Ok(n.len)
    }

    fn clip_factors(&self, total: &GpuNorms, clip_norm: f32) -> Result<(GpuBuf, usize)> {
        let mut f = self.take(total.len)?;
        if total.len == 0 {
            return Ok((f, 0));
        }
        let counts = gpu::clip::clip_factors(
            &self.gpu,
            &total.slice,
            &total.bound,
            clip_norm,
            &mut f.view_mut(),
        )?;
        // Set after the write (view_mut resets it): the sums skip masking on ZEROS_NONE.
        let known = if counts.zero == 0 {
            ZEROS_NONE
        } else {
            ZEROS_SOME
        };
        *f.zeros.get_mut() = known;
        Ok((f, counts.non_finite))
    }

    fn noise_axpy(&self, y: &mut GpuBuf, key: NoiseKey, a: f64) -> Result<()> {
        if y.len == 0 {
            return Ok(());
        }
        gpu::noise::noise_axpy(&self.gpu, key, 0, a, true, &mut y.view_mut())
    }

    unsafe fn add_layer_sq_norms_unchecked(
        &self,
        x: &GpuBuf,
        g: &GpuBuf,
        s: LinearShape,
        method: NormMethod,
        has_bias: bool,
        total: &mut GpuNorms,
    ) -> Result<()> {
        if s.b == 0 {
            return Ok(());
        }
        gpu::clip::add_layer_sq_norms(
            &self.gpu,
            &x.view(),
            &g.view(),
            s,
            method,
            has_bias,
            &mut total.slice,
        )?;
        gpu::clip::add_layer_rounding_bounds(
            &self.gpu,
            &x.view(),
            &g.view(),
            s,
            has_bias,
            total.rows_cap,
            &mut total.bound,
        )
    }

    unsafe fn clipped_weight_sum_unchecked(
        &self,
        x: &GpuBuf,
        g: &GpuBuf,
        factors: &GpuBuf,
        s: LinearShape,
        out: &mut GpuBuf,
        accumulate: bool,
    ) -> Result<()> {
        if s.b == 0 || s.t == 0 {
            return if accumulate {
                Ok(())
            } else {
                self.memset0(out)
            };
        }
        let some_zero = self.some_zero(factors)?;
        let mut ws = self.take(gpu::clip::workspace_len(s))?;
        gpu::clip::clipped_weight_sum(
            &self.gpu,
            &x.view(),
            &g.view(),
            &factors.view(),
            s,
            &mut ws.view_mut(),
            &mut out.view_mut(),
            accumulate,
            Some(some_zero),
        )
    }

    unsafe fn clipped_bias_sum_unchecked(
        &self,
        g: &GpuBuf,
        factors: &GpuBuf,
        s: LinearShape,
        out: &mut GpuBuf,
        accumulate: bool,
    ) -> Result<()> {
        if s.b == 0 || s.t == 0 {
            return if accumulate {
                Ok(())
            } else {
                self.memset0(out)
            };
        }
        gpu::clip::clipped_bias_sum(
            &self.gpu,
            &g.view(),
            &factors.view(),
            s,
            &mut out.view_mut(),
            accumulate,
        )
    }

    unsafe fn per_example_weight_grads_unchecked(
        &self,
        x: &GpuBuf,
        g: &GpuBuf,
        s: LinearShape,
    ) -> Result<GpuBuf> {
        let mut out = self.take(s.b * s.p * s.d)?;
        if s.t == 0 {
            self.memset0(&mut out)?;
            return Ok(out);
        }
        // Every example's G_iᵀ X_i (p×d) as one strided batched GEMM, strict: these
        // are both the measured norms and the summed values.
        let gemm = RowMajor {
            ta: true,
            tb: false,
            m: s.p,
            n: s.d,
            k: s.t,
            alpha: 1.0,
            beta: 0.0,
        };
        self.gemm_batched_with(Precision::Strict, &mut out, g, x, gemm, s.b)?;
        Ok(out)
    }

    unsafe fn per_example_bias_grads_unchecked(
        &self,
        g: &GpuBuf,
        s: LinearShape,
    ) -> Result<GpuBuf> {
        let mut out = self.take(s.b * s.p)?;
        unsafe { gpu::rows::sum_over_tokens(&self.gpu, &mut out.view_mut(), &g.view(), s) }?;
        Ok(out)
    }

    unsafe fn add_row_sq_norms_unchecked(
        &self,
        per_example: &GpuBuf,
        rows: usize,
        total: &mut GpuNorms,
    ) -> Result<()> {
        if rows == 0 || per_example.len == 0 {
            return Ok(());
        }
        let cols = per_example.len / rows;
        let gamma = dpclip::row_gamma(rows.max(total.rows_cap), cols);
        unsafe {
            gpu::rows::add_row_sq_norms(
                &self.gpu,
                &per_example.view(),
                rows,
                gamma,
                &mut total.slice,
                &mut total.bound,
            )
        }
    }

    unsafe fn weighted_row_sum_unchecked(
        &self,
        per_example: &GpuBuf,
        factors: &GpuBuf,
        rows: usize,
        out: &mut GpuBuf,
        accumulate: bool,
    ) -> Result<()> {
        if out.len == 0 {
            return Ok(());
        }
        if rows == 0 {
            return if accumulate {
                Ok(())
            } else {
                self.memset0(out)
            };
        }
        // out[1×L] = cᵀ[1×rows] · M[rows×L], strict FP32.
        let g = RowMajor {
            ta: false,
            tb: false,
            m: 1,
            n: out.len,
            k: rows,
            alpha: 1.0,
            beta: if accumulate { 1.0 } else { 0.0 },
        };
        if !self.some_zero(factors)? {
            return self.gemm_with(Precision::Strict, out, factors, per_example, g);
        }
        // Rare path: factor-0 rows (possibly NaN) zeroed in a copy, so 0·NaN cannot
        // reach the sum.
        let mut masked = self.take(per_example.len)?;
        gpu::clip::mask_examples(
            &self.gpu,
            &per_example.view(),
            &factors.view(),
            out.len,
            &mut masked.view_mut(),
        )?;
        self.gemm_with(Precision::Strict, out, factors, &masked, g)
    }

    unsafe fn noise_prune_update_unchecked(
        &self,
        set: &mut [TensorUpdate<'_, Self>],
        cfg: &UpdateConfig,
    ) -> Result<PruneReport> {
        let coords: u64 = set.iter().map(|t| self.len(t.grad) as u64).sum();
        let mut plan = self.prune.lock().unwrap_or_else(|e| e.into_inner());
        if plan.as_ref().is_none_or(|p| !p.fits(set.len(), coords)) {
            let old = plan.as_ref().map_or((0, 0), |p| p.capacity());
            *plan = Some(PrunePlan::new(
                &self.gpu,
                set.len().max(old.0),
                coords.max(old.1),
            )?);
        }
        let plan = plan.as_mut().expect("plan was just built");
        // Views of exactly each tensor's values (allocations may be larger).
        type Views<'v> = (
            u32,
            CudaView<'v, f32>,
            CudaViewMut<'v, f32>,
            Option<CudaViewMut<'v, f32>>,
            Option<CudaViewMut<'v, f32>>,
        );
        let mut views: Vec<Views<'_>> = Vec::with_capacity(set.len());
        for t in set.iter_mut() {
            if t.grad.len == 0 {
                continue;
            }
            views.push((
                t.tensor_id,
                t.grad.view(),
                t.param.view_mut(),
                t.m.as_deref_mut().map(GpuBuf::view_mut),
                t.v.as_deref_mut().map(GpuBuf::view_mut),
            ));
        }
        let mut tensors = Vec::with_capacity(views.len());
        for (id, g, p, m, v) in views.iter_mut() {
            tensors.push(DeviceTensor::new(
                &self.gpu,
                *id,
                &*g,
                p,
                m.as_mut(),
                v.as_mut(),
            )?);
        }
        plan.run(&self.gpu, &tensors, cfg)
    }
}
