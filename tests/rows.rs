//! The DP-SGD helpers for materialised per-example gradients (`kernels/rows.cu`, CPU
//! twin `src/backend/cpu/rows.rs`), through [`DpBackend`]: every example's bias
//! gradient, the rows' squared norms with their rounding bounds, and the weighted row
//! sum that skips factor-0 rows. By hand on the CPU, then the GPU against the CPU
//! (sums over tokens in the same f32 order: exact; norms in f64: 1e-12; the weighted
//! sum, a strict-FP32 GEMM against the CPU's f64 sum: 1e-5). The whole DP-SGD path is
//! tested in `tests/clip.rs`.
mod common;

use common::device::{assert_close, down, up};
use common::{rng, uniform};
use dualpriv::backend::cpu::Cpu;
use dualpriv::backend::dp::DpBackend;
use dualpriv::dp::clip::{row_gamma, LinearShape};
use dualpriv::Error;

#[test]
fn per_example_rows_by_hand() {
    let be = Cpu;
    let s = LinearShape {
        b: 3,
        t: 4,
        d: 2,
        p: 5,
    };
    let g = dualpriv::backend::cpu::pool::HostBuf::from(uniform(&mut rng(21), s.b * s.t * s.p));
    let bg = be.per_example_bias_grads(&g, s).unwrap();
    for i in 0..s.b {
        for j in 0..s.p {
            let want: f32 = (0..s.t).map(|t| g[(i * s.t + t) * s.p + j]).sum();
            assert_eq!(bg[i * s.p + j], want, "bias gradient {i},{j}");
        }
    }
    // Squared norms and bounds, added to what the accumulator holds; the bound's γ
    // uses the larger of the rows and the public cap.
    let mut norms = be.norms_zeros(s.b, 8).unwrap();
    norms.sq[1] = 2.0;
    be.add_row_sq_norms(&bg, s.b, &mut norms).unwrap();
    // The CPU sums a row in eight partial sums, not left to right: the same value
    // to f64 rounding (γ_{p+2}, which the bound's γ includes).
    let gamma = row_gamma(8, s.p);
    for (i, row) in bg.chunks(s.p).enumerate() {
        let sq: f64 = row.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        let before = if i == 1 { 2.0 } else { 0.0 };
        assert!((norms.sq[i] - (before + sq)).abs() <= 1e-15 * (before + sq));
        assert!((norms.bound[i] - gamma * sq.sqrt()).abs() <= 1e-15 * gamma * sq.sqrt());
    }
    // A factor-0 row is absent even when it holds NaN; accumulate adds to `out`.
    let mut rows = bg.clone();
    rows[s.p] = f32::NAN;
    let factors = dualpriv::backend::cpu::pool::HostBuf::from(vec![0.5f32, 0.0, 2.0]);
    let mut out = dualpriv::backend::cpu::pool::HostBuf::from(vec![1.0f32; s.p]);
    be.weighted_row_sum(&rows, &factors, s.b, &mut out, true)
        .unwrap();
    for j in 0..s.p {
        let want = 1.0 + 0.5 * f64::from(bg[j]) + 2.0 * f64::from(bg[2 * s.p + j]);
        assert_eq!(out[j], want as f32, "weighted sum {j}");
    }
    // Shapes that disagree are errors.
    let e = be.add_row_sq_norms(&bg, 2, &mut norms);
    assert!(matches!(e, Err(Error::Shape(_))), "{e:?}");
    let e = be.weighted_row_sum(
        &rows,
        &dualpriv::backend::cpu::pool::HostBuf::from(factors[..2].to_vec()),
        s.b,
        &mut out,
        false,
    );
    assert!(matches!(e, Err(Error::Shape(_))), "{e:?}");
    let e = be.per_example_bias_grads(
        &dualpriv::backend::cpu::pool::HostBuf::from(g[1..].to_vec()),
        s,
    );
    assert!(matches!(e, Err(Error::Shape(_))), "{e:?}");
}

