//! The CPU backend: plain `Vec` buffers, rayon threads and a packed GEMM.
//!
//! Every op is written once, generic over the element type ([`Real`]), and read
//! like the math, with each layer's forward and backward side by side (llm.c
//! style), one file per layer family named as its kernel file (`norms.rs` ↔
//! `kernels/norms.cu`, and `rope`, `attention`, `activations`, `embedding`,
//! `tensor`, `rows`); the DP ops are in `dp.rs`. [`CpuOf`] implements the
//! backend once for both element types:
//!
//! * [`Cpu`](type@Cpu): `f32` buffers, the reference the CUDA backend is compared with;
//! * [`Cpu64`](type@Cpu64): `f64` buffers, the same ops in double precision, so finite
//!   difference checks of whole layers and of the whole model can use tight
//!   tolerances (tests only; uploads and downloads convert from and to f32).
//!
//! Row reductions (norm statistics, softmax sums, the log-sum-exp of the loss)
//! accumulate in f64 whatever the element type.
#![allow(clippy::too_many_arguments)]

use std::fmt::Debug;
use std::marker::PhantomData;
use std::ops::{Add, AddAssign, Deref, DerefMut, Div, Mul, Neg, Sub};

mod activations;
mod attention;
mod dp;
mod embedding;
pub mod hot;
pub mod math;
mod norms;
pub mod pool;
mod rope;
mod rows;
mod tensor;

use super::{AttnShape, Backend, Blocks, MatmulSpec, PatchShape, RopeShape, RowShape};
use crate::linalg::{gemm_f32, gemm_f64, View};
use crate::vision::tokens::{select_tokens, TokenSelectConfig, TokenShape};
use crate::{Error, Result};
use pool::{HostBuf, Pool};

/// The element type of a CPU buffer: `f32` or `f64`.
pub trait Real:
    Copy
    + Default
    + Send
    + Sync
    + Debug
    + PartialOrd
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
{
    /// Converts from f64 (rounding for f32).
    fn from_f64(x: f64) -> Self;
    /// Converts to f64 (exact).
    fn to_f64(self) -> f64;
    /// `eˣ` in this type's precision.
    fn exp(self) -> Self;
    /// `tanh x` in this type's precision.
    fn tanh(self) -> Self;
    /// 0 for a subnormal value (f32: |x| < 2⁻¹²⁶), else `self`; f64 keeps every
    /// value (its finite-difference checks want exact arithmetic, and its
    /// subnormals start at 2⁻¹⁰²², far below any value of this model).
    fn flush_subnormal(self) -> Self;
    /// The name of the CPU backend on this type ("cpu", "cpu64").
    const BACKEND: &'static str;
    /// The backend's buffer of this element type: pooled [`HostBuf`] for f32 (the
    /// hot path), a plain `Vec` for f64 (finite-difference tests build their
    /// buffers directly).
    type Buf: Deref<Target = [Self]> + DerefMut + Clone + Debug + Send + Sync + 'static;
    /// A zero-filled buffer of `n` values.
    fn zeros(n: usize) -> Result<Self::Buf>;
    /// A buffer of `n` values whose contents the caller overwrites (see
    /// [`Backend::output`]).
    fn output(n: usize) -> Result<Self::Buf> {
        Self::zeros(n)
    }
    /// `c[m×n] = alpha·a·b + beta·c` (see [`crate::linalg`]).
    fn gemm(alpha: Self, a: View<'_, Self>, b: View<'_, Self>, beta: Self, c: &mut [Self]);
    /// `x` itself when this type is f32 (no copy needed to read it as f32).
    fn as_f32(_x: &[Self]) -> Option<&[f32]> {
        None
    }
}

impl Real for f32 {
    const BACKEND: &'static str = "cpu";
    type Buf = HostBuf<f32>;
    fn zeros(n: usize) -> Result<HostBuf<f32>> {
        F32_POOL.zeros(n)
    }
    fn output(n: usize) -> Result<HostBuf<f32>> {
        F32_POOL.take(n, false)
    }
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn exp(self) -> Self {
        math::exp_f32(self)
    }
    fn tanh(self) -> Self {
        f32::tanh(self)
    }
    #[inline(always)]
    fn flush_subnormal(self) -> Self {
        if self.abs() < f32::MIN_POSITIVE {
            0.0
        } else {
            self
        }
    }
    fn gemm(alpha: Self, a: View<'_, Self>, b: View<'_, Self>, beta: Self, c: &mut [Self]) {
        let n = b.cols;
        gemm_f32(alpha, a, b, beta, c, n)
    }
    fn as_f32(x: &[f32]) -> Option<&[f32]> {
        Some(x)
    }
}

