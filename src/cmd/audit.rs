//! `dualpriv audit`: the one-run empirical privacy audit ([`crate::audit`]) of
//! each method at each claimed ε, on the built-in task from the shipped
//! pretrained checkpoint. Prints (and with `out`, writes) one row per run.
//!
//! Each audited run trains its own copy of the model on a private split drawn
//! for the audit (not the demo's data), persists nothing and writes no ledger:
//! the ε lower bounds concern these audit runs only.
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::audit::{audit_run, AuditConfig, AuditRow};
use crate::backend::dp::DpBackend;
use crate::data::builtin;
use crate::data::synthetic::Split;
use crate::data::DataSource;
use crate::hf::dataset::LlavaDataset;
use crate::hf::load::load_llava;
use crate::train::checkpoint::{ModelSpec, HF_PRESET};
use crate::train::io_err;
use crate::train::method::Method;
use crate::{Error, Result};

/// Settings of `dualpriv audit`.
#[derive(Clone, Debug)]
pub struct AuditArgs {
    /// The pretrained LLaVA folder (the shipped `assets/tiny-pretrained`).
    pub pretrained: PathBuf,
    /// Methods audited; nonprivate is run once, the others at every ε.
    pub methods: Vec<Method>,
    /// Claimed ε values.
    pub epsilons: Vec<f64>,
    /// δ.
    pub delta: f64,
    /// m: canaries of each kind per run.
    pub canaries: usize,
    /// White-box canaries where the method supports them (`None`: yes).
    pub white_box: Option<bool>,
    /// A tiny audit (tests, a smoke run): fewer canaries, steps and examples.
    pub quick: bool,
    /// Where `audit.jsonl` and `audit.md` go (none: print only).
    pub out: Option<PathBuf>,
    /// Public seed for every run's coins and key (tests only; the binary passes `None`).
    #[doc(hidden)]
    pub seed: Option<u64>,
}

/// The audit's model: the demo's LoRA (r = 8) on the LLaVA folder `pretrained`.
pub fn audit_spec(pretrained: &Path) -> ModelSpec {
    ModelSpec {
        preset: format!("{HF_PRESET}{}", pretrained.display()),
        lora_rank: Some(8),
        lora_alpha: 16.0,
        full_groups: vec![],
    }
}

/// The built-in data of an audit, as LLaVA records read with the model folder
/// `pretrained`'s tokenizer and image processor: `base` private training examples
/// and `canaries` held-out examples to make canaries from (seeds fixed: the task
/// is public; what is secret is which canaries are in).
pub fn builtin_data(
    pretrained: &Path,
    image: usize,
    base: usize,
    canaries: usize,
) -> Result<(LlavaDataset, LlavaDataset)> {
    Ok((
        builtin::load(pretrained, Split::Private, base, 11, image)?.0,
        builtin::load(pretrained, Split::Test, canaries, 12, image)?.0,
    ))
}

/// The (method, claimed ε) runs of `a`, in order.
pub fn plan(a: &AuditArgs) -> Vec<(Method, Option<f64>)> {
    let mut runs = Vec::new();
    for &m in &a.methods {
        if m.is_private() {
            runs.extend(a.epsilons.iter().map(|&e| (m, Some(e))));
        } else {
            runs.push((m, None));
        }
    }
    runs
}

/// The config of one run of `a`.
pub fn run_config(a: &AuditArgs, method: Method, epsilon: Option<f64>) -> Result<AuditConfig> {
    let mut c = AuditConfig::new(method, epsilon);
    c.delta = a.delta;
    c.canaries = a.canaries;
    c.seed = a.seed;
    c.white_box = match a.white_box {
        Some(w) => w && method != Method::Dpzo,
        None => method != Method::Dpzo,
    };
    if a.white_box == Some(true) && method == Method::Dpzo && a.methods.len() == 1 {
        return Err(Error::Config(
            "dpzo has no per-coordinate gradient for white-box canaries; drop --white-box".into(),
        ));
    }
    if a.quick {
        c.steps = 12;
        c.batch = 40;
    }
    Ok(c)
}

/// Base training examples of `a`'s runs.
pub fn base_examples(a: &AuditArgs) -> usize {
    if a.quick {
        200
    } else {
        500
    }
}

