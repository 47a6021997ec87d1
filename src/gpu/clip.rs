//! Launchers for `kernels/clip.cu`: per-example norms, clip factors and the
//! book-keeping clipped sum on the GPU. CPU twin: [`crate::dp::clip`].
//!
//! Norms are *added* into a `[B]` f64 buffer so one buffer collects the total over
//! all layers; zero it once per micro-batch. The norm kernels are hand-written FP32
//! FMA tiles (no tensor cores); the clipped sum's GEMM runs on the strict-FP32
//! handle ([`Precision::Strict`]).
//!
//! A non-finite norm gets factor 0, and the sums treat a factor-0 example as absent:
//! the scaled operand gets `c == 0 ? 0 : c·v`, and only when some factor is 0 is the
//! other operand copied with those examples zeroed (the rare path).
use crate::gpu::kernels::clip as K;
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, PushKernelArg};

use super::abi::{
    self, BiasSqNormArgs, ClipFactorsArgs, ClippedBiasSumArgs, ExamplesArgs, RoundingBoundArgs,
    SqNormArgs,
};
use super::blas::{Precision, RowMajor};
use super::{dptr, dptr_mut, launch, launch_cfg, Gpu};
use crate::dp::clip::{self, LinearShape, NormMethod};
use crate::error::{ensure_shape, Error, Result};

const THREADS: u32 = abi::CLIP_THREADS;
const TILE: usize = abi::CLIP_TILE as usize;

fn i32_dim(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v)
        .map_err(|_| Error::Shape(format!("{what} = {v} exceeds the kernel's i32 range")))
}

fn check_xg(s: LinearShape, x_len: usize, g_len: usize) -> Result<()> {
    ensure_shape(x_len == s.b * s.t * s.d, || {
        format!(
            "device X has {x_len} values, expected b*t*d = {}",
            s.b * s.t * s.d
        )
    })?;
    check_g(s, g_len)
}

fn check_g(s: LinearShape, g_len: usize) -> Result<()> {
    ensure_shape(g_len == s.b * s.t * s.p, || {
        format!(
            "device G has {g_len} values, expected b*t*p = {}",
            s.b * s.t * s.p
        )
    })?;
    ensure_shape(s.b <= 65_535, || {
        format!("batch {} exceeds 65535 per launch; use micro-batches", s.b)
    })
}

/// Adds one linear layer's per-example squared gradient norms (by `method`, plus the
/// bias term when `has_bias`) into `total` (length b, f64).
pub fn add_layer_sq_norms<X: DevicePtr<f32>, G: DevicePtr<f32>>(
    gpu: &Gpu,
    x: &X,
    g: &G,
    s: LinearShape,
    method: NormMethod,
    has_bias: bool,
    total: &mut CudaSlice<f64>,
) -> Result<()> {
    check_xg(s, x.len(), g.len())?;
    ensure_shape(total.len() == s.b, || {
        format!("norm buffer has {} slots for batch {}", total.len(), s.b)
    })?;
    if s.b == 0 || s.t == 0 {
        return Ok(());
    }
    let st = gpu.stream();
    let (xp, gp, op) = (dptr(x, st), dptr(g, st), dptr_mut(total, st));
    let (t, d, p) = (i32_dim(s.t, "T")?, i32_dim(s.d, "d")?, i32_dim(s.p, "p")?);
    let b = s.b as u32;
    if s.d > 0 && s.p > 0 {
        let (name, blocks) = match method {
            NormMethod::Ghost => {
                let tiles = s.t.div_ceil(TILE);
                (K::GHOST_SQ_NORM_F32, tiles * (tiles + 1) / 2)
            }
            NormMethod::Instantiated => {
                (K::INST_SQ_NORM_F32, s.d.div_ceil(TILE) * s.p.div_ceil(TILE))
            }
        };
        let blocks = u32::try_from(blocks)
            .map_err(|_| Error::Shape(format!("{name}: {blocks} tiles is too many")))?;
        let args = SqNormArgs {
            x: xp,
            g: gp,
            out: op,
            t,
            d,
            p,
            pad: 0,
        };
        let f = gpu.func(name)?;
        let mut l = st.launch_builder(&f);
        l.arg(&args);
        // SAFETY: the kernel takes this struct (abi.h); shapes checked above.
        unsafe { launch(&mut l, launch_cfg((blocks, b, 1), THREADS, 0), name) }?;
    }
    if has_bias && s.p > 0 {
        let args = BiasSqNormArgs {
            g: gp,
            out: op,
            t,
            p,
        };
        let f = gpu.func(K::BIAS_SQ_NORM_F32)?;
        let mut l = st.launch_builder(&f);
        l.arg(&args);
        let grid = (s.p.div_ceil(THREADS as usize) as u32, b, 1);
        // SAFETY: as above.
        unsafe { launch(&mut l, launch_cfg(grid, THREADS, 0), K::BIAS_SQ_NORM_F32) }?;
    }
    Ok(())
}

