//! The CUDA backend: the same [`Backend`] and [`DpBackend`] ops as [`super::cpu::Cpu`],
//! on one GPU. GEMMs go through cuBLAS ([`crate::gpu::blas`], row-major helpers);
//! everything else is a kernel in `kernels/model.cu` (model ops) or the foundation
//! kernels (`clip.cu`, `prune.cu`, `noise.cu`, `tokens.cu`).
//!
//! # Memory
//!
//! Buffers come from a caching pool with size classes ([`size_class`]; a [`GpuBuf`]
//! returns its allocation to the pool when dropped). The model asks for the same
//! sizes every step, so the first step of a (preset, batch, tokens) plans the memory
//! and every later step reuses it with no `cuMemAlloc` at all, the effect of llm.c's
//! single planned allocation without hard-coding the model's buffer list twice;
//! the classes let the varying sizes of Poisson batches share buffers. The pool counts the
//! bytes live, cached and at peak ([`Cuda::memory`]); `cuMemGetInfo` gives the
//! device-wide view. An allocation failure is an error naming the request size,
//! never a panic.
//!
//! # Numerics
//!
//! Row reductions run in f32 (the CPU reference uses f64) and the model's cuBLAS
//! GEMMs may use TF32 tensor cores ([`Cuda::with_options`]; on by default); tests
//! state the tolerances each allows. The rule for DP: every GEMM that forms a
//! per-example norm or a clipped sum (`clipped_weight_sum`, `per_example_weight_grads`,
//! `weighted_row_sum`) runs on the strict-FP32 handle ([`Precision::Strict`]) whatever
//! the TF32 setting, because a TF32 residual of a near-cancelling example would
//! survive clipping and exceed the sensitivity C; the network's forward and backward
//! GEMMs are [`Precision::Model`]. The DP mechanisms reproduce the CPU's ChaCha20 /
//! Philox noise bit for bit.
#![allow(clippy::too_many_arguments)]

use crate::gpu::kernels::model as K;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

use super::dp::{DpBackend, TensorUpdate};
use super::{
    AttnShape, Backend, Blocks, DeviceMemory, MatmulSpec, PatchShape, RopeShape, RowShape,
};
use crate::dp::clip::{self as dpclip, LinearShape, NormMethod, NormTotals};
use crate::dp::noise::NoiseKey;
use crate::dp::prune::{PruneReport, UpdateConfig};
use crate::gpu::blas::{Precision, RowMajor};
use crate::gpu::prune::{DeviceTensor, PrunePlan};
use crate::gpu::tokens::TokenWorkspace;
use crate::gpu::{self, cuda_err, dptr, dptr_mut, grid_for, launch, launch_cfg, Gpu, Kernel};
use crate::vision::tokens::{TokenSelectConfig, TokenShape};
use crate::{Error, Result};

const THREADS: u32 = 256;
const ROW_THREADS: u32 = 256;

// ---------------------------------------------------------------------------
// The caching pool

#[derive(Default)]
struct PoolState {
    free: HashMap<usize, Vec<CudaSlice<f32>>>,
    live_bytes: u64,
    cached_bytes: u64,
    peak_bytes: u64,
    allocations: u64,
}

/// Byte counts of the backend's pool.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Bytes in buffers currently handed out.
    pub live_bytes: u64,
    /// Bytes held for reuse (not handed out).
    pub cached_bytes: u64,
    /// Largest `live_bytes` since the last [`Cuda::reset_peak`].
    pub peak_bytes: u64,
    /// `cuMemAlloc` calls so far (constant once the memory plan is warm).
    pub allocations: u64,
}

struct Pool {
    state: Mutex<PoolState>,
}

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        // A panic while holding the lock cannot leave the counters inconsistent
        // enough to matter, so a poisoned lock is recovered.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A device buffer of f32 from the backend's pool. Its allocation is the buffer's
/// size class ([`size_class`]), at least its logical length; [`GpuBuf::view`] and
/// [`GpuBuf::view_mut`] expose exactly the logical `len` values.
pub struct GpuBuf {
    slice: Option<CudaSlice<f32>>,
    len: usize,
    pool: Arc<Pool>,
    /// What is known about zeros among the values, for clip factors: `ZEROS_*`.
    /// Any mutable access resets it to unknown.
    zeros: AtomicU8,
}

/// [`GpuBuf::zeros`] states: unknown, no value is 0, some value is 0.
const ZEROS_UNKNOWN: u8 = 0;
const ZEROS_NONE: u8 = 1;
const ZEROS_SOME: u8 = 2;

impl GpuBuf {
    fn alloc(&self) -> &CudaSlice<f32> {
        self.slice
            .as_ref()
            .expect("GpuBuf slice present until drop")
    }

    fn bytes(&self) -> u64 {
        (self.alloc().len() * 4) as u64
    }

