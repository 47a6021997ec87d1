//! Launcher for `kernels/noise.cu`: Philox Gaussian noise written or added into a
//! buffer. CPU twin: [`crate::dp::noise::NoiseKey`].
use cudarc::driver::{DevicePtrMut, PushKernelArg};

use super::{dptr_mut, grid_for, launch, launch_cfg, Gpu};
use crate::dp::noise::NoiseKey;
use crate::Result;

/// `y = a·noise(offset ..)` (or `y += a·noise(..)` with `accumulate`), the same
/// values as [`NoiseKey::fill`] scaled by `a`.
pub fn noise_axpy<Y: DevicePtrMut<f32>>(
    gpu: &Gpu,
    key: NoiseKey,
    offset: u64,
    a: f32,
    accumulate: bool,
    y: &mut Y,
) -> Result<()> {
    let n = y.len() as u64;
    if n == 0 {
        return Ok(());
    }
    let yp = dptr_mut(y, gpu.stream());
    let acc = accumulate as i32;
    let f = gpu.func("noise", "noise_axpy_f32")?;
    let mut l = gpu.stream().launch_builder(&f);
    l.arg(&key.seed)
        .arg(&key.tensor_id)
        .arg(&key.step)
        .arg(&offset)
        .arg(&n)
        .arg(&a)
        .arg(&acc)
        .arg(&yp);
    let grid = grid_for((n as usize).div_ceil(4) + 1, 256, gpu.sm_count() * 8);
    // SAFETY: argument types mirror the kernel; the kernel writes y[0..n).
    unsafe { launch(&mut l, launch_cfg((grid, 1, 1), 256, 0), "noise_axpy_f32") }
}