/// Adds one linear layer's per-example rounding bounds
/// ([`clip::layer_rounding_bounds`]: γ·Σ_t ‖x_t‖‖g_t‖, plus γ·Σ_t ‖g_t‖ when
/// `has_bias`) into `bound` (length b, f64).
pub fn add_layer_rounding_bounds<X: DevicePtr<f32>, G: DevicePtr<f32>>(
    gpu: &Gpu,
    x: &X,
    g: &G,
    s: LinearShape,
    has_bias: bool,
    rows_cap: usize,
    bound: &mut CudaSlice<f64>,
) -> Result<()> {
    check_xg(s, x.len(), g.len())?;
    ensure_shape(bound.len() == s.b, || {
        format!("bound buffer has {} slots for batch {}", bound.len(), s.b)
    })?;
    if s.b == 0 || s.t == 0 || s.p == 0 {
        return Ok(());
    }
    let st = gpu.stream();
    let args = RoundingBoundArgs {
        x: dptr(x, st),
        g: dptr(g, st),
        out: dptr_mut(bound, st),
        gamma: clip::layer_gamma(s, rows_cap),
        t: i32_dim(s.t, "T")?,
        d: i32_dim(s.d, "d")?,
        p: i32_dim(s.p, "p")?,
        has_bias: has_bias as i32,
    };
    let name = K::ROUNDING_BOUND_F32;
    let f = gpu.func(name)?;
    let mut l = st.launch_builder(&f);
    l.arg(&args);
    let grid = (s.t.div_ceil((THREADS / 32) as usize) as u32, s.b as u32, 1);
    // SAFETY: the kernel takes this struct (abi.h); shapes checked above.
    unsafe { launch(&mut l, launch_cfg(grid, THREADS, 0), name) }
}

/// What [`clip_factors`] counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FactorCounts {
    /// Examples with a non-finite norm (their factor is 0).
    pub non_finite: usize,
    /// Factors that are 0: the non-finite ones, plus any finite norm so large that
    /// C/‖g_i‖ underflows. When this is 0 the sums need no masking.
    pub zero: usize,
}

/// Clip factors c_i = min(1, C / (‖g_i‖ + E_i + 1e-6)) from the total squared norms
/// and rounding bounds E_i ([`clip::clip_factors`]); a non-finite norm or bound gets
/// c_i = 0. Synchronises to download the two counts.
pub fn clip_factors<F: DevicePtrMut<f32>>(
    gpu: &Gpu,
    total: &CudaSlice<f64>,
    bound: &CudaSlice<f64>,
    clip_norm: f32,
    factors: &mut F,
) -> Result<FactorCounts> {
    if clip_norm.is_nan() || clip_norm <= 0.0 {
        return Err(Error::Config(format!(
            "clip norm C = {clip_norm} must be positive"
        )));
    }
    ensure_shape(
        factors.len() == total.len() && bound.len() == total.len(),
        || {
            format!(
                "{} factor slots and {} bounds for {} norms",
                factors.len(),
                bound.len(),
                total.len()
            )
        },
    )?;
    let b = i32_dim(total.len(), "batch")?;
    if b == 0 {
        return Ok(FactorCounts::default());
    }
    let mut counts = gpu.zeros::<u64>(2)?;
    let st = gpu.stream();
    let args = ClipFactorsArgs {
        sq: dptr(total, st),
        bound: dptr(bound, st),
        c: dptr_mut(factors, st),
        counts: dptr_mut(&mut counts, st),
        b,
        clip_norm,
    };
    let f = gpu.func(K::CLIP_FACTORS_F32)?;
    let mut l = st.launch_builder(&f);
    l.arg(&args);
    let grid = (b as u32).div_ceil(THREADS);
    // SAFETY: the kernel takes this struct (abi.h); every buffer holds b values.
    unsafe {
        launch(
            &mut l,
            launch_cfg((grid, 1, 1), THREADS, 0),
            K::CLIP_FACTORS_F32,
        )
    }?;
    let counts = gpu.download(&counts)?;
    Ok(FactorCounts {
        non_finite: counts[0] as usize,
        zero: counts[1] as usize,
    })
}