    /// The buffer's `len` values.
    pub fn view(&self) -> CudaView<'_, f32> {
        self.alloc().slice(0..self.len)
    }

    /// The buffer's `len` values, mutably.
    pub fn view_mut(&mut self) -> CudaViewMut<'_, f32> {
        *self.zeros.get_mut() = ZEROS_UNKNOWN;
        let len = self.len;
        self.slice
            .as_mut()
            .expect("GpuBuf slice present until drop")
            .slice_mut(0..len)
    }
}

/// The allocation size for a request of `n` values: exact up to 4096, above that
/// rounded up to 4 significant bits (at most 1/8 extra). Poisson batches change the
/// batch size every step; the classes let neighbouring sizes share cached buffers
/// instead of growing the cache with every new size.
pub fn size_class(n: usize) -> usize {
    if n <= 4096 {
        return n.max(1);
    }
    let bits = usize::BITS - n.leading_zeros();
    let shift = bits - 4;
    n.div_ceil(1 << shift) << shift
}

impl Drop for GpuBuf {
    fn drop(&mut self) {
        let bytes = self.bytes();
        if let Some(s) = self.slice.take() {
            let mut st = self.pool.lock();
            st.live_bytes -= bytes;
            st.cached_bytes += bytes;
            st.free.entry(s.len()).or_default().push(s);
        }
    }
}

/// Token ids on the device, with a host copy for range checks (ids are tiny next
/// to activations, and checking on the host needs no synchronisation).
pub struct GpuIds {
    dev: CudaSlice<u32>,
    host: Vec<u32>,
}

// ---------------------------------------------------------------------------
// The backend

/// The CUDA backend. Cheap to share by reference; all work runs on one stream.
pub struct Cuda {
    gpu: Gpu,
    pool: Arc<Pool>,
    prune: Mutex<Option<PrunePlan>>,
    tokens: Mutex<Option<TokenWorkspace>>,
    tf32: bool,
}

impl Cuda {
    /// Opens GPU 0 with TF32 tensor cores for the model's f32 GEMMs (the DP GEMMs
    /// stay strict FP32). Without a driver this is [`Error::NoCudaDriver`].
    pub fn new() -> Result<Self> {
        Self::with_options(0, true)
    }

    /// Opens GPU `ordinal`; `tf32` selects TF32 tensor cores for the model's GEMMs
    /// (false: strict FP32). The DP GEMMs are strict FP32 either way.
    pub fn with_options(ordinal: usize, tf32: bool) -> Result<Self> {
        let gpu = Gpu::with_device(ordinal)?;
        gpu.set_tf32(tf32)?;
        Ok(Self {
            gpu,
            pool: Arc::new(Pool {
                state: Mutex::new(PoolState::default()),
            }),
            prune: Mutex::new(None),
            tokens: Mutex::new(None),
            tf32,
        })
    }

    /// The underlying GPU runtime.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// Whether the model's GEMMs use TF32 tensor cores.
    pub fn tf32(&self) -> bool {
        self.tf32
    }

    /// The pool's byte counts.
    pub fn memory(&self) -> PoolStats {
        let st = self.pool.lock();
        PoolStats {
            live_bytes: st.live_bytes,
            cached_bytes: st.cached_bytes,
            peak_bytes: st.peak_bytes,
            allocations: st.allocations,
        }
    }

    /// Starts a new peak measurement at the current live bytes.
    pub fn reset_peak(&self) {
        let mut st = self.pool.lock();
        st.peak_bytes = st.live_bytes;
    }

    /// Frees every cached (not live) allocation back to the driver.
    pub fn trim(&self) {
        let mut st = self.pool.lock();
        st.free.clear();
        st.cached_bytes = 0;
    }

    /// A pooled buffer of `n` values with unspecified contents.
    fn take(&self, n: usize) -> Result<GpuBuf> {
        let size = size_class(n);
        let bytes = (size * 4) as u64;
        let cached = {
            let mut st = self.pool.lock();
            let s = st.free.get_mut(&size).and_then(|v| v.pop());
            if s.is_some() {
                st.cached_bytes -= bytes;
            }
            s
        };
        let slice = match cached {
            Some(s) => s,
            None => {
                self.pool.lock().allocations += 1;
                // SAFETY: every caller writes the buffer before reading it, or zeroes it.
                let fresh = unsafe { self.gpu.stream().alloc::<f32>(size) };
                match fresh {
                    Ok(s) => s,
                    Err(_) => {
                        // Give the cache back to the driver and try once more.
                        self.trim();
                        // SAFETY: as above.
                        unsafe { self.gpu.stream().alloc::<f32>(size) }
                            .map_err(|e| self.oom(size, e))?
                    }
                }
            }
        };
        let mut st = self.pool.lock();
        st.live_bytes += bytes;
        st.peak_bytes = st.peak_bytes.max(st.live_bytes);
        drop(st);
        Ok(GpuBuf {
            slice: Some(slice),
            len: n,
            pool: self.pool.clone(),
            zeros: AtomicU8::new(ZEROS_UNKNOWN),
        })
    }

