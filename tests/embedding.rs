//! Token embedding and the fused cross-entropy (`kernels/embedding.cu`, CPU twin
//! `src/backend/cpu/embedding.rs`): values by brute force and backwards by finite
//! differences in f64, masked rows, out-of-range ids and targets as shape errors,
//! then the GPU against the CPU (1e-5).
mod common;

use common::device::{assert_close, down, up};
use common::fd::{dot, fd_check, rand_vec};
use common::{rng, uniform};
use dualpriv::backend::cpu::{Cpu, Cpu64};
use dualpriv::backend::{Backend, RowShape};
use dualpriv::Error;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

#[test]
fn cross_entropy_with_mask() {
    let be = Cpu64;
    let mut r = ChaCha8Rng::seed_from_u64(11);
    let s = RowShape { rows: 5, dim: 7 };
    let logits = rand_vec(&mut r, 35, 3.0);
    // Row 1 and 3 masked; masked rows may hold out-of-range targets.
    let targets = be.upload_ids(&[3u32, 99, 0, 99, 6]).unwrap();
    let weights = vec![0.5, 0.0, 1.0, 0.0, 0.25];
    let fwd = |inp: &[Vec<f64>]| {
        let (mut l, mut d) = (vec![0.0; 5], vec![0.0; 35]);
        be.cross_entropy(&mut l, &mut d, &inp[0], &targets, &weights, s)
            .unwrap();
        (l, d)
    };
    let (l, d) = fwd(std::slice::from_ref(&logits));
    // Brute-force value.
    for row in 0..5 {
        let lr = &logits[row * 7..][..7];
        let want = if weights[row] == 0.0 {
            0.0
        } else {
            let z: f64 = lr.iter().map(|v| v.exp()).sum();
            weights[row] * (z.ln() - lr[targets[row] as usize])
        };
        assert!((l[row] - want).abs() < 1e-12);
    }
    assert!(d[7..14].iter().all(|&v| v == 0.0));
    fd_check("cross_entropy", &[logits], &[d], |inp| {
        fwd(inp).0.iter().sum()
    });
    // A used target out of range is an error.
    let (mut l2, mut d2) = (vec![0.0; 5], vec![0.0; 35]);
    let bad = be.upload_ids(&[3u32, 7, 0, 0, 0]).unwrap();
    let w2 = vec![1.0; 5];
    assert!(be
        .cross_entropy(&mut l2, &mut d2, &vec![0.0; 35], &bad, &w2, s)
        .is_err());
}

#[test]
fn embedding_forward_backward() {
    let be = Cpu64;
    let mut r = ChaCha8Rng::seed_from_u64(12);
    let (vocab, dim) = (6, 4);
    let ids = be.upload_ids(&[1u32, 5, 1, 0]).unwrap();
    let s = RowShape { rows: 4, dim };
    let table = rand_vec(&mut r, vocab * dim, 1.0);
    let go = rand_vec(&mut r, 16, 1.0);
    let fwd = |inp: &[Vec<f64>]| {
        let mut y = vec![0.0; 16];
        be.embedding_fwd(&mut y, &inp[0], &ids, s, vocab).unwrap();
        y
    };
    let mut dt = vec![0.0; vocab * dim];
    be.embedding_bwd(&mut dt, &go, &ids, s, vocab).unwrap();
    fd_check("embedding", std::slice::from_ref(&table), &[dt], |inp| {
        dot(&fwd(inp), &go)
    });
    let mut y = vec![0.0; 16];
    assert!(be
        .embedding_fwd(
            &mut y,
            &table,
            &be.upload_ids(&[1, 6, 0, 0]).unwrap(),
            s,
            vocab
        )
        .is_err());
}

// ---------------------------------------------------------------------------
// The GPU against the CPU

fn op_embedding_loss<B: Backend>(
    be: &B,
    table: &[f32],
    ids: &[u32],
    logits: &[f32],
    weights: &[f32],
    dim: usize,
    vocab: usize,
) -> Vec<Vec<f32>> {
    let rows = ids.len();
    let s = RowShape { rows, dim };
    let (tb, idb) = (up(be, table), be.upload_ids(ids).unwrap());
    let mut out = be.zeros(rows * dim).unwrap();
    be.embedding_fwd(&mut out, &tb, &idb, s, vocab).unwrap();
    let mut dt = up(be, table);
    be.embedding_bwd(&mut dt, &out, &idb, s, vocab).unwrap();
    let (lb, wb) = (up(be, logits), up(be, weights));
    let mut losses = be.zeros(rows).unwrap();
    let mut dl = be.zeros(rows * vocab).unwrap();
    be.cross_entropy(
        &mut losses,
        &mut dl,
        &lb,
        &idb,
        &wb,
        RowShape { rows, dim: vocab },
    )
    .unwrap();
    [out, dt, losses, dl].iter().map(|b| down(be, b)).collect()
}

fn embedding_and_loss_match_the_cpu<B: Backend>(be: &B) {
    let mut r = rng(5);
    let (vocab, dim, rows) = (1000, 48, 37);
    let table = uniform(&mut r, vocab * dim);
    // Repeated ids exercise the atomic accumulation of the embedding backward.
    let ids: Vec<u32> = (0..rows as u32).map(|i| (i * 7919) % 50).collect();
    let logits: Vec<f32> = uniform(&mut r, rows * vocab)
        .iter()
        .map(|v| 10.0 * v)
        .collect();
    let weights: Vec<f32> = (0..rows)
        .map(|i| if i % 3 == 0 { 0.0 } else { 0.5 })
        .collect();
    assert_close(
        "embedding + cross-entropy",
        &op_embedding_loss(be, &table, &ids, &logits, &weights, dim, vocab),
        &op_embedding_loss(&Cpu, &table, &ids, &logits, &weights, dim, vocab),
        1e-5,
    );
    // Out-of-range ids are shape errors on both backends, not device faults.
    let bad = be.upload_ids(&[vocab as u32]).unwrap();
    let mut out = be.zeros(dim).unwrap();
    let t = be.upload(&table).unwrap();
    let e = be.embedding_fwd(&mut out, &t, &bad, RowShape { rows: 1, dim }, vocab);
    assert!(matches!(e, Err(Error::Shape(_))), "{e:?}");
}

test_device!(embedding_and_loss_match_the_cpu);