/// Whether some factor is 0, by downloading them (a sync): for factor buffers that
/// did not come from [`clip_factors`].
pub fn any_zero<F: DevicePtr<f32>>(gpu: &Gpu, factors: &F) -> Result<bool> {
    if factors.len() == 0 {
        return Ok(false);
    }
    Ok(gpu.download(factors)?.contains(&0.0))
}

/// `dst[i] = c[i / per_example] == 0 ? 0 : src[i]` over `dst.len()` values: `src`
/// with the rows of factor-0 examples zeroed, for the rare path of the sums.
pub fn mask_examples<S: DevicePtr<f32>, F: DevicePtr<f32>, D: DevicePtrMut<f32>>(
    gpu: &Gpu,
    src: &S,
    factors: &F,
    per_example: usize,
    dst: &mut D,
) -> Result<()> {
    let total = dst.len();
    ensure_shape(
        src.len() >= total && per_example > 0 && factors.len() * per_example >= total,
        || {
            format!(
                "mask of {total} values from {} with {} factors of {per_example}",
                src.len(),
                factors.len()
            )
        },
    )?;
    if total == 0 {
        return Ok(());
    }
    let st = gpu.stream();
    let args = ExamplesArgs {
        x: dptr(src, st),
        c: dptr(factors, st),
        y: dptr_mut(dst, st),
        per_example: per_example as i64,
        total: total as i64,
    };
    let f = gpu.func(K::MASK_EXAMPLES_F32)?;
    let mut l = st.launch_builder(&f);
    l.arg(&args);
    let grid = super::grid_for(total, THREADS, gpu.sm_count() * 8);
    // SAFETY: the kernel takes this struct (abi.h); `src` and `dst` hold `total` values
    // and the factors cover every example index below total / per_example.
    unsafe {
        launch(
            &mut l,
            launch_cfg((grid, 1, 1), THREADS, 0),
            K::MASK_EXAMPLES_F32,
        )
    }
}

/// Workspace (f32 values) that [`clipped_weight_sum`] needs: the narrower of X and G.
pub fn workspace_len(s: LinearShape) -> usize {
    s.b * s.t * s.d.min(s.p)
}

/// The book-keeping clipped sum Σ_i c_i G_iᵀ X_i (p×d, W's layout) as one
/// strict-FP32 GEMM over all b·t rows, with the narrower of X and G scaled by c in
/// `workspace`. `accumulate` adds into `out` (micro-batches); otherwise `out` is
/// overwritten. `some_zero` says whether a factor is 0 (`None`: unknown, the
/// factors are downloaded to find out); when one is, the wider operand is copied
/// with those examples zeroed, so a NaN there cannot reach the sum.
#[allow(clippy::too_many_arguments)]
pub fn clipped_weight_sum<
    X: DevicePtr<f32>,
    G: DevicePtr<f32>,
    F: DevicePtr<f32>,
    W: DevicePtr<f32> + DevicePtrMut<f32>,
    O: DevicePtrMut<f32>,