impl Real for f64 {
    const BACKEND: &'static str = "cpu64";
    type Buf = Vec<f64>;
    fn zeros(n: usize) -> Result<Vec<f64>> {
        alloc(n)
    }
    fn from_f64(x: f64) -> Self {
        x
    }
    fn to_f64(self) -> f64 {
        self
    }
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn tanh(self) -> Self {
        f64::tanh(self)
    }
    fn flush_subnormal(self) -> Self {
        self
    }
    fn gemm(alpha: Self, a: View<'_, Self>, b: View<'_, Self>, beta: Self, c: &mut [Self]) {
        let n = b.cols;
        gemm_f64(alpha, a, b, beta, c, n)
    }
}

/// The pool of the f32 backend's buffers.
static F32_POOL: Pool<f32> = Pool::new();

/// The counters of the pool that serves [`Cpu`](type@Cpu)'s buffers (its misses are
/// the buffers it had to allocate).
pub fn pool_stats() -> pool::PoolStats {
    F32_POOL.stats()
}

/// `x` rounded to the element type.
fn r<T: Real>(x: f64) -> T {
    T::from_f64(x)
}

fn alloc<T: Real>(n: usize) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| {
        Error::Config(format!(
            "out of host memory allocating {n} values ({} bytes)",
            n.saturating_mul(std::mem::size_of::<T>())
        ))
    })?;
    v.resize(n, T::default());
    Ok(v)
}

/// An f32 copy of `x`, in a recycled buffer (a step downloads the same few
/// small buffers every time).
fn to_f32<T: Real>(x: &[T]) -> crate::mem::Recycled<f32> {
    x.iter().map(|v| v.to_f64() as f32).collect()
}

/// `x` read as f32: itself on the f32 backend, a rounded copy (in a recycled
/// buffer) on f64.
fn f32_view<T: Real>(x: &[T]) -> F32View<'_> {
    match T::as_f32(x) {
        Some(v) => F32View::Borrowed(v),
        None => F32View::Owned(to_f32(x)),
    }
}

/// See [`f32_view`].
enum F32View<'a> {
    Borrowed(&'a [f32]),
    Owned(crate::mem::Recycled<f32>),
}

impl Deref for F32View<'_> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            Self::Borrowed(v) => v,
            Self::Owned(v) => v,
        }
    }
}

/// The CPU backend on element type `T`: pooled [`HostBuf`] buffers, the ops of this module.
/// Use it through [`Cpu`](type@Cpu) (f32) and [`Cpu64`](type@Cpu64) (f64).
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuOf<T>(PhantomData<T>);

impl<T> CpuOf<T> {
    /// The backend (it holds no state).
    pub const fn new() -> Self {
        Self(PhantomData)
    }
}

/// The CPU reference backend, `f32` buffers.
pub type Cpu = CpuOf<f32>;
/// The value of [`Cpu`](type@Cpu): the backend holds no state, so `&Cpu` is all a caller needs.
#[allow(non_upper_case_globals)]
pub const Cpu: Cpu = CpuOf::new();

/// The CPU backend in double precision, `f64` buffers: the same ops as [`Cpu`](type@Cpu),
/// used by finite-difference tests. Token selection runs in f32 (its input is
/// rounded), as it has no gradient.
pub type Cpu64 = CpuOf<f64>;
/// The value of [`Cpu64`](type@Cpu64).
#[allow(non_upper_case_globals)]
pub const Cpu64: Cpu64 = CpuOf::new();

impl<T: Real> Backend for CpuOf<T> {
    type Buf = T::Buf;
    // Recycled: a step uploads its token ids and targets without allocating.
    type Ids = crate::mem::Recycled<u32>;

