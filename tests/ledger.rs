//! The privacy ledger: runs on the same data accumulate, resuming continues an
//! entry instead of adding one, entries only grow, a run folder cannot be reused
//! to reset one, runs that are not private count as ε = ∞, fingerprints are
//! keyed, and writes are atomic.
mod common;

use std::path::PathBuf;

use dualpriv::backend::cpu::Cpu;
use dualpriv::data::synthetic::{Dataset, Split};
use dualpriv::dp::accountant::ledger::{extends, Ledger, LedgerEntry};
use dualpriv::dp::accountant::AccountantKind;
use dualpriv::dp::key::RunKey;
use dualpriv::model::Mllm;
use dualpriv::train::checkpoint::ModelSpec;
use dualpriv::train::method::Method;
use dualpriv::train::sampler::Sampling;
use dualpriv::train::{TrainConfig, Trainer};

fn spec() -> ModelSpec {
    common::tiny_lora_rank(2)
}

fn trainer<'a>(d: &Dataset, method: Method, steps: u32, out: PathBuf) -> Trainer<'a, Cpu> {
    trainer_with(d, method, steps, out, None)
}

fn trainer_with<'a>(
    d: &Dataset,
    method: Method,
    steps: u32,
    out: PathBuf,
    key: Option<RunKey>,
) -> Trainer<'a, Cpu> {
    let (c, m) = spec().build().unwrap();
    let cfg = TrainConfig {
        steps,
        ..common::train_cfg(method, d)
    };
    let model = Mllm::new(&Cpu, &c, &m, 0).unwrap();
    let mut t = match key {
        Some(k) => Trainer::with_key(&Cpu, model, spec(), cfg, d, k).unwrap(),
        None => Trainer::new(&Cpu, model, spec(), cfg, d).unwrap(),
    };
    t.out_dir = Some(out);
    t
}

fn ledger_key(root: &std::path::Path) -> [u8; 32] {
    Ledger::fingerprint_key(&root.join("privacy-ledger.json")).unwrap()
}

#[test]
fn runs_on_the_same_data_accumulate_and_resume_continues() {
    let root = common::tmp_dir("runs_on_the_same_data_accumulate_and_resume_continues");
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
    let fp = d.fingerprint(&ledger_key(&root));
    let total = l2
        .cumulative_epsilon(&fp, AccountantKind::Rdp, 1e-5)
        .unwrap();
    let each: Vec<f64> = l2.entries.iter().map(|e| e.epsilon.unwrap()).collect();
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
    // A non-private run on other data is recorded as ε = ∞ under its own
    // fingerprint, and leaves the spend on `d` as it was.
    let other = Dataset::generate(Split::Private, 16, 4, 32).unwrap();
    trainer(&other, Method::Nonprivate, 1, root.join("c"))
        .run(&other, 0)
        .unwrap();
    let l4 = Ledger::load(&ledger_path).unwrap();
    assert_eq!(l4.entries.len(), 3);
    let c = &l4.entries[2];
    assert_eq!((c.epsilon, c.not_private.is_some()), (None, true));
    let ofp = other.fingerprint(&ledger_key(&root));
    assert_eq!(c.data_fingerprint, ofp);
    assert!(l4
        .cumulative_epsilon(&ofp, AccountantKind::Rdp, 1e-5)
        .unwrap()
        .is_infinite());
    let six =
        dualpriv::dp::accountant::epsilon(AccountantKind::Rdp, &[(0.25, 1.0, 7)], 1e-5).unwrap();
    let now = l4
        .cumulative_epsilon(&fp, AccountantKind::Rdp, 1e-5)
        .unwrap();
    assert!((now - six).abs() < 1e-9, "4 + 3 steps on d: {now} vs {six}");
}

