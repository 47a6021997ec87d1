//! LayerNorm and RMSNorm (`kernels/norms.cu`, CPU twin `src/backend/cpu/norms.rs`):
//! each backward against finite differences of its forward in f64, then the GPU
//! against the CPU (row reductions in f32 vs f64: 1e-5 of the output's scale).
mod common;

use common::device::{assert_close, down, up};
use common::fd::{dot, fd_check, rand_vec};
use common::{rng, uniform};
use dualpriv::backend::cpu::{Cpu, Cpu64};
use dualpriv::backend::{Backend, RowShape};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Shapes of the finite-difference checks: fewer rows than the backward's 8 row
/// blocks, and a count that does not divide into them.
const FD_SHAPES: [(usize, usize); 2] = [(3, 7), (37, 5)];

#[test]
fn layernorm_backward() {
    let be = Cpu64;
    let mut r = ChaCha8Rng::seed_from_u64(2);
    for (rows, dim) in FD_SHAPES {
        let s = RowShape { rows, dim };
        let n = rows * dim;
        let eps = 1e-5;
        let x = rand_vec(&mut r, n, 2.0);
        let w = rand_vec(&mut r, dim, 1.5);
        let b = rand_vec(&mut r, dim, 1.0);
        let go = rand_vec(&mut r, n, 1.0);
        let fwd = |inp: &[Vec<f64>]| {
            let mut out = vec![0.0; n];
            let (mut m, mut rs) = (vec![0.0; rows], vec![0.0; rows]);
            be.layernorm_fwd(&mut out, &mut m, &mut rs, &inp[0], &inp[1], &inp[2], s, eps)
                .unwrap();
            (out, m, rs)
        };
        let (_, m, rs) = fwd(&[x.clone(), w.clone(), b.clone()]);
        // dw and db accumulate: start them at 1 and take the 1 back off.
        let (mut dx, mut dw, mut db) = (vec![0.0; n], vec![1.0; dim], vec![1.0; dim]);
        be.layernorm_bwd(&mut dx, &mut dw, &mut db, &go, &x, &w, &m, &rs, s)
            .unwrap();
        dw.iter_mut().chain(db.iter_mut()).for_each(|v| *v -= 1.0);
        fd_check(
            &format!("layernorm {rows}x{dim}"),
            &[x, w, b],
            &[dx, dw, db],
            |inp| dot(&fwd(inp).0, &go),
        );
    }
}

#[test]
fn rmsnorm_backward() {
    let be = Cpu64;
    let mut r = ChaCha8Rng::seed_from_u64(3);
    for (rows, dim) in FD_SHAPES {
        let s = RowShape { rows, dim };
        let n = rows * dim;
        let x = rand_vec(&mut r, n, 2.0);
        let w = rand_vec(&mut r, dim, 1.5);
        let go = rand_vec(&mut r, n, 1.0);
        let fwd = |inp: &[Vec<f64>]| {
            let (mut out, mut rs) = (vec![0.0; n], vec![0.0; rows]);
            be.rmsnorm_fwd(&mut out, &mut rs, &inp[0], &inp[1], s, 1e-5)
                .unwrap();
            (out, rs)
        };
        let (_, rs) = fwd(&[x.clone(), w.clone()]);
        let (mut dx, mut dw) = (vec![0.0; n], vec![1.0; dim]);
        be.rmsnorm_bwd(&mut dx, &mut dw, &go, &x, &w, &rs, s)
            .unwrap();
        dw.iter_mut().for_each(|v| *v -= 1.0);
        fd_check(
            &format!("rmsnorm {rows}x{dim}"),
            &[x, w],
            &[dx, dw],
            |inp| dot(&fwd(inp).0, &go),
        );
    }
}

// ---------------------------------------------------------------------------
// The GPU against the CPU

fn op_layernorm<B: Backend>(
    be: &B,
    x: &[f32],
    w: &[f32],
    bias: &[f32],
    dy: &[f32],
    s: RowShape,
) -> Vec<Vec<f32>> {
    let (xb, wb, bb, dyb) = (up(be, x), up(be, w), up(be, bias), up(be, dy));
    let mut out = be.zeros(x.len()).unwrap();
    let (mut mean, mut rstd) = (be.zeros(s.rows).unwrap(), be.zeros(s.rows).unwrap());
    be.layernorm_fwd(&mut out, &mut mean, &mut rstd, &xb, &wb, &bb, s, 1e-5)
        .unwrap();
    let mut dx = be.zeros(x.len()).unwrap();
    // dw, db accumulate: start from non-zero values to check that.
    let (mut dw, mut db) = (up(be, w), up(be, bias));
    be.layernorm_bwd(&mut dx, &mut dw, &mut db, &dyb, &xb, &wb, &mean, &rstd, s)
        .unwrap();
    [out, mean, rstd, dx, dw, db]
        .iter()
        .map(|b| down(be, b))
        .collect()
}

fn op_rmsnorm<B: Backend>(be: &B, x: &[f32], w: &[f32], dy: &[f32], s: RowShape) -> Vec<Vec<f32>> {
    let (xb, wb, dyb) = (up(be, x), up(be, w), up(be, dy));
    let mut out = be.zeros(x.len()).unwrap();
    let mut rstd = be.zeros(s.rows).unwrap();
    be.rmsnorm_fwd(&mut out, &mut rstd, &xb, &wb, s, 1e-5)
        .unwrap();
    let mut dx = be.zeros(x.len()).unwrap();
    let mut dw = up(be, w);
    be.rmsnorm_bwd(&mut dx, &mut dw, &dyb, &xb, &wb, &rstd, s)
        .unwrap();
    [out, rstd, dx, dw].iter().map(|b| down(be, b)).collect()
}

fn norms_match_the_cpu<B: Backend>(be: &B) {
    let mut r = rng(1);
    for (rows, dim) in [(1, 1), (1, 2), (7, 64), (33, 1000), (5, 4096)] {
        let s = RowShape { rows, dim };
        let x: Vec<f32> = uniform(&mut r, rows * dim)
            .iter()
            .map(|v| 3.0 * v + 0.5)
            .collect();
        let (w, b, dy) = (
            uniform(&mut r, dim),
            uniform(&mut r, dim),
            uniform(&mut r, rows * dim),
        );
        assert_close(
            &format!("layernorm {rows}x{dim}"),
            &op_layernorm(be, &x, &w, &b, &dy, s),
            &op_layernorm(&Cpu, &x, &w, &b, &dy, s),
            1e-5,
        );
        // At dim 1, RMSNorm's dx = inv·(go·w − x̂·mean(go·w·x̂)) cancels to ~eps/x²
        // (x̂² ≈ 1): f32 keeps ~1e-8 of the terms, which is large relative to that tiny
        // result (the CPU subtracts in f64). A CPU emulation of the kernel measured it.
        if dim > 1 {
            assert_close(
                &format!("rmsnorm {rows}x{dim}"),
                &op_rmsnorm(be, &x, &w, &dy, s),
                &op_rmsnorm(&Cpu, &x, &w, &dy, s),
                1e-5,
            );
        }
    }
}

test_device!(norms_match_the_cpu);
