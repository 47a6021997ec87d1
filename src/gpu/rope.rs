//! Launcher for `kernels/rope.cu`: rotary embeddings in place, forward (`sign` = 1)
//! and backward (`sign` = −1). CPU twin: `src/backend/cpu/rope.rs`.
use cudarc::driver::CudaViewMut;

use super::grid::{elementwise, i32_of, i64_of};
use super::kernels::rope as K;
use super::{dptr_mut, Gpu};
use crate::backend::RopeShape;
use crate::Result;

/// Rotates `x` (`[b, t, heads·hd]`) in place by `sign` times the RoPE angles, see
/// [`crate::backend::Backend::rope_fwd`].
///
/// # Safety
/// The length passes [`crate::backend::check::rope`] for `s`.
pub unsafe fn rope(gpu: &Gpu, x: &mut CudaViewMut<'_, f32>, s: RopeShape, sign: f64) -> Result<()> {
    if s.heads * s.hd == 0 || x.is_empty() {
        return Ok(());
    }
    let xp = dptr_mut(x, gpu.stream());
    let rows = s.b * s.t;
    let dims = [
        i32_of(s.t.max(1), "tokens")?,
        i32_of(s.heads, "heads")?,
        i32_of(s.hd, "head dim")?,
    ];
    // SAFETY: the argument list of rope_f32; one item per (row, pair) of `x`.
    unsafe {
        elementwise(
            gpu,
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
}