#[test]
fn a_new_run_cannot_reset_a_ledger_entry() {
    // The review's attack: a 2-step run, then a fresh 3-step run into the same
    // folder replaced the entry (ε of 3 steps instead of 5).
    let root = common::tmp_dir("a_new_run_cannot_reset_a_ledger_entry");
    let d = Dataset::generate(Split::Private, 16, 3, 32).unwrap();
    trainer(&d, Method::Ghost, 2, root.join("a"))
        .run(&d, 0)
        .unwrap();
    let err = trainer(&d, Method::Ghost, 3, root.join("a"))
        .run(&d, 0)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("not empty") && err.contains("Trainer::resume"),
        "{err}"
    );
    let l = Ledger::load(&root.join("privacy-ledger.json")).unwrap();
    assert_eq!(l.entries.len(), 1);
    assert_eq!(l.entries[0].steps, 2);
    // Deleting the folder and running again adds an entry; the old spend stays.
    std::fs::remove_dir_all(root.join("a")).unwrap();
    trainer(&d, Method::Ghost, 3, root.join("a"))
        .run(&d, 0)
        .unwrap();
    let l = Ledger::load(&root.join("privacy-ledger.json")).unwrap();
    assert_eq!(l.entries.iter().map(|e| e.steps).sum::<u64>(), 5);
    let total = l
        .cumulative_epsilon(
            &d.fingerprint(&ledger_key(&root)),
            AccountantKind::Rdp,
            1e-5,
        )
        .unwrap();
    let five =
        dualpriv::dp::accountant::epsilon(AccountantKind::Rdp, &[(0.25, 1.0, 5)], 1e-5).unwrap();
    assert!((total - five).abs() < 1e-9, "{total} vs {five}");
}

#[test]
fn runs_that_are_not_private_are_recorded_as_infinite() {
    let root = common::tmp_dir("runs_that_are_not_private_are_recorded_as_infinite");
    let d = Dataset::generate(Split::Private, 16, 3, 32).unwrap();
    let mut t = trainer_with(
        &d,
        Method::Ghost,
        2,
        root.join("insecure"),
        Some(RunKey::from_insecure_seed(3)),
    );
    let s = t.run(&d, 0).unwrap();
    assert!(s.epsilon.is_infinite() && s.not_private.is_some());
    let mut t = trainer(&d, Method::Ghost, 2, root.join("shuffle"));
    t.cfg.sampling = Sampling::Shuffle;
    let s = t.run(&d, 0).unwrap();
    assert!(s.epsilon.is_infinite(), "shuffle: ε {}", s.epsilon);
    let l = Ledger::load(&root.join("privacy-ledger.json")).unwrap();
    assert_eq!(l.entries.len(), 2);
    for e in &l.entries {
        assert_eq!(e.epsilon, None, "{}", e.run);
        assert!(e.not_private.is_some());
    }
    // The metrics say so too: ε is null on every line.
    let metrics = std::fs::read_to_string(root.join("insecure/metrics.jsonl")).unwrap();
    assert!(
        !metrics.is_empty() && metrics.lines().all(|l| l.contains("\"epsilon\":null")),
        "{metrics}"
    );
    assert!(l
        .cumulative_epsilon(
            &d.fingerprint(&ledger_key(&root)),
            AccountantKind::Rdp,
            1e-5
        )
        .unwrap()
        .is_infinite());
}

fn entry(run_id: &str, eps: f64, history: Vec<(f64, f64, u64)>) -> LedgerEntry {
    let steps = history.iter().map(|h| h.2).sum();
    LedgerEntry {
        run_id: run_id.into(),
        run: format!("/runs/{run_id}"),
        data_fingerprint: "f".into(),
        method: "ghost".into(),
        history,
        steps,
        draws: steps,
        delta: 1e-5,
        accountant: "rdp".into(),
        epsilon: Some(eps),
        not_private: None,
        rng: "chacha20".into(),
        session: "s".into(),
    }
}