    fn oom(&self, values: usize, e: impl std::fmt::Debug) -> Error {
        let free = self.gpu.mem_info().map(|(f, _)| f).unwrap_or(0);
        Error::OutOfMemory(format!(
            "the GPU could not allocate {} MiB ({e:?}; {} MiB free, {} MiB live in dualpriv's pool); \
             use a smaller --micro-batch (activations scale with it), fewer --keep-tokens, or a smaller preset",
            (values * 4) >> 20,
            free >> 20,
            self.memory().live_bytes >> 20
        ))
    }

    fn st(&self) -> &Arc<cudarc::driver::CudaStream> {
        self.gpu.stream()
    }

    fn ptr(&self, b: &GpuBuf) -> u64 {
        dptr(b.alloc(), self.st())
    }

    fn ptr_mut(&self, b: &mut GpuBuf) -> u64 {
        *b.zeros.get_mut() = ZEROS_UNKNOWN;
        let st = self.st().clone();
        dptr_mut(
            b.slice.as_mut().expect("GpuBuf slice present until drop"),
            &st,
        )
    }

    /// Launches a grid-stride elementwise kernel over `n` items.
    fn elementwise(&self, name: Kernel, n: usize, args: &[&dyn KernelArg]) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let grid = grid_for(n, THREADS, self.gpu.sm_count() * 16);
        self.run(name, launch_cfg((grid, 1, 1), THREADS, 0), args)
    }

    /// Launches a one-block-per-row kernel over `rows` rows.
    fn per_row(&self, name: Kernel, rows: usize, args: &[&dyn KernelArg]) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        let rows = u32::try_from(rows)
            .map_err(|_| Error::Shape(format!("{name}: {rows} rows exceed one launch")))?;
        self.run(name, launch_cfg((rows, 1, 1), ROW_THREADS, 0), args)
    }

    fn run(&self, name: Kernel, cfg: LaunchConfig, args: &[&dyn KernelArg]) -> Result<()> {
        let f = self.gpu.func(name)?;
        let mut l = self.st().launch_builder(&f);
        for a in args {
            a.push(&mut l);
        }
        // SAFETY: each caller passes the argument list of the kernel it names, and
        // is an `*_unchecked` op whose buffers passed `backend::check`.
        unsafe { launch(&mut l, cfg, name) }
    }

    /// A model GEMM ([`Precision::Model`]: TF32 when on).
    fn gemm(&self, c: &mut GpuBuf, a: &GpuBuf, b: &GpuBuf, g: RowMajor) -> Result<()> {
        self.gemm_with(Precision::Model, c, a, b, g)
    }

    fn gemm_with(
        &self,
        precision: Precision,
        c: &mut GpuBuf,
        a: &GpuBuf,
        b: &GpuBuf,
        g: RowMajor,
    ) -> Result<()> {
        self.gpu.bind()?;
        g.run(
            &self.gpu,
            precision,
            &a.view(),
            &b.view(),
            &mut c.view_mut(),
        )
    }

    /// Model GEMMs, `batch` of them ([`Precision::Model`]).
    fn gemm_batched(
        &self,
        c: &mut GpuBuf,
        a: &GpuBuf,
        b: &GpuBuf,
        g: RowMajor,
        batch: usize,
    ) -> Result<()> {
        self.gemm_batched_with(Precision::Model, c, a, b, g, batch)
    }

    fn gemm_batched_with(
        &self,
        precision: Precision,
        c: &mut GpuBuf,
        a: &GpuBuf,
        b: &GpuBuf,
        g: RowMajor,
        batch: usize,
    ) -> Result<()> {
        if batch == 0 || g.m == 0 || g.n == 0 {
            return Ok(());
        }
        self.gpu.bind()?;
        g.run_batched(
            &self.gpu,
            precision,
            batch,
            &a.view(),
            &b.view(),
            &mut c.view_mut(),
        )
    }

    fn memset0(&self, b: &mut GpuBuf) -> Result<()> {
        self.st()
            .memset_zeros(&mut b.view_mut())
            .map_err(cuda_err("cuMemsetD8"))
    }
}

/// A kernel argument pushed by value (scalars, raw device pointers).
trait KernelArg {
    fn push<'a>(&'a self, l: &mut cudarc::driver::LaunchArgs<'a>);
}

impl<T: cudarc::driver::DeviceRepr> KernelArg for T {
    fn push<'a>(&'a self, l: &mut cudarc::driver::LaunchArgs<'a>) {
        l.arg(self);
    }
}

fn i32_of(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::Shape(format!("{what} = {v} exceeds the kernel's i32")))
}

fn i64_of(v: usize) -> i64 {
    v as i64
}

impl Backend for Cuda {
    type Buf = GpuBuf;
    type Ids = GpuIds;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn zeros(&self, n: usize) -> Result<GpuBuf> {
        let mut b = self.take(n)?;
        self.memset0(&mut b)?;
        Ok(b)
    }

    fn upload(&self, host: &[f32]) -> Result<GpuBuf> {
        let mut b = self.take(host.len())?;
        if !host.is_empty() {
            let mut view = b.view_mut();
            self.st()
                .memcpy_htod(host, &mut view)
                .map_err(cuda_err("host-to-device copy"))?;
        }
        Ok(b)
    }

