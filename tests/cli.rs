//! The command line names its own flags: the library reports what is wrong in its
//! own terms ([`dualpriv::Error::Setting`], [`dualpriv::Error::NoCudaDriver`]),
//! and the binary adds the flag that fixes it.
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use dualpriv::backend::cpu::Cpu;
use dualpriv::model::{Mllm, ModelConfig, TrainMode};

/// The CLI binary: cargo's, or the one beside the test binaries of a GPU bundle
/// (`scripts/gpu-test.sh` copies both).
fn dualpriv_binary() -> PathBuf {
    let built = PathBuf::from(env!("CARGO_BIN_EXE_dualpriv"));
    let exe = std::env::current_exe().unwrap();
    let beside = exe.ancestors().skip(1).take(2).map(|d| d.join("dualpriv"));
    std::iter::once(built)
        .chain(beside)
        .find(|p| p.is_file())
        .expect("the dualpriv binary")
}

/// Runs the binary; returns (success, stderr).
fn run(args: &[&str], paths: &[(&str, &Path)]) -> (bool, String) {
    let mut c = Command::new(dualpriv_binary());
    c.args(args);
    for (flag, p) in paths {
        c.arg(flag).arg(p);
    }
    let out = c.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A tiny LLaVA folder to start from, independent of the shipped assets.
fn init(dir: &Path) -> PathBuf {
    let cfg = dualpriv::data::builtin::model_config("tiny").unwrap();
    let m = Mllm::new(&Cpu, &cfg, &TrainMode::frozen(), 0).unwrap();
    let p = dir.join("init");
    dualpriv::data::builtin::write_model_folder(&Cpu, &m, &p).unwrap();
    p
}

const SMALL_RUN: [&str; 11] = [
    "train",
    "--method",
    "ghost",
    "--train-examples",
    "64",
    "--batch",
    "8",
    "--micro-batch",
    "8",
    "--noise-multiplier",
    "1",
];

#[test]
fn a_busy_output_folder_names_resume() {
    let root = common::tmp_dir("cli-busy-out");
    let init = init(&root);
    let out = root.join("run");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("something"), b"x").unwrap();
    let (ok, err) = run(&SMALL_RUN, &[("--init", &init), ("--out", &out)]);
    assert!(!ok, "{err}");
    assert!(
        err.contains("not empty") && err.contains("--resume"),
        "{err}"
    );
}

#[test]
fn bad_optimizer_settings_name_their_flags() {
    let root = common::tmp_dir("cli-lr");
    let init = init(&root);
    let mut args = SMALL_RUN.to_vec();
    args.extend(["--lr", "NaN"]);
    let (ok, err) = run(&args, &[("--init", &init), ("--out", &root.join("run"))]);
    assert!(!ok, "{err}");
    assert!(err.contains("--lr"), "{err}");
}

#[test]
fn bad_pruning_settings_name_their_flags() {
    for (flag, value, name) in [
        ("--keep-frac", "1.5", "keep fraction"),
        ("--keep-tokens", "99", "dominant patches"),
    ] {
        let root = common::tmp_dir("cli-prune");
        let init = init(&root);
        let mut args = SMALL_RUN.to_vec();
        args.extend([flag, value]);
        let (ok, err) = run(&args, &[("--init", &init), ("--out", &root.join("run"))]);
        assert!(!ok, "{err}");
        assert!(err.contains(flag) && err.contains(name), "{flag}: {err}");
    }
}

#[test]
fn a_folder_without_a_checkpoint_names_the_command_that_writes_one() {
    let root = common::tmp_dir("cli-no-ckpt");
    let (ok, err) = run(&["eval"], &[("--checkpoint", root.path())]);
    assert!(!ok, "{err}");
    assert!(
        err.contains("no checkpoint here") && err.contains("dualpriv train --out"),
        "{err}"
    );
}

#[test]
fn zero_steps_name_the_steps_flag() {
    let (ok, err) = run(
        &[
            "account",
            "--sample-rate",
            "0.01",
            "--noise-multiplier",
            "1",
            "--steps",
            "0",
        ],
        &[],
    );
    assert!(!ok, "{err}");
    assert!(
        err.contains("at least 1") && err.contains("--steps"),
        "{err}"
    );
}

#[test]
fn a_missing_gpu_names_the_cpu_backend() {
    let root = common::tmp_dir("cli-no-gpu");
    let (ok, err) = run(
        &["eval", "--backend", "cuda"],
        &[("--checkpoint", root.path())],
    );
    assert!(!ok, "{err}");
    // Without the cuda feature or without a driver the fix is the CPU backend; on a
    // GPU machine the command gets as far as the empty folder.
    if err.contains("no CUDA driver") || err.contains("without the `cuda` feature") {
        assert!(err.contains("--backend cpu"), "{err}");
    } else {
        assert!(err.contains("no checkpoint here"), "{err}");
    }
}

