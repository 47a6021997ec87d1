//! Crash safety of checkpoints and the ledger: a failure is injected after every
//! single durable write of a resumed run's checkpoints. After each, resuming
//! either continues with fresh draws (noise the crashed process never drew) or refuses with a
//! message, and the ledger never counts fewer steps than the checkpoints on disk
//! (the released models) hold.
mod common;

use std::path::{Path, PathBuf};

use dualpriv::backend::cpu::Cpu;
use dualpriv::data::synthetic::{Dataset, Split};
use dualpriv::dp::accountant::ledger::Ledger;
use dualpriv::model::Mllm;
use dualpriv::train::checkpoint::{self, fail_after_writes, CheckpointState, ModelSpec};
use dualpriv::train::method::Method;
use dualpriv::train::optim::OptConfig;
use dualpriv::train::{TrainConfig, Trainer};

fn spec() -> ModelSpec {
    common::tiny_lora_rank(2)
}

fn cfg(d: &Dataset, steps: u32) -> TrainConfig {
    TrainConfig {
        steps,
        opt: OptConfig::adamw(1e-2),
        keep_frac: 0.5,
        ..common::train_cfg(Method::Dualpriv, d)
    }
}

/// Every state.json on disk (complete or not): the checkpoints an adversary with
/// the disk could read, whichever folder `CURRENT` names.
fn states_on_disk(dir: &Path) -> Vec<CheckpointState> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path().join("state.json");
        if let Ok(b) = std::fs::read(&p) {
            out.push(serde_json::from_slice(&b).unwrap());
        }
    }
    out
}

/// The highest step of any model file on disk (its folder's name is step-N-…).
fn released_steps(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.path().join("model.safetensors").exists())
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.strip_prefix("step-")?.get(..8)?.parse().ok()
        })
        .max()
        .unwrap_or(0)
}

fn fresh(root: &Path, d: &Dataset) -> PathBuf {
    let _ = std::fs::remove_dir_all(root);
    let (c, m) = spec().build().unwrap();
    let model = Mllm::new(&Cpu, &c, &m, 0).unwrap();
    let mut t = Trainer::new(&Cpu, model, spec(), cfg(d, 2), d).unwrap();
    let dir = root.join("run");
    t.out_dir = Some(dir.clone());
    t.run(d, 1).unwrap();
    dir
}

#[test]
fn a_crash_after_any_write_never_undercounts_or_reuses_noise() {
    let d = Dataset::generate(Split::Private, 16, 3, 32).unwrap();
    let root = common::tmp_dir("a_crash_after_any_write_never_undercounts_or_reuses_noise");
    let mut tried = 0;
    for k in 1.. {
        let dir = fresh(&root, &d);
        let ledger = root.join("privacy-ledger.json");
        let mut t = Trainer::resume(&Cpu, &dir, &d, Some(5)).unwrap();
        let draws_before = t.draws();
        fail_after_writes(Some(k));
        let res = t.run(&d, 1);
        fail_after_writes(None);
        let crashed = res.is_err();
        // The process "dies": whatever was in memory is gone.
        let used = t.draws();
        drop(t);
        let entry = Ledger::load(&ledger).unwrap().entries[0].clone();
        let released = released_steps(&dir);
        assert!(
            entry.steps >= released,
            "write {k}: the ledger counts {} steps but a model of step {released} is on disk",
            entry.steps
        );
        let max_state_draws = states_on_disk(&dir).iter().map(|s| s.draws).max().unwrap();
        assert!(
            entry.draws >= u64::from(max_state_draws),
            "write {k}: ledger draws behind a checkpoint"
        );
        match Trainer::resume(&Cpu, &dir, &d, Some(6)) {
            Ok(mut r) => {
                // New steps draw after every draw a checkpoint on disk (released
                // or not) was made with, and after the ledger's count.
                assert!(u64::from(r.draws()) >= entry.draws, "write {k}");
                assert!(
                    r.draws() >= max_state_draws && r.draws() >= draws_before,
                    "write {k}"
                );
                // ... and after every draw the crashed process used at all.
                assert!(
                    r.draws() >= used,
                    "write {k}: draw {} reused (crashed run used {used})",
                    r.draws()
                );
                assert!(
                    r.privacy.steps() >= entry.steps,
                    "write {k}: ε restarts lower"
                );
                r.run(&d, 0).unwrap();
                let after = Ledger::load(&ledger).unwrap().entries[0].clone();
                assert!(after.steps > entry.steps && after.draws > entry.draws);
            }
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.len() > 20, "write {k}: refusal without a reason: {msg}");
            }
        }
        tried += 1;
        if !crashed {
            // k passed the last write of the run: every write was tried.
            assert!(used >= 5, "the run completed");
            break;
        }
    }
    assert!(
        tried > 12,
        "only {tried} crash points: three saves of ≥ 5 writes each"
    );
}