    fn download(&self, buf: &GpuBuf) -> Result<Vec<f32>> {
        if buf.len == 0 {
            return Ok(Vec::new());
        }
        self.gpu.download(&buf.view())
    }

    fn len(&self, buf: &GpuBuf) -> usize {
        buf.len
    }

    fn upload_ids(&self, ids: &[u32]) -> Result<GpuIds> {
        let dev = if ids.is_empty() {
            self.gpu.zeros::<u32>(1)?
        } else {
            self.gpu.upload(ids)?
        };
        Ok(GpuIds {
            dev,
            host: ids.to_vec(),
        })
    }

    fn host_ids<'a>(&self, ids: &'a GpuIds) -> &'a [u32] {
        &ids.host
    }

    fn available_memory(&self) -> Option<u64> {
        let cached = self.memory().cached_bytes;
        self.gpu
            .mem_info()
            .ok()
            .map(|(free, _)| free as u64 + cached)
    }

    fn value_bytes(&self) -> usize {
        4
    }

    fn device_memory(&self) -> Option<DeviceMemory> {
        let used = self
            .gpu
            .mem_info()
            .map_or(0, |(free, total)| (total - free) as u64);
        Some(DeviceMemory {
            peak_bytes: self.memory().peak_bytes,
            used_bytes: used,
        })
    }

    fn reset_device_peak(&self) {
        self.reset_peak();
    }

    fn device_time_ms(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<Option<f64>> {
        self.gpu.time_ms(f).map(|ms| Some(f64::from(ms)))
    }

    fn device_name(&self) -> Option<String> {
        self.gpu.name().ok()
    }

    fn tf32_gemms(&self) -> bool {
        self.tf32
    }

    fn duplicate(&self, src: &GpuBuf) -> Result<GpuBuf> {
        let mut b = self.take(src.len)?;
        if src.len > 0 {
            self.st()
                .memcpy_dtod(&src.view(), &mut b.view_mut())
                .map_err(cuda_err("device-to-device copy"))?;
        }
        Ok(b)
    }

    unsafe fn copy_blocks_unchecked(
        &self,
        dst: &mut GpuBuf,
        src: &GpuBuf,
        b: Blocks,
    ) -> Result<()> {
        if b.count == 0 || b.len == 0 {
            return Ok(());
        }
        let (d, s) = (self.ptr_mut(dst), self.ptr(src));
        self.elementwise(
            K::COPY_BLOCKS_F32,
            b.count * b.len,
            &[
                &d,
                &s,
                &i64_of(b.count),
                &i64_of(b.len),
                &i64_of(b.src_off),
                &i64_of(b.src_stride),
                &i64_of(b.dst_off),
                &i64_of(b.dst_stride),
            ],
        )
    }

    unsafe fn matmul_unchecked(
        &self,
        c: &mut GpuBuf,
        a: &GpuBuf,
        b: &GpuBuf,
        s: MatmulSpec,
    ) -> Result<()> {
        if s.m == 0 || s.n == 0 {
            return Ok(());
        }
        if s.k == 0 {
            // C = beta·C; cuBLAS is not asked to handle an empty inner dimension.
            if s.beta == 0.0 {
                return self.memset0(c);
            }
            let cp = self.ptr_mut(c);
            return self.elementwise(K::SCALE_F32, c.len, &[&cp, &s.beta, &i64_of(c.len)]);
        }
        let g = RowMajor {
            ta: s.trans_a,
            tb: s.trans_b,
            m: s.m,
            n: s.n,
            k: s.k,
            alpha: s.alpha,
            beta: s.beta,
        };
        self.gemm(c, a, b, g)
    }

    unsafe fn add_bias_unchecked(&self, y: &mut GpuBuf, bias: &GpuBuf, s: RowShape) -> Result<()> {
        let (yp, bp) = (self.ptr_mut(y), self.ptr(bias));
        self.elementwise(
            K::ADD_BIAS_F32,
            y.len,
            &[&yp, &bp, &i64_of(s.rows), &i64_of(s.dim)],
        )
    }

    unsafe fn axpy_unchecked(&self, y: &mut GpuBuf, alpha: f32, x: &GpuBuf) -> Result<()> {
        let (yp, xp) = (self.ptr_mut(y), self.ptr(x));
        self.elementwise(K::AXPY_F32, y.len, &[&yp, &alpha, &xp, &i64_of(y.len)])
    }

    unsafe fn layernorm_fwd_unchecked(
        &self,
        out: &mut GpuBuf,
        mean: &mut GpuBuf,
        rstd: &mut GpuBuf,
        x: &GpuBuf,
        w: &GpuBuf,
        b: &GpuBuf,
        s: RowShape,
        eps: f32,
    ) -> Result<()> {
        if s.dim == 0 {
            return Ok(());
        }
        let args = (
            self.ptr_mut(out),
            self.ptr_mut(mean),
            self.ptr_mut(rstd),
            self.ptr(x),
            self.ptr(w),
            self.ptr(b),
        );
        let dim = i32_of(s.dim, "layernorm dim")?;
        self.per_row(
            K::LAYERNORM_FWD_F32,
            s.rows,
            &[
                &args.0, &args.1, &args.2, &args.3, &args.4, &args.5, &dim, &eps,
            ],
        )
    }

    unsafe fn layernorm_bwd_unchecked(
        &self,
        dx: &mut GpuBuf,
        dw: &mut GpuBuf,
        db: &mut GpuBuf,
        dout: &GpuBuf,
        x: &GpuBuf,
        w: &GpuBuf,
        mean: &GpuBuf,
        rstd: &GpuBuf,
        s: RowShape,
    ) -> Result<()> {
        if s.dim == 0 {
            return Ok(());
        }
        let p = [
            self.ptr_mut(dx),
            self.ptr_mut(dw),
            self.ptr_mut(db),
            self.ptr(dout),
            self.ptr(x),
            self.ptr(w),
            self.ptr(mean),
            self.ptr(rstd),
        ];
        let dim = i32_of(s.dim, "layernorm dim")?;
        self.per_row(
            K::LAYERNORM_BWD_F32,
            s.rows,
            &[&p[0], &p[1], &p[2], &p[3], &p[4], &p[5], &p[6], &p[7], &dim],
        )
    }

    unsafe fn rmsnorm_fwd_unchecked(
        &self,
        out: &mut GpuBuf,
        rstd: &mut GpuBuf,
        x: &GpuBuf,
        w: &GpuBuf,
        s: RowShape,
        eps: f32,
    ) -> Result<()> {
        if s.dim == 0 {
            return Ok(());
        }
        let p = [
            self.ptr_mut(out),
            self.ptr_mut(rstd),
            self.ptr(x),
            self.ptr(w),
        ];
        let dim = i32_of(s.dim, "rmsnorm dim")?;
        self.per_row(
            K::RMSNORM_FWD_F32,
            s.rows,
            &[&p[0], &p[1], &p[2], &p[3], &dim, &eps],
        )
    }

    unsafe fn rmsnorm_bwd_unchecked(
        &self,
        dx: &mut GpuBuf,
        dw: &mut GpuBuf,
        dout: &GpuBuf,
        x: &GpuBuf,
        w: &GpuBuf,
        rstd: &GpuBuf,
        s: RowShape,
    ) -> Result<()> {
        if s.dim == 0 {
            return Ok(());
        }
        let p = [
            self.ptr_mut(dx),
            self.ptr_mut(dw),
            self.ptr(dout),
            self.ptr(x),
            self.ptr(w),
            self.ptr(rstd),
        ];
        let dim = i32_of(s.dim, "rmsnorm dim")?;
        self.per_row(
            K::RMSNORM_BWD_F32,
            s.rows,
            &[&p[0], &p[1], &p[2], &p[3], &p[4], &p[5], &dim],
        )
    }

    unsafe fn rope_unchecked(&self, x: &mut GpuBuf, s: RopeShape, sign: f64) -> Result<()> {
        let row = s.heads * s.hd;
        if row == 0 || x.len == 0 {
            return Ok(());
        }
        let xp = self.ptr_mut(x);
        let rows = s.b * s.t;
        let dims = [
            i32_of(s.t.max(1), "tokens")?,
            i32_of(s.heads, "heads")?,
            i32_of(s.hd, "head dim")?,
        ];
        self.elementwise(
            K::ROPE_F32,
            rows * (s.hd / 2),
            &[
                &xp,
                &i64_of(rows),
                &dims[0],
                &dims[1],
                &dims[2],
                &f64::from(s.theta),
                &sign,
            ],
        )
    }

    unsafe fn attention_fwd_unchecked(
        &self,
        out: &mut GpuBuf,
        probs: &mut GpuBuf,
        q: &GpuBuf,
        k: &GpuBuf,
        v: &GpuBuf,
        s: AttnShape,
    ) -> Result<()> {
        if s.b == 0 || s.t == 0 || s.hd == 0 || s.hq == 0 {
            return Ok(());
        }
        let rep = s.hq / s.hkv;
        let bh = s.b * s.hq;
        // Head-major copies so each (example, head) is one packed matrix for cuBLAS.
        let qh = self.split_heads(q, &s, s.hq, 1)?;
        let kh = self.split_heads(k, &s, s.hkv, rep)?;
        let vh = self.split_heads(v, &s, s.hkv, rep)?;
        let scale = 1.0 / (s.hd as f32).sqrt();
        let scores = RowMajor {
            ta: false,
            tb: true,
            m: s.t,
            n: s.t,
            k: s.hd,
            alpha: scale,
            beta: 0.0,
        };
        self.gemm_batched(probs, &qh, &kh, scores, bh)?;
        let pp = self.ptr_mut(probs);
        let (t, causal) = (i32_of(s.t, "tokens")?, s.causal as i32);
        self.per_row(K::SOFTMAX_FWD_F32, bh * s.t, &[&pp, &t, &causal])?;
        let mut oh = self.take(s.q_len())?;
        let pv = RowMajor {
            ta: false,
            tb: false,
            m: s.t,
            n: s.hd,
            k: s.t,
            alpha: 1.0,
            beta: 0.0,
        };
        self.gemm_batched(&mut oh, probs, &vh, pv, bh)?;
        self.merge_heads(out, &oh, &s, s.hq, 1)
    }

    unsafe fn attention_bwd_unchecked(
        &self,
        dq: &mut GpuBuf,
        dk: &mut GpuBuf,
        dv: &mut GpuBuf,
        dout: &GpuBuf,
        q: &GpuBuf,
        k: &GpuBuf,
        v: &GpuBuf,
        probs: &GpuBuf,
        s: AttnShape,
    ) -> Result<()> {
        if s.b == 0 || s.t == 0 || s.hd == 0 || s.hq == 0 {
            for b in [dq, dk, dv] {
                self.memset0(b)?;
            }
            return Ok(());
        }
        let rep = s.hq / s.hkv;
        let bh = s.b * s.hq;
        let (t, hd) = (s.t, s.hd);
        let scale = 1.0 / (hd as f32).sqrt();
        let doh = self.split_heads(dout, &s, s.hq, 1)?;
        let qh = self.split_heads(q, &s, s.hq, 1)?;
        let kh = self.split_heads(k, &s, s.hkv, rep)?;
        let vh = self.split_heads(v, &s, s.hkv, rep)?;
        let tn = |m, n, k, alpha| RowMajor {
            ta: true,
            tb: false,
            m,
            n,
            k,
            alpha,
            beta: 0.0,
        };
        // dV (per query head) = Pᵀ dO
        let mut dvh = self.take(s.q_len())?;
        self.gemm_batched(&mut dvh, probs, &doh, tn(t, hd, t, 1.0), bh)?;
        // dP = dO Vᵀ, then dS = scale · P ⊙ (dP − rowsum(dP ⊙ P)) in place
        let mut ds = self.take(s.probs_len())?;
        let nt = RowMajor {
            ta: false,
            tb: true,
            m: t,
            n: t,
            k: hd,
            alpha: 1.0,
            beta: 0.0,
        };
        self.gemm_batched(&mut ds, &doh, &vh, nt, bh)?;
        let (dsp, pp) = (self.ptr_mut(&mut ds), self.ptr(probs));
        let ti = i32_of(t, "tokens")?;
        self.per_row(K::SOFTMAX_BWD_F32, bh * t, &[&dsp, &pp, &ti, &scale])?;
        // dQ = dS K, dK (per query head) = dSᵀ Q
        let mut dqh = self.take(s.q_len())?;
        let nn = RowMajor {
            ta: false,
            tb: false,
            m: t,
            n: hd,
            k: t,
            alpha: 1.0,
            beta: 0.0,
        };
        self.gemm_batched(&mut dqh, &ds, &kh, nn, bh)?;
        let mut dkh = self.take(s.q_len())?;
        self.gemm_batched(&mut dkh, &ds, &qh, tn(t, hd, t, 1.0), bh)?;
        self.merge_heads(dq, &dqh, &s, s.hq, 1)?;
        // GQA: the query heads sharing a key/value head sum into it.
        self.merge_heads(dk, &dkh, &s, s.hkv, rep)?;
        self.merge_heads(dv, &dvh, &s, s.hkv, rep)
    }

    unsafe fn quick_gelu_fwd_unchecked(&self, out: &mut GpuBuf, x: &GpuBuf) -> Result<()> {
        self.unary(K::QUICK_GELU_FWD_F32, out, x)
    }

    unsafe fn gelu_fwd_unchecked(&self, out: &mut GpuBuf, x: &GpuBuf) -> Result<()> {
        self.unary(K::GELU_FWD_F32, out, x)
    }

    unsafe fn gelu_bwd_unchecked(&self, dx: &mut GpuBuf, dout: &GpuBuf, x: &GpuBuf) -> Result<()> {
        let p = [self.ptr_mut(dx), self.ptr(dout), self.ptr(x)];
        let n = dx.len;
        self.elementwise(K::GELU_BWD_F32, n, &[&p[0], &p[1], &p[2], &i64_of(n)])
    }

    unsafe fn swiglu_fwd_unchecked(
        &self,
        out: &mut GpuBuf,
        gate: &GpuBuf,
        up: &GpuBuf,
    ) -> Result<()> {
        let p = [self.ptr_mut(out), self.ptr(gate), self.ptr(up)];
        let n = out.len;
        self.elementwise(K::SWIGLU_FWD_F32, n, &[&p[0], &p[1], &p[2], &i64_of(n)])
    }

    unsafe fn swiglu_bwd_unchecked(
        &self,
        dgate: &mut GpuBuf,
        dup: &mut GpuBuf,
        dout: &GpuBuf,
        gate: &GpuBuf,
        up: &GpuBuf,
    ) -> Result<()> {
        let n = dout.len;
        let p = [
            self.ptr_mut(dgate),
            self.ptr_mut(dup),
            self.ptr(dout),
            self.ptr(gate),
            self.ptr(up),
        ];
        self.elementwise(
            K::SWIGLU_BWD_F32,
            n,
            &[&p[0], &p[1], &p[2], &p[3], &p[4], &i64_of(n)],
        )
    }

    unsafe fn embedding_fwd_unchecked(
        &self,
        out: &mut GpuBuf,
        table: &GpuBuf,
        ids: &GpuIds,
        s: RowShape,
    ) -> Result<()> {
        let (o, t) = (self.ptr_mut(out), self.ptr(table));
        self.embedding_launch(K::EMBEDDING_FWD_F32, o, t, ids, s)
    }

    unsafe fn embedding_bwd_unchecked(
        &self,
        dtable: &mut GpuBuf,
        dout: &GpuBuf,
        ids: &GpuIds,
        s: RowShape,
    ) -> Result<()> {
        let (t, o) = (self.ptr_mut(dtable), self.ptr(dout));
        self.embedding_launch(K::EMBEDDING_BWD_F32, t, o, ids, s)
    }

    unsafe fn cross_entropy_unchecked(
        &self,
        losses: &mut GpuBuf,
        dlogits: &mut GpuBuf,
        logits: &GpuBuf,
        targets: &GpuIds,
        weights: &GpuBuf,
        s: RowShape,
    ) -> Result<()> {
        if s.dim == 0 {
            return self.memset0(losses);
        }
        let p = [
            self.ptr_mut(losses),
            self.ptr_mut(dlogits),
            self.ptr(logits),
            dptr(&targets.dev, self.st()),
            self.ptr(weights),
        ];
        let vocab = i32_of(s.dim, "vocabulary")?;
        self.per_row(
            K::CROSS_ENTROPY_F32,
            s.rows,
            &[&p[0], &p[1], &p[2], &p[3], &p[4], &vocab],
        )
    }

    unsafe fn patchify_unchecked(
        &self,
        out: &mut GpuBuf,
        images: &GpuBuf,
        s: PatchShape,
    ) -> Result<()> {
        let p = [self.ptr_mut(out), self.ptr(images)];
        let dims = [
            i32_of(s.b, "batch")?,
            i32_of(s.channels, "channels")?,
            i32_of(s.size, "image size")?,
            i32_of(s.patch, "patch")?,
        ];
        self.elementwise(
            K::PATCHIFY_F32,
            out.len,
            &[&p[0], &p[1], &dims[0], &dims[1], &dims[2], &dims[3]],
        )
    }

    unsafe fn select_tokens_unchecked(
        &self,
        attn_cls: &GpuBuf,
        keys: &GpuBuf,
        hidden: &GpuBuf,
        shape: &TokenShape,
        cfg: &TokenSelectConfig,
    ) -> Result<GpuBuf> {
        // Fits: the config keeps at most N tokens of each image (checked).
        let out_len = shape.batch * cfg.out_tokens() * shape.hidden;
        let mut out = self.take(out_len)?;
        if out_len == 0 || shape.batch == 0 {
            return Ok(out);
        }
        let mut ws = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        if ws
            .as_ref()
            .is_none_or(|w| w.check_fits(shape, cfg).is_err())
        {
            *ws = Some(TokenWorkspace::new(&self.gpu, shape, cfg)?);
        }
        let ws = ws.as_mut().expect("workspace was just built");
        let kept_len = shape.batch * (1 + cfg.keep);
        let mut kept = self.gpu.zeros::<u32>(kept_len.max(1))?;
        gpu::tokens::select_tokens_dev(
            &self.gpu,
            &attn_cls.view(),
            &keys.view(),
            &hidden.view(),
            shape,
            cfg,
            &mut out.view_mut(),
            &mut kept.slice_mut(0..kept_len),
            ws,
        )?;
        Ok(out)
    }
}

