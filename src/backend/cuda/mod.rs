//! The CUDA backend: the same [`Backend`] and [`DpBackend`](super::dp::DpBackend)
//! ops as [`super::cpu::Cpu`], on one GPU. GEMMs go through cuBLAS
//! ([`crate::gpu::blas`], row-major helpers); everything else is a kernel launched by
//! [`crate::gpu`]'s typed launchers, one file per layer family
//! (`kernels/{norms,rope,attention,activations,embedding,tensor}.cu`, the DP kernels
//! `rows.cu`, `clip.cu`, `prune.cu`, `noise.cu` and `tokens.cu`). The DP ops are in
//! [`dp`], the memory pool in [`pool`]; the checks ran in [`super::check`] before
//! any of them.
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

pub mod dp;
pub mod pool;

use std::sync::{Arc, Mutex};

use cudarc::driver::CudaSlice;

pub use self::dp::GpuNorms;
pub use self::pool::{size_class, GpuBuf, PoolStats};
use super::{
    AttnShape, Backend, Blocks, DeviceMemory, MatmulSpec, PatchShape, RopeShape, RowShape,
};
use crate::gpu::blas::{Precision, RowMajor};
use crate::gpu::prune::PrunePlan;
use crate::gpu::tokens::TokenWorkspace;
use crate::gpu::{self, cuda_err, Gpu};
use crate::vision::tokens::{TokenSelectConfig, TokenShape};
use crate::{Error, Result};

/// Token ids on the device, with a host copy for range checks (ids are tiny next
/// to activations, and checking on the host needs no synchronisation).
pub struct GpuIds {
    dev: CudaSlice<u32>,
    host: Vec<u32>,
}

/// The CUDA backend. Cheap to share by reference; all work runs on one stream.
pub struct Cuda {
    gpu: Gpu,
    pool: Arc<pool::Pool>,
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
            pool: Arc::new(pool::Pool::new()),
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

    /// `[b, t, heads·hd]` → a new `[b, hq, t, hd]`, query head h reading head h / rep.
    ///
    /// # Safety
    /// `src` holds b·t·heads·hd values, `heads · rep = s.hq`.
    unsafe fn split_heads(
        &self,
        src: &GpuBuf,
        s: &AttnShape,
        heads: usize,
        rep: usize,
    ) -> Result<GpuBuf> {
        let mut dst = self.take(s.q_len())?;
        // SAFETY: `dst` holds q_len values; `src` from the caller.
        unsafe {
            gpu::attention::split_heads(&self.gpu, &mut dst.view_mut(), &src.view(), s, heads, rep)
        }?;
        Ok(dst)
    }

    /// `[b, hq, t, hd]` → `[b, t, heads·hd]`, summing each group of `rep` heads.
    ///
    /// # Safety
    /// `src` holds q_len values, `dst` b·t·heads·hd, `heads · rep = s.hq`.
    unsafe fn merge_heads(
        &self,
        dst: &mut GpuBuf,
        src: &GpuBuf,
        s: &AttnShape,
        heads: usize,
        rep: usize,
    ) -> Result<()> {
        // SAFETY: forwarded to the caller.
        unsafe {
            gpu::attention::merge_heads(&self.gpu, &mut dst.view_mut(), &src.view(), s, heads, rep)
        }
    }
}

