//! The training driver on the tiny model: the methods agree where the math says
//! they must, every method learns, pruning with keep_frac = 1 is a no-op, resuming
//! is exact, and the privacy budget is enforced.
mod common;

use common::rel_err;

use dualpriv::backend::cpu::Cpu;
use dualpriv::backend::dp::DpBackend;
use dualpriv::data::synthetic::{Dataset, Split};
use dualpriv::dp::key::RunKey;
use dualpriv::dp::noise::{NoiseKey, RngKind, StreamKey};
use dualpriv::model::Mllm;
use dualpriv::train::checkpoint::ModelSpec;
use dualpriv::train::method::Method;
use dualpriv::train::optim::{OptConfig, OptKind};
use dualpriv::train::sampler::{Sampler, Sampling};
use dualpriv::train::step::{
    dpzo_direction, gradient_sums, train_step, OptState, StepContext, StepOutcome,
};
use dualpriv::train::{PruneScope, TrainConfig, Trainer};

/// The pinned key of these tests (a public one: their runs are not private).
fn key() -> RunKey {
    RunKey::from_insecure_seed(11)
}

/// A trainer on the pinned key, so two trainers of a test see the same batches and noise.
fn trainer<'a>(m: Mllm<Cpu>, spec: ModelSpec, c: TrainConfig, d: &Dataset) -> Trainer<'a, Cpu> {
    Trainer::with_key(&Cpu, m, spec, c, d, key()).unwrap()
}

/// One step of the raw mechanism, which checks no config: σ = 0 is legal here, as
/// the σ = 0, C = ∞ equivalence checks need (the trainer refuses it for DP methods).
fn raw_step(m: &mut Mllm<Cpu>, c: &TrainConfig, d: &Dataset, idx: &[usize]) -> StepOutcome {
    let mut opt = OptState::default();
    let k = key();
    let mut ctx = StepContext {
        backend: &Cpu,
        model: m,
        opt: &mut opt,
        data: d,
        cfg: c,
        sigma: c.noise_multiplier.unwrap_or(0.0),
        key: &k,
    };
    train_step(&mut ctx, 0, 0, idx).unwrap()
}

fn data(n: usize) -> Dataset {
    Dataset::generate(Split::Private, n, 7, 32).unwrap()
}

fn lora() -> ModelSpec {
    common::tiny_lora()
}

fn full() -> ModelSpec {
    common::tiny_full()
}

fn model(spec: &ModelSpec, seed: u64) -> Mllm<Cpu> {
    let (c, m) = spec.build().unwrap();
    let mut model = Mllm::new(&Cpu, &c, &m, seed).unwrap();
    // LoRA B starts at zero, which would make A's gradient vanish: randomise every
    // trainable tensor a little so all captures carry signal.
    let ids: Vec<u32> = model.trainable().iter().map(|p| p.id).collect();
    for id in ids {
        Cpu.noise_axpy(
            model.param_mut(id),
            NoiseKey {
                stream: StreamKey::from_insecure_seed(RngKind::Chacha20, 99),
                tensor_id: id,
                step: 0,
            },
            0.02,
        )
        .unwrap();
    }
    model
}

fn cfg(method: Method, d: &Dataset) -> TrainConfig {
    TrainConfig {
        batch: 8,
        micro_batch: 8,
        steps: 4,
        opt: OptConfig::sgd(0.05),
        clip_norm: 0.05,
        // σ = 0 for the raw-mechanism equivalence checks (the trainer refuses it;
        // tests that train set a σ > 0).
        noise_multiplier: method.is_private().then_some(0.0),
        ..common::train_cfg(method, d)
    }
}

/// The floor of [`rel_err`] for f32 sums: their largest entry, since sums of f32
/// products are judged against their scale, not entry by entry.
fn scale(v: &[f32]) -> f32 {
    common::max_abs(v).max(1e-12)
}

