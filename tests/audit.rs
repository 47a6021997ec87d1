//! The one-run privacy audit: the bound against an independent scipy
//! implementation (scripts/make_audit_fixture.py), the canary data sources, and
//! the audit's power on real runs (nonprivate and a broken σ/10 mechanism are
//! caught, a correct DP run stays under its ε).
use std::path::{Path, PathBuf};

use dualpriv::audit::bound::{auc, epsilon_lower_bound, guess, p_value};
use dualpriv::audit::canary::{Relabeled, WithCanaries};
use dualpriv::audit::{audit_run, AuditConfig, AuditRow};
use dualpriv::backend::cpu::Cpu;
use dualpriv::cmd::audit::{audit_spec, builtin_data};
use dualpriv::data::DataSource;
use dualpriv::hf::load::load_llava;
use dualpriv::train::method::Method;
use rand::SeedableRng;
use serde_json::Value;

fn fixture() -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/audit/bound.json");
    serde_json::from_str(&std::fs::read_to_string(&p).expect("fixture")).expect("json")
}

#[test]
fn p_value_and_bound_match_scipy() {
    let f = fixture();
    for b in f["bounds"].as_array().unwrap() {
        let (m, r, v) = (
            b["m"].as_u64().unwrap() as usize,
            b["r"].as_u64().unwrap() as usize,
            b["v"].as_u64().unwrap() as usize,
        );
        let (delta, beta) = (b["delta"].as_f64().unwrap(), b["beta"].as_f64().unwrap());
        for pe in b["p_at"].as_array().unwrap() {
            let (e, want) = (pe[0].as_f64().unwrap(), pe[1].as_f64().unwrap());
            let got = p_value(m, r, v, e, delta);
            assert!(
                (got - want).abs() <= 1e-10 + 1e-9 * want,
                "p({m}, {r}, {v}, ε={e}, δ={delta}) = {got}, scipy {want}"
            );
        }
        let want = b["epsilon"].as_f64().unwrap();
        let got = epsilon_lower_bound(m, r, v, delta, beta);
        assert!(
            (got - want).abs() < 1e-7,
            "ε_lb({m}, {r}, {v}, δ={delta}) = {got}, scipy {want}"
        );
    }
}

#[test]
fn auc_matches_mann_whitney() {
    let f = fixture();
    for a in f["aucs"].as_array().unwrap() {
        let vals = |k: &str| -> Vec<f64> {
            a[k].as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        };
        let (i, o) = (vals("in"), vals("out"));
        let scores: Vec<f64> = i.iter().chain(&o).copied().collect();
        let members: Vec<bool> = (0..scores.len()).map(|j| j < i.len()).collect();
        let got = auc(&scores, &members);
        let want = a["auc"].as_f64().unwrap();
        assert!((got - want).abs() < 1e-12, "AUC {got}, scipy {want}");
    }
}

#[test]
fn guesses_count_top_and_bottom() {
    let scores = [0.9, 0.1, 0.8, 0.2, 0.5, 0.5];
    let members = [true, false, false, false, true, true];
    // Top 2: idx 0 (in, right), 2 (out, wrong); bottom 2: idx 1, 3 (both out, right).
    assert_eq!(guess(&scores, &members, 2), (4, 3));
    // k clamps to m/2.
    assert_eq!(guess(&scores, &members, 10).0, 6);
}

#[test]
fn canary_sources_relabel_and_append() {
    let (base, pool) = builtin_data(&tiny(), 32, 5, 6).unwrap();
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
    let can = Relabeled::random_wrong(&pool, &mut rng).unwrap();
    let t = base.max_text_len().max(pool.max_text_len());
    let orig = pool.collate(&[0, 1, 2, 3, 4, 5], t).unwrap();
    let relab = can.collate(&[0, 1, 2, 3, 4, 5], t).unwrap();
    for row in 0..6 {
        let p = (0..t)
            .find(|&j| orig.loss_mask[row * t + j] == 1.0)
            .unwrap();
        assert_ne!(
            orig.targets[row * t + p],
            relab.targets[row * t + p],
            "row {row}"
        );
        assert_eq!(relab.input_ids[row * t + p + 1], relab.targets[row * t + p]);
    }
    let data = WithCanaries::new(&base, &can, vec![1, 4]).unwrap();
    assert_eq!(data.len(), 7);
    let b = data.collate(&[6, 0, 5], t).unwrap();
    let want_base = base.collate(&[0], t).unwrap();
    let want_can = can.collate(&[4, 1], t).unwrap();
    assert_eq!(b.size, 3);
    assert_eq!(&b.input_ids[..t], &want_base.input_ids[..]);
    assert_eq!(&b.targets[t..], &want_can.targets[..]);
    assert_eq!(b.example_ids, vec![0, 9, 6]);
    assert!(data.collate(&[7], t).is_err());
}

/// The shipped LLaVA folder.
fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/tiny-pretrained")
}

