//! Activations (`kernels/activations.cu`, CPU twin `src/backend/cpu/activations.rs`):
//! GELU and SwiGLU backwards against finite differences in f64 and known values,
//! then the GPU against the CPU (f32 vs f64 transcendental functions: 2e-6).
mod common;

use common::device::{assert_close, down, up};
use common::fd::{dot, fd_check, rand_vec};
use common::{rng, uniform};
use dualpriv::backend::cpu::{Cpu, Cpu64};
use dualpriv::backend::Backend;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

#[test]
fn gelu_backward() {
    let be = Cpu64;
    let mut r = ChaCha8Rng::seed_from_u64(9);
    let x = rand_vec(&mut r, 40, 4.0);
    let go = rand_vec(&mut r, 40, 1.0);
    let fwd = |inp: &[Vec<f64>]| {
        let mut y = vec![0.0; 40];
        be.gelu_fwd(&mut y, &inp[0]).unwrap();
        y
    };
    let mut dx = vec![0.0; 40];
    be.gelu_bwd(&mut dx, &go, &x).unwrap();
    fd_check("gelu", std::slice::from_ref(&x), &[dx], |inp| {
        dot(&fwd(inp), &go)
    });
    // tanh approximation at known points: gelu(1) = 0.8411920, gelu(-2) = -0.0454023.
    let mut y = vec![0.0; 2];
    be.gelu_fwd(&mut y, &vec![1.0, -2.0]).unwrap();
    assert!((y[0] - 0.841_192_0).abs() < 1e-6 && (y[1] + 0.045_402_3).abs() < 1e-6);
    // quick-GELU value.
    be.quick_gelu_fwd(&mut y, &vec![1.0, -2.0]).unwrap();
    let qg = |x: f64| x / (1.0 + (-1.702 * x).exp());
    assert!((y[0] - qg(1.0)).abs() < 1e-15 && (y[1] - qg(-2.0)).abs() < 1e-15);
}

#[test]
fn swiglu_backward() {
    let be = Cpu64;
    let mut r = ChaCha8Rng::seed_from_u64(10);
    let g = rand_vec(&mut r, 30, 4.0);
    let u = rand_vec(&mut r, 30, 2.0);
    let go = rand_vec(&mut r, 30, 1.0);
    let fwd = |inp: &[Vec<f64>]| {
        let mut y = vec![0.0; 30];
        be.swiglu_fwd(&mut y, &inp[0], &inp[1]).unwrap();
        y
    };
    let (mut dg, mut du) = (vec![0.0; 30], vec![0.0; 30]);
    be.swiglu_bwd(&mut dg, &mut du, &go, &g, &u).unwrap();
    fd_check("swiglu", &[g, u], &[dg, du], |inp| dot(&fwd(inp), &go));
}

// ---------------------------------------------------------------------------
// The GPU against the CPU

fn op_activations<B: Backend>(be: &B, x: &[f32], y: &[f32], dy: &[f32]) -> Vec<Vec<f32>> {
    let (xb, yb, dyb) = (up(be, x), up(be, y), up(be, dy));
    let n = x.len();
    let mut outs = Vec::new();
    let mut o = be.zeros(n).unwrap();
    be.quick_gelu_fwd(&mut o, &xb).unwrap();
    outs.push(down(be, &o));
    be.gelu_fwd(&mut o, &xb).unwrap();
    outs.push(down(be, &o));
    be.gelu_bwd(&mut o, &dyb, &xb).unwrap();
    outs.push(down(be, &o));
    be.swiglu_fwd(&mut o, &xb, &yb).unwrap();
    outs.push(down(be, &o));
    let mut o2 = be.zeros(n).unwrap();
    be.swiglu_bwd(&mut o, &mut o2, &dyb, &xb, &yb).unwrap();
    outs.push(down(be, &o));
    outs.push(down(be, &o2));
    outs
}

fn activations_match_the_cpu<B: Backend>(be: &B) {
    let mut r = rng(4);
    let n = 10_001;
    let x: Vec<f32> = uniform(&mut r, n).iter().map(|v| 8.0 * v).collect();
    let (y, dy) = (uniform(&mut r, n), uniform(&mut r, n));
    assert_close(
        "activations",
        &op_activations(be, &x, &y, &dy),
        &op_activations(&Cpu, &x, &y, &dy),
        2e-6,
    );
}

test_device!(activations_match_the_cpu);
