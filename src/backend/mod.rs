//! The backend abstraction: the model and the training loop are written once
//! against [`Backend`] (model ops) and [`dp::DpBackend`] (DP mechanisms); the CPU
//! backend ([`cpu::Cpu`](type@cpu::Cpu)) is the executable specification and the CUDA backend
//! must agree with it within the tolerances stated in the tests.
//!
//! # Conventions (llm.c style)
//!
//! * Every tensor is a flat, row-major buffer; shapes are passed explicitly.
//! * Outputs come first in the argument list, then inputs, then the shape.
//! * Ops **overwrite** their outputs unless the doc says "accumulates" (`+=`).
//!   Weight-gradient outputs of norms and of the embedding accumulate; input
//!   gradients are overwritten, and the model adds residual branches explicitly
//!   with [`Backend::axpy`].
//! * A length that does not match the shape is an [`crate::Error::Shape`], never a
//!   panic; token ids are validated against the vocabulary. The checks live once,
//!   in [`check`], and the traits run them before any backend's implementation.
//! * Nothing in the trait refers to host slices of activations or weights, so a
//!   CUDA backend can implement every op with cuBLAS and its own kernels.
#![allow(clippy::too_many_arguments)]

pub mod check;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod dp;
pub mod meter;
pub mod profile;

use crate::vision::tokens::{TokenSelectConfig, TokenShape};
use crate::Result;

/// `C[m×n] = alpha · op(A) · op(B) + beta · C`, all row-major.
///
/// `op(A)` is m×k: `A` is stored m×k, or k×m when `trans_a`. `op(B)` is k×n: `B` is
/// stored k×n, or n×k when `trans_b`. A linear layer `Y = X Wᵀ` with `W` p×d
/// (PyTorch layout) is `m = rows, n = p, k = d, trans_b = true`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MatmulSpec {
    /// Rows of C.
    pub m: usize,
    /// Columns of C.
    pub n: usize,
    /// The contracted dimension.
    pub k: usize,
    /// A is stored k×m.
    pub trans_a: bool,
    /// B is stored n×k.
    pub trans_b: bool,
    /// Scale of the product.
    pub alpha: f32,
    /// Scale of the old C (0 overwrites; C is then never read, so NaNs in it vanish).
    pub beta: f32,
}

impl MatmulSpec {
    /// `C = A·B` with A m×k and B k×n.
    pub fn nn(m: usize, n: usize, k: usize) -> Self {
        Self {
            m,
            n,
            k,
            trans_a: false,
            trans_b: false,
            alpha: 1.0,
            beta: 0.0,
        }
    }

    /// `C = A·Bᵀ` with A m×k and B n×k (a linear layer's forward).
    pub fn nt(m: usize, n: usize, k: usize) -> Self {
        Self {
            trans_b: true,
            ..Self::nn(m, n, k)
        }
    }

    /// Returns the same spec with `alpha` and `beta` set.
    pub fn scaled(self, alpha: f32, beta: f32) -> Self {
        Self {
            alpha,
            beta,
            ..self
        }
    }
}

/// A strided block copy: for `i in 0..count`,
/// `dst[dst_off + i·dst_stride ..][..len] = src[src_off + i·src_stride ..][..len]`.
///
/// With `src_stride = 0` one source block is broadcast (the CLS token); with strides
/// it concatenates or slices sequences (`[visual, text]`, text rows, CLS rows).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Blocks {
    /// Number of blocks.
    pub count: usize,
    /// Values per block.
    pub len: usize,
    /// Offset of the first source block.
    pub src_off: usize,
    /// Distance between source blocks.
    pub src_stride: usize,
    /// Offset of the first destination block.
    pub dst_off: usize,
    /// Distance between destination blocks.
    pub dst_stride: usize,
}

/// Shape of a row-wise op (norms, softmax): `rows × dim`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowShape {
    /// Number of rows (tokens).
    pub rows: usize,
    /// Values per row (features).
    pub dim: usize,
}

/// Shape of a multi-head attention over `b` independent sequences of `t` tokens.
///
/// `q` is `[b, t, hq·hd]`, `k` and `v` are `[b, t, hkv·hd]`, the output is
/// `[b, t, hq·hd]` and the softmax probabilities are `[b, hq, t, t]`. Query head h
/// reads key/value head `h / (hq / hkv)` (grouped-query attention, as HF's
/// `repeat_kv`). Scores are scaled by `1/√hd`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    /// Sequences (examples).
    pub b: usize,
    /// Tokens per sequence.
    pub t: usize,
    /// Query heads.
    pub hq: usize,
    /// Key/value heads; must divide `hq`.
    pub hkv: usize,
    /// Dimension of one head.
    pub hd: usize,
    /// Token i attends only to tokens j ≤ i.
    pub causal: bool,
}

