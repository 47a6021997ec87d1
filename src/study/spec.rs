//! What one study run is ([`RunSpec`]) and which runs a study makes ([`Plan`],
//! [`grid`]). Nothing here knows the data: the knobs are the method's, the
//! model's and the optimizer's.
use serde::{Deserialize, Serialize};

use crate::train::method::Method;
use crate::train::PruneScope;

/// Visual token pruning: CLS + `keep` dominant patches + `context` fused tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenBudget {
    /// K, the dominant patches kept.
    pub keep: usize,
    /// M, the contextual tokens the other patches are fused into.
    pub context: usize,
}

impl TokenBudget {
    /// Visual tokens the LLM reads: CLS + K + M.
    pub fn visual_tokens(self) -> usize {
        1 + self.keep + self.context
    }
}

/// The (K, M) pair of each visual-token budget of the ablation (CLS + K + M
/// tokens; the tiny model has 16 patches, read whole without pruning). About one
/// token in four of the budget is contextual, as in the default (6, 2).
pub const TOKEN_BUDGETS: [(usize, TokenBudget); 4] = [
    (
        4,
        TokenBudget {
            keep: 2,
            context: 1,
        },
    ),
    (
        6,
        TokenBudget {
            keep: 4,
            context: 1,
        },
    ),
    (
        9,
        TokenBudget {
            keep: 6,
            context: 2,
        },
    ),
    (
        16,
        TokenBudget {
            keep: 12,
            context: 3,
        },
    ),
];

/// The `keep_frac` values of the update-pruning ablation.
pub const KEEP_FRACS: [f64; 6] = [0.1, 0.2, 0.4, 0.6, 0.8, 1.0];

/// Everything that defines one run of the study, and nothing that depends on the
/// private data. Two runs with equal specs ([`RunSpec::same_as`]) are the same
/// cell and repetition: the grid runs it once and a resume skips it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunSpec {
    /// The method.
    pub method: Method,
    /// Target ε; `None` is ε = ∞ (the non-private method).
    pub epsilon: Option<f64>,
    /// Repetition index: runs of one cell differ only in it (and each draws its own
    /// secret key, so batches and noise are independent).
    pub rep: u32,
    /// Visual token pruning (`None`: every patch).
    pub tokens: Option<TokenBudget>,
    /// Fraction of coordinates updated per step (1.0: no update pruning).
    pub keep_frac: f64,
    /// Scope of the top-k threshold of update pruning.
    pub prune_scope: PruneScope,
    /// LoRA rank on every decoder linear; `None` is full fine-tuning of the
    /// attention projections instead.
    pub lora_rank: Option<usize>,
    /// Learning rate (AdamW; SGD for dpzo).
    pub lr: f64,
    /// Planned optimizer steps.
    pub steps: u32,
    /// Expected (Poisson) batch size.
    pub batch: usize,
}

/// Default LoRA rank (the demo's).
pub const DEFAULT_RANK: usize = 8;

/// The token budget of default dualpriv runs (the tiny preset's, the demo's).
pub const DEFAULT_TOKENS: TokenBudget = TokenBudget {
    keep: 6,
    context: 2,
};

/// The keep fraction of default dualpriv runs (the demo's).
pub const DEFAULT_KEEP_FRAC: f64 = 0.8;

impl RunSpec {
    /// This run with LoRA rank `lora_rank` (`None`: full fine-tuning of attention,
    /// at [`FULL_ATTENTION_LR`]); the dimension ablation's cells.
    pub fn with_dimension(self, lora_rank: Option<usize>) -> RunSpec {
        RunSpec {
            lora_rank,
            lr: if lora_rank.is_none() {
                FULL_ATTENTION_LR
            } else {
                self.lr
            },
            ..self
        }
    }

