//! `DIR/RESULTS.md`: the study's tables, computed from `results.jsonl` alone
//! (mean ± sample std per cell; the dualpriv − dpsgd paired difference with its
//! 95 % t interval, paired by repetition index; memory and step time per method).
//! The series behind the plots come from here too, so the tables and the plots
//! show the same numbers.
use std::fmt::Write as _;

use super::results::{Record, StudyFile};
use super::spec::{
    Ablation, RunSpec, DEFAULT_KEEP_FRAC, DEFAULT_RANK, DEFAULT_TOKENS, FULL_ATTENTION_LR,
};
use super::stats::{paired_differences, summary, t_interval, Interval, Summary};
use crate::train::method::Method;
use crate::train::PruneScope;

/// The paper's peak memory of Dual-Priv relative to DP-SGD (14.34 % less;
/// arXiv 2506.07077).
pub const PAPER_RATIO_DPSGD: f64 = 1.0 - 0.1434;
/// The paper's peak memory of Dual-Priv relative to zeroth-order DP (1.74 % more).
pub const PAPER_RATIO_DPZO: f64 = 1.0174;

/// Reference accuracies that say what the study's numbers mean (e.g. the
/// pretrained model before fine-tuning, the majority answer).
pub type References = Vec<(String, f64)>;

/// The runs of `records` in the cell of `template` (every field but the
/// repetition equal).
pub fn cell<'a>(records: &'a [Record], template: &RunSpec) -> Vec<&'a Record> {
    let t = template.clone().normalized();
    records.iter().filter(|r| r.spec.same_cell(&t)).collect()
}

/// Test accuracy of a cell: mean ± std over its repetitions.
pub fn accuracy(records: &[Record], template: &RunSpec) -> Summary {
    let xs: Vec<f64> = cell(records, template)
        .iter()
        .map(|r| r.outcome.accuracy)
        .collect();
    summary(&xs)
}

/// The 95 % interval of the paired accuracy difference `a − b`, pairing runs by
/// repetition index.
pub fn paired(records: &[Record], a: &RunSpec, b: &RunSpec) -> Option<Interval> {
    let side = |t: &RunSpec| -> Vec<(u32, f64)> {
        cell(records, t)
            .iter()
            .map(|r| (r.spec.rep, r.outcome.accuracy))
            .collect()
    };
    let d: Vec<f64> = paired_differences(&side(a), &side(b))
        .into_iter()
        .map(|(_, x)| x)
        .collect();
    t_interval(&d, 0.95)
}

/// The main grid's run template of `method` at `epsilon`.
pub fn main_cell(study: &StudyFile, method: Method, epsilon: Option<f64>) -> RunSpec {
    RunSpec::base(method, epsilon, 0, study.plan.steps, study.plan.batch)
}

/// One point of a plotted series: x, and the accuracy summary there.
pub type Point = (f64, Summary);

/// Accuracy vs ε of each DP method of the main grid (points with no runs left out).
pub fn epsilon_series(study: &StudyFile, records: &[Record]) -> Vec<(Method, Vec<Point>)> {
    study
        .plan
        .methods
        .iter()
        .filter(|m| m.is_private())
        .map(|&m| {
            let pts = study
                .plan
                .epsilons
                .iter()
                .map(|&e| (e, accuracy(records, &main_cell(study, m, Some(e)))))
                .filter(|(_, s)| s.n > 0)
                .collect();
            (m, pts)
        })
        .collect()
}

/// Accuracy of the non-private cell (ε = ∞).
pub fn nonprivate(study: &StudyFile, records: &[Record]) -> Summary {
    accuracy(records, &main_cell(study, Method::Nonprivate, None))
}

/// Accuracy vs keep_frac of dualpriv at `epsilon`.
pub fn keep_frac_series(study: &StudyFile, records: &[Record], epsilon: f64) -> Vec<Point> {
    let d = main_cell(study, Method::Dualpriv, Some(epsilon));
    study
        .plan
        .keep_fracs
        .iter()
        .map(|&k| {
            (
                k,
                accuracy(
                    records,
                    &RunSpec {
                        keep_frac: k,
                        ..d.clone()
                    },
                ),
            )
        })
        .filter(|(_, s)| s.n > 0)
        .collect()
}