impl AttnShape {
    /// Values in `q` and in the output: b·t·hq·hd.
    pub fn q_len(&self) -> usize {
        self.b * self.t * self.hq * self.hd
    }
    /// Values in `k` and in `v`: b·t·hkv·hd.
    pub fn kv_len(&self) -> usize {
        self.b * self.t * self.hkv * self.hd
    }
    /// Values in the probabilities: b·hq·t·t.
    pub fn probs_len(&self) -> usize {
        self.b * self.hq * self.t * self.t
    }
}

/// Shape of rotary embeddings applied in place to `[b, t, heads·hd]`; the token at
/// sequence index s has position s.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeShape {
    /// Sequences.
    pub b: usize,
    /// Tokens per sequence.
    pub t: usize,
    /// Heads in the buffer.
    pub heads: usize,
    /// Head dimension (even).
    pub hd: usize,
    /// Base θ of the frequencies θ^(−2i/hd) (10000 for Llama).
    pub theta: f32,
}

/// Shape of patch extraction: images `[b, c, s, s]` to patches
/// `[b, (s/p)², c·p·p]`, each patch flattened in (channel, row, column) order, the
/// layout of a `Conv2d(c, D, p, stride p)` weight `[D, c, p, p]` seen as `[D, c·p·p]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PatchShape {
    /// Images.
    pub b: usize,
    /// Channels (3).
    pub channels: usize,
    /// Image side in pixels.
    pub size: usize,
    /// Patch side in pixels; must divide `size`.
    pub patch: usize,
}

/// Device memory as a backend sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceMemory {
    /// Largest bytes held by live buffers since the last reset (tracked allocations).
    pub peak_bytes: u64,
    /// Bytes in use on the whole device now (`cuMemGetInfo`: total − free), which
    /// includes the buffer cache, cuBLAS workspaces and the CUDA context.
    pub used_bytes: u64,
}

/// Storage and compute for one device. Buffers are flat arrays; shapes are passed
/// explicitly to every op, as in llm.c. Forward and backward of each layer are
/// declared side by side.
///
/// Each op is a provided method that runs its check from [`check`] on the buffer
/// lengths and then calls the backend's `*_unchecked` implementation; a backend
/// implements the storage methods and the `*_unchecked` ops, never the checks, and
/// does not override the checked methods.
pub trait Backend: Sync {
    /// A flat floating-point buffer on this device.
    type Buf: Send + Sync;
    /// A flat buffer of token ids on this device.
    type Ids: Send + Sync;