#[test]
fn entries_only_grow() {
    let mut l = Ledger::default();
    l.record(entry("x", 1.0, vec![(0.1, 1.0, 10)]), false)
        .unwrap();
    // Extending the last entry or appending one is an update.
    l.record(entry("x", 1.2, vec![(0.1, 1.0, 12)]), false)
        .unwrap();
    l.record(entry("x", 1.5, vec![(0.1, 1.0, 12), (0.2, 1.0, 1)]), false)
        .unwrap();
    // Shorter, rewritten or re-keyed histories are refused, and the entry stays.
    for bad in [
        entry("x", 0.5, vec![(0.1, 1.0, 5)]),
        entry("x", 0.5, vec![(0.1, 2.0, 13)]),
        entry("x", 0.5, vec![(0.1, 1.0, 12)]),
    ] {
        assert!(l.record(bad, false).is_err());
    }
    let mut other_data = entry("x", 2.0, vec![(0.1, 1.0, 12), (0.2, 1.0, 2)]);
    other_data.data_fingerprint = "g".into();
    assert!(l.record(other_data, false).is_err());
    let mut fewer_draws = entry("x", 2.0, vec![(0.1, 1.0, 12), (0.2, 1.0, 2)]);
    fewer_draws.draws = 3;
    assert!(l.record(fewer_draws, false).is_err());
    assert_eq!(l.entries.len(), 1);
    assert_eq!(l.entries[0].steps, 13);
    // Another session (a second copy of the run) may not update it, unless it takes
    // the run over, as a resume does.
    let mut other = entry("x", 2.0, vec![(0.1, 1.0, 12), (0.2, 1.0, 2)]);
    other.session = "t".into();
    assert!(l.record(other.clone(), false).is_err());
    l.record(other, true).unwrap();
    assert_eq!(l.entries[0].session, "t");
    assert!(extends(&[], &[(0.1, 1.0, 1)]));
    assert!(!extends(&[(0.1, 1.0, 2)], &[]));
}

#[test]
fn fingerprints_are_keyed_per_ledger() {
    let name = "fingerprints_are_keyed_per_ledger";
    let (r1, r2) = (common::tmp_dir(name), common::tmp_dir(name));
    let d = Dataset::generate(Split::Private, 16, 3, 32).unwrap();
    trainer(&d, Method::Ghost, 1, r1.join("a"))
        .run(&d, 0)
        .unwrap();
    trainer(&d, Method::Ghost, 1, r2.join("a"))
        .run(&d, 0)
        .unwrap();
    let f1 = &Ledger::load(&r1.join("privacy-ledger.json"))
        .unwrap()
        .entries[0]
        .data_fingerprint;
    let f2 = &Ledger::load(&r2.join("privacy-ledger.json"))
        .unwrap()
        .entries[0]
        .data_fingerprint;
    // The same data under two ledger keys: unrelated fingerprints, so the ledger
    // does not identify the dataset to a reader without the key.
    assert_ne!(f1, f2);
    assert_eq!(f1, &d.fingerprint(&ledger_key(&r1)));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(r1.join("privacy-ledger.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "the ledger key is private to its owner");
    }
}

#[test]
fn writes_are_atomic_and_corruption_is_never_reset() {
    let root = common::tmp_dir("writes_are_atomic_and_corruption_is_never_reset");
    let p = root.join("privacy-ledger.json");
    let mut l = Ledger::default();
    l.record(entry("x", 1.0, vec![(0.1, 1.0, 10)]), false)
        .unwrap();
    l.save(&p).unwrap();
    // A crash mid-write leaves only a partial temporary file; the ledger is intact.
    std::fs::write(
        root.join(".privacy-ledger.json.tmp-1"),
        b"{\"entries\": [ {\"run\": \"x\", \"da",
    )
    .unwrap();
    assert_eq!(Ledger::load(&p).unwrap(), l);
    l.record(entry("x", 2.0, vec![(0.1, 1.0, 20)]), false)
        .unwrap();
    l.record(entry("y", 0.5, vec![(0.1, 1.0, 3)]), false)
        .unwrap();
    l.save(&p).unwrap();
    let back = Ledger::load(&p).unwrap();
    assert_eq!(back.entries.len(), 2);
    assert_eq!(back.entries[0].epsilon, Some(2.0));
    // A corrupt ledger is an error, never silently replaced by an empty one.
    std::fs::write(&p, b"not json").unwrap();
    assert!(Ledger::load(&p).is_err());
    // A missing ledger is empty.
    assert!(Ledger::load(&root.join("none.json"))
        .unwrap()
        .entries
        .is_empty());
}
