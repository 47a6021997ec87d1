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

/// DPZO's directions z from the last [`DpBackend::noise_axpy_many`] call, with the
/// (key, length) of each tensor: a DPZO step perturbs θ by the same z three times
/// (+λ, −2λ, then λ − ηg), and regenerating it each time was 10 % of a tiny step
/// (the sampler costs ~30 ns per normal). The stored values are the ones
/// [`NoiseKey::fill`] gives, and [`add_scaled_stored`] does `add_scaled`'s
/// arithmetic, so results are bitwise those of regenerating (`tests/noise.rs`).
/// z depends on no data (it is released by the update itself, up to the noisy
/// scalar), and it stays in memory only, replaced by the next step's. It is held
/// between steps, so a step's measured peak does not include it (8 bytes per
/// trainable value: 0.3 MB at tiny).
#[derive(Default)]
struct Directions {
    keys: Vec<(NoiseKey, usize)>,
    z: Vec<Vec<f64>>,
}

static DIRECTIONS: std::sync::Mutex<Directions> = std::sync::Mutex::new(Directions {
    keys: Vec::new(),
    z: Vec::new(),
});

/// The most values whose directions are stored (64 MiB of f64); beyond, each
/// call regenerates them (a llava-7b LoRA has ~3·10⁸ trainable values).
const DIRECTIONS_MAX: usize = 1 << 23;

/// `y[j] ← (f64(y[j]) + a · z[j]) as f32`, [`NoiseKey::add_scaled`]'s arithmetic
/// on stored noise.
fn add_scaled_stored(a: f64, z: &[f64], y: &mut [f32]) {
    for (y, &z) in y.iter_mut().zip(z) {
        *y = (f64::from(*y) + a * z) as f32;
    }
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
        let total: usize = ys.iter().map(|(y, _)| y.len()).sum();
        if total > DIRECTIONS_MAX {
            // LoRA tensors are too small to split one by one: run the tensors in
            // parallel (counter-based noise, so the order does not change a value).
            ys.par_iter_mut()
                .for_each(|(y, key)| key.add_scaled(0, a, y));
            // Nothing stored for a model this size: free what a smaller one left.
            *DIRECTIONS.lock().unwrap_or_else(|e| e.into_inner()) = Directions::default();
            return Ok(());
        }
        // Taken out of the lock, which is never held across the parallel work
        // below: a worker waiting inside it may run another caller's step, whose
        // DPZO would then block on the lock forever. A concurrent run finds the
        // cache empty and regenerates into its own (the last one back keeps it).
        let mut d = std::mem::take(&mut *DIRECTIONS.lock().unwrap_or_else(|e| e.into_inner()));
        let same = d.keys.len() == ys.len()
            && d.keys
                .iter()
                .zip(ys.iter())
                .all(|(&(k, n), (y, key))| k == *key && n == y.len());
        if !same {
            d.keys.clear();
            d.z.resize_with(ys.len(), Vec::new);
            ys.par_iter()
                .zip(d.z.par_iter_mut())
                .for_each(|((y, key), z)| {
                    z.resize(y.len(), 0.0);
                    key.fill(0, z);
                });
            // Keyed only once z is complete.
            d.keys.extend(ys.iter().map(|(y, key)| (*key, y.len())));
        }
        ys.par_iter_mut()
            .zip(d.z.par_iter())
            .for_each(|((y, _), z)| add_scaled_stored(a, z, y));
        *DIRECTIONS.lock().unwrap_or_else(|e| e.into_inner()) = d;
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
