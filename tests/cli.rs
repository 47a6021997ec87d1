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

/// A tiny pretrained checkpoint to start from, independent of the shipped assets.
fn init(dir: &Path) -> PathBuf {
    let cfg = ModelConfig::preset("tiny").unwrap();
    let m = Mllm::new(&Cpu, &cfg, &TrainMode::frozen(), 0).unwrap();
    let p = dir.join("init");
    std::fs::create_dir_all(&p).unwrap();
    m.save(&Cpu, &p.join("model.safetensors")).unwrap();
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