fn params(m: &Mllm<Cpu>) -> Vec<Vec<f32>> {
    m.trainable()
        .iter()
        .map(|p| m.param(p.id).to_vec())
        .collect()
}

#[test]
fn ghost_and_dpsgd_clipped_sums_agree() {
    let d = data(16);
    let idx: Vec<usize> = (0..8).collect();
    for spec in [full(), lora()] {
        let m = model(&spec, 1);
        let g = gradient_sums(&Cpu, &m, &key(), &cfg(Method::Ghost, &d), &d, &idx).unwrap();
        let p = gradient_sums(&Cpu, &m, &key(), &cfg(Method::Dpsgd, &d), &d, &idx).unwrap();
        assert_eq!(g.grads.len(), m.trainable().len());
        for (id, gv) in &g.grads {
            let e = rel_err(gv, &p.grads[id], scale(&p.grads[id]));
            // Not 1e-5 any more: each path inflates the clip norm by the bound on its
            // own f32 rounding (γ_{b·t}·Σ_t‖x_t‖‖g_t‖ for the BK sum, γ_b·‖∇W_i‖ for
            // dpsgd's row sum; γ ≈ 512·2⁻²⁴ ≈ 3e-5 here), so the factors of clipped
            // examples differ by up to a few γ relative.
            assert!(e < 5e-4, "{spec:?} param {id}: ghost vs dpsgd rel err {e}");
        }
    }
}

#[test]
fn clipping_is_active_in_these_tests() {
    // The agreement above would be vacuous if no example were clipped.
    let d = data(16);
    let m = model(&full(), 1);
    let idx: Vec<usize> = (0..8).collect();
    let clipped = gradient_sums(&Cpu, &m, &key(), &cfg(Method::Ghost, &d), &d, &idx).unwrap();
    let plain = gradient_sums(&Cpu, &m, &key(), &cfg(Method::Nonprivate, &d), &d, &idx).unwrap();
    let id = m.trainable()[0].id;
    let (c, p) = (&clipped.grads[&id], &plain.grads[&id]);
    assert!(rel_err(c, p, scale(p)) > 0.1);
}

#[test]
fn without_noise_and_clipping_dp_gradients_equal_the_plain_gradient() {
    let d = data(16);
    let m = model(&full(), 2);
    let idx: Vec<usize> = (0..8).collect();
    let plain = gradient_sums(&Cpu, &m, &key(), &cfg(Method::Nonprivate, &d), &d, &idx).unwrap();
    assert_eq!(plain.grads.len(), m.trainable().len());
    for method in [Method::Dpsgd, Method::Ghost, Method::Dualpriv] {
        let mut c = cfg(method, &d);
        c.clip_norm = f32::INFINITY;
        let s = gradient_sums(&Cpu, &m, &key(), &c, &d, &idx).unwrap();
        for (id, g) in &plain.grads {
            let e = rel_err(&s.grads[id], g, scale(g));
            assert!(e < 1e-5, "{method}: param {id} rel err {e}");
        }
    }
    // One full step: σ = 0, C = ∞ and |batch| = B_expected give the same update.
    let mut a = model(&full(), 2);
    raw_step(&mut a, &cfg(Method::Nonprivate, &d), &d, &idx);
    let mut c = cfg(Method::Ghost, &d);
    c.clip_norm = f32::INFINITY;
    let mut b = model(&full(), 2);
    raw_step(&mut b, &c, &d, &idx);
    for (x, y) in params(&a).iter().zip(params(&b)) {
        assert!(rel_err(x, &y, scale(&y)) < 1e-6);
    }
}