/// Runs every audit of `a`, calling `each` after every run (progress printing).
pub fn audit<B: DpBackend>(
    backend: &B,
    a: &AuditArgs,
    mut each: impl FnMut(usize, usize, &AuditRow),
) -> Result<Vec<AuditRow>> {
    let runs = plan(a);
    if runs.is_empty() {
        return Err(Error::Config(
            "nothing to audit: give at least one method (and an ε for DP methods)".into(),
        ));
    }
    if let Some(e) = a.epsilons.iter().find(|e| !(e.is_finite() && **e > 0.0)) {
        return Err(Error::Config(format!(
            "claimed ε = {e} must be finite and > 0"
        )));
    }
    if !crate::cmd::pretrain::is_model_folder(&a.pretrained) {
        return Err(Error::Io {
            path: a.pretrained.display().to_string(),
            message: "no pretrained LLaVA folder here (config.json and model.safetensors); \
                      pass --pretrained with the shipped assets/tiny-pretrained (or run \
                      `dualpriv pretrain --out DIR` first)"
                .into(),
        });
    }
    let spec = audit_spec(&a.pretrained);
    let (mcfg, mode) = spec.build()?;
    let (base, pool) = builtin_data(
        &a.pretrained,
        mcfg.vision.image_size,
        base_examples(a),
        a.canaries,
    )?;
    let mut out_files = match &a.out {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(|e| io_err(d, e))?;
            let p = d.join("audit.jsonl");
            let f = std::fs::File::create(&p).map_err(|e| io_err(&p, e))?;
            Some((p, f))
        }
        None => None,
    };
    let mut rows = Vec::with_capacity(runs.len());
    // σ depends on (q, T, ε) only: calibrate once per ε (PLD calibration takes
    // seconds at ε = 8).
    // Keyed on everything the calibration reads (ε, δ, steps, batch; the base size
    // is one for the whole audit), so no run reuses a σ calibrated for another.
    let mut sigmas: Vec<((u64, u64, u32, usize), f64)> = Vec::new();
    for (i, &(method, eps)) in runs.iter().enumerate() {
        let mut c = run_config(a, method, eps)?;
        if let Some(e) = eps.filter(|_| method.is_private()) {
            let key = (e.to_bits(), c.delta.to_bits(), c.steps, c.batch);
            c.sigma = match sigmas.iter().find(|s| s.0 == key) {
                Some(s) => Some(s.1),
                None => {
                    let s = crate::audit::calibrate_sigma(&c, base.len())?;
                    if let Some(s) = s {
                        sigmas.push((key, s));
                    }
                    s
                }
            };
        }
        let (model, _) = load_llava(backend, &a.pretrained, &mode, 0)?;
        let row = audit_run(backend, model, spec.clone(), &base, &pool, &c)?;
        if let Some((p, f)) = out_files.as_mut() {
            let line = serde_json::to_string(&row)
                .map_err(|e| Error::Format(format!("serialising the audit row: {e}")))?;
            writeln!(f, "{line}").map_err(|e| io_err(p, e))?;
        }
        each(i, runs.len(), &row);
        rows.push(row);
    }
    if let Some(d) = &a.out {
        let p = d.join("audit.md");
        std::fs::write(&p, markdown_table(&rows)).map_err(|e| io_err(&p, e))?;
    }
    Ok(rows)
}

/// The audit table in Markdown.
pub fn markdown_table(rows: &[AuditRow]) -> String {
    let mut s = String::from(
        "| method | claimed ε | canaries | guesses | correct | ε lower bound (95 %) | MIA AUC |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        s += &format!(
            "| {}{}{} | {} | {} {} | {} | {} | {:.3} | {:.3} |\n",
            r.method,
            if r.broken { " (broken σ/10)" } else { "" },
            if r.insecure_seed {
                " (public seed)"
            } else {
                ""
            },
            r.claimed_epsilon.map_or("∞".into(), |e| format!("{e}")),
            r.primary.canaries,
            r.primary.kind,
            r.primary.guesses,
            r.primary.correct,
            r.primary.epsilon_lower_bound,
            r.mia_auc
        );
    }
    s
}
