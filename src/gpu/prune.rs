//! Launcher for `kernels/prune.cu`: noise + exact top-k threshold + masked
//! optimizer update in one device-side sequence. CPU twin: [`crate::dp::prune`].
//!
//! A [`PrunePlan`] owns every buffer the sequence needs, sized once for the largest
//! selection set, so a training step allocates nothing.
use crate::gpu::kernels::prune as K;
use std::marker::PhantomData;

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, PushKernelArg};

use super::abi::{self, rng_code, NoiseArgs, OptArgs, PruneArgs, Segment, SelectState};
use super::{cuda_err, dptr, dptr_mut, launch, launch_cfg, Gpu};
use crate::dp::prune::{keep_count, Optimizer, PruneReport, UpdateConfig};
use crate::{Error, Result};

const THREADS: u32 = abi::PRUNE_THREADS;
/// Coordinates per apply block.
const CHUNK: u64 = abi::PRUNE_CHUNK;
const BINS: usize = abi::PRUNE_BINS as usize;

impl OptArgs {
    fn new(opt: &Optimizer, inv_batch: f32) -> Self {
        let (bias_corr1, bias_corr2) = opt.bias_corr();
        let base = OptArgs {
            kind: 0,
            lr: 0.0,
            inv_batch,
            weight_decay: 0.0,
            momentum: 0.0,
            beta1: 0.0,
            beta2: 0.0,
            eps: 0.0,
            bias_corr1,
            bias_corr2,
        };
        match *opt {
            Optimizer::Sgd {
                lr,
                momentum,
                weight_decay,
            } => OptArgs {
                lr,
                momentum,
                weight_decay,
                ..base
            },
            Optimizer::AdamW {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
                ..
            } => OptArgs {
                kind: 1,
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
                ..base
            },
        }
    }
}

/// One trainable tensor on the device: its clipped-sum gradient, parameters and
/// optimizer moments. Built with [`DeviceTensor::new`], which checks the lengths.
pub struct DeviceTensor<'a> {
    seg: Segment,
    _borrow: PhantomData<&'a mut f32>,
}

impl<'a> DeviceTensor<'a> {
    /// Borrows the buffers of one tensor. `m` / `v` are required exactly when the
    /// optimizer uses them ([`Optimizer::needs_m`], [`Optimizer::needs_v`]).
    pub fn new<G: DevicePtr<f32>, P: DevicePtrMut<f32>, M: DevicePtrMut<f32>>(
        gpu: &Gpu,
        tensor_id: u32,
        grad: &'a G,
        param: &'a mut P,
        m: Option<&'a mut M>,
        v: Option<&'a mut M>,
    ) -> Result<Self> {
        let len = grad.len();
        let bad = |what: &str, n: usize| {
            Error::Shape(format!(
                "tensor {tensor_id}: {what} has {n} values, grad has {len}"
            ))
        };
        if param.len() != len {
            return Err(bad("param", param.len()));
        }
        let st = gpu.stream();
        let ptr_of = |b: Option<&'a mut M>, what: &str| -> Result<u64> {
            match b {
                None => Ok(0),
                Some(b) if b.len() == len => Ok(dptr_mut(b, st)),
                Some(b) => Err(bad(what, b.len())),
            }
        };
        let (m, v) = (ptr_of(m, "m")?, ptr_of(v, "v")?);
        Ok(Self {
            seg: Segment {
                grad: dptr(grad, st),
                param: dptr_mut(param, st),
                m,
                v,
                len: len as u64,
                chunk_base: 0,
                tensor_id,
                pad: 0,
            },
            _borrow: PhantomData,
        })
    }
}

impl<'a> DeviceTensor<'a> {
    /// A tensor updated by plain SGD (no momentum), which needs no moment buffers.
    pub fn plain<G: DevicePtr<f32>, P: DevicePtrMut<f32>>(
        gpu: &Gpu,
        tensor_id: u32,
        grad: &'a G,
        param: &'a mut P,
    ) -> Result<Self> {
        Self::new::<G, P, CudaSlice<f32>>(gpu, tensor_id, grad, param, None, None)
    }
}

