//! `dualpriv study`: the statistics against scipy, and the `--quick` pipeline end
//! to end through the binary (results.jsonl, RESULTS.md, the plots, `--resume`).
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use dualpriv::backend::cpu::Cpu;
use dualpriv::model::{Mllm, TrainMode};
use dualpriv::study::results::{Record, StudyFile};
use dualpriv::study::spec::grid;
use dualpriv::study::stats::{summary, t_cdf, t_interval, t_quantile};

/// Reference values from scipy.stats 1.17 (`scripts/make_study_stats_fixture.py`).
#[test]
fn statistics_match_scipy() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/study/stats.json");
    let fx: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let f = |v: &serde_json::Value| v.as_f64().unwrap();
    let mut worst = 0.0f64;
    for q in fx["quantiles"].as_array().unwrap() {
        let (df, p, want) = (f(&q["df"]), f(&q["p"]), f(&q["t"]));
        let got = t_quantile(p, df);
        let rel = (got - want).abs() / want.abs();
        worst = worst.max(rel);
        assert!(rel < 1e-10, "t.ppf({p}, {df}): {got} vs scipy {want}");
    }
    for c in fx["cdf"].as_array().unwrap() {
        let (df, t, want) = (f(&c["df"]), f(&c["t"]), f(&c["cdf"]));
        let got = t_cdf(t, df);
        assert!(
            (got - want).abs() < 1e-12,
            "t.cdf({t}, {df}): {got} vs {want}"
        );
    }
    for c in fx["cases"].as_array().unwrap() {
        let xs: Vec<f64> = c["xs"].as_array().unwrap().iter().map(f).collect();
        let s = summary(&xs);
        let scale = f(&c["std"]).max(1e-300);
        assert!((s.mean - f(&c["mean"])).abs() < 1e-12 * f(&c["mean"]).abs().max(1.0));
        assert!((s.std - f(&c["std"])).abs() < 1e-9 * scale, "std of {xs:?}");
        let i = t_interval(&xs, 0.95).unwrap();
        // The half-width relative to the interval's own scale.
        let half = f(&c["hi95"]) - f(&c["mean"]);
        // Plus a few ulps of the ends: near 1.0 a 4e-9 half-width is below ulp(1) · 1e9.
        let tol = |end: f64| 1e-9 * half + 4.0 * f64::EPSILON * end.abs();
        let (lo, hi) = (f(&c["lo95"]), f(&c["hi95"]));
        assert!(
            (i.lo - lo).abs() < tol(lo),
            "lo of {xs:?}: {} vs {lo}",
            i.lo
        );
        assert!(
            (i.hi - hi).abs() < tol(hi),
            "hi of {xs:?}: {} vs {hi}",
            i.hi
        );
    }
    eprintln!("worst relative error of t quantiles vs scipy: {worst:.1e}");
}

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_dualpriv"))
}

