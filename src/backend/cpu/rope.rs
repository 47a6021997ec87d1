//! Rotary embeddings on the CPU, rotate-half (HF Llama); the backward is the
//! rotation by the opposite angle. GPU twin: `kernels/rope.cu`.
use std::sync::{Arc, Mutex};

use super::math::simd_fn;
use rayon::prelude::*;

use super::{r, Real};
use crate::backend::RopeShape;
use crate::Result;

/// A (sin, cos) table of positions 0.. for one (head dimension, θ, sign). Angle
/// (pos, i) does not depend on the sequence length, so a table serves every call
/// with as many positions or fewer: the methods of one process (dualpriv prunes
/// visual tokens, so its sequences are shorter) share it, and a
/// step recomputes nothing and allocates nothing. It is shared (`Arc`) so the lock
/// is held only to look it up, not during the rotation (a rotation inside a rayon
/// job could otherwise wait on a lock its own thread holds).
struct Angles {
    key: (usize, u32, u64),
    table: Arc<Vec<(f64, f64)>>,
}

/// Tables kept: one per (head dimension, θ, direction) a process uses, up to this
/// many (the vision tower has no RoPE; a Llama needs a forward and a backward one).
const ANGLES_KEEP: usize = 8;

/// The kept tables, the forward rotation's and the backward's (opposite sign).
static ANGLES: Mutex<Vec<Angles>> = Mutex::new(Vec::new());

pub(super) fn rope<T: Real>(x: &mut [T], s: RopeShape, sign: f64) -> Result<()> {
    let row = s.heads * s.hd;
    if row == 0 {
        return Ok(());
    }
    let half = s.hd / 2;
    let t = s.t.max(1);
    // One angle per (position, pair), shared by every head and every example:
    // computed once per shape, not once per row. (A poisoned lock holds at worst
    // a table too short or of another key, which the checks below replace.)
    let key = (s.hd, s.theta.to_bits(), sign.to_bits());
    let table = {
        let mut cache = ANGLES.lock().unwrap_or_else(|e| e.into_inner());
        let at = cache.iter().position(|a| a.key == key);
        match at {
            Some(i) if cache[i].table.len() >= t * half => Arc::clone(&cache[i].table),
            _ => {
                let tb: Arc<Vec<(f64, f64)>> = Arc::new(
                    (0..t)
                        .flat_map(|pos| {
                            (0..half).map(move |i| {
                                let freq = (s.theta as f64).powf(-2.0 * i as f64 / s.hd as f64);
                                (sign * pos as f64 * freq).sin_cos()
                            })
                        })
                        .collect(),
                );
                let entry = Angles {
                    key,
                    table: Arc::clone(&tb),
                };
                match at {
                    Some(i) => cache[i] = entry,
                    None => {
                        if cache.len() == ANGLES_KEEP {
                            cache.remove(0);
                        }
                        cache.push(entry);
                    }
                }
                tb
            }
        }
    };
    let angles = &table[..];
    x.par_chunks_mut(row).enumerate().for_each(|(idx, xr)| {
        let pos = idx % t;
        rope_row(xr, &angles[pos * half..][..half], s.hd);
    });
    Ok(())
}

simd_fn! {
    fn rope_row<T: Real>(xr: &mut [T], angles: &[(f64, f64)], hd: usize) {
        let half = angles.len();
        for head in xr.chunks_mut(hd) {
            let (h1, h2) = head.split_at_mut(half);
            for ((a, b), &(sin, cos)) in h1.iter_mut().zip(h2.iter_mut()).zip(angles) {
                let (x1, x2) = (a.to_f64(), b.to_f64());
                *a = r(x1 * cos - x2 * sin);
                *b = r(x2 * cos + x1 * sin);
            }
        }
    }
}
