//! The privacy ledger: every training run on a dataset records what it spent, so
//! the cumulative privacy loss on the same data is visible and never reset.
//!
//! The ledger is a JSON file (by default `privacy-ledger.json` in the folder that
//! holds the run folders), with a secret key beside it (`privacy-ledger.key`)
//! that keys the data fingerprints: the ledger shows which runs share data without
//! identifying the data to whoever reads it.
//!
//! Rules an adversary (or an accident) cannot get around:
//! * Runs are keyed by a random run id. A resumed run updates its own entry, and
//!   only with a history that **extends** the stored one ([`Ledger::record`]).
//! * A run records its steps here *before* the checkpoint that releases them is
//!   written, so a crash can make the ledger over-count, never under-count.
//! * Non-private runs, runs with shuffled batches and `--insecure-seed` runs are
//!   recorded with ε = ∞ (not covered), and make the cumulative ε on their data ∞.
//! * It is rewritten atomically (temporary file, fsync, rename); a corrupt ledger
//!   is an error, never silently replaced.
//!
//! Scope: one ledger file counts the runs that wrote to it. Runs on the same data
//! recorded in another ledger (another folder, another machine) are not seen.
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{epsilon, AccountantKind};
use crate::{Error, Result};

/// One run's spend.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// The run's random id (its identity in the ledger).
    pub run_id: String,
    /// The run's output folder, for people reading the ledger.
    pub run: String,
    /// Keyed fingerprint of the private training data.
    pub data_fingerprint: String,
    /// Training method.
    pub method: String,
    /// (q, σ, steps) history of the mechanism.
    pub history: Vec<(f64, f64, u64)>,
    /// Steps taken (and possibly released).
    pub steps: u64,
    /// Sampling/noise draws the run has reserved: a resumed run continues after
    /// these, so it never reuses noise that a lost checkpoint may have released.
    pub draws: u64,
    /// δ the run is accounted at.
    pub delta: f64,
    /// Accountant used.
    pub accountant: String,
    /// ε spent by this run at `delta`; `None` when the run is not covered (ε = ∞).
    pub epsilon: Option<f64>,
    /// Why the run is not private, when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_private: Option<String>,
    /// The noise generator (`chacha20`, or `philox`: not cryptographic).
    #[serde(default)]
    pub rng: String,
    /// Random id of the process that currently owns the run: a resume takes the run
    /// over, and the process it took over from can record nothing more.
    #[serde(default)]
    pub session: String,
}

impl LedgerEntry {
    /// ε of this entry, ∞ when not covered.
    pub fn epsilon_or_inf(&self) -> f64 {
        self.epsilon.unwrap_or(f64::INFINITY)
    }
}

/// The ledger file's contents.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Ledger {
    /// Every run, in the order they first appeared.
    pub entries: Vec<LedgerEntry>,
}