/// Accuracy vs visual tokens of dualpriv at `epsilon` (the plan's budgets), and the run without token pruning (all 16 patches) when
/// it was made.
pub fn token_series(
    study: &StudyFile,
    records: &[Record],
    epsilon: f64,
) -> (Vec<Point>, Option<Point>) {
    let d = main_cell(study, Method::Dualpriv, Some(epsilon));
    let pts = study
        .plan
        .token_budgets
        .iter()
        .map(|&t| {
            (
                t.visual_tokens() as f64,
                accuracy(
                    records,
                    &RunSpec {
                        tokens: Some(t),
                        ..d.clone()
                    },
                ),
            )
        })
        .filter(|(_, s)| s.n > 0)
        .collect();
    let none_spec = RunSpec { tokens: None, ..d };
    let none = cell(records, &none_spec)
        .first()
        .map(|r| r.outcome.visual_tokens as f64)
        .map(|v| (v, accuracy(records, &none_spec)));
    (pts, none)
}

/// Memory and time of one method over its main-grid runs.
#[derive(Clone, Copy, Debug)]
pub struct Resources {
    /// The method.
    pub method: Method,
    /// Runs measured.
    pub runs: usize,
    /// Mean model and training peak (peak − base), MiB.
    pub model_peak_mib: Summary,
    /// Mean heap peak including the splits the study holds, MiB.
    pub peak_mib: Summary,
    /// Median step time, seconds: mean ± std of the runs' medians.
    pub step_seconds: Summary,
    /// Wall time of a run, seconds.
    pub wall_seconds: Summary,
    /// CPU time of a run (all threads), seconds.
    pub cpu_seconds: Summary,
}

/// [`Resources`] of every method over the main grid's runs (all ε; the cost of a
/// step does not depend on ε).
pub fn resources(study: &StudyFile, records: &[Record]) -> Vec<Resources> {
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    study
        .plan
        .methods
        .iter()
        .map(|&m| {
            let eps: Vec<Option<f64>> = if m.is_private() {
                study.plan.epsilons.iter().map(|&e| Some(e)).collect()
            } else {
                vec![None]
            };
            let runs: Vec<&Record> = eps
                .iter()
                .flat_map(|&e| cell(records, &main_cell(study, m, e)))
                .collect();
            let of = |f: &dyn Fn(&Record) -> Option<f64>| {
                summary(&runs.iter().filter_map(|r| f(r)).collect::<Vec<_>>())
            };
            Resources {
                method: m,
                runs: runs.len(),
                model_peak_mib: of(&|r| r.outcome.model_peak_bytes().map(mib)),
                peak_mib: of(&|r| r.outcome.peak_bytes.map(mib)),
                step_seconds: of(&|r| Some(r.outcome.median_step_seconds)),
                wall_seconds: of(&|r| Some(r.outcome.wall_seconds)),
                cpu_seconds: of(&|r| r.outcome.cpu_seconds),
            }
        })
        .collect()
}

fn pm(s: &Summary, digits: usize) -> String {
    match s.n {
        0 => "—".into(),
        1 => format!("{:.*} (1 run)", digits, s.mean),
        n => format!("{:.*} ± {:.*} ({n})", digits, s.mean, digits, s.std),
    }
}

fn ci(i: Option<Interval>) -> String {
    match i {
        None => "— (needs ≥ 2 paired runs)".into(),
        Some(i) => format!(
            "{:+.4} [{:+.4}, {:+.4}] ({} pairs){}",
            i.mean,
            i.lo,
            i.hi,
            i.n,
            if i.lo > 0.0 {
                ", dualpriv better"
            } else if i.hi < 0.0 {
                ", dpsgd better"
            } else {
                ", not significant"
            }
        ),
    }
}