/// Runs the binary; returns (success, stdout, stderr).
fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(binary()).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A random tiny LLaVA folder (the built-in task's config, tokenizer and
/// preprocessor, random weights), independent of the shipped assets: the test
/// checks the pipeline, not the numbers. A folder the study cannot read would make
/// it pretrain one first (minutes); the test asserts that it did not.
fn init(dir: &Path) -> PathBuf {
    let cfg = dualpriv::data::builtin::model_config("tiny").unwrap();
    let m = Mllm::new(&Cpu, &cfg, &TrainMode::frozen(), 0).unwrap();
    let p = dir.join("init");
    std::fs::create_dir_all(&p).unwrap();
    dualpriv::data::builtin::write_model_folder(&Cpu, &m, &p).unwrap();
    p
}

fn records(dir: &Path) -> Vec<Record> {
    std::fs::read_to_string(dir.join("results.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

#[test]
fn quick_study_end_to_end_and_resume() {
    let root = common::tmp_dir("study-quick");
    let init = init(&root);
    let dir = root.join("study");
    let (d, i) = (dir.to_str().unwrap(), init.to_str().unwrap());
    let t0 = std::time::Instant::now();
    let (ok, out, err) = run(&["study", "--quick", "--out", d, "--pretrained", i]);
    assert!(ok, "{out}\n{err}");
    assert!(!err.contains("pretraining one now"), "{err}");
    eprintln!("quick study: {:.1} s", t0.elapsed().as_secs_f64());

    // Every run of the grid is one parsed line, with the accountant's ε.
    let study: StudyFile =
        serde_json::from_str(&std::fs::read_to_string(dir.join("study.json")).unwrap()).unwrap();
    let want = grid(&study.plan);
    let recs = records(&dir);
    assert_eq!(recs.len(), want.len(), "{out}");
    assert!(want.len() >= 6);
    for s in &want {
        let r = recs
            .iter()
            .find(|r| r.spec.same_as(s))
            .unwrap_or_else(|| panic!("{} missing", s.label()));
        let o = &r.outcome;
        assert!((0.0..=1.0).contains(&o.accuracy) && o.loss.is_finite() && o.loss > 0.0);
        assert_eq!(o.steps_done, s.steps);
        match (s.epsilon, o.epsilon_spent) {
            (None, None) => assert_eq!(o.sigma, 0.0),
            (Some(target), Some(spent)) => {
                assert!(
                    spent <= target + 1e-9 && spent > 0.5 * target,
                    "{spent} vs {target}"
                );
                assert!(o.sigma > 0.0);
            }
            other => panic!("{}: ε {other:?}", s.label()),
        }
        assert!(o.peak_bytes.unwrap() > o.base_bytes.unwrap());
        assert!(o.median_step_seconds > 0.0 && o.wall_seconds >= o.median_step_seconds);
        assert!(o.trainable_params > 0);
        let want_tokens = s.tokens.map_or(16, |t| t.visual_tokens());
        assert_eq!(o.visual_tokens, want_tokens, "{}", s.label());
    }

    // The report has its tables, and the plots are real images.
    let md = std::fs::read_to_string(dir.join("RESULTS.md")).unwrap();
    for needle in [
        "## Accuracy per method and ε",
        "## dualpriv − dpsgd, paired by repetition",
        "| dualpriv / dpsgd |",
        "0.8566 (14.34 % less)",
        "plots/accuracy_vs_epsilon.png",
        "plots/memory_time.svg",
        "## Ablation at ε = 3: keep_frac",
        "## Ablation at ε = 3: visual-token budget",
    ] {
        assert!(md.contains(needle), "RESULTS.md lacks {needle:?}:\n{md}");
    }
    for (stem, word) in [
        ("accuracy_vs_epsilon", "dualpriv"),
        ("accuracy_vs_keep_frac", "keep_frac"),
        ("accuracy_vs_visual_tokens", "visual tokens"),
        ("memory_time", "step time"),
    ] {
        let png = dir.join(format!("plots/{stem}.png"));
        let img = image::open(&png).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (800, 500));
        let mut colours: Vec<[u8; 3]> = img.pixels().map(|p| p.0).collect();
        colours.sort_unstable();
        colours.dedup();
        let ink = img.pixels().filter(|p| p.0 != [255, 255, 255]).count();
        // Anti-aliased text and coloured series: many colours, and ink on more
        // than 1 % of the picture but not all of it.
        assert!(
            colours.len() > 20,
            "{stem}.png has {} colours",
            colours.len()
        );
        assert!(
            ink > 4000 && ink < 300_000,
            "{stem}.png: {ink} non-white pixels"
        );
        let svg = std::fs::read_to_string(dir.join(format!("plots/{stem}.svg"))).unwrap();
        assert!(svg.starts_with("<svg") && svg.len() > 2000, "{stem}.svg");
        assert!(
            svg.contains("<text") && svg.contains(word),
            "{stem}.svg lacks {word:?}"
        );
    }

    // A resume with everything done runs nothing and keeps every line.
    let before = std::fs::read_to_string(dir.join("results.jsonl")).unwrap();
    let (ok, out, err) = run(&["study", "--resume", d]);
    assert!(ok, "{out}\n{err}");
    assert!(
        out.contains(&format!("{} runs in the grid, 0 run now", want.len())),
        "{out}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("results.jsonl")).unwrap(),
        before
    );

    // An interrupted study: one finished line lost and a half-written one left.
    let lines: Vec<&str> = before.lines().collect();
    let (last, kept) = lines.split_last().unwrap();
    let mut cut = kept.join("\n") + "\n";
    cut += &last[..last.len() / 2];
    std::fs::write(dir.join("results.jsonl"), cut).unwrap();
    let (ok, out, err) = run(&["study", "--resume", d]);
    assert!(ok, "{out}\n{err}");
    assert!(err.contains("unfinished line"), "{err}");
    assert!(out.contains("1 run now"), "{out}");
    let again = records(&dir);
    assert_eq!(again.len(), want.len());
    assert!(want.iter().all(|s| again.iter().any(|r| r.spec.same_as(s))));

    // A new study refuses a folder that holds one, and names --resume.
    let (ok, _, err) = run(&["study", "--quick", "--out", d, "--pretrained", i]);
    assert!(!ok);
    assert!(err.contains("--resume"), "{err}");
}