#[test]
fn dpzo_estimates_the_directional_derivative() {
    // With σ = 0 and C = ∞, DPZO's scalar is Σ_i (ℓ_i(θ+λz) − ℓ_i(θ−λz)) / 2λ ≈ ⟨Σ_i ∇ℓ_i, z⟩,
    // and its update is θ ← θ − lr · (scalar / B) · z.
    let d = data(16);
    let idx: Vec<usize> = (0..8).collect();
    let m0 = model(&lora(), 3);
    let plain = gradient_sums(&Cpu, &m0, &key(), &cfg(Method::Nonprivate, &d), &d, &idx).unwrap();
    let mut c = cfg(Method::Dpzo, &d);
    c.clip_norm = f32::INFINITY;
    // λ·‖z‖ ≈ 0.13 here: small enough for a local central difference, large
    // enough for f32 losses.
    c.dpzo_lambda = 1e-3;
    let before = params(&m0);
    let mut m = m0;
    raw_step(&mut m, &c, &d, &idx);
    let mut dot = 0.0f64;
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (k, p) in m.trainable().iter().enumerate() {
        let mut z = vec![0.0f64; p.len];
        dpzo_direction(&key(), RngKind::Chacha20, p.id, 0).fill(0, &mut z);
        let g = &plain.grads[&p.id];
        dot += g
            .iter()
            .zip(&z)
            .map(|(a, b)| f64::from(*a) * b)
            .sum::<f64>();
        let after = m.param(p.id);
        for j in 0..p.len {
            // Δθ = −lr · s · z, so s = −Δθ / (lr · z) (least squares over coordinates).
            let dth = f64::from(after[j]) - f64::from(before[k][j]);
            num += -dth * z[j];
            den += f64::from(c.opt.lr) * z[j].powi(2);
        }
    }
    let scalar = num / den * c.batch as f64;
    assert!(
        (scalar - dot).abs() < 0.05 * dot.abs().max(1e-3),
        "dpzo scalar {scalar} vs ⟨∇L, z⟩ {dot}"
    );
}

fn mean_loss(m: &Mllm<Cpu>, d: &Dataset, c: &TrainConfig) -> f64 {
    let idx: Vec<usize> = (0..d.len()).collect();
    let b = d.collate(&idx, c.text_len).unwrap();
    let l = m
        .per_example_loss(&Cpu, &b, c.token_select().as_ref())
        .unwrap();
    l.iter().map(|&x| f64::from(x)).sum::<f64>() / l.len() as f64
}

#[test]
fn every_method_lowers_the_training_loss() {
    let d = data(32);
    for method in [
        Method::Nonprivate,
        Method::Dpsgd,
        Method::Ghost,
        Method::Dualpriv,
        Method::Dpzo,
    ] {
        let mut c = cfg(method, &d);
        c.steps = 12;
        c.clip_norm = 1.0;
        c.noise_multiplier = method.is_private().then_some(0.15);
        c.opt = OptConfig {
            kind: OptKind::Adamw,
            lr: 1e-2,
            momentum: 0.0,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        };
        if method == Method::Dualpriv {
            c.keep_tokens = Some(6);
            c.context_tokens = 2;
            c.keep_frac = 0.8;
        }
        // Zeroth-order steps move along one random direction each: slower, so more
        // of them, and a smaller required drop (the run is seeded, so deterministic).
        let min_drop = if method == Method::Dpzo { 0.03 } else { 0.05 };
        if method == Method::Dpzo {
            c.steps = 80;
            c.opt = OptConfig::sgd(3e-3);
            c.dpzo_lambda = 1e-2;
        }
        let m = model(&full(), 4);
        let before = mean_loss(&m, &d, &c);
        let mut t = Trainer::new(&Cpu, m, full(), c.clone(), &d).unwrap();
        t.run(&d, 0).unwrap();
        let after = mean_loss(&t.model, &d, &c);
        assert!(
            after < before - min_drop,
            "{method}: loss {before:.4} -> {after:.4}"
        );
    }
}

