//! Launchers for `kernels/attention.cu`: the head-major relayouts around the
//! batched cuBLAS GEMMs of attention, and the row softmax with its backward. The
//! CUDA backend composes them with the GEMMs; CPU twin of the whole attention:
//! `src/backend/cpu/attention.rs`.
use cudarc::driver::{CudaView, CudaViewMut};

use super::grid::{elementwise, i32_of, per_row};
use super::kernels::attention as K;
use super::{dptr, dptr_mut, Gpu};
use crate::backend::AttnShape;
use crate::Result;

/// `[b, t, heads·hd]` → `[b, hq, t, hd]`, query head h reading head h / rep.
///
/// # Safety
/// `src` holds b·t·heads·hd values and `dst` [`AttnShape::q_len`] (checked by
/// [`crate::backend::check::attention_fwd`]), with `heads · rep = s.hq`.
pub unsafe fn split_heads(
    gpu: &Gpu,
    dst: &mut CudaViewMut<'_, f32>,
    src: &CudaView<'_, f32>,
    s: &AttnShape,
    heads: usize,
    rep: usize,
) -> Result<()> {
    let st = gpu.stream();
    let p = [dptr_mut(dst, st), dptr(src, st)];
    let dims = [
        i32_of(s.b, "batch")?,
        i32_of(s.t, "tokens")?,
        i32_of(s.hq, "heads")?,
        i32_of(heads, "heads")?,
        i32_of(s.hd, "head dim")?,
        i32_of(rep, "group")?,
    ];
    // SAFETY: the argument list of split_heads_f32; one item per value of `dst`.
    unsafe {
        elementwise(
            gpu,
            K::SPLIT_HEADS_F32,
            s.q_len(),
            &[
                &p[0], &p[1], &dims[0], &dims[1], &dims[2], &dims[3], &dims[4], &dims[5],
            ],
        )
    }
}

/// `[b, hq, t, hd]` → `[b, t, heads·hd]`, summing each group of `rep` query heads
/// (GQA's key/value gradients; `rep` = 1 is the inverse of [`split_heads`]).
///
/// # Safety
/// `src` holds [`AttnShape::q_len`] values and `dst` b·t·heads·hd, with
/// `heads · rep = s.hq`.
pub unsafe fn merge_heads(
    gpu: &Gpu,
    dst: &mut CudaViewMut<'_, f32>,
    src: &CudaView<'_, f32>,
    s: &AttnShape,
    heads: usize,
    rep: usize,
) -> Result<()> {
    let n = s.b * s.t * heads * s.hd;
    let st = gpu.stream();
    let p = [dptr_mut(dst, st), dptr(src, st)];
    let dims = [
        i32_of(s.b, "batch")?,
        i32_of(s.t, "tokens")?,
        i32_of(heads, "heads")?,
        i32_of(s.hd, "head dim")?,
        i32_of(rep, "group")?,
    ];
    // SAFETY: the argument list of merge_heads_f32; one item per value of `dst`.
    unsafe {
        elementwise(
            gpu,
            K::MERGE_HEADS_F32,
            n,
            &[
                &p[0], &p[1], &dims[0], &dims[1], &dims[2], &dims[3], &dims[4],
            ],
        )
    }
}

/// In-place softmax of `rows` rows of `t` scaled scores; a causal row i (of its
/// sequence) keeps entries j ≤ i and zeroes the rest.
///
/// # Safety
/// `p` holds rows·t values.
pub unsafe fn softmax_fwd(
    gpu: &Gpu,
    p: &mut CudaViewMut<'_, f32>,
    rows: usize,
    t: usize,
    causal: bool,
) -> Result<()> {
    let pp = dptr_mut(p, gpu.stream());
    let (t, causal) = (i32_of(t, "tokens")?, causal as i32);
    // SAFETY: the argument list of softmax_fwd_f32; one block per row of `p`.
    unsafe { per_row(gpu, K::SOFTMAX_FWD_F32, rows, &[&pp, &t, &causal]) }
}

/// Softmax backward in place: `dp` (the gradient of the probabilities `p`) becomes
/// `scale · p ⊙ (dp − rowsum(dp ⊙ p))`, the gradient of the unscaled scores.
///
/// # Safety
/// `dp` and `p` hold rows·t values.
pub unsafe fn softmax_bwd(
    gpu: &Gpu,
    dp: &mut CudaViewMut<'_, f32>,
    p: &CudaView<'_, f32>,
    rows: usize,
    t: usize,
    scale: f32,
) -> Result<()> {
    let st = gpu.stream();
    let (dsp, pp) = (dptr_mut(dp, st), dptr(p, st));
    let t = i32_of(t, "tokens")?;
    // SAFETY: the argument list of softmax_bwd_f32; one block per row.
    unsafe { per_row(gpu, K::SOFTMAX_BWD_F32, rows, &[&dsp, &pp, &t, &scale]) }
}
