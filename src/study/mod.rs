//! `dualpriv study`: the utility study of every method and ablation on the
//! built-in task, from the shipped pretrained checkpoint.
//!
//! * [`spec`]: what one run is ([`spec::RunSpec`]) and the grid of a study
//!   ([`spec::Plan`], [`spec::grid`]), deduplicated where parts share runs;
//! * [`run`]: the one seam to the training code, [`run::run_one`];
//! * [`results`]: `DIR/study.json` and `DIR/results.jsonl` (a line per finished run,
//!   fsynced as it ends; `--resume` skips what it holds);
//! * [`stats`]: mean, std and Student-t intervals;
//! * [`report`]: the tables of `DIR/RESULTS.md`;
//! * [`plot`]: the plots, PNG and SVG.
//!
//! **Privacy.** Every run is a separate DP fine-tune with its own fresh secret key
//! from the OS, and every ε the study reports is the one its accountant computed for
//! the steps taken. All runs train on the same private split, so their releases
//! compose: each records its spend in `DIR/privacy-ledger.json`, which adds them up
//! (and the non-private runs are not private at all). `results.jsonl` and
//! `RESULTS.md` hold only public settings (the [`spec::RunSpec`], the declared
//! dataset size) and aggregate metrics of the released models on the **test** split
//! (post-processing, covered by each run's ε), plus the peak memory and step time of
//! the runs. Those two are side channels of the Poisson batch sizes, as in every
//! run's `metrics.jsonl`; ε does not cover timing or memory side channels. Nothing
//! computed from the private examples themselves (training loss, batch sizes,
//! gradient norms) is written. The run folders under `DIR/runs/` hold each released
//! model's checkpoint and its `metrics.jsonl`.
pub mod plot;
pub mod report;
pub mod results;
pub mod run;
pub mod spec;
pub mod stats;
