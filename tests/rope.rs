//! Rotary embeddings (`kernels/rope.cu`, CPU twin `src/backend/cpu/rope.rs`): the
//! backward against finite differences in f64 and the rotate-half convention by
//! hand, then the GPU against the CPU (f64 angles on both: 1e-5).
mod common;

use common::device::{assert_close, down, up};
use common::fd::{dot, fd_check, rand_vec};
use common::{rng, uniform};
use dualpriv::backend::cpu::{Cpu, Cpu64};
use dualpriv::backend::{Backend, RopeShape};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

#[test]
fn rope_backward_and_convention() {
    let be = Cpu64;
    let mut r = ChaCha8Rng::seed_from_u64(4);
    let s = RopeShape {
        b: 2,
        t: 5,
        heads: 3,
        hd: 8,
        theta: 10000.0,
    };
    let n = 2 * 5 * 3 * 8;
    let x = rand_vec(&mut r, n, 1.0);
    let go = rand_vec(&mut r, n, 1.0);
    let fwd = |inp: &[Vec<f64>]| {
        let mut y = inp[0].clone();
        be.rope_fwd(&mut y, s).unwrap();
        y
    };
    let mut dx = go.clone();
    be.rope_bwd(&mut dx, s).unwrap();
    fd_check("rope", std::slice::from_ref(&x), &[dx], |inp| {
        dot(&fwd(inp), &go)
    });
    // Rotate-half convention, checked by hand at one coordinate: example 1, position
    // 3, head 2, pair i = 1 of hd = 8 (x1 at 1, x2 at 5).
    let y = fwd(std::slice::from_ref(&x));
    let base = ((5 + 3) * 3 + 2) * 8;
    let a = 3.0 * 10000f64.powf(-2.0 / 8.0);
    let (x1, x2) = (x[base + 1], x[base + 5]);
    assert!((y[base + 1] - (x1 * a.cos() - x2 * a.sin())).abs() < 1e-14);
    assert!((y[base + 5] - (x2 * a.cos() + x1 * a.sin())).abs() < 1e-14);
    // Position 0 is the identity.
    assert_eq!(&y[..24], &x[..24]);
}

/// The CPU keeps one angle table per (head dimension, θ) and direction, grown to
/// the longest sequence seen and read as a prefix by shorter ones (the methods of
/// one process differ in length). Every rotation, through lengths that shrink and
/// grow and a θ in between, equals the by-hand one bit for bit.
#[test]
fn rope_tables_serve_any_length_and_theta() {
    let be = Cpu64;
    let mut r = ChaCha8Rng::seed_from_u64(5);
    let (b, heads, hd) = (2, 2, 8);
    for (t, theta) in [(9, 1e4), (5, 1e4), (12, 5e5), (3, 1e4), (12, 1e4), (7, 5e5)] {
        let s = RopeShape {
            b,
            t,
            heads,
            hd,
            theta,
        };
        let x = rand_vec(&mut r, b * t * heads * hd, 1.0);
        for sign in [1.0f64, -1.0] {
            let mut y = x.clone();
            if sign > 0.0 {
                be.rope_fwd(&mut y, s).unwrap();
            } else {
                be.rope_bwd(&mut y, s).unwrap();
            }
            for (row, (xr, yr)) in x.chunks(heads * hd).zip(y.chunks(heads * hd)).enumerate() {
                let pos = row % t;
                for h in 0..heads {
                    for i in 0..hd / 2 {
                        let freq = (theta as f64).powf(-2.0 * i as f64 / hd as f64);
                        let (sin, cos) = (sign * pos as f64 * freq).sin_cos();
                        let (j1, j2) = (h * hd + i, h * hd + i + hd / 2);
                        let (x1, x2) = (xr[j1], xr[j2]);
                        assert_eq!(yr[j1], x1 * cos - x2 * sin, "t {t} θ {theta} sign {sign}");
                        assert_eq!(yr[j2], x2 * cos + x1 * sin, "t {t} θ {theta} sign {sign}");
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The GPU against the CPU

fn op_rope<B: Backend>(be: &B, x: &[f32], s: RopeShape) -> Vec<Vec<f32>> {
    let mut a = up(be, x);
    be.rope_fwd(&mut a, s).unwrap();
    let fwd = down(be, &a);
    be.rope_bwd(&mut a, s).unwrap();
    vec![fwd, down(be, &a)]
}

fn rope_matches_the_cpu<B: Backend>(be: &B) {
    let mut r = rng(2);
    for (b, t, heads, hd) in [(1, 1, 1, 2), (2, 77, 4, 32), (1, 700, 2, 128)] {
        let s = RopeShape {
            b,
            t,
            heads,
            hd,
            theta: 10000.0,
        };
        let x = uniform(&mut r, b * t * heads * hd);
        assert_close(
            &format!("rope {b}x{t}x{heads}x{hd}"),
            &op_rope(be, &x, s),
            &op_rope(&Cpu, &x, s),
            1e-5,
        );
    }
}

test_device!(rope_matches_the_cpu);