/// Planned buffers for [`PrunePlan::run`], sized for at most `max_tensors` tensors
/// and `max_coords` coordinates per selection set.
pub struct PrunePlan {
    segs: CudaSlice<Segment>,
    state: CudaSlice<SelectState>,
    chunk_ties: CudaSlice<u32>,
    chunk_offset: CudaSlice<u64>,
    max_tensors: usize,
    max_chunks: u64,
}

impl PrunePlan {
    /// Allocates the plan once; reuse it for every step.
    pub fn new(gpu: &Gpu, max_tensors: usize, max_coords: u64) -> Result<Self> {
        let max_tensors = max_tensors.max(1);
        let max_chunks = max_coords.div_ceil(CHUNK) + max_tensors as u64;
        Ok(Self {
            segs: gpu.zeros(max_tensors)?,
            state: gpu.zeros(1)?,
            chunk_ties: gpu.zeros(max_chunks as usize)?,
            chunk_offset: gpu.zeros(max_chunks as usize)?,
            max_tensors,
            max_chunks,
        })
    }

    /// Whether the plan can run a set of `tensors` tensors with `coords` coordinates.
    pub fn fits(&self, tensors: usize, coords: u64) -> bool {
        tensors <= self.max_tensors && coords.div_ceil(CHUNK) + tensors as u64 <= self.max_chunks
    }

    /// The (tensors, coordinates) the plan was built for.
    pub fn capacity(&self) -> (usize, u64) {
        (
            self.max_tensors,
            (self.max_chunks - self.max_tensors as u64) * CHUNK,
        )
    }