impl Cuda {
    /// Launches an embedding kernel: `(written, read, ids, rows, dim)` over rows × dim.
    fn embedding_launch(
        &self,
        name: Kernel,
        written: u64,
        read: u64,
        ids: &GpuIds,
        s: RowShape,
    ) -> Result<()> {
        let ip = dptr(&ids.dev, self.st());
        let dim = i32_of(s.dim, "embedding dim")?;
        self.elementwise(
            name,
            s.rows * s.dim,
            &[&written, &read, &ip, &i64_of(s.rows), &dim],
        )
    }

    fn unary(&self, name: Kernel, out: &mut GpuBuf, x: &GpuBuf) -> Result<()> {
        let p = [self.ptr_mut(out), self.ptr(x)];
        let n = out.len;
        self.elementwise(name, n, &[&p[0], &p[1], &i64_of(n)])
    }

    /// `[b, t, heads·hd]` → `[b, hq, t, hd]`, query head h reading head h / rep.
    fn split_heads(&self, src: &GpuBuf, s: &AttnShape, heads: usize, rep: usize) -> Result<GpuBuf> {
        let mut dst = self.take(s.q_len())?;
        let p = [self.ptr_mut(&mut dst), self.ptr(src)];
        let dims = [
            i32_of(s.b, "batch")?,
            i32_of(s.t, "tokens")?,
            i32_of(s.hq, "heads")?,
            i32_of(heads, "heads")?,
            i32_of(s.hd, "head dim")?,
            i32_of(rep, "group")?,
        ];
        self.elementwise(
            K::SPLIT_HEADS_F32,
            s.q_len(),
            &[
                &p[0], &p[1], &dims[0], &dims[1], &dims[2], &dims[3], &dims[4], &dims[5],
            ],
        )?;
        Ok(dst)
    }