>(
    gpu: &Gpu,
    x: &X,
    g: &G,
    factors: &F,
    s: LinearShape,
    workspace: &mut W,
    out: &mut O,
    accumulate: bool,
    some_zero: Option<bool>,
) -> Result<()> {
    check_xg(s, x.len(), g.len())?;
    ensure_shape(factors.len() == s.b, || {
        format!("{} factors for batch {}", factors.len(), s.b)
    })?;
    ensure_shape(out.len() == s.p * s.d, || {
        format!(
            "clipped sum buffer has {} values, expected p*d = {}",
            out.len(),
            s.p * s.d
        )
    })?;
    ensure_shape(workspace.len() >= workspace_len(s), || {
        format!(
            "workspace has {} values, needs {}",
            workspace.len(),
            workspace_len(s)
        )
    })?;
    if s.p == 0 || s.d == 0 {
        return Ok(());
    }
    let scale_x = s.d < s.p;
    let (src_ptr, width) = if scale_x {
        (dptr(x, gpu.stream()), s.d)
    } else {
        (dptr(g, gpu.stream()), s.p)
    };
    let per_example = (s.t * width) as i64;
    let total = (s.b * s.t * width) as i64;
    if total > 0 {
        let args = ExamplesArgs {
            x: src_ptr,
            c: dptr(factors, gpu.stream()),
            y: dptr_mut(workspace, gpu.stream()),
            per_example,
            total,
        };
        let f = gpu.func(K::SCALE_EXAMPLES_F32)?;
        let mut l = gpu.stream().launch_builder(&f);
        l.arg(&args);
        let grid = super::grid_for(total as usize, THREADS, gpu.sm_count() * 8);
        // SAFETY: the kernel takes this struct (abi.h); workspace holds `total` values.
        unsafe {
            launch(
                &mut l,
                launch_cfg((grid, 1, 1), THREADS, 0),
                K::SCALE_EXAMPLES_F32,
            )
        }?;
    }
    let gemm = RowMajor {
        ta: true,
        tb: false,
        m: s.p,
        n: s.d,
        k: s.b * s.t,
        alpha: 1.0,
        beta: if accumulate { 1.0 } else { 0.0 },
    };
    // With no rows (total == 0) there is nothing to mask.
    let some_zero = total > 0
        && match some_zero {
            Some(z) => z,
            None => any_zero(gpu, factors)?,
        };
    let strict = Precision::Strict;
    match (scale_x, some_zero) {
        (true, false) => gemm.run(gpu, strict, g, workspace, out),
        (false, false) => gemm.run(gpu, strict, workspace, x, out),
        (true, true) => {
            let mut gm = gpu.zeros::<f32>(g.len())?;
            mask_examples(gpu, g, factors, s.t * s.p, &mut gm)?;
            gemm.run(gpu, strict, &gm, workspace, out)
        }
        (false, true) => {
            let mut xm = gpu.zeros::<f32>(x.len())?;
            mask_examples(gpu, x, factors, s.t * s.d, &mut xm)?;
            gemm.run(gpu, strict, workspace, &xm, out)
        }
    }
}

/// The clipped bias sum Σ_i c_i Σ_t G_i,t (length p) over the examples with c_i ≠ 0;
/// `accumulate` adds into `out`.
pub fn clipped_bias_sum<G: DevicePtr<f32>, F: DevicePtr<f32>, O: DevicePtrMut<f32>>(
    gpu: &Gpu,
    g: &G,
    factors: &F,
    s: LinearShape,
    out: &mut O,
    accumulate: bool,
) -> Result<()> {
    check_g(s, g.len())?;
    ensure_shape(factors.len() == s.b, || {
        format!("{} factors for batch {}", factors.len(), s.b)
    })?;
    ensure_shape(out.len() == s.p, || {
        format!(
            "bias sum buffer has {} values, expected p = {}",
            out.len(),
            s.p
        )
    })?;
    if s.p == 0 {
        return Ok(());
    }
    let st = gpu.stream();
    let args = ClippedBiasSumArgs {
        g: dptr(g, st),
        c: dptr(factors, st),
        out: dptr_mut(out, st),
        b: i32_dim(s.b, "batch")?,
        t: i32_dim(s.t, "T")?,
        p: i32_dim(s.p, "p")?,
        accumulate: accumulate as i32,
    };
    let f = gpu.func(K::CLIPPED_BIAS_SUM_F32)?;
    let mut l = st.launch_builder(&f);
    l.arg(&args);
    let grid = (s.p as u32).div_ceil(THREADS);
    // SAFETY: the kernel takes this struct (abi.h); shapes checked above.
    unsafe {
        launch(
            &mut l,
            launch_cfg((grid, 1, 1), THREADS, 0),
            K::CLIPPED_BIAS_SUM_F32,
        )
    }
}
