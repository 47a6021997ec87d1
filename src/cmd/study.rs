//! `dualpriv study`: runs the study grid ([`crate::study`]) into a folder, one
//! run at a time, appending each finished run to `results.jsonl`; then writes
//! `RESULTS.md` and the plots from every result the folder holds. A resume runs
//! only what `results.jsonl` lacks.
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::backend::dp::DpBackend;
use crate::study::report::{self, References};
use crate::study::results::{self, Record, StudyFile};
use crate::study::run::{references, run_one, Settings, StudyContext};
use crate::study::spec::{grid, Plan};
use crate::{Error, Result};

/// Settings of `dualpriv study`.
#[derive(Clone, Debug)]
pub struct StudyArgs {
    /// The study folder.
    pub dir: PathBuf,
    /// Continue the study already in `dir` (its `study.json` gives the plan and
    /// settings; `plan`, `settings` and `pretrained` are ignored).
    pub resume: bool,
    /// The grid of a new study.
    pub plan: Plan,
    /// The shared settings of a new study.
    pub settings: Settings,
    /// The pretrained checkpoint folder of a new study.
    pub pretrained: PathBuf,
    /// Show a progress bar with an ETA.
    pub progress: bool,
}

/// What a `dualpriv study` call did.
#[derive(Clone, Debug)]
pub struct StudyOutcome {
    /// Runs in the grid.
    pub grid: usize,
    /// Runs made by this call.
    pub ran: usize,
    /// Runs skipped because `results.jsonl` already held them.
    pub skipped: usize,
    /// Wall time of this call's runs, seconds.
    pub seconds: f64,
    /// The report written.
    pub results_md: PathBuf,
    /// The plot files written (PNG and SVG).
    pub plots: Vec<PathBuf>,
}

/// The file of the reference accuracies, computed once per study.
fn references_path(dir: &Path) -> PathBuf {
    dir.join("references.json")
}

/// Runs the study of `a` on `backend`.
pub fn study<B: DpBackend>(backend: &B, a: &StudyArgs) -> Result<StudyOutcome> {
    let sf = if a.resume {
        results::load_study(&a.dir)?
    } else {
        let sf = StudyFile {
            plan: a.plan.clone(),
            settings: a.settings.clone(),
            pretrained: a.pretrained.clone(),
        };
        results::create(&a.dir, &sf)?;
        sf
    };
    let runs = grid(&sf.plan);
    let done = results::load_records(&a.dir)?;
    let todo = results::remaining(&runs, &done);
    let skipped = runs.len() - todo.len();
    let refs_file = references_path(&a.dir);
    let mut refs: Option<References> = read_references(&refs_file)?;
    let t0 = Instant::now();
    if !todo.is_empty() || refs.is_none() {
        let ctx = StudyContext::new(backend, &sf.pretrained, &sf.settings, &a.dir)?;
        if refs.is_none() {
            let r = references(backend, &ctx)?;
            let json = serde_json::to_string_pretty(&r)
                .map_err(|e| Error::Internal(format!("references do not serialise: {e}")))?;
            std::fs::write(&refs_file, json + "\n").map_err(|e| Error::Io {
                path: refs_file.display().to_string(),
                message: e.to_string(),
            })?;
            refs = Some(r);
        }
        if skipped > 0 {
            eprintln!(
                "study: {skipped} of {} runs are already in {}; running the other {}",
                runs.len(),
                results::results_path(&a.dir).display(),
                todo.len()
            );
        }
        let bar = a.progress.then(|| {
            let b = indicatif::ProgressBar::new(todo.len() as u64);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} runs | {elapsed_precise} elapsed, ETA {eta_precise} | {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b
        });
        for spec in &todo {
            if let Some(b) = &bar {
                b.set_message(spec.label());
            }
            let outcome = run_one(backend, spec, &ctx).map_err(|e| {
                Error::Internal(format!(
                    "run {} failed: {e}. The finished runs are saved; fix the cause and continue \
                     with `dualpriv study --resume {}`",
                    spec.label(),
                    a.dir.display()
                ))
            })?;
            let finished_unix = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            results::append(
                &a.dir,
                &Record {
                    spec: spec.clone(),
                    outcome,
                    finished_unix,
                },
            )?;
            if let Some(b) = &bar {
                b.inc(1);
            }
        }
        if let Some(b) = bar {
            b.finish();
        }
    }
    let seconds = t0.elapsed().as_secs_f64();
    let records = results::load_records(&a.dir)?;
    let (results_md, plots) = write_report(&a.dir, &sf, &records, &refs.unwrap_or_default())?;
    Ok(StudyOutcome {
        grid: runs.len(),
        ran: todo.len(),
        skipped,
        seconds,
        results_md,
        plots,
    })
}

fn read_references(path: &Path) -> Result<Option<References>> {
    match std::fs::read_to_string(path) {
        Ok(t) => serde_json::from_str(&t).map(Some).map_err(|e| {
            Error::Format(format!(
                "{}: not a list of reference accuracies ({e}); delete it to recompute it",
                path.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        }),
    }
}

/// Writes `dir/RESULTS.md` and `dir/plots/*` from `records`.
pub fn write_report(
    dir: &Path,
    sf: &StudyFile,
    records: &[Record],
    refs: &References,
) -> Result<(PathBuf, Vec<PathBuf>)> {
    let plot_dir = dir.join("plots");
    let made = crate::study::plot::write_all(&plot_dir, sf, records)?;
    let embedded: Vec<(String, &str)> = made
        .iter()
        .map(|(f, t)| (format!("plots/{f}"), *t))
        .collect();
    let embedded: Vec<(&str, &str)> = embedded.iter().map(|(f, t)| (f.as_str(), *t)).collect();
    let last = records.iter().map(|r| r.finished_unix).max().unwrap_or(0);
    let md = report::render(sf, records, refs, &embedded, &machine(), &utc_date(last));
    let path = dir.join("RESULTS.md");
    std::fs::write(&path, md).map_err(|e| Error::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    let plots = made
        .iter()
        .flat_map(|(f, _)| ["png", "svg"].map(|x| plot_dir.join(format!("{f}.{x}"))))
        .collect();
    Ok((path, plots))
}

/// The CPU model and the threads the backend uses, e.g. "Intel Xeon …, 2 threads".
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    format!(
        "{cpu}, {} threads (CPU backend)",
        rayon::current_num_threads()
    )
}

/// `YYYY-MM-DD` (UTC) of Unix time `secs` (the civil-from-days algorithm of
/// H. Hinnant, "chrono-Compatible Low-Level Date Algorithms").
pub fn utc_date(secs: u64) -> String {
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

#[cfg(test)]
mod tests {
    use super::utc_date;

    #[test]
    fn dates() {
        assert_eq!(utc_date(0), "1970-01-01");
        // 2000-02-29 00:00:00 UTC and 2026-12-01 12:00:00 UTC.
        assert_eq!(utc_date(951_782_400), "2000-02-29");
        assert_eq!(utc_date(1_796_126_400), "2026-12-01");
    }
}