    /// `[b, hq, t, hd]` → `[b, t, heads·hd]`, summing each group of `rep` heads.
    fn merge_heads(
        &self,
        dst: &mut GpuBuf,
        src: &GpuBuf,
        s: &AttnShape,
        heads: usize,
        rep: usize,
    ) -> Result<()> {
        let n = s.b * s.t * heads * s.hd;
        let p = [self.ptr_mut(dst), self.ptr(src)];
        let dims = [
            i32_of(s.b, "batch")?,
            i32_of(s.t, "tokens")?,
            i32_of(heads, "heads")?,
            i32_of(s.hd, "head dim")?,
            i32_of(rep, "group")?,
        ];
        self.elementwise(
            K::MERGE_HEADS_F32,
            n,
            &[
                &p[0], &p[1], &dims[0], &dims[1], &dims[2], &dims[3], &dims[4],
            ],
        )
    }
}

// ---------------------------------------------------------------------------
// DP operations

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
            sq: self.gpu.download(&n.slice)?,
            bound: self.gpu.download(&n.bound)?,
            rows_cap: n.rows_cap,
        })
    }

    fn norms_len(&self, n: &GpuNorms) -> Result<usize> {
        Ok(n.len)
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
        let p = [self.ptr_mut(&mut out), self.ptr(g)];
        let dims = [
            i32_of(s.b, "batch")?,
            i32_of(s.t, "tokens")?,
            i32_of(s.p, "p")?,
        ];
        self.elementwise(
            K::SUM_OVER_TOKENS_F32,
            s.b * s.p,
            &[&p[0], &p[1], &dims[0], &dims[1], &dims[2]],
        )?;
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
        let cols = cols as i64;
        let pp = self.ptr(per_example);
        let tp = dptr_mut(&mut total.slice, self.st());
        let bp = dptr_mut(&mut total.bound, self.st());
        self.per_row(
            K::ADD_ROW_SQ_NORMS_F32,
            rows,
            &[&pp, &cols, &gamma, &tp, &bp],
        )
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
        let coords: u64 = set.iter().map(|t| t.grad.len as u64).sum();
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

    fn noise_axpy(&self, y: &mut GpuBuf, key: NoiseKey, a: f64) -> Result<()> {
        if y.len == 0 {
            return Ok(());
        }
        gpu::noise::noise_axpy(&self.gpu, key, 0, a, true, &mut y.view_mut())
    }
}

