//! Launchers for `kernels/tokens.cu`: VisionZip token selection on the GPU, the twin
//! of [`crate::vision::tokens`] (same plan bit for bit, see that module's notes).
//!
//! Three launches, no B×N×N buffer: `tokens_key_metric` (normalised head-averaged
//! keys, only when M > 0), `tokens_select` (one block per image: scores, top-K,
//! centers, assignments) and `tokens_gather_fuse` (the output tokens). The small
//! intermediate buffers live in a reusable [`TokenWorkspace`].
use crate::gpu::kernels::tokens as K;
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

use super::abi::{self, StreamArgs, TokensGatherFuseArgs, TokensKeyMetricArgs, TokensSelectArgs};
use super::{cuda_err, dptr, dptr_mut, grid_for, Gpu};
use crate::error::ensure_shape;
use crate::vision::tokens::{TokenPlan, TokenSelectConfig, TokenSelection, TokenShape};
use crate::{Error, Result};

/// The largest P = N − 1 the GPU path supports: `tokens_select` runs one thread per
/// patch in a single block (CLIP ViT-L/14-336 has 576).
pub const MAX_PATCHES: usize = abi::TOKENS_MAX_PATCHES as usize;

/// The largest batch: the batch is the grid's z dimension in `tokens_gather_fuse`.
pub const MAX_BATCH: usize = 65_535;

/// Threads per block of `tokens_key_metric` (8 warps, one token each).
const METRIC_THREADS: u32 = abi::TOKENS_METRIC_THREADS;
/// Grid cap of `tokens_key_metric`, which is grid-stride over tokens.
const METRIC_MAX_BLOCKS: u32 = 1 << 16;
/// Threads per block of `tokens_gather_fuse` (over the hidden dimension).
const GATHER_THREADS: u32 = abi::TOKENS_GATHER_THREADS;

/// Device buffers between the launches: the key metric `[B, N, hd]`, the remaining
/// patch indices `[B, R]`, the centers `[B, M]` and the assignments `[B, R]`.
///
/// Sized for one (shape, config); it can be reused for any that needs no more.
pub struct TokenWorkspace {
    metric: CudaSlice<f32>,
    remaining: CudaSlice<u32>,
    centers: CudaSlice<u32>,
    assign: CudaSlice<u32>,
}

/// Element counts of the workspace buffers: (metric, remaining, centers, assign).
/// The metric is only needed when something is merged.
fn workspace_lens(shape: &TokenShape, cfg: &TokenSelectConfig) -> (usize, usize, usize, usize) {
    let (b, r, m) = (shape.batch, cfg.remaining(shape), cfg.context);
    let metric = if m > 0 {
        b * shape.tokens * shape.head_dim
    } else {
        0
    };
    (metric, b * r, b * m, b * r)
}

impl TokenWorkspace {
    /// Allocates a workspace for `shape` and `cfg` (validated first).
    pub fn new(gpu: &Gpu, shape: &TokenShape, cfg: &TokenSelectConfig) -> Result<Self> {
        cfg.validate(shape)?;
        let (metric, remaining, centers, assign) = workspace_lens(shape, cfg);
        // Zero-length device allocations are invalid, so every buffer holds at least one.
        Ok(Self {
            metric: gpu.zeros(metric.max(1))?,
            remaining: gpu.zeros(remaining.max(1))?,
            centers: gpu.zeros(centers.max(1))?,
            assign: gpu.zeros(assign.max(1))?,
        })
    }

    /// Checks this workspace is large enough for `shape` and `cfg`.
    pub fn check_fits(&self, shape: &TokenShape, cfg: &TokenSelectConfig) -> Result<()> {
        let (metric, remaining, centers, assign) = workspace_lens(shape, cfg);
        for (name, have, need) in [
            ("metric", self.metric.len(), metric),
            ("remaining", self.remaining.len(), remaining),
            ("centers", self.centers.len(), centers),
            ("assign", self.assign.len(), assign),
        ] {
            ensure_shape(have >= need, || {
                format!(
                    "token workspace buffer {name} holds {have} elements but this shape needs \
                     {need}; allocate it with TokenWorkspace::new for the larger shape"
                )
            })?;
        }
        Ok(())
    }

    /// The remaining patch indices `[B, R]` (a prefix of the buffer) of the last plan.
    pub fn remaining(&self) -> &CudaSlice<u32> {
        &self.remaining
    }

