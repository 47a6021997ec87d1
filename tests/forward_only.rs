//! The forward-only paths (evaluation, DPZO's two forwards) against the training
//! forward: LoRA merged into W' = W + s·B·A on many rows, and the entry from
//! projected visual tokens (DPZO with a frozen projector), give the training
//! forward's losses. One test: it reads the global op profile.
mod common;

use dualpriv::backend::cpu::{Cpu, Cpu64};
use dualpriv::backend::profile;
use dualpriv::backend::Backend;
use dualpriv::data::synthetic::{Dataset, Split};
use dualpriv::data::Batch;
use dualpriv::model::Mllm;

/// The tiny LoRA model with every trainable tensor moved off its init (LoRA B
/// starts at 0, which would hide the adapter).
fn model<B: Backend>(be: &B) -> Mllm<B> {
    let (c, m) = common::tiny_lora_rank(8).build().unwrap();
    let mut model = Mllm::new(be, &c, &m, 1).unwrap();
    let mut r = common::rng(5);
    let ids: Vec<u32> = model.trainable().iter().map(|p| p.id).collect();
    for id in ids {
        let mut v = be.download(model.param(id)).unwrap();
        let u = common::uniform(&mut r, v.len());
        for (x, u) in v.iter_mut().zip(u) {
            *x += 0.05 * u;
        }
        *model.param_mut(id) = be.upload(&v).unwrap();
    }
    model
}

fn batch(n: usize) -> Batch {
    let d = Dataset::generate(Split::Private, n, 7, 32).unwrap();
    let idx: Vec<usize> = (0..n).collect();
    d.collate(&idx, d.max_text_len()).unwrap()
}

fn max_rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(&x, &y)| common::rel(f64::from(x), f64::from(y)))
        .fold(0.0, f64::max)
}

fn matmuls(f: impl FnOnce()) -> u64 {
    profile::start();
    f();
    let t = profile::stop();
    t.iter().find(|o| o.name == "matmul").map_or(0, |o| o.calls)
}

#[test]
fn forward_only_losses_match_the_training_forward() {
    // 16 examples of 31 tokens: 496 rows, enough for every tiny linear to merge;
    // 2 examples (62 rows) keep the factored form.
    let (big, small) = (batch(16), batch(2));
    let m64 = model(&Cpu64);
    let merged = m64.per_example_loss(&Cpu64, &big, None).unwrap();
    let factored = m64
        .forward_backward(&Cpu64, &big, None)
        .unwrap()
        .per_example_loss;
    assert!(
        max_rel(&merged, &factored) < 1e-6,
        "{merged:?} vs {factored:?}"
    );
    let m = model(&Cpu);
    let merged = m.per_example_loss(&Cpu, &big, None).unwrap();
    let factored = m
        .forward_backward(&Cpu, &big, None)
        .unwrap()
        .per_example_loss;
    assert!(
        max_rel(&merged, &factored) < 1e-4,
        "{merged:?} vs {factored:?}"
    );
    // The merged form ran: one product fewer per LoRA linear (2 layers × 7).
    let on_big = matmuls(|| drop(m.per_example_loss(&Cpu, &big, None).unwrap()));
    let on_small = matmuls(|| drop(m.per_example_loss(&Cpu, &small, None).unwrap()));
    assert_eq!(on_small - on_big, 14, "{on_big} vs {on_small} matmuls");
    // From projected visual tokens: the same ops in the same order, bit for bit.
    assert!(!m.projector_trainable());
    let vis = m.projected_features(&Cpu, &big, None).unwrap();
    let from_vis = m
        .per_example_loss_from_projected(&Cpu, &big, None, &vis)
        .unwrap();
    assert_eq!(
        from_vis.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        merged.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
}