// SAFETY (every `*_unchecked` op below): the buffers passed the op's check in
// `backend::check`, which is the contract of the launcher each one calls.
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
            self.gpu
                .stream()
                .memcpy_htod(host, &mut view)
                .map_err(cuda_err("host-to-device copy"))?;
        }
        Ok(b)
    }

    fn download(&self, buf: &GpuBuf) -> Result<crate::mem::Recycled<f32>> {
        if buf.len == 0 {
            return Ok(crate::mem::Recycled::default());
        }
        self.gpu.download(&buf.view()).map(Into::into)
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
            self.gpu
                .stream()
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
        unsafe { gpu::tensor::copy_blocks(&self.gpu, &mut dst.view_mut(), &src.view(), b) }
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
            return gpu::tensor::scale(&self.gpu, &mut c.view_mut(), s.beta);
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
        unsafe { gpu::tensor::add_bias(&self.gpu, &mut y.view_mut(), &bias.view(), s) }
    }

    unsafe fn axpy_unchecked(&self, y: &mut GpuBuf, alpha: f32, x: &GpuBuf) -> Result<()> {
        unsafe { gpu::tensor::axpy(&self.gpu, &mut y.view_mut(), alpha, &x.view()) }
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
        unsafe {
            gpu::norms::layernorm_fwd(
                &self.gpu,
                &mut out.view_mut(),
                &mut mean.view_mut(),
                &mut rstd.view_mut(),
                &x.view(),
                &w.view(),
                &b.view(),
                s,
                eps,
            )
        }
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
        unsafe {
            gpu::norms::layernorm_bwd(
                &self.gpu,
                &mut dx.view_mut(),
                &mut dw.view_mut(),
                &mut db.view_mut(),
                &dout.view(),
                &x.view(),
                &w.view(),
                &mean.view(),
                &rstd.view(),
                s,
            )
        }
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
        unsafe {
            gpu::norms::rmsnorm_fwd(
                &self.gpu,
                &mut out.view_mut(),
                &mut rstd.view_mut(),
                &x.view(),
                &w.view(),
                s,
                eps,
            )
        }
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
        unsafe {
            gpu::norms::rmsnorm_bwd(
                &self.gpu,
                &mut dx.view_mut(),
                &mut dw.view_mut(),
                &dout.view(),
                &x.view(),
                &w.view(),
                &rstd.view(),
                s,
            )
        }
    }

    unsafe fn rope_unchecked(&self, x: &mut GpuBuf, s: RopeShape, sign: f64) -> Result<()> {
        unsafe { gpu::rope::rope(&self.gpu, &mut x.view_mut(), s, sign) }
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
        let (qh, kh, vh) = unsafe {
            (
                self.split_heads(q, &s, s.hq, 1)?,
                self.split_heads(k, &s, s.hkv, rep)?,
                self.split_heads(v, &s, s.hkv, rep)?,
            )
        };
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
        unsafe {
            gpu::attention::softmax_fwd(&self.gpu, &mut probs.view_mut(), bh * s.t, s.t, s.causal)
        }?;
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
        unsafe { self.merge_heads(out, &oh, &s, s.hq, 1) }
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
        let (doh, qh, kh, vh) = unsafe {
            (
                self.split_heads(dout, &s, s.hq, 1)?,
                self.split_heads(q, &s, s.hq, 1)?,
                self.split_heads(k, &s, s.hkv, rep)?,
                self.split_heads(v, &s, s.hkv, rep)?,
            )
        };
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
        unsafe {
            gpu::attention::softmax_bwd(
                &self.gpu,
                &mut ds.view_mut(),
                &probs.view(),
                bh * t,
                t,
                scale,
            )
        }?;
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
        unsafe {
            self.merge_heads(dq, &dqh, &s, s.hq, 1)?;
            // GQA: the query heads sharing a key/value head sum into it.
            self.merge_heads(dk, &dkh, &s, s.hkv, rep)?;
            self.merge_heads(dv, &dvh, &s, s.hkv, rep)
        }
    }

    unsafe fn quick_gelu_fwd_unchecked(&self, out: &mut GpuBuf, x: &GpuBuf) -> Result<()> {
        unsafe { gpu::activations::quick_gelu_fwd(&self.gpu, &mut out.view_mut(), &x.view()) }
    }

    unsafe fn gelu_fwd_unchecked(&self, out: &mut GpuBuf, x: &GpuBuf) -> Result<()> {
        unsafe { gpu::activations::gelu_fwd(&self.gpu, &mut out.view_mut(), &x.view()) }
    }

    unsafe fn gelu_bwd_unchecked(&self, dx: &mut GpuBuf, dout: &GpuBuf, x: &GpuBuf) -> Result<()> {
        unsafe {
            gpu::activations::gelu_bwd(&self.gpu, &mut dx.view_mut(), &dout.view(), &x.view())
        }
    }

    unsafe fn gelu_erf_fwd_unchecked(&self, out: &mut GpuBuf, x: &GpuBuf) -> Result<()> {
        unsafe { gpu::activations::gelu_erf_fwd(&self.gpu, &mut out.view_mut(), &x.view()) }
    }

    unsafe fn gelu_erf_bwd_unchecked(
        &self,
        dx: &mut GpuBuf,
        dout: &GpuBuf,
        x: &GpuBuf,
    ) -> Result<()> {
        unsafe {
            gpu::activations::gelu_erf_bwd(&self.gpu, &mut dx.view_mut(), &dout.view(), &x.view())
        }
    }

    unsafe fn swiglu_fwd_unchecked(
        &self,
        out: &mut GpuBuf,
        gate: &GpuBuf,
        up: &GpuBuf,
    ) -> Result<()> {
        unsafe {
            gpu::activations::swiglu_fwd(&self.gpu, &mut out.view_mut(), &gate.view(), &up.view())
        }
    }

    unsafe fn swiglu_bwd_unchecked(
        &self,
        dgate: &mut GpuBuf,
        dup: &mut GpuBuf,
        dout: &GpuBuf,
        gate: &GpuBuf,
        up: &GpuBuf,
    ) -> Result<()> {
        unsafe {
            gpu::activations::swiglu_bwd(
                &self.gpu,
                &mut dgate.view_mut(),
                &mut dup.view_mut(),
                &dout.view(),
                &gate.view(),
                &up.view(),
            )
        }
    }

    unsafe fn embedding_fwd_unchecked(
        &self,
        out: &mut GpuBuf,
        table: &GpuBuf,
        ids: &GpuIds,
        s: RowShape,
    ) -> Result<()> {
        unsafe {
            gpu::embedding::embedding_fwd(
                &self.gpu,
                &mut out.view_mut(),
                &table.view(),
                &ids.dev.as_view(),
                s,
            )
        }
    }

    unsafe fn embedding_bwd_unchecked(
        &self,
        dtable: &mut GpuBuf,
        dout: &GpuBuf,
        ids: &GpuIds,
        s: RowShape,
    ) -> Result<()> {
        unsafe {
            gpu::embedding::embedding_bwd(
                &self.gpu,
                &mut dtable.view_mut(),
                &dout.view(),
                &ids.dev.as_view(),
                s,
            )
        }
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
        unsafe {
            gpu::embedding::cross_entropy(
                &self.gpu,
                &mut losses.view_mut(),
                &mut dlogits.view_mut(),
                &logits.view(),
                &targets.dev.as_view(),
                &weights.view(),
                s,
            )
        }
    }

    unsafe fn patchify_unchecked(
        &self,
        out: &mut GpuBuf,
        images: &GpuBuf,
        s: PatchShape,
    ) -> Result<()> {
        unsafe { gpu::tensor::patchify(&self.gpu, &mut out.view_mut(), &images.view(), s) }
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