/// A Markdown table.
fn table(out: &mut String, head: &[&str], rows: &[Vec<String>]) {
    let _ = writeln!(out, "| {} |", head.join(" | "));
    let _ = writeln!(out, "|{}", "---|".repeat(head.len()));
    for r in rows {
        let _ = writeln!(out, "| {} |", r.join(" | "));
    }
    out.push('\n');
}

/// Renders `DIR/RESULTS.md`. `plots` are the plot files (relative to DIR, without
/// extension) to embed; `machine` and `date` say where and when it ran.
pub fn render(
    study: &StudyFile,
    records: &[Record],
    references: &References,
    plots: &[(&str, &str)],
    machine: &str,
    date: &str,
) -> String {
    let plan = &study.plan;
    let set = &study.settings;
    let mut o = String::new();
    let _ = writeln!(o, "# Utility study\n");
    let _ = writeln!(
        o,
        "{date}, {machine}. {} finished runs; {} repetition(s) per cell, each with a fresh secret \
         key; {} steps of expected batch {} (Poisson) on {} private examples; {} test examples; \
         δ = {}. Every DP ε below is the accountant's for the steps taken. Each DP run alone is \
         (ε, δ)-DP; the runs share one private split, so together they compose (the privacy \
         ledger beside this file adds them up), and the non-private runs are not private.\n",
        records.len(),
        plan.reps,
        plan.steps,
        plan.batch,
        set.train_examples,
        set.test_examples,
        set.delta
    );
    let wall: f64 = records.iter().map(|r| r.outcome.wall_seconds).sum();
    let cpu: f64 = records.iter().filter_map(|r| r.outcome.cpu_seconds).sum();
    let _ = writeln!(
        o,
        "Time of all runs: {:.1} min wall, {:.1} min CPU (all threads).\n",
        wall / 60.0,
        cpu / 60.0
    );
    if !references.is_empty() {
        let refs: Vec<String> = references
            .iter()
            .map(|(k, v)| format!("{k} {v:.4}"))
            .collect();
        let _ = writeln!(o, "Reference accuracies: {}.\n", refs.join(", "));
    }

    let _ = writeln!(o, "## Accuracy per method and ε (mean ± std (runs))\n");
    let mut head = vec!["method".to_string()];
    head.extend(plan.epsilons.iter().map(|e| format!("ε = {e}")));
    head.push("ε = ∞".into());
    let rows: Vec<Vec<String>> = plan
        .methods
        .iter()
        .map(|&m| {
            let mut r = vec![m.to_string()];
            if m.is_private() {
                r.extend(
                    plan.epsilons
                        .iter()
                        .map(|&e| pm(&accuracy(records, &main_cell(study, m, Some(e))), 4)),
                );
                r.push("—".into());
            } else {
                r.extend(plan.epsilons.iter().map(|_| "—".to_string()));
                r.push(pm(&accuracy(records, &main_cell(study, m, None)), 4));
            }
            r
        })
        .collect();
    table(
        &mut o,
        &head.iter().map(String::as_str).collect::<Vec<_>>(),
        &rows,
    );
    let spent: Vec<String> = plan
        .epsilons
        .iter()
        .map(|&e| {
            let got: Vec<f64> = plan
                .methods
                .iter()
                .flat_map(|&m| cell(records, &main_cell(study, m, Some(e))))
                .filter_map(|r| r.outcome.epsilon_spent)
                .collect();
            let max = got.iter().copied().fold(f64::NAN, f64::max);
            format!("target {e}: at most {max:.4}")
        })
        .collect();
    let _ = writeln!(o, "ε spent (accountant): {}.\n", spent.join("; "));

    if plan.methods.contains(&Method::Dualpriv) && plan.methods.contains(&Method::Dpsgd) {
        let _ = writeln!(
            o,
            "## dualpriv − dpsgd, paired by repetition\n\nMean accuracy difference, its 95 % \
             Student-t interval over the pairs (same repetition index), and whether the interval \
             excludes 0.\n"
        );
        let rows: Vec<Vec<String>> = plan
            .epsilons
            .iter()
            .map(|&e| {
                vec![
                    format!("{e}"),
                    ci(paired(
                        records,
                        &main_cell(study, Method::Dualpriv, Some(e)),
                        &main_cell(study, Method::Dpsgd, Some(e)),
                    )),
                ]
            })
            .collect();
        table(&mut o, &["ε", "dualpriv − dpsgd [95 % CI]"], &rows);
    }

    for &e in &plan.ablation_epsilons {
        ablations(&mut o, study, records, e);
    }

    let _ = writeln!(
        o,
        "## Memory and step time per method (main-grid runs, every ε)\n\nPeak is the heap in use \
         during training (the CPU backend's counting allocator) less what was in use before the \
         model was loaded (the splits the study holds): the model, optimizer state and step \
         buffers, the analogue of a GPU's peak. Step time is each run's median; a run's wall time \
         includes loading and the test evaluation, and its CPU time counts every thread (on a \
         machine shared with other jobs, wall time stretches and CPU time does not).\n"
    );
    let res = resources(study, records);
    let rows: Vec<Vec<String>> = res
        .iter()
        .map(|r| {
            vec![
                r.method.to_string(),
                r.runs.to_string(),
                pm(&r.model_peak_mib, 2),
                pm(&r.peak_mib, 2),
                pm(&r.step_seconds, 3),
                pm(&r.wall_seconds, 1),
                pm(&r.cpu_seconds, 1),
            ]
        })
        .collect();
    table(
        &mut o,
        &[
            "method",
            "runs",
            "peak MiB (model + training)",
            "peak MiB (whole heap)",
            "step s",
            "run s (wall)",
            "run s (CPU)",
        ],
        &rows,
    );
    let of = |m: Method| res.iter().find(|r| r.method == m && r.runs > 0);
    let ratio = |a: Method, b: Method| match (of(a), of(b)) {
        (Some(x), Some(y)) => format!("{:.4}", x.model_peak_mib.mean / y.model_peak_mib.mean),
        _ => "—".into(),
    };
    table(
        &mut o,
        &[
            "peak memory ratio",
            "this study",
            "paper (arXiv 2506.07077)",
        ],
        &[
            vec![
                "dualpriv / dpsgd".into(),
                ratio(Method::Dualpriv, Method::Dpsgd),
                format!("{PAPER_RATIO_DPSGD:.4} (14.34 % less)"),
            ],
            vec![
                "dualpriv / dpzo".into(),
                ratio(Method::Dualpriv, Method::Dpzo),
                format!("{PAPER_RATIO_DPZO:.4} (1.74 % more)"),
            ],
        ],
    );

    if !plots.is_empty() {
        let _ = writeln!(o, "## Plots\n");
        for (file, title) in plots {
            let _ = writeln!(
                o,
                "![{title}]({file}.png)\n\n({title}; vector: [{file}.svg]({file}.svg))\n"
            );
        }
    }
    o
}