#[test]
fn keep_frac_one_per_tensor_equals_ghost() {
    let d = data(24);
    let mut g = cfg(Method::Ghost, &d);
    g.noise_multiplier = Some(0.7);
    let mut p = g.clone();
    p.method = Method::Dualpriv;
    p.keep_frac = 1.0;
    let mut a = trainer(model(&lora(), 5), lora(), g, &d);
    let mut b = trainer(model(&lora(), 5), lora(), p, &d);
    a.run(&d, 0).unwrap();
    b.run(&d, 0).unwrap();
    assert_eq!(params(&a.model), params(&b.model));
    assert_ne!(
        params(&a.model),
        params(&model(&lora(), 5)),
        "the runs trained"
    );
    // keep_frac < 1 really prunes: some coordinates are left untouched.
    let mut q = cfg(Method::Dualpriv, &d);
    q.noise_multiplier = Some(0.7);
    q.keep_frac = 0.5;
    let m = model(&lora(), 5);
    let before = params(&m);
    let mut c = Trainer::new(&Cpu, m, lora(), q, &d).unwrap();
    let out = c.one_step(&d, &[0, 1, 2]).unwrap();
    assert_eq!(out.kept, out.coords.div_ceil(2).max(out.kept));
    let same: usize = params(&c.model)
        .iter()
        .zip(&before)
        .map(|(x, y)| x.iter().zip(y).filter(|(a, b)| a == b).count())
        .sum();
    assert!(
        same as u64 >= out.coords / 2 - 64,
        "only {same} of {} untouched",
        out.coords
    );
}

#[test]
fn global_scope_and_micro_batches() {
    let d = data(24);
    let idx: Vec<usize> = (0..8).collect();
    let m = model(&lora(), 6);
    let one = gradient_sums(&Cpu, &m, &key(), &cfg(Method::Ghost, &d), &d, &idx).unwrap();
    let mut c = cfg(Method::Ghost, &d);
    c.micro_batch = 3;
    let three = gradient_sums(&Cpu, &m, &key(), &c, &d, &idx).unwrap();
    assert_eq!(one.grads.len(), m.trainable().len());
    for (id, g) in &one.grads {
        assert!(
            rel_err(&three.grads[id], g, scale(g)) < 1e-5,
            "micro-batched sums differ for {id}"
        );
    }
    // Global scope keeps exactly ⌈keep_frac · N⌉ over all tensors together.
    let mut c = cfg(Method::Dualpriv, &d);
    c.keep_frac = 0.3;
    c.noise_multiplier = Some(1.0);
    c.prune_scope = PruneScope::Global;
    let mut t = Trainer::new(&Cpu, model(&lora(), 6), lora(), c, &d).unwrap();
    let out = t.one_step(&d, &idx).unwrap();
    assert_eq!(out.kept, (out.coords as f64 * 0.3).ceil() as u64);
}

/// A step called from outside the rayon pool hops onto a worker with polling
/// peers, or, with polling off, runs where it is called (this once recursed until
/// the stack overflowed); both give the same parameters bit for bit.
#[test]
fn a_step_is_the_same_with_and_without_polling_workers() {
    let d = data(8);
    let mut c = cfg(Method::Ghost, &d);
    c.noise_multiplier = Some(1.0);
    let idx: Vec<usize> = (0..8).collect();
    let run = |poll: bool| {
        dualpriv::backend::cpu::hot::set_polling(poll);
        let mut t = trainer(model(&lora(), 7), lora(), c.clone(), &d);
        t.one_step(&d, &idx).unwrap();
        params(&t.model)
    };
    let off = run(false);
    let on = run(true);
    assert_eq!(off, on);
}

#[test]
fn empty_batches_release_noise_only() {
    let d = data(8);
    let mut c = cfg(Method::Ghost, &d);
    c.noise_multiplier = Some(1.0);
    let m = model(&lora(), 7);
    let before = params(&m);
    let mut t = Trainer::new(&Cpu, m, lora(), c, &d).unwrap();
    t.one_step(&d, &[]).unwrap();
    assert!(
        params(&t.model).iter().zip(&before).all(|(a, b)| a != b),
        "every tensor gets noise"
    );
    let m = model(&lora(), 7);
    let mut t = Trainer::new(&Cpu, m, lora(), cfg(Method::Nonprivate, &d), &d).unwrap();
    t.one_step(&d, &[]).unwrap();
    assert_eq!(params(&t.model), before);
}

