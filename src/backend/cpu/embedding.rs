//! Token embedding and the fused weighted softmax cross-entropy on the CPU. Ids and
//! used targets are in range (`backend::check`). GPU twin: `kernels/embedding.cu`.
use rayon::prelude::*;

use super::{r, Real};
use crate::backend::RowShape;
use crate::Result;

pub(super) fn embedding_fwd<T: Real>(
    out: &mut [T],
    table: &[T],
    ids: &[u32],
    s: RowShape,
) -> Result<()> {
    for (row, &id) in ids.iter().enumerate() {
        out[row * s.dim..][..s.dim].copy_from_slice(&table[id as usize * s.dim..][..s.dim]);
    }
    Ok(())
}

pub(super) fn embedding_bwd<T: Real>(
    dtable: &mut [T],
    dout: &[T],
    ids: &[u32],
    s: RowShape,
) -> Result<()> {
    for (row, &id) in ids.iter().enumerate() {
        let dst = &mut dtable[id as usize * s.dim..][..s.dim];
        dst.iter_mut()
            .zip(&dout[row * s.dim..][..s.dim])
            .for_each(|(a, &b)| *a += b);
    }
    Ok(())
}

pub(super) fn cross_entropy<T: Real>(
    losses: &mut [T],
    dlogits: &mut [T],
    logits: &[T],
    targets: &[u32],
    weights: &[T],
    s: RowShape,
) -> Result<()> {
    if s.dim == 0 {
        losses.iter_mut().for_each(|l| *l = T::default());
        return Ok(());
    }
    dlogits
        .par_chunks_mut(s.dim)
        .zip(losses.par_iter_mut())
        .enumerate()
        .for_each(|(row, (dl, loss))| {
            let w = weights[row].to_f64();
            if w == 0.0 {
                dl.iter_mut().for_each(|v| *v = T::default());
                *loss = T::default();
                return;
            }
            let lg = &logits[row * s.dim..][..s.dim];
            let tg = targets[row] as usize;
            let mx = lg.iter().map(|v| v.to_f64()).fold(f64::MIN, f64::max);
            let sum: f64 = lg.iter().map(|v| (v.to_f64() - mx).exp()).sum();
            let lse = mx + sum.ln();
            *loss = r(w * (lse - lg[tg].to_f64()));
            for (j, d) in dl.iter_mut().enumerate() {
                let p = (lg[j].to_f64() - lse).exp();
                *d = r(w * (p - if j == tg { 1.0 } else { 0.0 }));
            }
        });
    Ok(())
}