    /// A run of `method` with the demo's knobs: dualpriv prunes tokens to
    /// [`DEFAULT_TOKENS`] and updates to [`DEFAULT_KEEP_FRAC`] per tensor, every
    /// other method prunes nothing; LoRA r = 8; AdamW at 1e-2 (dpzo: SGD at 2e-3).
    pub fn base(method: Method, epsilon: Option<f64>, rep: u32, steps: u32, batch: usize) -> Self {
        let dual = method == Method::Dualpriv;
        Self {
            method,
            epsilon: if method.is_private() { epsilon } else { None },
            rep,
            tokens: dual.then_some(DEFAULT_TOKENS),
            keep_frac: if dual { DEFAULT_KEEP_FRAC } else { 1.0 },
            prune_scope: PruneScope::Tensor,
            lora_rank: Some(DEFAULT_RANK),
            lr: if method == Method::Dpzo { 2e-3 } else { 1e-2 },
            steps,
            batch,
        }
    }

    /// The same run with both pruning mechanisms off is ghost clipping: dualpriv
    /// without token and update pruning is renamed `ghost`, so the two share runs.
    pub fn normalized(mut self) -> Self {
        if self.method == Method::Dualpriv && self.tokens.is_none() && self.keep_frac >= 1.0 {
            self.method = Method::Ghost;
        }
        if self.keep_frac >= 1.0 {
            // No update pruning: the scope selects nothing.
            self.prune_scope = PruneScope::Tensor;
        }
        self
    }

    /// Whether `other` is the same run: every field equal, floats to 1e-9
    /// relative (a JSON round trip may move the last bit).
    pub fn same_as(&self, other: &RunSpec) -> bool {
        let close = |a: f64, b: f64| a == b || (a - b).abs() <= 1e-9 * a.abs().max(b.abs());
        self.method == other.method
            && match (self.epsilon, other.epsilon) {
                (None, None) => true,
                (Some(a), Some(b)) => close(a, b),
                _ => false,
            }
            && self.rep == other.rep
            && self.tokens == other.tokens
            && close(self.keep_frac, other.keep_frac)
            && self.prune_scope == other.prune_scope
            && self.lora_rank == other.lora_rank
            && close(self.lr, other.lr)
            && self.steps == other.steps
            && self.batch == other.batch
    }

    /// Whether `other` is in the same cell (the same run up to the repetition).
    pub fn same_cell(&self, other: &RunSpec) -> bool {
        let mut o = other.clone();
        o.rep = self.rep;
        self.same_as(&o)
    }

    /// A short readable name of the run, unique within a grid (used for its folder).
    pub fn label(&self) -> String {
        let eps = self.epsilon.map_or("inf".into(), |e| format!("{e}"));
        let mut s = format!("{}-eps{eps}", self.method);
        if let Some(t) = self.tokens {
            s += &format!("-k{}m{}", t.keep, t.context);
        }
        if self.keep_frac < 1.0 {
            s += &format!("-keep{}", self.keep_frac);
            if self.prune_scope == PruneScope::Global {
                s += "-global";
            }
        }
        s += &match self.lora_rank {
            Some(r) => format!("-r{r}"),
            None => "-fullattn".into(),
        };
        s + &format!(
            "-lr{}-s{}-b{}-rep{}",
            self.lr, self.steps, self.batch, self.rep
        )
    }
}

/// ε as the tables print it: ∞ for `None`.
pub fn fmt_eps(e: Option<f64>) -> String {
    e.map_or("∞".into(), |e| format!("{e}"))
}

/// Which runs a study makes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Repetitions of every cell (each with a fresh secret key).
    pub reps: u32,
    /// ε levels of the main grid (every DP method at each; nonprivate at ∞).
    pub epsilons: Vec<f64>,
    /// ε levels of the dualpriv ablations.
    pub ablation_epsilons: Vec<f64>,
    /// Methods of the main grid.
    pub methods: Vec<Method>,
    /// The ablations to run (none: the main grid only).
    pub ablations: Vec<Ablation>,
    /// The `keep_frac` values of [`Ablation::KeepFrac`].
    pub keep_fracs: Vec<f64>,
    /// The (K, M) budgets of [`Ablation::TokenBudget`].
    pub token_budgets: Vec<TokenBudget>,
    /// The trainable dimensions of [`Ablation::Dimension`] (LoRA ranks; `None`:
    /// full attention fine-tuning).
    pub dimensions: Vec<Option<usize>>,
    /// Optimizer steps of every run.
    pub steps: u32,
    /// Expected batch size of every run.
    pub batch: usize,
}