/// Weighted sums of rows wider than one job and than one pass of a job (the CPU
/// splits columns by thread count, then into passes of 1024), and squared norms of
/// rows of any length, against the plain loops: sums bit for bit (each column in
/// row order, in f64), norms to f64 rounding (γ_cols, positive terms).
#[test]
fn wide_rows_match_the_plain_loops() {
    let be = Cpu;
    let mut r = rng(23);
    for (rows, cols) in [(3, 1), (4, 17), (9, 1000), (5, 10_000), (2, 300_001)] {
        let v = uniform(&mut r, rows * cols);
        let factors: Vec<f32> = (0..rows)
            .map(|i| if i == 1 { 0.0 } else { 0.5 + i as f32 })
            .collect();
        let mut out = dualpriv::backend::cpu::pool::HostBuf::from(vec![0.25f32; cols]);
        let (vb, fb) = (
            dualpriv::backend::cpu::pool::HostBuf::from(v.clone()),
            dualpriv::backend::cpu::pool::HostBuf::from(factors.clone()),
        );
        // Accumulating into 0.25, then overwriting what that left (as a step does).
        for (accumulate, start) in [(true, 0.25f64), (false, 0.0)] {
            be.weighted_row_sum(&vb, &fb, rows, &mut out, accumulate)
                .unwrap();
            for j in 0..cols {
                let mut acc = start;
                for (i, &f) in factors.iter().enumerate().filter(|(_, &f)| f != 0.0) {
                    acc += f64::from(f) * f64::from(v[i * cols + j]);
                }
                assert_eq!(
                    out[j], acc as f32,
                    "{rows}x{cols} ({accumulate}): column {j}"
                );
            }
        }
        let mut norms = be.norms_zeros(rows, rows).unwrap();
        be.add_row_sq_norms(&vb, rows, &mut norms).unwrap();
        for (i, row) in v.chunks(cols).enumerate() {
            let sq: f64 = row.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
            // Both orders are within γ_cols = cols·u of the exact sum (positive terms).
            assert!(
                (norms.sq[i] - sq).abs() <= (cols + 2) as f64 * f64::EPSILON * sq,
                "{rows}x{cols}: row {i}: {} vs {sq}",
                norms.sq[i]
            );
        }
    }
}

/// Bias gradients and weighted sums (with and without zero factors) as f32 outputs,
/// and the squared norms and bounds in f64.
fn op_rows<B: DpBackend>(be: &B, g: &[f32], s: LinearShape) -> (Vec<Vec<f32>>, Vec<f64>) {
    let gb = up(be, g);
    let bg = be.per_example_bias_grads(&gb, s).unwrap();
    let mut norms = be.norms_zeros(s.b, s.b).unwrap();
    be.add_row_sq_norms(&bg, s.b, &mut norms).unwrap();
    let totals = be.norms_download(&norms).unwrap();
    let mut outs = vec![down(be, &bg)];
    for factors in [
        vec![0.25f32; s.b],
        (0..s.b).map(|i| (i % 3) as f32).collect(),
    ] {
        let f = up(be, &factors);
        let mut out = up(be, &vec![1.0; s.p]);
        be.weighted_row_sum(&bg, &f, s.b, &mut out, true).unwrap();
        outs.push(down(be, &out));
    }
    (
        outs,
        [totals.sq.as_slice(), totals.bound.as_slice()].concat(),
    )
}

fn rows_match_the_cpu<B: DpBackend>(be: &B) {
    let mut r = rng(22);
    for (b, t, p) in [(1, 1, 1), (5, 7, 33), (17, 3, 1000)] {
        let s = LinearShape { b, t, d: 1, p };
        let g = uniform(&mut r, b * t * p);
        let (got, got_norms) = op_rows(be, &g, s);
        let (want, want_norms) = op_rows(&Cpu, &g, s);
        assert_eq!(got[0], want[0], "sum over tokens {b}x{t}x{p}");
        assert_close(
            &format!("weighted row sums {b}x{t}x{p}"),
            &got[1..],
            &want[1..],
            1e-5,
        );
        for (x, y) in got_norms.iter().zip(&want_norms) {
            assert!(
                (x - y).abs() <= 1e-12 * y.abs(),
                "norms {b}x{t}x{p}: {x} vs {y}"
            );
        }
    }
}

test_device!(rows_match_the_cpu);