/// For tests: the [`Cuda`] backend with its shipped defaults ([`Cuda::new`], TF32
/// model GEMMs), or `None` after [`gpu::skip_without_driver`] when this machine has
/// none. Any other failure to open the GPU is a real error.
pub fn cuda_or_skip(test: &str) -> Option<Cuda> {
    open_or_skip(test, Cuda::new())
}

/// For op-level tests that judge kernels against the CPU at FP32 tolerances: a
/// backend whose model GEMMs are strict FP32 too, or `None` as [`cuda_or_skip`].
pub fn cuda_strict_or_skip(test: &str) -> Option<Cuda> {
    open_or_skip(test, Cuda::with_options(0, false))
}

fn open_or_skip(test: &str, opened: Result<Cuda>) -> Option<Cuda> {
    match opened {
        Ok(c) => Some(c),
        Err(Error::NoCudaDriver) => {
            gpu::skip_without_driver(test);
            None
        }
        Err(e) => panic!("{test}: a CUDA driver is present but the GPU failed to open: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::size_class;

    #[test]
    fn size_classes_cover_requests_with_bounded_waste() {
        for n in (0..200_000usize).chain([1 << 30, (1 << 30) + 1, 3_000_000_007]) {
            let c = size_class(n);
            assert!(c >= n.max(1), "{n} -> {c}");
            assert!(c as f64 <= n.max(1) as f64 * 1.125 + 1.0, "{n} -> {c}");
        }
        assert_eq!(size_class(4096), 4096);
        assert_eq!(size_class(4097), 4608);
        // A Poisson batch of 256 ± 50 examples of a 16 × 128 activation needs only a
        // handful of distinct allocations.
        let classes: std::collections::BTreeSet<usize> =
            (206..=306).map(|b| size_class(b * 16 * 128)).collect();
        assert!(classes.len() <= 6, "{classes:?}");
    }
}
