//! The study's files: `DIR/study.json` (the plan and settings, written once, checked
//! on `--resume`) and `DIR/results.jsonl` (one [`Record`] per finished run, each
//! line written and fsynced as its run ends, so an interruption loses at most the
//! run in progress).
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::run::{RunOutcome, Settings};
use super::spec::{Plan, RunSpec};
use crate::error::Setting;
use crate::{Error, Result};

/// One line of `results.jsonl`: the run's spec and what it measured, flat.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The run.
    #[serde(flatten)]
    pub spec: RunSpec,
    /// What it measured.
    #[serde(flatten)]
    pub outcome: RunOutcome,
    /// When it finished, seconds since the Unix epoch.
    pub finished_unix: u64,
}

/// `DIR/study.json`: what a study is, so a resume continues the same study.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StudyFile {
    /// The grid.
    pub plan: Plan,
    /// The shared settings.
    pub settings: Settings,
    /// The starting checkpoint folder, as given.
    pub pretrained: PathBuf,
}

/// The results file of study folder `dir`.
pub fn results_path(dir: &Path) -> PathBuf {
    dir.join("results.jsonl")
}

/// The study file of study folder `dir`.
pub fn study_path(dir: &Path) -> PathBuf {
    dir.join("study.json")
}

fn io(path: &Path, e: std::io::Error) -> Error {
    Error::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// Starts a new study in `dir` (created when absent): refuses a folder that
/// already holds one, then writes `study.json` and an empty `results.jsonl`.
pub fn create(dir: &Path, study: &StudyFile) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let sp = study_path(dir);
    if sp.exists() || results_path(dir).exists() {
        return Err(Error::Setting {
            setting: Setting::OutDir,
            message: format!(
                "{} already holds a study; continue it with `--resume {}` or choose another folder",
                dir.display(),
                dir.display()
            ),
        });
    }
    let json = serde_json::to_string_pretty(study)
        .map_err(|e| Error::Internal(format!("study.json does not serialise: {e}")))?;
    write_synced(&sp, format!("{json}\n").as_bytes())?;
    write_synced(&results_path(dir), b"")
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(|e| io(path, e))?;
    f.write_all(bytes).map_err(|e| io(path, e))?;
    f.sync_all().map_err(|e| io(path, e))
}

/// Reads the `study.json` of a study folder.
pub fn load_study(dir: &Path) -> Result<StudyFile> {
    let p = study_path(dir);
    let text = std::fs::read_to_string(&p).map_err(|e| Error::Io {
        path: p.display().to_string(),
        message: format!("{e}; `--resume` takes a folder an earlier `dualpriv study --out` made"),
    })?;
    serde_json::from_str(&text).map_err(|e| {
        Error::Format(format!(
            "{}: not a study file ({e}); it was edited or damaged: start a new study with --out",
            p.display()
        ))
    })
}

/// Reads every finished run of `results.jsonl`. A last line without its newline is
/// a write the process did not finish (its run did not count as finished): it is
/// cut off the file, so the next append starts on a line of its own.
pub fn load_records(dir: &Path) -> Result<Vec<Record>> {
    let p = results_path(dir);
    let text = match std::fs::read_to_string(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(&p, e)),
    };
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    if complete.len() < text.len() {
        eprintln!(
            "study: {} ends in an unfinished line (an interrupted write); dropping it",
            p.display()
        );
        let f = OpenOptions::new()
            .write(true)
            .open(&p)
            .map_err(|e| io(&p, e))?;
        f.set_len(complete.len() as u64).map_err(|e| io(&p, e))?;
        f.sync_all().map_err(|e| io(&p, e))?;
    }
    complete
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| {
                Error::Format(format!(
                    "{} line {}: not a study result ({e}); delete that line to rerun its run",
                    p.display(),
                    i + 1
                ))
            })
        })
        .collect()
}

/// Appends `rec` to `results.jsonl` and fsyncs it.
pub fn append(dir: &Path, rec: &Record) -> Result<()> {
    let p = results_path(dir);
    let line = serde_json::to_string(rec)
        .map_err(|e| Error::Internal(format!("a study result does not serialise: {e}")))?;
    let mut f = OpenOptions::new()
        .append(true)
        .create(true)
        .open(&p)
        .map_err(|e| io(&p, e))?;
    f.write_all(format!("{line}\n").as_bytes())
        .map_err(|e| io(&p, e))?;
    f.sync_all().map_err(|e| io(&p, e))
}

/// The runs of `grid` that `done` does not hold yet, in grid order.
pub fn remaining(grid: &[RunSpec], done: &[Record]) -> Vec<RunSpec> {
    grid.iter()
        .filter(|s| !done.iter().any(|r| r.spec.same_as(s)))
        .cloned()
        .collect()
}