    /// The center token indices `[B, M]` (a prefix of the buffer) of the last plan.
    pub fn centers(&self) -> &CudaSlice<u32> {
        &self.centers
    }

    /// The assignments `[B, R]` (a prefix of the buffer) of the last plan; see
    /// [`TokenPlan::assign`].
    pub fn assign(&self) -> &CudaSlice<u32> {
        &self.assign
    }
}

/// Checks the config and the GPU path's limits; returns the kernels' i32 scalars
/// (N, H, hd, D, K, M).
fn launch_dims(
    shape: &TokenShape,
    cfg: &TokenSelectConfig,
) -> Result<(i32, i32, i32, i32, i32, i32)> {
    cfg.validate(shape)?;
    ensure_shape(shape.patches() <= MAX_PATCHES, || {
        format!(
            "the GPU token selection supports at most {MAX_PATCHES} patches (N ≤ {}), got \
             N = {}; use the CPU reference for larger images",
            MAX_PATCHES + 1,
            shape.tokens
        )
    })?;
    ensure_shape(shape.batch <= MAX_BATCH, || {
        format!(
            "the GPU token selection takes at most {MAX_BATCH} images per call, got {}; split \
             the batch",
            shape.batch
        )
    })?;
    let i32_of = |v: usize, what: &str| {
        i32::try_from(v)
            .map_err(|_| Error::Shape(format!("token selection: {what} = {v} exceeds i32")))
    };
    i32_of(shape.batch * shape.tokens, "B·N")?;
    Ok((
        i32_of(shape.tokens, "tokens")?,
        i32_of(shape.heads, "heads")?,
        i32_of(shape.head_dim, "head_dim")?,
        i32_of(shape.hidden, "hidden")?,
        i32_of(cfg.keep, "keep")?,
        i32_of(cfg.context, "context")?,
    ))
}

/// Checks a device buffer's length against its shape.
fn ensure_dev_len(name: &str, got: usize, want: usize, layout: &str) -> Result<()> {
    ensure_shape(got == want, || {
        format!("{name} has {got} elements on the device, expected {want} = {layout}")
    })
}