/// One ablation of dualpriv (each is run at every [`Plan::ablation_epsilons`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ablation {
    /// Token pruning only, update pruning only, both, neither (= ghost).
    Mechanisms,
    /// `keep_frac` ∈ [`KEEP_FRACS`].
    KeepFrac,
    /// Per-tensor vs global top-k threshold.
    Scope,
    /// Visual-token budgets [`TOKEN_BUDGETS`].
    TokenBudget,
    /// LoRA r ∈ {8, 32} and full fine-tuning of attention, for dpsgd and dualpriv.
    Dimension,
}

impl Ablation {
    /// Every ablation.
    pub const ALL: [Ablation; 5] = [
        Ablation::Mechanisms,
        Ablation::KeepFrac,
        Ablation::Scope,
        Ablation::TokenBudget,
        Ablation::Dimension,
    ];
}

/// The LoRA ranks of the dimension ablation (`None`: full attention fine-tuning).
pub const DIMENSIONS: [Option<usize>; 3] = [Some(8), Some(32), None];

/// The learning rate of full attention fine-tuning: a full weight moves by about
/// lr per AdamW step, so the LoRA rate (whose B starts at zero) is too large for it.
pub const FULL_ATTENTION_LR: f64 = 2e-3;

impl Plan {
    /// The default study: the main grid (five methods; ε ∈ {1, 3, 8} and ∞) and
    /// every ablation at ε = 3, `reps` repetitions, `steps` steps of batch `batch`.
    pub fn default_study(reps: u32, steps: u32, batch: usize) -> Self {
        Self {
            reps,
            epsilons: vec![1.0, 3.0, 8.0],
            ablation_epsilons: vec![3.0],
            methods: Method::ALL.to_vec(),
            ablations: Ablation::ALL.to_vec(),
            keep_fracs: KEEP_FRACS.to_vec(),
            token_budgets: TOKEN_BUDGETS.iter().map(|&(_, t)| t).collect(),
            dimensions: DIMENSIONS.to_vec(),
            steps,
            batch,
        }
    }

    /// The `--quick` grid: four methods at ε = 3 (nonprivate at ∞), two
    /// repetitions, and one more point of the keep_frac (0.4) and token-budget
    /// (4 tokens) ablations, so every table and plot has data.
    pub fn quick(steps: u32, batch: usize) -> Self {
        Self {
            reps: 2,
            epsilons: vec![3.0],
            ablation_epsilons: vec![3.0],
            methods: vec![
                Method::Nonprivate,
                Method::Dpsgd,
                Method::Dualpriv,
                Method::Dpzo,
            ],
            ablations: vec![Ablation::KeepFrac, Ablation::TokenBudget],
            keep_fracs: vec![0.4, DEFAULT_KEEP_FRAC],
            token_budgets: vec![TOKEN_BUDGETS[0].1, DEFAULT_TOKENS],
            dimensions: vec![],
            steps,
            batch,
        }
    }
}