#[test]
fn resuming_gives_the_same_weights() {
    let d = data(24);
    // A private root: the default ledger goes beside the run folder.
    let root = common::tmp_dir("resuming_gives_the_same_weights");
    let dir = root.join("run");
    let mut c = cfg(Method::Dualpriv, &d);
    c.noise_multiplier = Some(0.8);
    c.keep_frac = 0.7;
    c.keep_tokens = Some(5);
    c.context_tokens = 2;
    c.opt = OptConfig {
        kind: OptKind::Adamw,
        lr: 1e-2,
        momentum: 0.0,
        weight_decay: 0.01,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
    };
    c.steps = 3;
    let mut first = trainer(model(&lora(), 8), lora(), c.clone(), &d);
    first.out_dir = Some(dir.clone());
    first.run(&d, 0).unwrap();
    let mut second = Trainer::resume(&Cpu, &dir, &d, Some(6)).unwrap();
    assert_eq!(second.step, 3);
    assert_eq!(params(&second.model), params(&first.model));
    assert_eq!(second.privacy, first.privacy);
    // Resuming continues after the draws the ledger reserved, never at a draw the
    // first process may have used.
    let resumed_at = second.draws();
    assert!(resumed_at >= first.draws(), "resumed at draw {resumed_at}");
    second.run(&d, 0).unwrap();
    // The checkpoint restored model and optimizer exactly: continuing the first
    // run in memory with the same draws gives the same weights bit for bit.
    let sampler = Sampler::new(d.len(), c.batch, Sampling::Poisson, &key()).unwrap();
    let mut opt = std::mem::take(&mut first.opt);
    let k = key();
    for (i, draw) in (resumed_at..resumed_at + 3).enumerate() {
        let mut ctx = StepContext {
            backend: &Cpu,
            model: &mut first.model,
            opt: &mut opt,
            data: &d,
            cfg: &first.cfg,
            sigma: first.sigma,
            key: &k,
        };
        train_step(&mut ctx, 3 + i as u32, draw, &sampler.batch(draw)).unwrap();
    }
    assert_eq!(params(&second.model), params(&first.model));
    // Resuming on other data is refused.
    assert!(Trainer::resume(&Cpu, &dir, &data(25), None).is_err());
}

#[test]
fn training_stops_before_the_budget_is_exceeded() {
    let d = data(40);
    let mut c = cfg(Method::Ghost, &d);
    c.noise_multiplier = Some(1.5);
    c.epsilon = Some(2.0);
    c.steps = 1000;
    let mut t = Trainer::new(&Cpu, model(&lora(), 9), lora(), c, &d).unwrap();
    let s = t.run(&d, 0).unwrap();
    assert!(s.steps < 1000 && s.steps > 0, "steps {}", s.steps);
    assert!(s.epsilon <= 2.0, "ε {}", s.epsilon);
    // One more step would have crossed the target.
    let mut h = t.privacy.clone();
    h.record(8.0 / 40.0, 1.5);
    assert!(
        h.epsilon(dualpriv::dp::accountant::AccountantKind::Rdp, 1e-5)
            .unwrap()
            > 2.0
    );
}

#[test]
fn calibrated_sigma_meets_the_target_for_the_planned_steps() {
    let d = data(200);
    let mut c = cfg(Method::Ghost, &d);
    c.noise_multiplier = None;
    c.epsilon = Some(3.0);
    c.steps = 50;
    let t = Trainer::new(&Cpu, model(&lora(), 10), lora(), c, &d).unwrap();
    let eps = dualpriv::dp::accountant::epsilon(
        dualpriv::dp::accountant::AccountantKind::Rdp,
        &[(8.0 / 200.0, t.sigma, 50)],
        1e-5,
    )
    .unwrap();
    assert!(eps <= 3.0 && eps > 2.9, "σ {} gives ε {eps}", t.sigma);
}