    /// Adds σC·noise to each tensor's clipped sum, finds the exact threshold that keeps
    /// ⌈keep_frac·N⌉ coordinates of the whole set, and applies the masked update.
    ///
    /// One call is one selection set: pass all tensors for the global scope, or one
    /// for the per-tensor scope. Synchronises once at the end to read the report; a
    /// non-finite noisy value fails the call with nothing written.
    pub fn run(
        &mut self,
        gpu: &Gpu,
        tensors: &[DeviceTensor<'_>],
        cfg: &UpdateConfig,
    ) -> Result<PruneReport> {
        cfg.validate()?;
        if tensors.len() > self.max_tensors {
            return Err(Error::Shape(format!(
                "{} tensors in one selection set, but the plan was sized for {}",
                tensors.len(),
                self.max_tensors
            )));
        }
        let mut segs = Vec::with_capacity(tensors.len());
        let (mut n, mut chunks) = (0u64, 0u64);
        for t in tensors.iter().filter(|t| t.seg.len > 0) {
            if (cfg.opt.needs_m() && t.seg.m == 0) || (cfg.opt.needs_v() && t.seg.v == 0) {
                return Err(Error::Config(format!(
                    "tensor {}: the optimizer needs moment buffers that were not given",
                    t.seg.tensor_id
                )));
            }
            segs.push(Segment {
                chunk_base: chunks,
                ..t.seg
            });
            n += t.seg.len;
            chunks += t.seg.len.div_ceil(CHUNK);
        }
        if chunks > self.max_chunks {
            return Err(Error::Shape(format!(
                "{n} coordinates in one selection set exceed the plan's size; build the plan larger"
            )));
        }
        let k = keep_count(cfg.keep_frac, n)?;
        if segs.is_empty() {
            return Ok(PruneReport {
                n,
                k,
                kept: 0,
                threshold: 0.0,
            });
        }
        let keep_all = k == n;
        let init = SelectState {
            hist: [0; BINS],
            prefix: 0,
            prefix_mask: 0,
            k,
            rank: k,
            count_eq: 0,
            ties_to_keep: 0,
            nonfinite: 0,
            kept: 0,
            keep_all: keep_all as i32,
            pad: 0,
        };
        let st = gpu.stream().clone();
        st.memcpy_htod(&segs, &mut self.segs)
            .map_err(cuda_err("uploading segments"))?;
        st.memcpy_htod(&[init], &mut self.state)
            .map_err(cuda_err("uploading select state"))?;
        let mut args = PruneArgs {
            segs: dptr(&self.segs, &st),
            st: dptr_mut(&mut self.state, &st),
            chunk_ties: dptr_mut(&mut self.chunk_ties, &st),
            chunk_offset: dptr_mut(&mut self.chunk_offset, &st),
            nchunks: chunks,
            noise: NoiseArgs {
                key: cfg.noise.key,
                rng: rng_code(cfg.noise.rng),
                step: cfg.step,
                std: cfg.noise_std,
            },
            opt: OptArgs::new(&cfg.opt, cfg.inv_batch),
            nsegs: segs.len() as i32,
            pass: 0,
        };
        let selecting = k > 0 && !keep_all;
        let hist_grid = (gpu.sm_count() * 4).max(1);
        let (hist, pick) = (gpu.func(K::PRUNE_HIST)?, gpu.func(K::PRUNE_PICK)?);
        // Pass 0 always runs: it is also the NaN/Inf check.
        for pass in 0..if selecting { 3 } else { 1 } {
            args.pass = pass;
            let mut l = st.launch_builder(&hist);
            l.arg(&args);
            // SAFETY: the kernels take this struct (abi.h); the segments hold live
            // buffers, chunk_ties and chunk_offset hold `chunks` slots (checked against
            // max_chunks), and every kernel of the sequence runs in order on one stream.
            unsafe {
                launch(
                    &mut l,
                    launch_cfg((hist_grid, 1, 1), THREADS, 0),
                    K::PRUNE_HIST,
                )
            }?;
            if selecting {
                let mut l = st.launch_builder(&pick);
                l.arg(&args);
                let cfg = launch_cfg((1, 1, 1), abi::PRUNE_PICK_THREADS, 0);
                // SAFETY: as above.
                unsafe { launch(&mut l, cfg, K::PRUNE_PICK) }?;
            }
        }
        let grid = (
            u32::try_from(chunks).map_err(|_| Error::Shape("too many chunks".into()))?,
            1,
            1,
        );
        if selecting {
            let f = gpu.func(K::PRUNE_TIE_COUNT)?;
            let mut l = st.launch_builder(&f);
            l.arg(&args);
            // SAFETY: as above.
            unsafe { launch(&mut l, launch_cfg(grid, THREADS, 0), K::PRUNE_TIE_COUNT) }?;
            let f = gpu.func(K::PRUNE_TIE_SCAN)?;
            let mut l = st.launch_builder(&f);
            l.arg(&args);
            let cfg = launch_cfg((1, 1, 1), abi::PRUNE_SCAN_THREADS, 0);
            // SAFETY: as above.
            unsafe { launch(&mut l, cfg, K::PRUNE_TIE_SCAN) }?;
        }
        if k > 0 {
            let f = gpu.func(K::PRUNE_APPLY)?;
            let mut l = st.launch_builder(&f);
            l.arg(&args);
            // SAFETY: as above.
            unsafe { launch(&mut l, launch_cfg(grid, THREADS, 0), K::PRUNE_APPLY) }?;
        }
        let s = gpu.download(&self.state)?[0];
        if s.nonfinite > 0 {
            return Err(Error::NonFinite(format!(
                "{} noisy gradient value(s) are NaN or Inf; the step was not applied",
                s.nonfinite
            )));
        }
        Ok(PruneReport {
            n,
            k,
            kept: s.kept,
            threshold: if selecting {
                f32::from_bits(s.prefix)
            } else {
                0.0
            },
        })
    }
}