    fn name(&self) -> &'static str {
        T::BACKEND
    }
    fn zeros(&self, n: usize) -> Result<T::Buf> {
        T::zeros(n)
    }
    fn output(&self, n: usize) -> Result<T::Buf> {
        T::output(n)
    }
    fn upload(&self, host: &[f32]) -> Result<T::Buf> {
        let mut v = self.zeros(host.len())?;
        v.iter_mut()
            .zip(host)
            .for_each(|(d, &s)| *d = r(f64::from(s)));
        Ok(v)
    }
    fn download(&self, buf: &T::Buf) -> Result<crate::mem::Recycled<f32>> {
        Ok(to_f32(buf))
    }
    fn len(&self, buf: &T::Buf) -> usize {
        buf.len()
    }
    fn upload_ids(&self, ids: &[u32]) -> Result<Self::Ids> {
        Ok(crate::mem::Recycled::from_slice(ids))
    }
    fn host_ids<'a>(&self, ids: &'a Self::Ids) -> &'a [u32] {
        ids
    }
    fn is_zero(&self, buf: &T::Buf) -> Result<Vec<bool>> {
        Ok(buf.iter().map(|v| v.to_f64() == 0.0).collect())
    }
    fn available_memory(&self) -> Option<u64> {
        host_available_memory()
    }
    fn value_bytes(&self) -> usize {
        std::mem::size_of::<T>()
    }
    fn duplicate(&self, src: &T::Buf) -> Result<T::Buf> {
        let mut v = self.zeros(src.len())?;
        v.copy_from_slice(src);
        Ok(v)
    }
    unsafe fn copy_blocks_unchecked(
        &self,
        dst: &mut T::Buf,
        src: &T::Buf,
        b: Blocks,
    ) -> Result<()> {
        tensor::copy_blocks(dst, src, b)
    }
    unsafe fn matmul_unchecked(
        &self,
        c: &mut T::Buf,
        a: &T::Buf,
        b: &T::Buf,
        s: MatmulSpec,
    ) -> Result<()> {
        tensor::matmul(c, a, b, s)
    }
    unsafe fn add_bias_unchecked(&self, y: &mut T::Buf, bias: &T::Buf, s: RowShape) -> Result<()> {
        tensor::add_bias(y, bias, s)
    }
    unsafe fn axpy_unchecked(&self, y: &mut T::Buf, alpha: f32, x: &T::Buf) -> Result<()> {
        tensor::axpy(y, alpha, x)
    }
    unsafe fn layernorm_fwd_unchecked(
        &self,
        out: &mut T::Buf,
        mean: &mut T::Buf,
        rstd: &mut T::Buf,
        x: &T::Buf,
        w: &T::Buf,
        b: &T::Buf,
        s: RowShape,
        eps: f32,
    ) -> Result<()> {
        norms::layernorm_fwd(out, mean, rstd, x, w, b, s, eps)
    }
    unsafe fn layernorm_bwd_unchecked(
        &self,
        dx: &mut T::Buf,
        dw: &mut T::Buf,
        db: &mut T::Buf,
        dout: &T::Buf,
        x: &T::Buf,
        w: &T::Buf,
        mean: &T::Buf,
        rstd: &T::Buf,
        s: RowShape,
    ) -> Result<()> {
        norms::layernorm_bwd(dx, dw, db, dout, x, w, mean, rstd, s)
    }
    unsafe fn rmsnorm_fwd_unchecked(
        &self,
        out: &mut T::Buf,
        rstd: &mut T::Buf,
        x: &T::Buf,
        w: &T::Buf,
        s: RowShape,
        eps: f32,
    ) -> Result<()> {
        norms::rmsnorm_fwd(out, rstd, x, w, s, eps)
    }
    unsafe fn rmsnorm_bwd_unchecked(
        &self,
        dx: &mut T::Buf,
        dw: &mut T::Buf,
        dout: &T::Buf,
        x: &T::Buf,
        w: &T::Buf,
        rstd: &T::Buf,
        s: RowShape,
    ) -> Result<()> {
        norms::rmsnorm_bwd(dx, dw, dout, x, w, rstd, s)
    }
    unsafe fn rope_unchecked(&self, x: &mut T::Buf, s: RopeShape, sign: f64) -> Result<()> {
        rope::rope(x, s, sign)
    }
    unsafe fn attention_fwd_unchecked(
        &self,
        out: &mut T::Buf,
        probs: &mut T::Buf,
        q: &T::Buf,
        k: &T::Buf,
        v: &T::Buf,
        s: AttnShape,
    ) -> Result<()> {
        attention::attention_fwd(out, probs, q, k, v, s)
    }
    unsafe fn attention_probs_unchecked(
        &self,
        probs: &mut T::Buf,
        q: &T::Buf,
        k: &T::Buf,
        _v: &T::Buf,
        s: AttnShape,
    ) -> Result<()> {
        attention::attention_probs(probs, q, k, s);
        Ok(())
    }
    unsafe fn attention_bwd_unchecked(
        &self,
        dq: &mut T::Buf,
        dk: &mut T::Buf,
        dv: &mut T::Buf,
        dout: &T::Buf,
        q: &T::Buf,
        k: &T::Buf,
        v: &T::Buf,
        probs: &T::Buf,
        s: AttnShape,
    ) -> Result<()> {
        attention::attention_bwd(dq, dk, dv, dout, q, k, v, probs, s)
    }
    unsafe fn quick_gelu_fwd_unchecked(&self, out: &mut T::Buf, x: &T::Buf) -> Result<()> {
        activations::map(out, x, activations::quick_gelu)
    }
    unsafe fn gelu_fwd_unchecked(&self, out: &mut T::Buf, x: &T::Buf) -> Result<()> {
        activations::map(out, x, activations::gelu)
    }
    unsafe fn gelu_bwd_unchecked(&self, dx: &mut T::Buf, dout: &T::Buf, x: &T::Buf) -> Result<()> {
        activations::unary_bwd(dx, dout, x, activations::gelu_grad)
    }
    unsafe fn gelu_erf_fwd_unchecked(&self, out: &mut T::Buf, x: &T::Buf) -> Result<()> {
        activations::map_f64(out, x, activations::gelu_erf)
    }
    unsafe fn gelu_erf_bwd_unchecked(
        &self,
        dx: &mut T::Buf,
        dout: &T::Buf,
        x: &T::Buf,
    ) -> Result<()> {
        activations::unary_bwd_f64(dx, dout, x, activations::gelu_erf_grad)
    }
    unsafe fn swiglu_fwd_unchecked(
        &self,
        out: &mut T::Buf,
        gate: &T::Buf,
        up: &T::Buf,
    ) -> Result<()> {
        activations::swiglu_fwd(out, gate, up)
    }
    unsafe fn swiglu_bwd_unchecked(
        &self,
        dgate: &mut T::Buf,
        dup: &mut T::Buf,
        dout: &T::Buf,
        gate: &T::Buf,
        up: &T::Buf,
    ) -> Result<()> {
        activations::swiglu_bwd(dgate, dup, dout, gate, up)
    }
    unsafe fn embedding_fwd_unchecked(
        &self,
        out: &mut T::Buf,
        table: &T::Buf,
        ids: &Self::Ids,
        s: RowShape,
    ) -> Result<()> {
        embedding::embedding_fwd(out, table, ids, s)
    }
    unsafe fn embedding_bwd_unchecked(
        &self,
        dtable: &mut T::Buf,
        dout: &T::Buf,
        ids: &Self::Ids,
        s: RowShape,
    ) -> Result<()> {
        embedding::embedding_bwd(dtable, dout, ids, s)
    }
    unsafe fn cross_entropy_unchecked(
        &self,
        losses: &mut T::Buf,
        dlogits: &mut T::Buf,
        logits: &T::Buf,
        targets: &Self::Ids,
        weights: &T::Buf,
        s: RowShape,
    ) -> Result<()> {
        embedding::cross_entropy(losses, dlogits, logits, targets, weights, s)
    }
    unsafe fn patchify_unchecked(
        &self,
        out: &mut T::Buf,
        images: &T::Buf,
        s: PatchShape,
    ) -> Result<()> {
        tensor::patchify(out, images, s)
    }
    unsafe fn select_tokens_unchecked(
        &self,
        attn_cls: &T::Buf,
        keys: &T::Buf,
        hidden: &T::Buf,
        shape: &TokenShape,
        cfg: &TokenSelectConfig,
    ) -> Result<T::Buf> {
        let sel = select_tokens(
            &f32_view(attn_cls),
            &f32_view(keys),
            &f32_view(hidden),
            shape,
            cfg,
        )?;
        self.upload(&sel.tokens)
    }
}

/// `MemAvailable` from `/proc/meminfo`, in bytes (None where unreadable).
fn host_available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