#[test]
fn poisson_sampling_rate_and_determinism() {
    let s = Sampler::new(
        10_000,
        100,
        Sampling::Poisson,
        &RunKey::from_insecure_seed(5),
    )
    .unwrap();
    let total: usize = (0..200).map(|k| s.batch(k).len()).sum();
    // 200 steps × Binomial(10⁴, 0.01): mean 20 000, sd √(20 000·0.99) ≈ 141.
    assert!(
        (total as f64 - 20_000.0).abs() < 5.0 * 141.0,
        "total {total}"
    );
    assert_eq!(s.batch(17), s.batch(17));
    assert_ne!(s.batch(17), s.batch(18));
    // The batches follow the key: another key, other batches.
    let other = Sampler::new(
        10_000,
        100,
        Sampling::Poisson,
        &RunKey::from_insecure_seed(6),
    )
    .unwrap();
    assert_ne!(s.batch(17), other.batch(17));
    let k = RunKey::from_insecure_seed(0);
    assert!(Sampler::new(10, 0, Sampling::Poisson, &k).is_err());
    assert!(Sampler::new(10, 11, Sampling::Poisson, &k).is_err());
    assert!(Sampler::new(0, 1, Sampling::Poisson, &k).is_err());
}

#[test]
fn bad_configs_are_errors() {
    let d = data(8);
    let mut base = cfg(Method::Ghost, &d);
    base.noise_multiplier = Some(1.0);
    base.delta = 1e-3;
    let bad = |f: &dyn Fn(&mut TrainConfig)| {
        let mut c = base.clone();
        f(&mut c);
        Trainer::new(&Cpu, model(&lora(), 1), lora(), c, &d).is_err()
    };
    assert!(!bad(&|_| {}), "the base config is valid");
    // σ = 0 releases the clipped sum in the clear.
    assert!(bad(&|c| c.noise_multiplier = Some(0.0)));
    // σ so small that the sampler's support (|z| ≤ 13.32) would show: 1/σ = 12
    // (4 steps × q = 1 × Φ̄(1.32) ≫ δ/100).
    assert!(bad(&|c| c.noise_multiplier = Some(1.0 / 12.0)));
    assert!(!bad(&|c| c.noise_multiplier = Some(0.2)));
    // δ ≥ 1/N admits publishing a random example outright.
    assert!(bad(&|c| c.delta = 1.0 / 8.0));
    assert!(bad(&|c| c.delta = 0.2));
    // Slot-keyed fused-token noise breaks the sensitivity bound.
    assert!(bad(&|c| {
        c.keep_tokens = Some(5);
        c.context_tokens = 2;
        c.fuse_noise_std = 0.1;
    }));
    assert!(bad(&|c| c.batch = 0));
    assert!(bad(&|c| c.batch = 9));
    assert!(bad(&|c| c.micro_batch = 0));
    assert!(bad(&|c| c.clip_norm = 0.0));
    assert!(bad(&|c| c.keep_frac = 1.5));
    assert!(bad(&|c| c.delta = 1.0));
    assert!("moments"
        .parse::<dualpriv::dp::accountant::AccountantKind>()
        .is_err());
    assert!(serde_json::from_str::<TrainConfig>(
        &serde_json::to_string(&base)
            .unwrap()
            .replace("\"rdp\"", "\"moments\"")
    )
    .is_err());
    assert!(bad(&|c| {
        c.noise_multiplier = None;
        c.epsilon = None;
    }));
    assert!(bad(&|c| c.opt.lr = f32::NAN));
}