/// The runs of `plan`, deduplicated (a run several parts of the grid share is
/// listed once, where it first appears), main grid first, repetition-major within
/// each part so an interrupted study has every cell at its first repetitions.
pub fn grid(plan: &Plan) -> Vec<RunSpec> {
    let (steps, batch) = (plan.steps, plan.batch);
    let base = |m: Method, e: Option<f64>, rep: u32| RunSpec::base(m, e, rep, steps, batch);
    let mut cells: Vec<RunSpec> = Vec::new();
    for &m in &plan.methods {
        if m.is_private() {
            for &e in &plan.epsilons {
                cells.push(base(m, Some(e), 0));
            }
        } else {
            cells.push(base(m, None, 0));
        }
    }
    for &e in &plan.ablation_epsilons {
        let dual = base(Method::Dualpriv, Some(e), 0);
        for &a in &plan.ablations {
            match a {
                Ablation::Mechanisms => {
                    for (tokens, keep_frac) in [
                        (Some(DEFAULT_TOKENS), 1.0),
                        (None, DEFAULT_KEEP_FRAC),
                        (Some(DEFAULT_TOKENS), DEFAULT_KEEP_FRAC),
                        (None, 1.0),
                    ] {
                        cells.push(RunSpec {
                            tokens,
                            keep_frac,
                            ..dual.clone()
                        });
                    }
                }
                Ablation::KeepFrac => {
                    for &keep_frac in &plan.keep_fracs {
                        cells.push(RunSpec {
                            keep_frac,
                            ..dual.clone()
                        });
                    }
                }
                Ablation::Scope => {
                    for prune_scope in [PruneScope::Tensor, PruneScope::Global] {
                        cells.push(RunSpec {
                            prune_scope,
                            ..dual.clone()
                        });
                    }
                }
                Ablation::TokenBudget => {
                    for &t in &plan.token_budgets {
                        cells.push(RunSpec {
                            tokens: Some(t),
                            ..dual.clone()
                        });
                    }
                }
                Ablation::Dimension => {
                    for m in [Method::Dpsgd, Method::Dualpriv] {
                        for &lora_rank in &plan.dimensions {
                            cells.push(base(m, Some(e), 0).with_dimension(lora_rank));
                        }
                    }
                }
            }
        }
    }
    let mut unique: Vec<RunSpec> = Vec::new();
    for c in cells.into_iter().map(RunSpec::normalized) {
        if !unique.iter().any(|u| u.same_as(&c)) {
            unique.push(c);
        }
    }
    let mut runs = Vec::new();
    for rep in 0..plan.reps {
        for c in &unique {
            runs.push(RunSpec { rep, ..c.clone() });
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_grid_dedupes_shared_runs() {
        let plan = Plan::default_study(3, 10, 64);
        let runs = grid(&plan);
        // Main: nonprivate + 4 DP methods × 3 ε = 13 cells. Ablations at ε = 3 add:
        // token only, update only (both = main dualpriv, neither = main ghost);
        // keep_frac 0.1, 0.2, 0.4, 0.6 (0.8 = main, 1.0 = token only); global scope;
        // budgets 4, 6, 16 (9 = main); r = 32 and full attention for dpsgd and
        // dualpriv (r = 8 = main): 2 + 4 + 1 + 3 + 4 = 14.
        assert_eq!(runs.len(), (13 + 14) * 3);
        for (i, a) in runs.iter().enumerate() {
            for b in &runs[i + 1..] {
                assert!(!a.same_as(b), "{} twice", a.label());
                assert_ne!(a.label(), b.label());
            }
        }
        assert!(runs
            .iter()
            .all(|r| r.method != Method::Dualpriv || r.tokens.is_some() || r.keep_frac < 1.0));
    }

    #[test]
    fn same_as_tolerates_a_round_trip_only() {
        let a = RunSpec::base(Method::Dualpriv, Some(3.0), 1, 10, 64);
        let json = serde_json::to_string(&a).unwrap();
        let b: RunSpec = serde_json::from_str(&json).unwrap();
        assert!(a.same_as(&b));
        let c = RunSpec {
            keep_frac: 0.8001,
            ..a.clone()
        };
        assert!(!a.same_as(&c));
        assert!(a.same_cell(&RunSpec {
            rep: 2,
            ..a.clone()
        }));
        assert!(!a.same_as(&RunSpec {
            rep: 2,
            ..a.clone()
        }));
        let n = RunSpec::base(Method::Nonprivate, Some(3.0), 0, 10, 64);
        assert_eq!(n.epsilon, None);
    }
}
