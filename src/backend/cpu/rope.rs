//! Rotary embeddings on the CPU, rotate-half (HF Llama); the backward is the
//! rotation by the opposite angle. GPU twin: `kernels/rope.cu`.
use super::math::with_simd;
use rayon::prelude::*;

use super::{r, Real};
use crate::backend::RopeShape;
use crate::Result;

pub(super) fn rope<T: Real>(x: &mut [T], s: RopeShape, sign: f64) -> Result<()> {
    let row = s.heads * s.hd;
    if row == 0 {
        return Ok(());
    }
    let half = s.hd / 2;
    let t = s.t.max(1);
    // One angle per (position, pair), shared by every head and every example:
    // computed once per call, not once per row.
    let angles: Vec<(f64, f64)> = (0..t)
        .flat_map(|pos| {
            (0..half).map(move |i| {
                let freq = (s.theta as f64).powf(-2.0 * i as f64 / s.hd as f64);
                (sign * pos as f64 * freq).sin_cos()
            })
        })
        .collect();
    x.par_chunks_mut(row).enumerate().for_each(|(idx, xr)| {
        with_simd(|| {
            let pos = idx % t;
            for (i, &(sin, cos)) in angles[pos * half..][..half].iter().enumerate() {
                for head in xr.chunks_mut(s.hd) {
                    let (x1, x2) = (head[i].to_f64(), head[i + half].to_f64());
                    head[i] = r(x1 * cos - x2 * sin);
                    head[i + half] = r(x2 * cos + x1 * sin);
                }
            }
        })
    });
    Ok(())
}
