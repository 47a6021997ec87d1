//! A backend that runs the model and training code on buffer *sizes* only: every
//! op checks its shapes (the provided checked methods of [`Backend`] and
//! [`DpBackend`]) and then does nothing, and every buffer is a length whose
//! allocation is counted at the CUDA pool's size class ([`size_class`]).
//!
//! It answers "how much device memory does one training step of this model need?"
//! for any config on any machine, llava-7b included, with the crate's own
//! allocation sequence instead of a hand-written formula: the peak of
//! [`Meter::stats`] is what the CUDA pool's `live_bytes` peak would be for the
//! same calls. Values are all zero, so anything that branches on data (non-finite
//! losses, top-k thresholds) takes its all-zeros path; none of those paths
//! allocates differently by design (buffers are sized by shapes, not values).
//!
//! Not counted, because they live outside the pool: the CUDA context, cuBLAS
//! workspaces, the DP kernels' small fixed plans (top-k and token-selection
//! workspaces) and the pool's cache of freed buffers. See `cmd::inspect::plan`.
#![allow(clippy::too_many_arguments)]
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use super::dp::{DpBackend, TensorUpdate};
use super::{AttnShape, Backend, Blocks, MatmulSpec, PatchShape, RopeShape, RowShape};
use crate::dp::clip::{LinearShape, NormMethod, NormTotals};
use crate::dp::noise::NoiseKey;
use crate::dp::prune::{PruneReport, UpdateConfig};
use crate::vision::tokens::{TokenSelectConfig, TokenShape};
use crate::{Error, Result};

/// The CUDA pool's allocation size for a request of `n` values: exact up to 4096,
/// above that rounded up to 4 significant bits (at most 1/8 extra). The pool
/// (`backend::cuda::pool::size_class`) uses the same rule; a test compares them.
pub fn size_class(n: usize) -> usize {
    if n <= 4096 {
        return n.max(1);
    }
    let bits = usize::BITS - n.leading_zeros();
    let shift = bits - 4;
    n.div_ceil(1 << shift) << shift
}

#[derive(Default)]
struct Counters {
    live: AtomicU64,
    peak: AtomicU64,
    allocations: AtomicU64,
    requested_live: AtomicU64,
    requested_peak: AtomicU64,
}

/// Live and peak bytes of a [`Meter`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MeterStats {
    /// Bytes of live buffers at their pool size class.
    pub live_bytes: u64,
    /// Largest `live_bytes` since the last [`Meter::reset_peak`].
    pub peak_bytes: u64,
    /// Bytes of live buffers as requested (4 × length, no rounding).
    pub requested_live_bytes: u64,
    /// Largest `requested_live_bytes` since the last reset.
    pub requested_peak_bytes: u64,
    /// Buffers created so far.
    pub allocations: u64,
}

/// The size-only backend. Cheap to clone; clones share the counters.
#[derive(Clone, Default)]
pub struct Meter {
    c: Arc<Counters>,
}

/// A buffer of the [`Meter`]: its length, and the counters it is billed to.
pub struct MeterBuf {
    len: usize,
    c: Arc<Counters>,
}

impl Drop for MeterBuf {
    fn drop(&mut self) {
        self.c
            .live
            .fetch_sub(4 * size_class(self.len) as u64, Relaxed);
        self.c
            .requested_live
            .fetch_sub(4 * self.len as u64, Relaxed);
    }
}

impl Meter {
    /// A meter with zeroed counters.
    pub fn new() -> Self {
        Self::default()
    }

    /// The counters now.
    pub fn stats(&self) -> MeterStats {
        MeterStats {
            live_bytes: self.c.live.load(Relaxed),
            peak_bytes: self.c.peak.load(Relaxed),
            requested_live_bytes: self.c.requested_live.load(Relaxed),
            requested_peak_bytes: self.c.requested_peak.load(Relaxed),
            allocations: self.c.allocations.load(Relaxed),
        }
    }

    /// Starts a new peak measurement from the bytes live now.
    pub fn reset_peak(&self) {
        self.c.peak.store(self.c.live.load(Relaxed), Relaxed);
        self.c
            .requested_peak
            .store(self.c.requested_live.load(Relaxed), Relaxed);
    }