fn run(
    method: Method,
    eps: Option<f64>,
    broken: bool,
    m: usize,
    steps: u32,
    seed: u64,
) -> AuditRow {
    let spec = audit_spec(&tiny());
    let (mcfg, mode) = spec.build().unwrap();
    let (model, _) = load_llava(&Cpu, &tiny(), &mode, 0).unwrap();
    let (base, pool) = builtin_data(&tiny(), mcfg.vision.image_size, 300, m).unwrap();
    let mut c = AuditConfig::new(method, eps);
    c.canaries = m;
    c.steps = steps;
    c.batch = 60;
    c.seed = Some(seed);
    c.broken_noise = broken;
    let r = audit_run(&Cpu, model, spec, &base, &pool, &c).unwrap();
    eprintln!(
        "{} ε={:?} broken={} σ={:.3} q={:.3}: {} {}/{} correct, ε_lb {:.3} (black-box {:.3}, {}/{}), AUC {:.3}, MIA {:.3}, {:.1} s",
        r.method, r.claimed_epsilon, r.broken, r.sigma, r.q, r.primary.kind, r.primary.correct,
        r.primary.guesses, r.primary.epsilon_lower_bound, r.black_box.epsilon_lower_bound,
        r.black_box.correct, r.black_box.guesses, r.primary.score_auc, r.mia_auc, r.seconds
    );
    r
}

// The power tests: m = 300 white-box canaries, 300 base examples, B = 60, T = 60,
// so q = 60 / (300 + 2·300) = 1/15 and an included canary is sampled qT = 4 times
// on average (never with probability e^−4 ≈ 2 %). Seeds are public, so each test
// is deterministic; the margins below say why another seed would pass too.
const M: usize = 300;
const STEPS: u32 = 60;

#[test]
fn nonprivate_gives_a_clearly_positive_bound() {
    // No noise: a sampled canary moves its coordinate by lr·C/|B| per sampling.
    // What blurs it is the data's own (unclipped, as the model learns) drift along
    // the LoRA A coordinates, a per-coordinate offset independent of the coins:
    // measured 132/150 correct, ε ≥ 1.43, AUC 0.86 with this seed. ε > 0.5 needs
    // only ≥ 110/150 at k = 75 (chance: 75).
    let r = run(Method::Nonprivate, None, false, M, STEPS, 21);
    assert!(r.primary.epsilon_lower_bound > 0.5, "{r:?}");
    assert!(r.primary.score_auc > 0.75, "{r:?}");
}

#[test]
fn broken_noise_is_caught_and_correct_noise_is_not() {
    // Claimed ε = 1 (σ ≈ 2.24 here). Broken: σ/10 ≈ 0.22, so along a canary's
    // coordinate the signal (qT = 4 samplings of C) against the noise accumulated
    // over all T steps (0.22·C·√60 ≈ 1.7 C) is ≈ 2.3 stds: measured 139/150 correct,
    // ε ≥ 1.85 (AUC 0.89) with this seed. At k = 75, ε ≤ 1 would need ≤ 122/150 (chance: 75).
    let broken = run(Method::Dpsgd, Some(1.0), true, M, STEPS, 22);
    assert!(broken.primary.epsilon_lower_bound > 1.0, "{broken:?}");
    // Correct: measured 23/30, ε ≥ 0.20. Exceeding the true ε at all has probability
    // ≤ 5 % by the theorem, and the one-run bound is far from tight (0.8 at ε = 8 in
    // the default audit, docs/RESULTS.md), so exceeding 1 at ε = 1 is far rarer.
    let ok = run(Method::Dpsgd, Some(1.0), false, M, STEPS, 22);
    assert!(ok.primary.epsilon_lower_bound <= 1.0, "{ok:?}");
    assert!(ok.primary.epsilon_lower_bound < broken.primary.epsilon_lower_bound);
    assert_eq!(broken.sigma * 10.0, ok.sigma);
}

#[test]
fn cli_quick_audit_writes_its_table_and_has_no_broken_switch() {
    let exe = env!("CARGO_BIN_EXE_dualpriv");
    let dir = std::env::temp_dir().join(format!("dualpriv-audit-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = std::process::Command::new(exe)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "audit",
            "--quick",
            "--method",
            "nonprivate,dpsgd",
            "--epsilon",
            "1",
            "--out",
        ])
        .arg(&dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("concern these audit runs only"), "{stdout}");
    assert!(stdout.contains("| dpsgd | 1 | 100 white-box |"), "{stdout}");
    let lines = std::fs::read_to_string(dir.join("audit.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 2);
    let row: Value = serde_json::from_str(lines.lines().nth(1).unwrap()).unwrap();
    assert_eq!(row["broken"], false);
    assert_eq!(
        row["insecure_seed"], false,
        "the CLI draws coins and keys from the OS"
    );
    assert!(std::fs::read_to_string(dir.join("audit.md"))
        .unwrap()
        .contains("| nonprivate | ∞ |"));
    // Nothing else is written: no checkpoint, no ledger.
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2);
    let help = std::process::Command::new(exe)
        .args(["audit", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout).to_lowercase();
    assert!(help.contains("--canaries") && !help.contains("broken") && !help.contains("seed"));
    let bad = std::process::Command::new(exe)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["audit", "--quick", "--method", "dpzo", "--white-box"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("dpzo has no per-coordinate gradient"));
    let _ = std::fs::remove_dir_all(&dir);
}
