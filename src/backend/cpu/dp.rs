//! The CPU backend's DP ops ([`DpBackend`], f32 buffers): the references of
//! [`crate::dp`] (norms, clip factors, clipped sums, noise + top-k + update) and the
//! per-example row helpers of [`rows`](super::rows). GPU twin: `backend/cuda/dp.rs`.
use super::pool::HostBuf;
use super::{rows, Cpu};
use crate::backend::dp::{DpBackend, TensorUpdate};
use crate::backend::Backend;
use crate::dp::clip::{self, LinearShape, NormMethod, NormTotals};
use crate::dp::noise::NoiseKey;
use crate::dp::prune::{self, PruneReport, TensorState, UpdateConfig};
use crate::error::ensure_shape;
use crate::linalg::{gemm_f32, View};
use crate::Result;
use rayon::prelude::*;

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

    fn clip_factors(&self, total: &NormTotals, clip_norm: f32) -> Result<(HostBuf<f32>, usize)> {
        let (f, clipped) = clip::clip_factors(&total.sq, &total.bound, f64::from(clip_norm))?;
        Ok((self.upload(&f)?, clipped))
    }

    fn noise_axpy(&self, y: &mut HostBuf<f32>, key: NoiseKey, a: f64) -> Result<()> {
        key.add_scaled(0, a, y);
        Ok(())
    }

    fn noise_axpy_many(&self, ys: &mut [(&mut HostBuf<f32>, NoiseKey)], a: f64) -> Result<()> {
        let _op = crate::backend::profile::op("noise_axpy_many");
        // LoRA tensors are too small to split one by one: run the tensors in
        // parallel (counter-based noise, so the order does not change a value).
        ys.par_iter_mut()
            .for_each(|(y, key)| key.add_scaled(0, a, y));
        Ok(())
    }

    unsafe fn add_layer_sq_norms_unchecked(
        &self,
        x: &HostBuf<f32>,
        g: &HostBuf<f32>,
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
        x: &HostBuf<f32>,
        g: &HostBuf<f32>,
        factors: &HostBuf<f32>,
        s: LinearShape,
        out: &mut HostBuf<f32>,
        accumulate: bool,
    ) -> Result<()> {
        if !accumulate {
            out.fill(0.0);
        }
        clip::clipped_weight_sum_f32(x, g, factors, s, out)
    }

    unsafe fn clipped_bias_sum_unchecked(
        &self,
        g: &HostBuf<f32>,
        factors: &HostBuf<f32>,
        s: LinearShape,
        out: &mut HostBuf<f32>,
        accumulate: bool,
    ) -> Result<()> {
        if !accumulate {
            out.fill(0.0);
        }
        clip::clipped_bias_sum(g, factors, s, out)
    }

    unsafe fn per_example_weight_grads_unchecked(
        &self,
        x: &HostBuf<f32>,
        g: &HostBuf<f32>,
        s: LinearShape,
    ) -> Result<HostBuf<f32>> {
        let (t, d, p) = (s.t, s.d, s.p);
        if p * d == 0 || t == 0 {
            return self.zeros(s.b * p * d);
        }
        // Every value is written by its example's GEMM (β = 0).
        let mut out = self.output(s.b * p * d)?;
        // One GEMM per example, examples in parallel (each GEMM then runs whole).
        out.par_chunks_mut(p * d).enumerate().for_each(|(i, w)| {
            let xi = View::row_major(&x[i * t * d..(i + 1) * t * d], t, d);
            let gi = View::row_major(&g[i * t * p..(i + 1) * t * p], t, p);
            gemm_f32(1.0, gi.t(), xi, 0.0, w, d);
        });
        Ok(out)
    }

    unsafe fn per_example_bias_grads_unchecked(
        &self,
        g: &HostBuf<f32>,
        s: LinearShape,
    ) -> Result<HostBuf<f32>> {
        self.upload(&rows::sum_over_tokens(g, s))
    }

    unsafe fn add_row_sq_norms_unchecked(
        &self,
        per_example: &HostBuf<f32>,
        rows: usize,
        total: &mut NormTotals,
    ) -> Result<()> {
        rows::add_row_sq_norms(per_example, rows, total);
        Ok(())
    }

    unsafe fn weighted_row_sum_unchecked(
        &self,
        per_example: &HostBuf<f32>,
        factors: &HostBuf<f32>,
        _rows: usize,
        out: &mut HostBuf<f32>,
        accumulate: bool,
    ) -> Result<()> {
        rows::weighted_row_sum(per_example, factors, out, accumulate);
        Ok(())
    }

    unsafe fn noise_prune_update_unchecked(
        &self,
        set: &mut [TensorUpdate<'_, Self>],
        cfg: &UpdateConfig,
    ) -> Result<PruneReport> {
        // One tensor (per-tensor scope) needs no list (no allocation).
        if let [t] = set {
            return prune::noise_prune_update(&mut [state(t)], cfg);
        }
        let mut states: Vec<TensorState<'_>> = set.iter_mut().map(state).collect();
        prune::noise_prune_update(&mut states, cfg)
    }
}

/// The CPU reference's view of one tensor of an update set.
fn state<'a>(t: &'a mut TensorUpdate<'_, Cpu>) -> TensorState<'a> {
    TensorState {
        tensor_id: t.tensor_id,
        grad: &t.grad[..],
        param: &mut t.param[..],
        m: t.m.as_deref_mut().map_or(&mut [][..], |m| &mut m[..]),
        v: t.v.as_deref_mut().map_or(&mut [][..], |v| &mut v[..]),
    }
}