    fn buf(&self, len: usize) -> MeterBuf {
        let live =
            self.c.live.fetch_add(4 * size_class(len) as u64, Relaxed) + 4 * size_class(len) as u64;
        self.c.peak.fetch_max(live, Relaxed);
        let req = self.c.requested_live.fetch_add(4 * len as u64, Relaxed) + 4 * len as u64;
        self.c.requested_peak.fetch_max(req, Relaxed);
        self.c.allocations.fetch_add(1, Relaxed);
        MeterBuf {
            len,
            c: self.c.clone(),
        }
    }
}

impl Backend for Meter {
    type Buf = MeterBuf;
    type Ids = Vec<u32>;

    fn name(&self) -> &'static str {
        "meter"
    }
    fn zeros(&self, n: usize) -> Result<MeterBuf> {
        Ok(self.buf(n))
    }
    fn upload(&self, host: &[f32]) -> Result<MeterBuf> {
        Ok(self.buf(host.len()))
    }
    fn download(&self, buf: &MeterBuf) -> Result<crate::mem::Recycled<f32>> {
        Ok(crate::mem::Recycled::zeros(buf.len))
    }
    fn len(&self, buf: &MeterBuf) -> usize {
        buf.len
    }
    fn upload_ids(&self, ids: &[u32]) -> Result<Vec<u32>> {
        Ok(ids.to_vec())
    }
    fn host_ids<'a>(&self, ids: &'a Vec<u32>) -> &'a [u32] {
        ids
    }
    fn available_memory(&self) -> Option<u64> {
        None
    }
    fn value_bytes(&self) -> usize {
        4
    }
    fn duplicate(&self, src: &MeterBuf) -> Result<MeterBuf> {
        Ok(self.buf(src.len))
    }

    unsafe fn copy_blocks_unchecked(
        &self,
        _: &mut MeterBuf,
        _: &MeterBuf,
        _: Blocks,
    ) -> Result<()> {
        Ok(())
    }
    unsafe fn matmul_unchecked(
        &self,
        _: &mut MeterBuf,
        _: &MeterBuf,
        _: &MeterBuf,
        _: MatmulSpec,
    ) -> Result<()> {
        Ok(())
    }
    unsafe fn add_bias_unchecked(&self, _: &mut MeterBuf, _: &MeterBuf, _: RowShape) -> Result<()> {
        Ok(())
    }
    unsafe fn axpy_unchecked(&self, _: &mut MeterBuf, _: f32, _: &MeterBuf) -> Result<()> {
        Ok(())
    }
    unsafe fn layernorm_fwd_unchecked(
        &self,
        _: &mut MeterBuf,
        _: &mut MeterBuf,
        _: &mut MeterBuf,
        _: &MeterBuf,
        _: &MeterBuf,
        _: &MeterBuf,
        _: RowShape,
        _: f32,
    ) -> Result<()> {
        Ok(())
    }
    unsafe fn layernorm_bwd_unchecked(
        &self,
        _: &mut MeterBuf,
        _: &mut MeterBuf,
        _: &mut MeterBuf,
        _: &MeterBuf,
        _: &MeterBuf,
        _: &MeterBuf,
        _: &MeterBuf,
        _: &MeterBuf,
        _: RowShape,
    ) -> Result<()> {
        Ok(())
    }
    unsafe fn rmsnorm_fwd_unchecked(
        &self,
        _: &mut MeterBuf,
        _: &mut MeterBuf,
        _: &MeterBuf,
        _: &MeterBuf,
        _: RowShape,
        _: f32,
    ) -> Result<()> {
        Ok(())
    }
    unsafe fn rmsnorm_bwd_unchecked(
        &self,
        _: &mut MeterBuf,
        _: &mut MeterBuf,
        _: &MeterBuf,
        _: &MeterBuf,
        _: &MeterBuf,
        _: &MeterBuf,
        _: RowShape,
    ) -> Result<()> {
        Ok(())
    }
    unsafe fn rope_unchecked(&self, _: &mut MeterBuf, _: RopeShape, _: f64) -> Result<()> {
        Ok(())
    }
    unsafe fn attention_fwd_unchecked(
        &self,
        _: &mut MeterBuf,
        _: &mut MeterBuf,
        _: &MeterBuf,
        _: &MeterBuf,
        _: &MeterBuf,
        _: AttnShape,
    ) -> Result<()> {
        Ok(())
    }
    unsafe fn attention_bwd_unchecked(
        &self,
        _: &mut MeterBuf,
        _: &mut MeterBuf,
        _: &mut MeterBuf,
        _: &MeterBuf,
        _: &MeterBuf,
        _: &MeterBuf,
        _: &MeterBuf,
        _: &MeterBuf,
        _: AttnShape,
    ) -> Result<()> {
        Ok(())
    }
    unsafe fn quick_gelu_fwd_unchecked(&self, _: &mut MeterBuf, _: &MeterBuf) -> Result<()> {
        Ok(())
    }
    unsafe fn gelu_fwd_unchecked(&self, _: &mut MeterBuf, _: &MeterBuf) -> Result<()> {
        Ok(())
    }
    unsafe fn gelu_bwd_unchecked(
        &self,
        _: &mut MeterBuf,
        _: &MeterBuf,
        _: &MeterBuf,
    ) -> Result<()> {
        Ok(())
    }
    unsafe fn gelu_erf_fwd_unchecked(&self, _: &mut MeterBuf, _: &MeterBuf) -> Result<()> {
        Ok(())
    }
    unsafe fn gelu_erf_bwd_unchecked(
        &self,
        _: &mut MeterBuf,
        _: &MeterBuf,
        _: &MeterBuf,
    ) -> Result<()> {
        Ok(())
    }
    unsafe fn swiglu_fwd_unchecked(
        &self,
        _: &mut MeterBuf,
        _: &MeterBuf,
        _: &MeterBuf,
    ) -> Result<()> {
        Ok(())
    }
    unsafe fn swiglu_bwd_unchecked(
        &self,
        _: &mut MeterBuf,
        _: &mut MeterBuf,
        _: &MeterBuf,
        _: &MeterBuf,
        _: &MeterBuf,
    ) -> Result<()> {
        Ok(())
    }
    unsafe fn embedding_fwd_unchecked(
        &self,
        _: &mut MeterBuf,
        _: &MeterBuf,
        _: &Vec<u32>,
        _: RowShape,
    ) -> Result<()> {
        Ok(())
    }
    unsafe fn embedding_bwd_unchecked(
        &self,
        _: &mut MeterBuf,
        _: &MeterBuf,
        _: &Vec<u32>,
        _: RowShape,
    ) -> Result<()> {
        Ok(())
    }
    unsafe fn cross_entropy_unchecked(
        &self,
        _: &mut MeterBuf,
        _: &mut MeterBuf,
        _: &MeterBuf,
        _: &Vec<u32>,
        _: &MeterBuf,
        _: RowShape,
    ) -> Result<()> {
        Ok(())
    }
    unsafe fn patchify_unchecked(
        &self,
        _: &mut MeterBuf,
        _: &MeterBuf,
        _: PatchShape,
    ) -> Result<()> {
        Ok(())
    }
    unsafe fn select_tokens_unchecked(
        &self,
        _: &MeterBuf,
        _: &MeterBuf,
        _: &MeterBuf,
        shape: &TokenShape,
        cfg: &TokenSelectConfig,
    ) -> Result<MeterBuf> {
        // As the CUDA backend: one [B, 1 + K + M, D] output.
        Ok(self.buf(shape.batch * cfg.out_tokens() * shape.hidden))
    }
}