    /// Short name for logs and metrics ("cpu", "cuda").
    fn name(&self) -> &'static str;
    /// A zero-filled buffer of `n` values. Running out of memory is an error.
    fn zeros(&self, n: usize) -> Result<Self::Buf>;
    /// A buffer of `n` values for the output of an op that writes every one of
    /// them (a GEMM with β = 0, a norm, an activation): its contents before that op
    /// are unspecified. The CPU backend hands out a pooled buffer without clearing
    /// it; the default is [`Backend::zeros`]. Only the model code's full-write
    /// outputs use it, and the op's CPU twin and tests show the write is full.
    fn output(&self, n: usize) -> Result<Self::Buf> {
        self.zeros(n)
    }
    /// Copies host values into a new buffer.
    fn upload(&self, host: &[f32]) -> Result<Self::Buf>;
    /// Copies a buffer back to the host.
    fn download(&self, buf: &Self::Buf) -> Result<crate::mem::Recycled<f32>>;
    /// Number of values in a buffer.
    fn len(&self, buf: &Self::Buf) -> usize;
    /// Copies host token ids to the device.
    fn upload_ids(&self, ids: &[u32]) -> Result<Self::Ids>;
    /// The host copy of uploaded ids, which the checks read: ids are tiny next to
    /// activations, and checking them on the host needs no synchronisation.
    fn host_ids<'a>(&self, ids: &'a Self::Ids) -> &'a [u32];
    /// Which values of `buf` are exactly 0, read back by the checks that depend on
    /// data (the masked rows of the loss). The default compares the downloaded f32
    /// values; a backend whose values are wider overrides it so that no tiny value
    /// rounds to 0.
    fn is_zero(&self, buf: &Self::Buf) -> Result<Vec<bool>> {
        Ok(self.download(buf)?.iter().map(|&v| v == 0.0).collect())
    }
    /// Bytes of memory free for new buffers, if the backend can tell.
    fn available_memory(&self) -> Option<u64>;
    /// Bytes one buffer value occupies (4 for f32).
    fn value_bytes(&self) -> usize;
    /// Device memory counters, for backends with device memory (the CPU's heap is
    /// tracked by [`crate::mem`] instead).
    fn device_memory(&self) -> Option<DeviceMemory> {
        None
    }
    /// Starts a new peak measurement of [`DeviceMemory::peak_bytes`].
    fn reset_device_peak(&self) {}
    /// Runs `f`; returns the device time it took in milliseconds where the backend
    /// can measure it on the device (CUDA events), `None` elsewhere.
    fn device_time_ms(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<Option<f64>> {
        f()?;
        Ok(None)
    }
    /// The device's name (e.g. "NVIDIA H200"), where there is one.
    fn device_name(&self) -> Option<String> {
        None
    }
    /// Whether f32 GEMMs run on TF32 tensor cores.
    fn tf32_gemms(&self) -> bool {
        false
    }

    /// A copy of a buffer.
    fn duplicate(&self, src: &Self::Buf) -> Result<Self::Buf>;

    // -----------------------------------------------------------------------
    // The model ops, checked: what the model calls.

    /// Strided block copy, see [`Blocks`].
    fn copy_blocks(&self, dst: &mut Self::Buf, src: &Self::Buf, blocks: Blocks) -> Result<()> {
        check::copy_blocks(self.len(dst), self.len(src), &blocks)?;
        let _op = profile::op("copy_blocks");
        // SAFETY: checked just above.
        unsafe { self.copy_blocks_unchecked(dst, src, blocks) }
    }
    /// General matrix multiply, see [`MatmulSpec`].
    fn matmul(
        &self,
        c: &mut Self::Buf,
        a: &Self::Buf,
        b: &Self::Buf,
        spec: MatmulSpec,
    ) -> Result<()> {
        check::matmul(self.len(c), self.len(a), self.len(b), spec)?;
        let _op = profile::op("matmul");
        // SAFETY: checked just above.
        unsafe { self.matmul_unchecked(c, a, b, spec) }
    }
    /// `y[r, j] += bias[j]` for `y` of shape `rows × cols`.
    fn add_bias(&self, y: &mut Self::Buf, bias: &Self::Buf, shape: RowShape) -> Result<()> {
        check::add_bias(self.len(y), self.len(bias), shape)?;
        let _op = profile::op("add_bias");
        // SAFETY: checked just above.
        unsafe { self.add_bias_unchecked(y, bias, shape) }
    }
    /// `y += alpha · x` (the residual add when alpha = 1; accumulating gradients).
    fn axpy(&self, y: &mut Self::Buf, alpha: f32, x: &Self::Buf) -> Result<()> {
        check::axpy(self.len(y), self.len(x))?;
        let _op = profile::op("axpy");
        // SAFETY: checked just above.
        unsafe { self.axpy_unchecked(y, alpha, x) }
    }

    /// LayerNorm forward: `out = (x − μ)/√(σ² + eps) · w + b` per row (biased σ²);
    /// also stores each row's μ and 1/√(σ² + eps) for the backward.
    fn layernorm_fwd(
        &self,
        out: &mut Self::Buf,
        mean: &mut Self::Buf,
        rstd: &mut Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        b: &Self::Buf,
        shape: RowShape,
        eps: f32,
    ) -> Result<()> {
        check::layernorm_fwd(
            self.len(out),
            self.len(mean),
            self.len(rstd),
            self.len(x),
            self.len(w),
            self.len(b),
            shape,
        )?;
        let _op = profile::op("layernorm_fwd");
        // SAFETY: checked just above.
        unsafe { self.layernorm_fwd_unchecked(out, mean, rstd, x, w, b, shape, eps) }
    }
    /// LayerNorm backward: overwrites `dx`; accumulates `dw` and `db`.
    fn layernorm_bwd(
        &self,
        dx: &mut Self::Buf,
        dw: &mut Self::Buf,
        db: &mut Self::Buf,
        dout: &Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        mean: &Self::Buf,
        rstd: &Self::Buf,
        shape: RowShape,
    ) -> Result<()> {
        check::layernorm_bwd(
            self.len(dx),
            self.len(dw),
            self.len(db),
            self.len(dout),
            self.len(x),
            self.len(w),
            self.len(mean),
            self.len(rstd),
            shape,
        )?;
        let _op = profile::op("layernorm_bwd");
        // SAFETY: checked just above.
        unsafe { self.layernorm_bwd_unchecked(dx, dw, db, dout, x, w, mean, rstd, shape) }
    }
    /// RMSNorm forward: `out = x / √(mean(x²) + eps) · w` per row; stores the
    /// reciprocal root per row.
    fn rmsnorm_fwd(
        &self,
        out: &mut Self::Buf,
        rstd: &mut Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        shape: RowShape,
        eps: f32,
    ) -> Result<()> {
        check::rmsnorm_fwd(
            self.len(out),
            self.len(rstd),
            self.len(x),
            self.len(w),
            shape,
        )?;
        let _op = profile::op("rmsnorm_fwd");
        // SAFETY: checked just above.
        unsafe { self.rmsnorm_fwd_unchecked(out, rstd, x, w, shape, eps) }
    }
    /// RMSNorm backward: overwrites `dx`; accumulates `dw`.
    fn rmsnorm_bwd(
        &self,
        dx: &mut Self::Buf,
        dw: &mut Self::Buf,
        dout: &Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        rstd: &Self::Buf,
        shape: RowShape,
    ) -> Result<()> {
        check::rmsnorm_bwd(
            self.len(dx),
            self.len(dw),
            self.len(dout),
            self.len(x),
            self.len(w),
            self.len(rstd),
            shape,
        )?;
        let _op = profile::op("rmsnorm_bwd");
        // SAFETY: checked just above.
        unsafe { self.rmsnorm_bwd_unchecked(dx, dw, dout, x, w, rstd, shape) }
    }
    /// Rotary embedding, in place, rotate-half convention (HF Llama): with
    /// `x = [x₁, x₂]` split at hd/2 and angle `a_i = s · θ^(−2i/hd)`,
    /// `x₁' = x₁ cos a − x₂ sin a`, `x₂' = x₂ cos a + x₁ sin a`.
    fn rope_fwd(&self, x: &mut Self::Buf, shape: RopeShape) -> Result<()> {
        check::rope(self.len(x), shape)?;
        let _op = profile::op("rope_fwd");
        // SAFETY: checked just above.
        unsafe { self.rope_unchecked(x, shape, 1.0) }
    }
    /// Rotary backward, in place: the inverse rotation (angle −a) of the gradient.
    fn rope_bwd(&self, dx: &mut Self::Buf, shape: RopeShape) -> Result<()> {
        check::rope(self.len(dx), shape)?;
        let _op = profile::op("rope_bwd");
        // SAFETY: checked just above.
        unsafe { self.rope_unchecked(dx, shape, -1.0) }
    }
    /// Scaled dot-product attention forward, see [`AttnShape`]; writes the output
    /// and the softmax probabilities (masked entries are 0). The CLS attention rows
    /// of a vision layer are `probs[b, h, 0, :]`.
    fn attention_fwd(
        &self,
        out: &mut Self::Buf,
        probs: &mut Self::Buf,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        shape: AttnShape,
    ) -> Result<()> {
        check::attention_fwd(
            self.len(out),
            self.len(probs),
            self.len(q),
            self.len(k),
            self.len(v),
            shape,
        )?;
        let _op = profile::op("attention_fwd");
        // SAFETY: checked just above.
        unsafe { self.attention_fwd_unchecked(out, probs, q, k, v, shape) }
    }
    /// The softmax probabilities of [`Self::attention_fwd`] alone, bit for bit the
    /// same: the training backward recomputes them instead of keeping every
    /// layer's `[b, hq, t, t]` from the forward. The default runs the forward
    /// into a scratch output; the CPU backend skips P·V.
    fn attention_probs(
        &self,
        probs: &mut Self::Buf,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        shape: AttnShape,
    ) -> Result<()> {
        check::attention_probs(
            self.len(probs),
            self.len(q),
            self.len(k),
            self.len(v),
            shape,
        )?;
        let _op = profile::op("attention_probs");
        // SAFETY: checked just above.
        unsafe { self.attention_probs_unchecked(probs, q, k, v, shape) }
    }
    /// Attention backward: overwrites `dq`, `dk`, `dv` (GQA heads summed into their
    /// shared key/value head).
    fn attention_bwd(
        &self,
        dq: &mut Self::Buf,
        dk: &mut Self::Buf,
        dv: &mut Self::Buf,
        dout: &Self::Buf,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        probs: &Self::Buf,
        shape: AttnShape,
    ) -> Result<()> {
        check::attention_bwd(
            self.len(dq),
            self.len(dk),
            self.len(dv),
            self.len(dout),
            self.len(q),
            self.len(k),
            self.len(v),
            self.len(probs),
            shape,
        )?;
        let _op = profile::op("attention_bwd");
        // SAFETY: checked just above.
        unsafe { self.attention_bwd_unchecked(dq, dk, dv, dout, q, k, v, probs, shape) }
    }
    /// CLIP's quick-GELU, `x · σ(1.702 x)` (frozen vision MLP: forward only).
    fn quick_gelu_fwd(&self, out: &mut Self::Buf, x: &Self::Buf) -> Result<()> {
        check::unary("quick_gelu", self.len(out), self.len(x))?;
        let _op = profile::op("quick_gelu_fwd");
        // SAFETY: checked just above.
        unsafe { self.quick_gelu_fwd_unchecked(out, x) }
    }
    /// GELU, tanh approximation: `0.5 x (1 + tanh(√(2/π)(x + 0.044715 x³)))`.
    fn gelu_fwd(&self, out: &mut Self::Buf, x: &Self::Buf) -> Result<()> {
        check::unary("gelu", self.len(out), self.len(x))?;
        let _op = profile::op("gelu_fwd");
        // SAFETY: checked just above.
        unsafe { self.gelu_fwd_unchecked(out, x) }
    }
    /// GELU backward: overwrites `dx`.
    fn gelu_bwd(&self, dx: &mut Self::Buf, dout: &Self::Buf, x: &Self::Buf) -> Result<()> {
        check::gelu_bwd(self.len(dx), self.len(dout), self.len(x))?;
        let _op = profile::op("gelu_bwd");
        // SAFETY: checked just above.
        unsafe { self.gelu_bwd_unchecked(dx, dout, x) }
    }
    /// The exact GELU, `x·Φ(x) = 0.5 x (1 + erf(x/√2))` (torch's `gelu` with
    /// `approximate="none"`, transformers' `"gelu"`, LLaVA's projector activation).
    /// Both backends compute it in f64 from the f32 input (Φ from erfc, not
    /// 1 + erf, so the negative tail keeps its relative accuracy) and round once: the
    /// CPU is within 1 ulp of mpmath's value (tested; torch's f32 is not, for x ≲ −1).
    fn gelu_erf_fwd(&self, out: &mut Self::Buf, x: &Self::Buf) -> Result<()> {
        check::unary("gelu_erf", self.len(out), self.len(x))?;
        let _op = profile::op("gelu_erf_fwd");
        // SAFETY: checked just above.
        unsafe { self.gelu_erf_fwd_unchecked(out, x) }
    }
    /// Exact-GELU backward: overwrites `dx` with `dout · (Φ(x) + x·φ(x))`, φ the
    /// standard normal density (computed in f64, like the forward).
    fn gelu_erf_bwd(&self, dx: &mut Self::Buf, dout: &Self::Buf, x: &Self::Buf) -> Result<()> {
        check::gelu_erf_bwd(self.len(dx), self.len(dout), self.len(x))?;
        let _op = profile::op("gelu_erf_bwd");
        // SAFETY: checked just above.
        unsafe { self.gelu_erf_bwd_unchecked(dx, dout, x) }
    }
    /// SwiGLU: `out = silu(gate) · up`, `silu(g) = g σ(g)`.
    fn swiglu_fwd(&self, out: &mut Self::Buf, gate: &Self::Buf, up: &Self::Buf) -> Result<()> {
        check::swiglu_fwd(self.len(out), self.len(gate), self.len(up))?;
        let _op = profile::op("swiglu_fwd");
        // SAFETY: checked just above.
        unsafe { self.swiglu_fwd_unchecked(out, gate, up) }
    }
    /// SwiGLU backward: overwrites `dgate` and `dup`.
    fn swiglu_bwd(
        &self,
        dgate: &mut Self::Buf,
        dup: &mut Self::Buf,
        dout: &Self::Buf,
        gate: &Self::Buf,
        up: &Self::Buf,
    ) -> Result<()> {
        check::swiglu_bwd(
            self.len(dgate),
            self.len(dup),
            self.len(dout),
            self.len(gate),
            self.len(up),
        )?;
        let _op = profile::op("swiglu_bwd");
        // SAFETY: checked just above.
        unsafe { self.swiglu_bwd_unchecked(dgate, dup, dout, gate, up) }
    }
    /// Embedding lookup: `out[r] = table[ids[r]]`, `table` is `vocab × dim`; an id
    /// ≥ vocab is a shape error.
    fn embedding_fwd(
        &self,
        out: &mut Self::Buf,
        table: &Self::Buf,
        ids: &Self::Ids,
        shape: RowShape,
        vocab: usize,
    ) -> Result<()> {
        let host = self.host_ids(ids);
        check::embedding(
            "embedding",
            host,
            self.len(table),
            self.len(out),
            shape,
            vocab,
        )?;
        let _op = profile::op("embedding_fwd");
        // SAFETY: checked just above.
        unsafe { self.embedding_fwd_unchecked(out, table, ids, shape) }
    }
    /// Embedding backward: accumulates `dtable[ids[r]] += dout[r]`.
    fn embedding_bwd(
        &self,
        dtable: &mut Self::Buf,
        dout: &Self::Buf,
        ids: &Self::Ids,
        shape: RowShape,
        vocab: usize,
    ) -> Result<()> {
        let host = self.host_ids(ids);
        check::embedding(
            "embedding_bwd",
            host,
            self.len(dtable),
            self.len(dout),
            shape,
            vocab,
        )?;
        let _op = profile::op("embedding_bwd");
        // SAFETY: checked just above.
        unsafe { self.embedding_bwd_unchecked(dtable, dout, ids, shape) }
    }
    /// Fused softmax cross-entropy over `rows × vocab` logits with row weights:
    /// `losses[r] = w_r · (logsumexp(logits_r) − logits_r[target_r])` and
    /// `dlogits[r] = w_r · (softmax(logits_r) − onehot(target_r))`, the gradient of
    /// `Σ_r losses[r]`. Rows with `w_r = 0` (masked) give 0 and their target is not
    /// read; a used target ≥ vocab is a shape error.
    fn cross_entropy(
        &self,
        losses: &mut Self::Buf,
        dlogits: &mut Self::Buf,
        logits: &Self::Buf,
        targets: &Self::Ids,
        weights: &Self::Buf,
        shape: RowShape,
    ) -> Result<()> {
        check::cross_entropy(
            self.len(losses),
            self.len(dlogits),
            self.len(logits),
            self.host_ids(targets),
            self.len(weights),
            shape,
            || self.is_zero(weights),
        )?;
        let _op = profile::op("cross_entropy");
        // SAFETY: checked just above.
        unsafe { self.cross_entropy_unchecked(losses, dlogits, logits, targets, weights, shape) }
    }
    /// Cuts images into flattened patches, see [`PatchShape`].
    fn patchify(&self, out: &mut Self::Buf, images: &Self::Buf, shape: PatchShape) -> Result<()> {
        check::patchify(self.len(out), self.len(images), shape)?;
        let _op = profile::op("patchify");
        // SAFETY: checked just above.
        unsafe { self.patchify_unchecked(out, images, shape) }
    }
    /// VisionZip token selection ([`crate::vision::tokens::select_tokens`]): returns
    /// `[B, 1 + K + M, D]`.
    fn select_tokens(
        &self,
        attn_cls: &Self::Buf,
        keys: &Self::Buf,
        hidden: &Self::Buf,
        shape: &TokenShape,
        cfg: &TokenSelectConfig,
    ) -> Result<Self::Buf> {
        check::select_tokens(
            self.len(attn_cls),
            self.len(keys),
            self.len(hidden),
            shape,
            cfg,
        )?;
        let _op = profile::op("select_tokens");
        // SAFETY: checked just above.
        unsafe { self.select_tokens_unchecked(attn_cls, keys, hidden, shape, cfg) }
    }

    // -----------------------------------------------------------------------
    // The model ops as each device implements them, after the checks.

    /// [`Self::copy_blocks`] without its checks.
    ///
    /// # Safety
    /// The lengths pass [`check::copy_blocks`].
    unsafe fn copy_blocks_unchecked(
        &self,
        dst: &mut Self::Buf,
        src: &Self::Buf,
        blocks: Blocks,
    ) -> Result<()>;
    /// [`Self::matmul`] without its checks.
    ///
    /// # Safety
    /// The lengths pass [`check::matmul`].
    unsafe fn matmul_unchecked(
        &self,
        c: &mut Self::Buf,
        a: &Self::Buf,
        b: &Self::Buf,
        spec: MatmulSpec,
    ) -> Result<()>;
    /// [`Self::add_bias`] without its checks.
    ///
    /// # Safety
    /// The lengths pass [`check::add_bias`].
    unsafe fn add_bias_unchecked(
        &self,
        y: &mut Self::Buf,
        bias: &Self::Buf,
        shape: RowShape,
    ) -> Result<()>;
    /// [`Self::axpy`] without its checks.
    ///
    /// # Safety
    /// The lengths pass [`check::axpy`].
    unsafe fn axpy_unchecked(&self, y: &mut Self::Buf, alpha: f32, x: &Self::Buf) -> Result<()>;
    /// [`Self::layernorm_fwd`] without its checks.
    ///
    /// # Safety
    /// The lengths pass [`check::layernorm_fwd`].
    unsafe fn layernorm_fwd_unchecked(
        &self,
        out: &mut Self::Buf,
        mean: &mut Self::Buf,
        rstd: &mut Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        b: &Self::Buf,
        shape: RowShape,
        eps: f32,
    ) -> Result<()>;
    /// [`Self::layernorm_bwd`] without its checks.
    ///
    /// # Safety
    /// The lengths pass [`check::layernorm_bwd`].
    unsafe fn layernorm_bwd_unchecked(
        &self,
        dx: &mut Self::Buf,
        dw: &mut Self::Buf,
        db: &mut Self::Buf,
        dout: &Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        mean: &Self::Buf,
        rstd: &Self::Buf,
        shape: RowShape,
    ) -> Result<()>;
    /// [`Self::rmsnorm_fwd`] without its checks.
    ///
    /// # Safety
    /// The lengths pass [`check::rmsnorm_fwd`].
    unsafe fn rmsnorm_fwd_unchecked(
        &self,
        out: &mut Self::Buf,
        rstd: &mut Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        shape: RowShape,
        eps: f32,
    ) -> Result<()>;
    /// [`Self::rmsnorm_bwd`] without its checks.
    ///
    /// # Safety
    /// The lengths pass [`check::rmsnorm_bwd`].
    unsafe fn rmsnorm_bwd_unchecked(
        &self,
        dx: &mut Self::Buf,
        dw: &mut Self::Buf,
        dout: &Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        rstd: &Self::Buf,
        shape: RowShape,
    ) -> Result<()>;
    /// [`Self::rope_fwd`] (`sign` = 1) and [`Self::rope_bwd`] (`sign` = −1, the
    /// opposite angle) without their checks.
    ///
    /// # Safety
    /// The lengths pass [`check::rope`].
    unsafe fn rope_unchecked(&self, x: &mut Self::Buf, shape: RopeShape, sign: f64) -> Result<()>;
    /// [`Self::attention_fwd`] without its checks.
    ///
    /// # Safety
    /// The lengths pass [`check::attention_fwd`].
    unsafe fn attention_fwd_unchecked(
        &self,
        out: &mut Self::Buf,
        probs: &mut Self::Buf,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        shape: AttnShape,
    ) -> Result<()>;
    /// [`Self::attention_probs`] without its checks. The default runs
    /// [`Self::attention_fwd`] (checked) into a scratch output.
    ///
    /// # Safety
    /// The lengths pass [`check::attention_probs`].
    unsafe fn attention_probs_unchecked(
        &self,
        probs: &mut Self::Buf,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        shape: AttnShape,
    ) -> Result<()> {
        let mut out = self.output(shape.q_len())?;
        self.attention_fwd(&mut out, probs, q, k, v, shape)
    }
    /// [`Self::attention_bwd`] without its checks.
    ///
    /// # Safety
    /// The lengths pass [`check::attention_bwd`].
    unsafe fn attention_bwd_unchecked(
        &self,
        dq: &mut Self::Buf,
        dk: &mut Self::Buf,
        dv: &mut Self::Buf,
        dout: &Self::Buf,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        probs: &Self::Buf,
        shape: AttnShape,
    ) -> Result<()>;
    /// [`Self::quick_gelu_fwd`] without its checks.
    ///
    /// # Safety
    /// The lengths pass [`check::unary`].
    unsafe fn quick_gelu_fwd_unchecked(&self, out: &mut Self::Buf, x: &Self::Buf) -> Result<()>;
    /// [`Self::gelu_fwd`] without its checks.
    ///
    /// # Safety
    /// The lengths pass [`check::unary`].
    unsafe fn gelu_fwd_unchecked(&self, out: &mut Self::Buf, x: &Self::Buf) -> Result<()>;
    /// [`Self::gelu_bwd`] without its checks.
    ///
    /// # Safety
    /// The lengths pass [`check::gelu_bwd`].
    unsafe fn gelu_bwd_unchecked(
        &self,
        dx: &mut Self::Buf,
        dout: &Self::Buf,
        x: &Self::Buf,
    ) -> Result<()>;
    /// [`Self::gelu_erf_fwd`] without its checks.
    ///
    /// # Safety
    /// The lengths pass [`check::unary`].
    unsafe fn gelu_erf_fwd_unchecked(&self, out: &mut Self::Buf, x: &Self::Buf) -> Result<()>;
    /// [`Self::gelu_erf_bwd`] without its checks.
    ///
    /// # Safety
    /// The lengths pass [`check::gelu_erf_bwd`].
    unsafe fn gelu_erf_bwd_unchecked(
        &self,
        dx: &mut Self::Buf,
        dout: &Self::Buf,
        x: &Self::Buf,
    ) -> Result<()>;
    /// [`Self::swiglu_fwd`] without its checks.
    ///
    /// # Safety
    /// The lengths pass [`check::swiglu_fwd`].
    unsafe fn swiglu_fwd_unchecked(
        &self,
        out: &mut Self::Buf,
        gate: &Self::Buf,
        up: &Self::Buf,
    ) -> Result<()>;
    /// [`Self::swiglu_bwd`] without its checks.
    ///
    /// # Safety
    /// The lengths pass [`check::swiglu_bwd`].
    unsafe fn swiglu_bwd_unchecked(
        &self,
        dgate: &mut Self::Buf,
        dup: &mut Self::Buf,
        dout: &Self::Buf,
        gate: &Self::Buf,
        up: &Self::Buf,
    ) -> Result<()>;
    /// [`Self::embedding_fwd`] without its checks.
    ///
    /// # Safety
    /// The lengths and ids pass [`check::embedding`].
    unsafe fn embedding_fwd_unchecked(
        &self,
        out: &mut Self::Buf,
        table: &Self::Buf,
        ids: &Self::Ids,
        shape: RowShape,
    ) -> Result<()>;
    /// [`Self::embedding_bwd`] without its checks.
    ///
    /// # Safety
    /// The lengths and ids pass [`check::embedding`].
    unsafe fn embedding_bwd_unchecked(
        &self,
        dtable: &mut Self::Buf,
        dout: &Self::Buf,
        ids: &Self::Ids,
        shape: RowShape,
    ) -> Result<()>;
    /// [`Self::cross_entropy`] without its checks.
    ///
    /// # Safety
    /// The lengths and the used targets pass [`check::cross_entropy`].
    unsafe fn cross_entropy_unchecked(
        &self,
        losses: &mut Self::Buf,
        dlogits: &mut Self::Buf,
        logits: &Self::Buf,
        targets: &Self::Ids,
        weights: &Self::Buf,
        shape: RowShape,
    ) -> Result<()>;
    /// [`Self::patchify`] without its checks.
    ///
    /// # Safety
    /// The lengths pass [`check::patchify`].
    unsafe fn patchify_unchecked(
        &self,
        out: &mut Self::Buf,
        images: &Self::Buf,
        shape: PatchShape,
    ) -> Result<()>;
    /// [`Self::select_tokens`] without its checks.
    ///
    /// # Safety
    /// The lengths and the config pass [`check::select_tokens`].
    unsafe fn select_tokens_unchecked(
        &self,
        attn_cls: &Self::Buf,
        keys: &Self::Buf,
        hidden: &Self::Buf,
        shape: &TokenShape,
        cfg: &TokenSelectConfig,
    ) -> Result<Self::Buf>;
}