#[test]
fn mixed_checkpoint_pieces_are_refused() {
    let d = Dataset::generate(Split::Private, 16, 3, 32).unwrap();
    let root = common::tmp_dir("mixed_checkpoint_pieces_are_refused");
    let dir = fresh(&root, &d);
    let cur = checkpoint::current(&dir).unwrap().unwrap();
    // Keep the step-2 optimizer file, then move on one step and put it back.
    let old_optim = std::fs::read(cur.join("optim.safetensors")).unwrap();
    let mut t = Trainer::resume(&Cpu, &dir, &d, Some(3)).unwrap();
    t.run(&d, 0).unwrap();
    let cur = checkpoint::current(&dir).unwrap().unwrap();
    std::fs::write(cur.join("optim.safetensors"), old_optim).unwrap();
    let err = Trainer::resume(&Cpu, &dir, &d, Some(4))
        .err()
        .expect("mixed pieces must be refused")
        .to_string();
    assert!(
        err.contains("optim.safetensors") && err.contains("mixes"),
        "{err}"
    );
    // state.json is private to its owner: it holds the run key.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(cur.join("state.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0);
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let dst = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

#[test]
fn two_copies_of_a_run_never_share_draws() {
    // A run folder copied and resumed twice shares the run key: without care both
    // copies would draw the same noise. The second resume takes the run over in the
    // ledger; the first can then reserve nothing more, so it stops before a step.
    let d = Dataset::generate(Split::Private, 16, 3, 32).unwrap();
    let root = common::tmp_dir("two_copies_of_a_run_never_share_draws");
    let dir = fresh(&root, &d);
    let copy = root.join("copy");
    copy_dir(&dir, &copy);
    let mut a = Trainer::resume(&Cpu, &dir, &d, Some(4)).unwrap();
    let mut b = Trainer::resume(&Cpu, &copy, &d, Some(4)).unwrap();
    let err = a
        .run(&d, 0)
        .expect_err("the run taken over must stop")
        .to_string();
    assert!(err.contains("resumed by another process"), "{err}");
    assert_eq!(a.step, 2, "no step after the take-over");
    let before = b.draws();
    b.run(&d, 0).unwrap();
    assert!(
        before >= a.draws(),
        "b starts at draw {before}, a had reached {}",
        a.draws()
    );
    let entry = Ledger::load(&root.join("privacy-ledger.json"))
        .unwrap()
        .entries[0]
        .clone();
    assert_eq!(entry.steps, 4);
}

#[test]
fn published_steps_are_always_charged() {
    // The second review's attack: a run killed between checkpoints had published
    // evaluations of steps the ledger never charged. Each DP step is charged in the
    // ledger before it runs, so for every point where the run can die, the ledger
    // counts at least the steps metrics.jsonl shows.
    let d = Dataset::generate(Split::Private, 16, 3, 32).unwrap();
    let held_out = Dataset::generate(Split::Test, 8, 2, 32).unwrap();
    let root = common::tmp_dir("published_steps_are_always_charged");
    let mut most_shown = 0;
    for k in 1..=6 {
        let _ = std::fs::remove_dir_all(&root);
        let (c, m) = spec().build().unwrap();
        let mut cf = cfg(&d, 5);
        cf.eval_every = 1;
        cf.text_len = d.max_text_len().max(held_out.max_text_len());
        let model = Mllm::new(&Cpu, &c, &m, 0).unwrap();
        let mut t = Trainer::new(&Cpu, model, spec(), cf, &d).unwrap();
        t.out_dir = Some(root.join("run"));
        t.eval_data = Some(Box::new(held_out.clone()));
        fail_after_writes(Some(k));
        let _ = t.run(&d, 0); // dies after its k-th durable write
        fail_after_writes(None);
        let shown = std::fs::read_to_string(root.join("run/metrics.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("eval_accuracy"))
            .count() as u64;
        let entry = Ledger::load(&root.join("privacy-ledger.json"))
            .unwrap()
            .entries[0]
            .clone();
        assert!(
            entry.steps >= shown,
            "crash after write {k}: {shown} evaluated steps published, {} charged",
            entry.steps
        );
        most_shown = most_shown.max(shown);
    }
    // Some crash points had published evaluations (else the check above is vacuous).
    assert!(
        most_shown > 0,
        "no evaluation in metrics.jsonl at any crash point"
    );
}

#[test]
fn every_resume_draws_a_fresh_key() {
    // The second review: a copy of a run folder resumed against a copy of its ledger
    // (another machine, a restored backup) shares the run key and the draw counter,
    // so it would redraw the same noise. Each resume draws a new key instead.
    let d = Dataset::generate(Split::Private, 16, 3, 32).unwrap();
    let root = common::tmp_dir("every_resume_draws_a_fresh_key");
    let dir = fresh(&root, &d);
    let (st, _) = checkpoint::load_state(&dir).unwrap();
    // A secure run's key is never written (review 3: a leaked state.json would
    // reveal every step's noise since the last start).
    assert!(st.key.is_none(), "state.json holds the secret key");
    let text = std::fs::read_to_string(
        checkpoint::current(&dir)
            .unwrap()
            .unwrap()
            .join("state.json"),
    )
    .unwrap();
    assert!(!text.contains("\"hex\""), "key material in state.json");
    let a = Trainer::resume(&Cpu, &dir, &d, Some(4)).unwrap();
    let b = Trainer::resume(&Cpu, &dir, &d, Some(4)).unwrap();
    assert_ne!(a.key(), b.key(), "two resumes share a key");
}