/// Per-example accumulators of the meter: only their count matters.
pub struct MeterNorms {
    b: usize,
    rows_cap: usize,
}

impl DpBackend for Meter {
    type Norms = MeterNorms;

    fn norms_zeros(&self, b: usize, rows_cap: usize) -> Result<MeterNorms> {
        Ok(MeterNorms { b, rows_cap })
    }
    fn norms_download(&self, n: &MeterNorms) -> Result<NormTotals> {
        Ok(NormTotals {
            sq: vec![1.0; n.b].into(),
            bound: vec![0.0; n.b].into(),
            rows_cap: n.rows_cap,
        })
    }
    fn norms_len(&self, n: &MeterNorms) -> Result<usize> {
        Ok(n.b)
    }
    fn clip_factors(&self, total: &MeterNorms, _: f32) -> Result<(MeterBuf, usize)> {
        Ok((self.buf(total.b), 0))
    }
    fn noise_axpy(&self, _: &mut MeterBuf, _: NoiseKey, _: f64) -> Result<()> {
        Ok(())
    }
    unsafe fn add_layer_sq_norms_unchecked(
        &self,
        _: &MeterBuf,
        _: &MeterBuf,
        _: LinearShape,
        _: NormMethod,
        _: bool,
        _: &mut MeterNorms,
    ) -> Result<()> {
        Ok(())
    }
    unsafe fn clipped_weight_sum_unchecked(
        &self,
        _: &MeterBuf,
        _: &MeterBuf,
        _: &MeterBuf,
        _: LinearShape,
        _: &mut MeterBuf,
        _: bool,
    ) -> Result<()> {
        Ok(())
    }
    unsafe fn clipped_bias_sum_unchecked(
        &self,
        _: &MeterBuf,
        _: &MeterBuf,
        _: LinearShape,
        _: &mut MeterBuf,
        _: bool,
    ) -> Result<()> {
        Ok(())
    }
    unsafe fn per_example_weight_grads_unchecked(
        &self,
        _: &MeterBuf,
        _: &MeterBuf,
        s: LinearShape,
    ) -> Result<MeterBuf> {
        let n =
            s.b.checked_mul(s.p)
                .and_then(|v| v.checked_mul(s.d))
                .ok_or_else(|| Error::Shape(format!("per-example gradients of {s:?} overflow")))?;
        Ok(self.buf(n))
    }
    unsafe fn per_example_bias_grads_unchecked(
        &self,
        _: &MeterBuf,
        s: LinearShape,
    ) -> Result<MeterBuf> {
        Ok(self.buf(s.b * s.p))
    }
    unsafe fn add_row_sq_norms_unchecked(
        &self,
        _: &MeterBuf,
        _: usize,
        _: &mut MeterNorms,
    ) -> Result<()> {
        Ok(())
    }
    unsafe fn weighted_row_sum_unchecked(
        &self,
        _: &MeterBuf,
        _: &MeterBuf,
        _: usize,
        _: &mut MeterBuf,
        _: bool,
    ) -> Result<()> {
        Ok(())
    }
    unsafe fn noise_prune_update_unchecked(
        &self,
        set: &mut [TensorUpdate<'_, Self>],
        cfg: &UpdateConfig,
    ) -> Result<PruneReport> {
        let n: u64 = set.iter().map(|u| u.grad.len as u64).sum();
        let k = ((cfg.keep_frac * n as f64).ceil() as u64).min(n);
        Ok(PruneReport {
            n,
            k,
            kept: k,
            threshold: 0.0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_billed_at_their_size_class_and_released_on_drop() {
        let m = Meter::new();
        let a = m.zeros(10).unwrap();
        let b = m.zeros(5000).unwrap(); // class 5120 (4 significant bits)
        assert_eq!(m.stats().live_bytes, 4 * (10 + 5120));
        assert_eq!(m.stats().requested_live_bytes, 4 * 5010);
        drop(b);
        let _c = m.duplicate(&a).unwrap();
        let s = m.stats();
        assert_eq!(s.live_bytes, 4 * 20);
        assert_eq!(s.peak_bytes, 4 * 5130);
        assert_eq!(s.allocations, 3);
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn size_class_is_the_cuda_pools() {
        for n in (0..70_000).chain([1 << 20, (1 << 30) + 12345, 5_000_000_007]) {
            assert_eq!(
                size_class(n),
                crate::backend::cuda::pool::size_class(n),
                "{n}"
            );
        }
    }
}
