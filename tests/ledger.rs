//! The privacy ledger: runs on the same data accumulate, resuming continues an
//! entry instead of adding one, and writes are atomic.
use std::path::PathBuf;

use dualpriv::backend::cpu::Cpu;
use dualpriv::data::synthetic::{Dataset, Split};
use dualpriv::dp::accountant::ledger::{Ledger, LedgerEntry};
use dualpriv::dp::accountant::AccountantKind;
use dualpriv::model::Mllm;
use dualpriv::train::checkpoint::ModelSpec;
use dualpriv::train::method::Method;
use dualpriv::train::optim::{OptConfig, OptKind};
use dualpriv::train::sampler::Sampling;
use dualpriv::train::{PruneScope, TrainConfig, Trainer};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dualpriv-ledger-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn spec() -> ModelSpec {
    ModelSpec {
        preset: "tiny".into(),
        lora_rank: Some(2),
        lora_alpha: 4.0,
        full_groups: vec![],
    }
}

fn trainer<'a>(d: &Dataset, method: Method, steps: u32, out: PathBuf) -> Trainer<'a, Cpu> {
    let (c, m) = spec().build().unwrap();
    let cfg = TrainConfig {
        method,
        batch: 4,
        micro_batch: 4,
        sampling: Sampling::Poisson,
        steps,
        opt: OptConfig {
            kind: OptKind::Sgd,
            lr: 0.01,
            momentum: 0.0,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        },
        clip_norm: 1.0,
        epsilon: None,
        delta: 1e-5,
        noise_multiplier: method.is_private().then_some(1.0),
        accountant: "rdp".into(),
        keep_tokens: None,
        context_tokens: 0,
        fuse_noise_std: 0.0,
        keep_frac: 1.0,
        prune_scope: PruneScope::Tensor,
        dpzo_lambda: 1e-3,
        seed: 1,
        noise_seed: 2,
        text_len: d.max_text_len(),
    };
    let mut t = Trainer::new(&Cpu, Mllm::new(&Cpu, &c, &m, 0).unwrap(), spec(), cfg, d).unwrap();
    t.out_dir = Some(out);
    t
}

#[test]
fn runs_on_the_same_data_accumulate_and_resume_continues() {
    let root = tmp("acc");
    let d = Dataset::generate(Split::Private, 16, 3, 32).unwrap();
    let ledger_path = root.join("privacy-ledger.json");
    trainer(&d, Method::Ghost, 2, root.join("a"))
        .run(&d, 0)
        .unwrap();
    let l1 = Ledger::load(&ledger_path).unwrap();
    assert_eq!(l1.entries.len(), 1);
    assert_eq!(l1.entries[0].steps, 2);
    // A second run on the same data gets its own entry; the cumulative ε covers both.
    trainer(&d, Method::Dpsgd, 3, root.join("b"))
        .run(&d, 0)
        .unwrap();
    let l2 = Ledger::load(&ledger_path).unwrap();
    assert_eq!(l2.entries.len(), 2);
    let fp = d.fingerprint();
    let total = l2
        .cumulative_epsilon(&fp, AccountantKind::Rdp, 1e-5)
        .unwrap();
    let each: Vec<f64> = l2.entries.iter().map(|e| e.epsilon).collect();
    assert!(
        total > each[0] && total > each[1],
        "cumulative {total} vs {each:?}"
    );
    let five =
        dualpriv::dp::accountant::epsilon(AccountantKind::Rdp, &[(0.25, 1.0, 5)], 1e-5).unwrap();
    assert!(
        (total - five).abs() < 1e-9,
        "two runs of 2 + 3 steps compose like 5 steps"
    );
    // Resuming run a continues its entry rather than adding one.
    let mut t = Trainer::resume(&Cpu, &root.join("a"), &d, Some(4)).unwrap();
    t.run(&d, 0).unwrap();
    let l3 = Ledger::load(&ledger_path).unwrap();
    assert_eq!(l3.entries.len(), 2);
    let a = l3.entries.iter().find(|e| e.run.ends_with("/a")).unwrap();
    assert_eq!(a.steps, 4);
    assert_eq!(a.history, vec![(0.25, 1.0, 4)]);
    // Other data and non-private runs do not touch the ledger's spend.
    let other = Dataset::generate(Split::Private, 16, 4, 32).unwrap();
    trainer(&other, Method::Nonprivate, 1, root.join("c"))
        .run(&other, 0)
        .unwrap();
    assert_eq!(Ledger::load(&ledger_path).unwrap().entries.len(), 2);
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn writes_are_atomic_and_corruption_is_never_reset() {
    let root = tmp("atomic");
    let p = root.join("privacy-ledger.json");
    let entry = |run: &str, eps: f64| LedgerEntry {
        run: run.into(),
        data_fingerprint: "f".into(),
        method: "ghost".into(),
        history: vec![(0.1, 1.0, 10)],
        steps: 10,
        delta: 1e-5,
        accountant: "rdp".into(),
        epsilon: eps,
    };
    let mut l = Ledger::default();
    l.upsert(entry("x", 1.0));
    l.save(&p).unwrap();
    // A crash mid-write leaves only a partial temporary file; the ledger is intact.
    std::fs::write(
        root.join("privacy-ledger.json.tmp"),
        b"{\"entries\": [ {\"run\": \"x\", \"da",
    )
    .unwrap();
    assert_eq!(Ledger::load(&p).unwrap(), l);
    l.upsert(entry("x", 2.0));
    l.upsert(entry("y", 0.5));
    l.save(&p).unwrap();
    let back = Ledger::load(&p).unwrap();
    assert_eq!(back.entries.len(), 2);
    assert_eq!(back.entries[0].epsilon, 2.0);
    // A corrupt ledger is an error, never silently replaced by an empty one.
    std::fs::write(&p, b"not json").unwrap();
    assert!(Ledger::load(&p).is_err());
    // A missing ledger is empty.
    assert!(Ledger::load(&root.join("none.json"))
        .unwrap()
        .entries
        .is_empty());
    let _ = std::fs::remove_dir_all(&root);
}
