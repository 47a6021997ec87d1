//! The privacy ledger: every DP training run on a dataset appends what it spent,
//! so the cumulative privacy loss on the same data is visible and never reset.
//!
//! The ledger is a JSON file (by default `privacy-ledger.json` in the folder that
//! holds the run folders). Runs are keyed by their output folder; a resumed run
//! updates its own entry. It is rewritten atomically (temporary file, fsync,
//! rename), so a crash mid-write leaves the previous ledger intact.
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{epsilon, AccountantKind};
use crate::{Error, Result};

/// One run's spend.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// The run's output folder (its identity in the ledger).
    pub run: String,
    /// Fingerprint of the private training data.
    pub data_fingerprint: String,
    /// Training method.
    pub method: String,
    /// (q, σ, steps) history of the mechanism.
    pub history: Vec<(f64, f64, u64)>,
    /// Steps taken.
    pub steps: u64,
    /// δ the run is accounted at.
    pub delta: f64,
    /// Accountant used.
    pub accountant: String,
    /// ε spent by this run at `delta`.
    pub epsilon: f64,
}

/// The ledger file's contents.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Ledger {
    /// Every run, in the order they first appeared.
    pub entries: Vec<LedgerEntry>,
}

impl Ledger {
    /// The default ledger path for a run written to `run_dir`: beside the run
    /// folders, so runs on the same data share it.
    pub fn default_path(run_dir: &Path) -> PathBuf {
        let parent = run_dir
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        parent.join("privacy-ledger.json")
    }

    /// Reads a ledger; a missing file is an empty ledger.
    pub fn load(path: &Path) -> Result<Self> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                Error::Config(format!(
                    "{}: the privacy ledger is corrupt ({e}); restore it from a backup rather than deleting it",
                    path.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(Error::Io { path: path.display().to_string(), message: e.to_string() }),
        }
    }

    /// Writes the ledger atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let io = |e: std::io::Error| Error::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let json = serde_json::to_vec_pretty(self)
            .map_err(|e| Error::Config(format!("serialising the ledger: {e}")))?;
        let tmp = path.with_extension("json.tmp");
        let mut f = File::create(&tmp).map_err(io)?;
        f.write_all(&json).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// Inserts or replaces the entry of `entry.run`.
    pub fn upsert(&mut self, entry: LedgerEntry) {
        match self.entries.iter_mut().find(|e| e.run == entry.run) {
            Some(e) => *e = entry,
            None => self.entries.push(entry),
        }
    }

    /// Runs other than `run` that used the data with this fingerprint.
    pub fn others_on<'a>(
        &'a self,
        fingerprint: &'a str,
        run: &'a str,
    ) -> impl Iterator<Item = &'a LedgerEntry> + 'a {
        self.entries
            .iter()
            .filter(move |e| e.data_fingerprint == fingerprint && e.run != run)
    }

    /// The cumulative ε of every run on `fingerprint`, composed by `kind` at `delta`
    /// (sequential composition of all their mechanisms: the runs touched the same data).
    pub fn cumulative_epsilon(
        &self,
        fingerprint: &str,
        kind: AccountantKind,
        delta: f64,
    ) -> Result<f64> {
        let history: Vec<(f64, f64, u64)> = self
            .entries
            .iter()
            .filter(|e| e.data_fingerprint == fingerprint)
            .flat_map(|e| e.history.iter().copied())
            .collect();
        epsilon(kind, &history, delta)
    }
}
