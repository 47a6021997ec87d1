//! Launch shapes shared by the model-layer launchers ([`super::norms`],
//! [`super::rope`], [`super::attention`], [`super::activations`],
//! [`super::embedding`], [`super::tensor`], [`super::rows`]): grid-stride
//! elementwise kernels and one-block-per-row kernels, both with 256 threads.
use cudarc::driver::{DeviceRepr, LaunchArgs, PushKernelArg};

use super::{grid_for, launch, launch_cfg, Gpu, Kernel};
use crate::{Error, Result};

/// Threads per block of the elementwise kernels.
const THREADS: u32 = 256;
/// Threads per block of the row kernels (a multiple of 32: `dp::block_sum`).
const ROW_THREADS: u32 = 256;

/// A kernel argument pushed by value (scalars, raw device pointers).
pub(crate) trait KernelArg {
    fn push<'a>(&'a self, l: &mut LaunchArgs<'a>);
}

impl<T: DeviceRepr> KernelArg for T {
    fn push<'a>(&'a self, l: &mut LaunchArgs<'a>) {
        l.arg(self);
    }
}

/// A dimension as the kernels' `int`, or a shape error naming it.
pub(crate) fn i32_of(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::Shape(format!("{what} = {v} exceeds the kernel's i32")))
}

/// A count as the kernels' `long long` (every `usize` length of a buffer fits).
pub(crate) fn i64_of(v: usize) -> i64 {
    v as i64
}

/// Launches a grid-stride elementwise kernel over `n` items; nothing when `n` = 0.
///
/// # Safety
/// `args` is the kernel's parameter list, and the buffers behind its pointers hold
/// what the kernel touches for `n` items.
pub(crate) unsafe fn elementwise(
    gpu: &Gpu,
    k: Kernel,
    n: usize,
    args: &[&dyn KernelArg],
) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    let grid = grid_for(n, THREADS, gpu.sm_count() * 16);
    // SAFETY: forwarded to the caller.
    unsafe { run(gpu, k, launch_cfg((grid, 1, 1), THREADS, 0), args) }
}

/// Launches a one-block-per-row kernel over `rows` rows; nothing when `rows` = 0.
///
/// # Safety
/// As [`elementwise`], for `rows` rows.
pub(crate) unsafe fn per_row(
    gpu: &Gpu,
    k: Kernel,
    rows: usize,
    args: &[&dyn KernelArg],
) -> Result<()> {
    if rows == 0 {
        return Ok(());
    }
    let rows = u32::try_from(rows)
        .map_err(|_| Error::Shape(format!("{k}: {rows} rows exceed one launch")))?;
    // SAFETY: forwarded to the caller.
    unsafe { run(gpu, k, launch_cfg((rows, 1, 1), ROW_THREADS, 0), args) }
}

/// # Safety
/// As [`elementwise`], for the launch `cfg`.
unsafe fn run(
    gpu: &Gpu,
    k: Kernel,
    cfg: cudarc::driver::LaunchConfig,
    args: &[&dyn KernelArg],
) -> Result<()> {
    let f = gpu.func(k)?;
    let mut l = gpu.stream().launch_builder(&f);
    for a in args {
        a.push(&mut l);
    }
    // SAFETY: forwarded to the caller.
    unsafe { launch(&mut l, cfg, k) }
}