/// Runs the planning half on device buffers: writes the kept indices `[B, 1 + K]`
/// to `kept` and the remaining list, centers and assignments to `ws`.
///
/// `attn_cls` is `[B, H, N]` and `keys` `[B, N, H·hd]`, row-major. Asynchronous on
/// [`Gpu::stream`].
pub fn plan_tokens_dev(
    gpu: &Gpu,
    attn_cls: &CudaView<f32>,
    keys: &CudaView<f32>,
    shape: &TokenShape,
    cfg: &TokenSelectConfig,
    kept: &mut CudaViewMut<u32>,
    ws: &mut TokenWorkspace,
) -> Result<()> {
    let (n, h, hd, _d, k, m) = launch_dims(shape, cfg)?;
    ensure_dev_len("attn_cls", attn_cls.len(), shape.attn_len()?, "B·H·N")?;
    ensure_dev_len("keys", keys.len(), shape.keys_len()?, "B·N·H·hd")?;
    ensure_dev_len("kept", kept.len(), shape.batch * (1 + cfg.keep), "B·(1+K)")?;
    ws.check_fits(shape, cfg)?;
    let stream = gpu.stream();

    if cfg.context > 0 {
        let bn = (shape.batch * shape.tokens) as i32;
        let warps = METRIC_THREADS / 32;
        let launch = LaunchConfig {
            grid_dim: (
                grid_for(shape.batch * shape.tokens, warps, METRIC_MAX_BLOCKS),
                1,
                1,
            ),
            block_dim: (METRIC_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let args = TokensKeyMetricArgs {
            keys: dptr(keys, stream),
            metric: dptr_mut(&mut ws.metric, stream),
            bn,
            h,
            hd,
            pad: 0,
        };
        let f = gpu.func(K::TOKENS_KEY_METRIC)?;
        let mut b = stream.launch_builder(&f);
        b.arg(&args);
        // SAFETY: the kernel takes this struct (abi.h); the buffers hold at least
        // B·N·H·hd (checked) and B·N·hd (check_fits) elements.
        unsafe { b.launch(launch) }.map_err(cuda_err("launching tokens_key_metric"))?;
    }

    // One thread per patch, a whole number of warps (the ballot scan needs full warps).
    let threads = shape.patches().div_ceil(32).max(1) as u32 * 32;
    let launch = LaunchConfig {
        grid_dim: (shape.batch as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    let args = TokensSelectArgs {
        attn: dptr(attn_cls, stream),
        metric: dptr(&ws.metric, stream),
        kept: dptr_mut(kept, stream),
        remaining: dptr_mut(&mut ws.remaining, stream),
        centers: dptr_mut(&mut ws.centers, stream),
        assign: dptr_mut(&mut ws.assign, stream),
        n,
        h,
        hd,
        k,
        m,
        pad: 0,
    };
    let f = gpu.func(K::TOKENS_SELECT)?;
    let mut b = stream.launch_builder(&f);
    b.arg(&args);
    // SAFETY: the kernel takes this struct (abi.h); P ≤ MAX_PATCHES fits the kernel's shared arrays and one
    // block; every buffer was checked to hold what the kernel indexes.
    unsafe { b.launch(launch) }.map_err(cuda_err("launching tokens_select"))?;
    Ok(())
}

/// Runs the output half on device buffers: writes `[B, 1 + K + M, D]` to `out` from
/// `hidden` (`[B, N, D]`), the kept indices of [`plan_tokens_dev`] and its workspace.
/// Asynchronous on [`Gpu::stream`].
pub fn gather_fuse_dev(
    gpu: &Gpu,
    hidden: &CudaView<f32>,
    shape: &TokenShape,
    cfg: &TokenSelectConfig,
    kept: &CudaView<u32>,
    ws: &TokenWorkspace,
    out: &mut CudaViewMut<f32>,
) -> Result<()> {
    let (n, _h, _hd, d, k, m) = launch_dims(shape, cfg)?;
    ensure_dev_len("hidden", hidden.len(), shape.hidden_len()?, "B·N·D")?;
    ensure_dev_len("kept", kept.len(), shape.batch * (1 + cfg.keep), "B·(1+K)")?;
    let out_len = shape.batch * cfg.out_tokens() * shape.hidden;
    ensure_dev_len("out", out.len(), out_len, "B·(1+K+M)·D")?;
    ws.check_fits(shape, cfg)?;

    let stream = gpu.stream();
    let args = TokensGatherFuseArgs {
        hidden: dptr(hidden, stream),
        kept: dptr(kept, stream),
        remaining: dptr(&ws.remaining, stream),
        centers: dptr(&ws.centers, stream),
        assign: dptr(&ws.assign, stream),
        out: dptr_mut(out, stream),
        noise: StreamArgs::new(&cfg.noise_key()),
        n,
        d,
        k,
        m,
        noise_std: cfg.fuse_noise_std,
        pad: 0,
    };
    let threads = (shape.hidden.div_ceil(32) * 32).min(GATHER_THREADS as usize) as u32;
    let launch = LaunchConfig {
        grid_dim: (
            grid_for(shape.hidden, threads, u32::MAX),
            cfg.out_tokens() as u32,
            shape.batch as u32,
        ),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    let f = gpu.func(K::TOKENS_GATHER_FUSE)?;
    let mut b = stream.launch_builder(&f);
    b.arg(&args);
    // SAFETY: the kernel takes this struct (abi.h); 1+K+M ≤ N ≤ 1025 and B ≤ 65535 fit the grid;
    // all buffers were checked. The indices come from plan_tokens_dev, so they are
    // below N (kept, remaining, centers) and below M (assign).
    unsafe { b.launch(launch) }.map_err(cuda_err("launching tokens_gather_fuse"))?;
    Ok(())
}

/// Token selection on device buffers: [`plan_tokens_dev`] then [`gather_fuse_dev`].
/// Writes the tokens `[B, 1 + K + M, D]` to `out` and the kept indices
/// `[B, 1 + K]` to `kept`. Asynchronous on [`Gpu::stream`].
#[allow(clippy::too_many_arguments)]
pub fn select_tokens_dev(
    gpu: &Gpu,
    attn_cls: &CudaView<f32>,
    keys: &CudaView<f32>,
    hidden: &CudaView<f32>,
    shape: &TokenShape,
    cfg: &TokenSelectConfig,
    out: &mut CudaViewMut<f32>,
    kept: &mut CudaViewMut<u32>,
    ws: &mut TokenWorkspace,
) -> Result<()> {
    // Check everything before the first launch, so a bad `hidden` or `out` does not
    // leave a half-done plan behind.
    launch_dims(shape, cfg)?;
    ensure_dev_len("hidden", hidden.len(), shape.hidden_len()?, "B·N·D")?;
    let out_len = shape.batch * cfg.out_tokens() * shape.hidden;
    ensure_dev_len("out", out.len(), out_len, "B·(1+K+M)·D")?;
    plan_tokens_dev(gpu, attn_cls, keys, shape, cfg, kept, ws)?;
    gather_fuse_dev(gpu, hidden, shape, cfg, &kept.as_view(), ws, out)
}

/// Host-slice length checks shared by the convenience functions.
fn check_host(name: &str, got: usize, want: usize, layout: &str) -> Result<()> {
    ensure_shape(got == want, || {
        format!("{name} has {got} elements, expected {want} = {layout}")
    })
}

/// Downloads the first `n` elements of a device buffer (none when `n` = 0).
fn download_prefix(gpu: &Gpu, buf: &CudaSlice<u32>, n: usize) -> Result<Vec<u32>> {
    if n == 0 {
        return Ok(Vec::new());
    }
    gpu.download(&buf.slice(0..n))
}

/// Convenience for tests and one-off use: uploads host slices, runs
/// [`plan_tokens_dev`], and downloads the whole [`TokenPlan`].
pub fn plan_tokens(
    gpu: &Gpu,
    attn_cls: &[f32],
    keys: &[f32],
    shape: &TokenShape,
    cfg: &TokenSelectConfig,
) -> Result<TokenPlan> {
    launch_dims(shape, cfg)?;
    check_host("attn_cls", attn_cls.len(), shape.attn_len()?, "B·H·N")?;
    check_host("keys", keys.len(), shape.keys_len()?, "B·N·H·hd")?;
    let a = gpu.upload(attn_cls)?;
    let kd = gpu.upload(keys)?;
    let mut kept = gpu.zeros::<u32>(shape.batch * (1 + cfg.keep))?;
    let mut ws = TokenWorkspace::new(gpu, shape, cfg)?;
    plan_tokens_dev(
        gpu,
        &a.as_view(),
        &kd.as_view(),
        shape,
        cfg,
        &mut kept.as_view_mut(),
        &mut ws,
    )?;
    let (_, r, c, s) = workspace_lens(shape, cfg);
    Ok(TokenPlan {
        kept: gpu.download(&kept)?.into(),
        remaining: download_prefix(gpu, &ws.remaining, r)?.into(),
        centers: download_prefix(gpu, &ws.centers, c)?.into(),
        assign: download_prefix(gpu, &ws.assign, s)?.into(),
    })
}

/// Convenience for tests and one-off use: uploads host slices, runs
/// [`select_tokens_dev`] and downloads the result. Same contract as
/// [`crate::vision::tokens::select_tokens`].
pub fn select_tokens(
    gpu: &Gpu,
    attn_cls: &[f32],
    keys: &[f32],
    hidden: &[f32],
    shape: &TokenShape,
    cfg: &TokenSelectConfig,
) -> Result<TokenSelection> {
    launch_dims(shape, cfg)?;
    check_host("attn_cls", attn_cls.len(), shape.attn_len()?, "B·H·N")?;
    check_host("keys", keys.len(), shape.keys_len()?, "B·N·H·hd")?;
    check_host("hidden", hidden.len(), shape.hidden_len()?, "B·N·D")?;
    let a = gpu.upload(attn_cls)?;
    let kd = gpu.upload(keys)?;
    let hd = gpu.upload(hidden)?;
    let mut out = gpu.zeros::<f32>(shape.batch * cfg.out_tokens() * shape.hidden)?;
    let mut kept = gpu.zeros::<u32>(shape.batch * (1 + cfg.keep))?;
    let mut ws = TokenWorkspace::new(gpu, shape, cfg)?;
    select_tokens_dev(
        gpu,
        &a.as_view(),
        &kd.as_view(),
        &hd.as_view(),
        shape,
        cfg,
        &mut out.as_view_mut(),
        &mut kept.as_view_mut(),
        &mut ws,
    )?;
    Ok(TokenSelection {
        tokens: gpu.download(&out)?.into(),
        kept: gpu.download(&kept)?.into(),
    })
}