fn ablations(o: &mut String, study: &StudyFile, records: &[Record], e: f64) {
    let plan = &study.plan;
    let d = main_cell(study, Method::Dualpriv, Some(e));
    let has = |a: Ablation| plan.ablations.contains(&a);
    let tk = |t: Option<super::spec::TokenBudget>| {
        t.map_or("all 16 patches".into(), |t| {
            format!("{} (K = {}, M = {})", t.visual_tokens(), t.keep, t.context)
        })
    };
    if has(Ablation::Mechanisms) {
        let _ = writeln!(o, "## Ablation at ε = {e}: which pruning mechanism\n");
        let rows: Vec<Vec<String>> = [
            ("both (dualpriv)", Some(DEFAULT_TOKENS), DEFAULT_KEEP_FRAC),
            ("token pruning only", Some(DEFAULT_TOKENS), 1.0),
            ("update pruning only", None, DEFAULT_KEEP_FRAC),
            ("neither (= ghost)", None, 1.0),
        ]
        .iter()
        .map(|&(name, tokens, keep_frac)| {
            let s = RunSpec {
                tokens,
                keep_frac,
                ..d.clone()
            };
            vec![
                name.into(),
                tk(tokens),
                format!("{keep_frac}"),
                pm(&accuracy(records, &s), 4),
            ]
        })
        .collect();
        table(
            o,
            &["variant", "visual tokens", "keep_frac", "accuracy"],
            &rows,
        );
    }
    if has(Ablation::KeepFrac) {
        let _ = writeln!(
            o,
            "## Ablation at ε = {e}: keep_frac (tokens {})\n",
            tk(Some(DEFAULT_TOKENS))
        );
        let rows: Vec<Vec<String>> = keep_frac_series(study, records, e)
            .iter()
            .map(|(k, s)| vec![format!("{k}"), pm(s, 4)])
            .collect();
        table(o, &["keep_frac", "accuracy"], &rows);
    }
    if has(Ablation::Scope) {
        let _ = writeln!(
            o,
            "## Ablation at ε = {e}: top-k scope (keep_frac {DEFAULT_KEEP_FRAC})\n"
        );
        let rows: Vec<Vec<String>> = [PruneScope::Tensor, PruneScope::Global]
            .iter()
            .map(|&prune_scope| {
                let s = RunSpec {
                    prune_scope,
                    ..d.clone()
                };
                vec![
                    format!("{prune_scope:?}").to_lowercase(),
                    pm(&accuracy(records, &s), 4),
                ]
            })
            .collect();
        table(o, &["scope", "accuracy"], &rows);
    }
    if has(Ablation::TokenBudget) {
        let _ = writeln!(
            o,
            "## Ablation at ε = {e}: visual-token budget (keep_frac {DEFAULT_KEEP_FRAC})\n\nCLS + \
             K dominant patches + M contextual tokens; the pairs (K, M) keep about one contextual \
             token per three dominant ones, as the default (6, 2).\n"
        );
        let mut rows: Vec<Vec<String>> = plan
            .token_budgets
            .iter()
            .map(|&t| {
                let s = RunSpec {
                    tokens: Some(t),
                    ..d.clone()
                };
                vec![tk(Some(t)), pm(&accuracy(records, &s), 4)]
            })
            .collect();
        let none = RunSpec {
            tokens: None,
            ..d.clone()
        };
        rows.push(vec![
            "no token pruning (16 patches)".into(),
            pm(&accuracy(records, &none), 4),
        ]);
        table(o, &["visual tokens", "accuracy"], &rows);
    }
    if has(Ablation::Dimension) {
        let _ = writeln!(
            o,
            "## Ablation at ε = {e}: trainable dimension\n\nLoRA on every decoder linear (α = 2r) \
             at lr 1e-2, or full fine-tuning of the attention projections at lr \
             {FULL_ATTENTION_LR}. The paper's argument: noise grows with the dimension, so update \
             pruning should matter more as it grows.\n"
        );
        let rows: Vec<Vec<String>> = plan
            .dimensions
            .iter()
            .map(|&lora_rank| {
                let at = |m: Method| {
                    let b = main_cell(study, m, Some(e));
                    b.with_dimension(lora_rank)
                };
                let (ds, dp) = (at(Method::Dpsgd), at(Method::Dualpriv));
                let params = cell(records, &dp)
                    .first()
                    .or(cell(records, &ds).first())
                    .map_or("—".into(), |r| r.outcome.trainable_params.to_string());
                vec![
                    lora_rank.map_or("full attention".into(), |r| {
                        format!(
                            "LoRA r = {r}{}",
                            if r == DEFAULT_RANK { " (default)" } else { "" }
                        )
                    }),
                    params,
                    pm(&accuracy(records, &ds), 4),
                    pm(&accuracy(records, &dp), 4),
                    ci(paired(records, &dp, &ds)),
                ]
            })
            .collect();
        table(
            o,
            &[
                "trainable",
                "parameters",
                "dpsgd",
                "dualpriv",
                "dualpriv − dpsgd [95 % CI]",
            ],
            &rows,
        );
    }
}