/// `bench --interleave` keeps every method's model live, which a device peak would
/// count for each method: refused on CUDA with the fix, before any device is used.
#[test]
fn bench_interleave_is_refused_on_cuda() {
    let (ok, out, err) = run_out(&["bench", "--backend", "cuda", "--interleave"]);
    assert!(!ok && out.is_empty(), "{out}");
    assert!(err.contains("drop --interleave"), "{err}");
}

/// Runs the binary; returns (success, stdout, stderr).
fn run_out(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(dualpriv_binary()).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `bench --describe` prints what a peer needs to build the bench's model: the
/// preset's sizes, the token counts of the bench's data, the trainable count and
/// each method's settings, all equal to what the library computes.
#[test]
fn bench_describe_prints_the_model_a_peer_builds() {
    use dualpriv::data::synthetic::{Dataset, Split};
    let (ok, out, err) = run_out(&[
        "bench",
        "--describe",
        "--preset",
        "small",
        "--batch",
        "4",
        "--method",
        "all",
    ]);
    assert!(ok, "{err}");
    let d: serde_json::Value = serde_json::from_str(&out).unwrap();
    let cfg = ModelConfig::preset("small").unwrap();
    let mode = TrainMode::lora(8, 16.0);
    assert_eq!(d["trainable_params"], cfg.trainable_params(&mode));
    assert_eq!(d["frozen_params"], cfg.base_params());
    assert_eq!(d["batch"], 4);
    assert_eq!(d["vision"]["patches"], 64);
    assert_eq!(d["vision"]["layers_run"], 3);
    assert_eq!(d["visual_tokens"], 64);
    assert_eq!(d["llm"]["vocab"], 1024);
    assert_eq!(d["llm"]["kv_heads"], 4);
    assert_eq!(d["lora_alpha"], 16.0);
    assert_eq!(d["lora_targets"].as_array().unwrap().len(), 7);
    let text_len = Dataset::generate(Split::Private, 4, 1, 64)
        .unwrap()
        .max_text_len();
    assert_eq!(d["text_len"], text_len);
    let methods = d["methods"].as_array().unwrap();
    let names: Vec<&str> = methods
        .iter()
        .map(|m| m["method"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["nonprivate", "dpsgd", "ghost", "dualpriv", "dpzo"]);
    for m in methods {
        let private = m["method"] != "nonprivate";
        assert_eq!(m["clip_norm"].is_null(), !private, "{m}");
        assert_eq!(m["noise_multiplier"].is_null(), !private, "{m}");
        let vis = if m["method"] == "dualpriv" {
            // The preset's default token selection: CLS + 3/8 + 1/8 of 64 patches.
            1 + 24 + 8
        } else {
            64
        };
        assert_eq!(m["visual_tokens"], vis, "{m}");
        assert_eq!(m["seq_len"], vis + text_len, "{m}");
    }
    assert_eq!(methods[4]["optimizer"], "sgd");
    assert_eq!(methods[0]["optimizer"], "adamw");
    // An unknown preset is an error naming the valid ones, and prints no JSON.
    let (ok, out, err) = run_out(&["bench", "--describe", "--preset", "huge"]);
    assert!(!ok && out.is_empty(), "{out}");
    assert!(err.contains("small") && err.contains("tiny"), "{err}");
}

/// The PyTorch peers (`benches/peers`) build the model `bench --describe` prints:
/// `peer.py --check` refuses a trainable count that differs from the crate's and
/// compares Opacus' and the book-keeping per-sample norms and DPZero's differences
/// with brute force. Needs a python with torch and opacus in
/// `DUALPRIV_PEERS_PYTHON`; skipped without it.
#[test]
fn the_torch_peers_match_the_described_model() {
    let Some(py) = std::env::var_os("DUALPRIV_PEERS_PYTHON") else {
        println!("skipped: set DUALPRIV_PEERS_PYTHON to a python with torch and opacus");
        return;
    };
    let root = common::tmp_dir("cli-peers");
    let (ok, out, err) = run_out(&["bench", "--describe", "--preset", "tiny", "--batch", "4"]);
    assert!(ok, "{err}");
    let desc = root.join("tiny.json");
    std::fs::write(&desc, &out).unwrap();
    let peer = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/peers/peer.py");
    let r = Command::new(&py)
        .arg(&peer)
        .arg("--describe")
        .arg(&desc)
        .args(["--check", "--threads", "1"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&r.stdout);
    assert!(
        r.status.success() && stdout.contains("check passed"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&r.stderr)
    );
    // A describe whose trainable count differs is refused.
    let mut d: serde_json::Value = serde_json::from_str(&out).unwrap();
    d["trainable_params"] = serde_json::json!(d["trainable_params"].as_u64().unwrap() + 1);
    std::fs::write(&desc, d.to_string()).unwrap();
    let r = Command::new(&py)
        .arg(&peer)
        .arg("--describe")
        .arg(&desc)
        .args(["--method", "nonprivate", "--steps", "1", "--warmup", "0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(
        !r.status.success() && stderr.contains("trainable"),
        "{stderr}"
    );
}
