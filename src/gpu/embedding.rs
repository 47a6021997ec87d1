//! Launchers for `kernels/embedding.cu`: the token embedding and its accumulating
//! backward, and the fused softmax cross-entropy. CPU twin:
//! `src/backend/cpu/embedding.rs`. The ids and the used targets must be in range
//! (the backend checks them on the host).
use cudarc::driver::{CudaView, CudaViewMut};

use super::grid::{elementwise, i32_of, i64_of, per_row};
use super::kernels::embedding as K;
use super::{cuda_err, dptr, dptr_mut, Gpu, Kernel};
use crate::backend::RowShape;
use crate::Result;

/// `(written, read, ids, rows, dim)` over rows × dim items.
///
/// # Safety
/// As [`embedding_fwd`].
unsafe fn launch_rows(
    gpu: &Gpu,
    k: Kernel,
    written: u64,
    read: u64,
    ids: u64,
    s: RowShape,
) -> Result<()> {
    let dim = i32_of(s.dim, "embedding dim")?;
    // SAFETY: the argument list of both embedding kernels; lengths from the caller.
    unsafe {
        elementwise(
            gpu,
            k,
            s.rows * s.dim,
            &[&written, &read, &ids, &i64_of(s.rows), &dim],
        )
    }
}

/// `out[r] = table[ids[r]]`.
///
/// # Safety
/// The lengths and ids pass [`crate::backend::check::embedding`].
pub unsafe fn embedding_fwd(
    gpu: &Gpu,
    out: &mut CudaViewMut<'_, f32>,
    table: &CudaView<'_, f32>,
    ids: &CudaView<'_, u32>,
    s: RowShape,
) -> Result<()> {
    let st = gpu.stream();
    let (o, t, i) = (dptr_mut(out, st), dptr(table, st), dptr(ids, st));
    // SAFETY: forwarded to the caller.
    unsafe { launch_rows(gpu, K::EMBEDDING_FWD_F32, o, t, i, s) }
}

/// `dtable[ids[r]] += dout[r]`.
///
/// # Safety
/// The lengths and ids pass [`crate::backend::check::embedding`].
pub unsafe fn embedding_bwd(
    gpu: &Gpu,
    dtable: &mut CudaViewMut<'_, f32>,
    dout: &CudaView<'_, f32>,
    ids: &CudaView<'_, u32>,
    s: RowShape,
) -> Result<()> {
    let st = gpu.stream();
    let (t, o, i) = (dptr_mut(dtable, st), dptr(dout, st), dptr(ids, st));
    // SAFETY: forwarded to the caller.
    unsafe { launch_rows(gpu, K::EMBEDDING_BWD_F32, t, o, i, s) }
}

/// Weighted softmax cross-entropy over `s.rows × s.dim` logits, see
/// [`crate::backend::Backend::cross_entropy`].
///
/// # Safety
/// The lengths and the used targets pass [`crate::backend::check::cross_entropy`].
pub unsafe fn cross_entropy(
    gpu: &Gpu,
    losses: &mut CudaViewMut<'_, f32>,
    dlogits: &mut CudaViewMut<'_, f32>,
    logits: &CudaView<'_, f32>,
    targets: &CudaView<'_, u32>,
    weights: &CudaView<'_, f32>,
    s: RowShape,
) -> Result<()> {
    let st = gpu.stream();
    if s.dim == 0 {
        return st.memset_zeros(losses).map_err(cuda_err("cuMemsetD8"));
    }
    let p = [
        dptr_mut(losses, st),
        dptr_mut(dlogits, st),
        dptr(logits, st),
        dptr(targets, st),
        dptr(weights, st),
    ];
    let vocab = i32_of(s.dim, "vocabulary")?;
    // SAFETY: the argument list of cross_entropy_f32; one block per row.
    unsafe {
        per_row(
            gpu,
            K::CROSS_ENTROPY_F32,
            s.rows,
            &[&p[0], &p[1], &p[2], &p[3], &p[4], &vocab],
        )
    }
}