/// Whether `new` is `old` followed by more steps (the last entry may have grown).
pub fn extends(old: &[(f64, f64, u64)], new: &[(f64, f64, u64)]) -> bool {
    let Some((last, head)) = old.split_last() else {
        return true;
    };
    new.len() >= old.len()
        && new[..head.len()] == *head
        && new[head.len()].0 == last.0
        && new[head.len()].1 == last.1
        && new[head.len()].2 >= last.2
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
                Error::Format(format!(
                    "{}: the privacy ledger is corrupt ({e}); restore it from a backup rather than deleting it",
                    path.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(Error::io(path, e)),
        }
    }

    /// The fingerprint key of an existing ledger (resuming needs the key that
    /// fingerprinted the run's data; a new one would look like other data).
    pub fn existing_fingerprint_key(path: &Path) -> Result<[u8; 32]> {
        let kp = path.with_extension("key");
        if !kp.exists() {
            return Err(Error::io(
                &kp,
                "the ledger's fingerprint key is missing, so this run's data cannot be \
                 recognised; restore the key file from a backup",
            ));
        }
        Self::fingerprint_key(path)
    }

    /// The fingerprint key of the ledger at `path` (`<ledger>.key`), created with
    /// fresh OS entropy, readable by the owner only, on first use.
    pub fn fingerprint_key(path: &Path) -> Result<[u8; 32]> {
        let kp = path.with_extension("key");
        let io = |e: std::io::Error| Error::Io {
            path: kp.display().to_string(),
            message: e.to_string(),
        };
        match std::fs::read_to_string(&kp) {
            Ok(s) => crate::dp::key::parse_hex32(s.trim()).ok_or_else(|| {
                Error::Format(format!(
                    "{}: not a ledger key (expected 64 hex digits); restore it from a backup",
                    kp.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(dir) = kp.parent().filter(|p| !p.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(io)?;
                }
                let mut key = [0u8; 32];
                getrandom::fill(&mut key).map_err(Error::entropy)?;
                let hex = crate::dp::key::to_hex(&key);
                let mut f = private_create_new(&kp).map_err(io)?;
                f.write_all(hex.as_bytes()).map_err(io)?;
                f.sync_all().map_err(io)?;
                Ok(key)
            }
            Err(e) => Err(io(e)),
        }
    }

    /// Writes the ledger atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_vec_pretty(self)
            .map_err(|e| Error::Format(format!("serialising the ledger: {e}")))?;
        write_durable(path, &json)
    }

    /// Inserts the entry of a new run, or updates its own entry. An update that
    /// does not extend the stored history and draws, or that changes the data or
    /// method, is refused: a ledger entry can only grow. So is an update from a
    /// session that no longer owns the run, unless it takes the run over (a resume).
    pub fn record(&mut self, entry: LedgerEntry, take_over: bool) -> Result<()> {
        match self.entries.iter_mut().find(|e| e.run_id == entry.run_id) {
            Some(e) => {
                if e.session != entry.session && !take_over {
                    return Err(Error::Config(format!(
                        "run {} ({}) was resumed by another process since this one started; this \
                         process stops, so that two copies of one run never share a ledger entry",
                        e.run_id, e.run
                    )));
                }
                let grows = extends(&e.history, &entry.history)
                    && entry.steps >= e.steps
                    && entry.draws >= e.draws;
                if !grows
                    || e.data_fingerprint != entry.data_fingerprint
                    || e.method != entry.method
                {
                    return Err(Error::Config(format!(
                        "the privacy ledger already records run {} ({}) with {} steps; the update \
                         ({} steps) does not extend it, so it is refused (a ledger entry can only grow)",
                        e.run_id, e.run, e.steps, entry.steps
                    )));
                }
                *e = entry;
            }
            None => self.entries.push(entry),
        }
        Ok(())
    }

    /// The entry of run `run_id`.
    pub fn entry(&self, run_id: &str) -> Option<&LedgerEntry> {
        self.entries.iter().find(|e| e.run_id == run_id)
    }

    /// Runs other than `run_id` that used the data with this fingerprint.
    pub fn others_on<'a>(
        &'a self,
        fingerprint: &'a str,
        run_id: &'a str,
    ) -> impl Iterator<Item = &'a LedgerEntry> + 'a {
        self.entries
            .iter()
            .filter(move |e| e.data_fingerprint == fingerprint && e.run_id != run_id)
    }

    /// The cumulative ε of every run on `fingerprint`, composed by `kind` at `delta`
    /// (sequential composition of all their mechanisms: the runs touched the same
    /// data); ∞ when any of them is not covered.
    pub fn cumulative_epsilon(
        &self,
        fingerprint: &str,
        kind: AccountantKind,
        delta: f64,
    ) -> Result<f64> {
        let on: Vec<&LedgerEntry> = self
            .entries
            .iter()
            .filter(|e| e.data_fingerprint == fingerprint)
            .collect();
        if on.iter().any(|e| e.not_private.is_some()) {
            return Ok(f64::INFINITY);
        }
        let history: Vec<(f64, f64, u64)> =
            on.iter().flat_map(|e| e.history.iter().copied()).collect();
        epsilon(kind, &history, delta)
    }
}

/// Holds `<ledger>.lock` for a read-modify-write of the ledger, so concurrent runs
/// (or two copies of one run folder) serialise their updates; removed on drop.
pub struct LedgerLock {
    path: PathBuf,
}

impl LedgerLock {
    /// Waits up to 30 s for the lock of the ledger at `ledger`.
    pub fn acquire(ledger: &Path) -> Result<Self> {
        let path = ledger.with_extension("lock");
        if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::Io {
                path: dir.display().to_string(),
                message: e.to_string(),
            })?;
        }
        for _ in 0..600 {
            match private_create_new(&path) {
                Ok(_) => return Ok(Self { path }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    std::thread::sleep(std::time::Duration::from_millis(50))
                }
                Err(e) => {
                    return Err(Error::Io {
                        path: path.display().to_string(),
                        message: e.to_string(),
                    })
                }
            }
        }
        Err(Error::io(
            &path,
            "another dualpriv process has held the ledger lock for 30 s; if none is running \
             (a crash left it), delete the lock file",
        ))
    }
}

impl Drop for LedgerLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Creates `path` (which must not exist), readable and writable by the owner only.
pub(crate) fn private_create_new(path: &Path) -> std::io::Result<File> {
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    o.open(path)
}

/// Writes `bytes` to `path` durably and atomically: a private temporary file,
/// fsync, rename over `path`, fsync of the folder. Every durable write of the
/// training driver goes through here, so the crash-injection hook
/// ([`crate::train::checkpoint::fail_after_writes`]) sees each one.
pub(crate) fn write_durable(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |p: &Path, e: std::io::Error| Error::Io {
        path: p.display().to_string(),
        message: e.to_string(),
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let name = path
        .file_name()
        .map_or("file".into(), |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut f = private_create_new(&tmp).map_err(|e| io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| io(&tmp, e))?;
    f.sync_all().map_err(|e| io(&tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| io(path, e))?;
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    crate::train::checkpoint::after_write(path)
}
