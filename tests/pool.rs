//! The CPU backend's buffer pool (`src/backend/cpu/pool.rs`): a reused buffer from
//! `zeros` is cleared, an `output` buffer may hold stale values, and every op the
//! model hands an `output` buffer overwrites all of it (run here on buffers full
//! of NaN, so a value it skipped would survive as NaN).
mod common;

use common::{rng, uniform};
use dualpriv::backend::cpu::pool::HostBuf;
use dualpriv::backend::cpu::Cpu;
use dualpriv::backend::{AttnShape, Backend, MatmulSpec, RowShape};

/// A buffer of `n` NaNs.
fn nan(n: usize) -> HostBuf<f32> {
    HostBuf::from(vec![f32::NAN; n])
}

fn all_finite(name: &str, v: &[f32]) {
    let bad = v.iter().filter(|x| !x.is_finite()).count();
    assert_eq!(bad, 0, "{name}: {bad} of {} values not written", v.len());
}

#[test]
fn zeros_clears_a_reused_buffer_and_output_need_not() {
    // Sizes no other test uses, so the pool's free list for them is this test's.
    let n = 12_345;
    let mut b = Cpu.output(n).unwrap();
    b.iter_mut().for_each(|v| *v = 7.0);
    drop(b);
    let z = Cpu.zeros(n).unwrap();
    assert!(z.iter().all(|&v| v == 0.0), "zeros handed out stale values");
    drop(z);
    // `output` hands the freed buffer back as it was (the saving it exists for).
    let mut b = Cpu.output(n + 1).unwrap();
    b.iter_mut().for_each(|v| *v = 7.0);
    drop(b);
    let o = Cpu.output(n + 1).unwrap();
    assert!(
        o.iter().all(|&v| v == 7.0),
        "output did not reuse the free buffer"
    );
}

#[test]
fn ops_given_output_buffers_write_every_value() {
    let be = Cpu;
    let mut r = rng(5);
    let up = |r: &mut _, n| be.upload(&uniform(r, n)).unwrap();
    // GEMM with beta = 0, as Linear's forward and backward call it.
    let (m, n, k) = (13, 7, 5);
    let (a, w) = (up(&mut r, m * k), up(&mut r, n * k));
    let mut y = nan(m * n);
    be.matmul(&mut y, &a, &w, MatmulSpec::nt(m, n, k)).unwrap();
    all_finite("matmul nt", &y);
    let wt = up(&mut r, k * n);
    let mut y = nan(m * n);
    be.matmul(&mut y, &a, &wt, MatmulSpec::nn(m, n, k)).unwrap();
    all_finite("matmul nn", &y);
    // RMSNorm forward: output and 1/rms.
    let s = RowShape { rows: 6, dim: 8 };
    let (x, g) = (up(&mut r, 48), up(&mut r, 8));
    let (mut out, mut rstd) = (nan(48), nan(6));
    be.rmsnorm_fwd(&mut out, &mut rstd, &x, &g, s, 1e-5)
        .unwrap();
    all_finite("rmsnorm out", &out);
    all_finite("rmsnorm rstd", &rstd);
    // Attention forward, causal (the masked tail of each row must be written too)
    // and not, with grouped heads.
    for causal in [true, false] {
        let s = AttnShape {
            b: 2,
            t: 5,
            hq: 4,
            hkv: 2,
            hd: 3,
            causal,
        };
        let (q, kk, v) = (
            up(&mut r, s.q_len()),
            up(&mut r, s.kv_len()),
            up(&mut r, s.kv_len()),
        );
        let (mut o, mut p) = (nan(s.q_len()), nan(s.probs_len()));
        be.attention_fwd(&mut o, &mut p, &q, &kk, &v, s).unwrap();
        all_finite("attention out", &o);
        all_finite("attention probs", &p);
    }
    // SwiGLU forward and backward.
    let (gate, upv, dout) = (up(&mut r, 40), up(&mut r, 40), up(&mut r, 40));
    let mut act = nan(40);
    be.swiglu_fwd(&mut act, &gate, &upv).unwrap();
    all_finite("swiglu", &act);
    let (mut dg, mut du) = (nan(40), nan(40));
    be.swiglu_bwd(&mut dg, &mut du, &dout, &gate, &upv).unwrap();
    all_finite("swiglu dgate", &dg);
    all_finite("swiglu dup", &du);
}
