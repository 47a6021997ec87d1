//! `dualpriv eval`: test accuracy of a checkpoint written by `train` or `pretrain`
//! on the built-in task ([`eval`]), or exact-match accuracy of greedy generation of
//! a transformers LLaVA folder (with a PEFT adapter or not) or a `train --model`
//! run on LLaVA conversation JSON ([`eval_hf`]).
//!
//! Privacy: the test set is not trained on, so ε says nothing about it; the
//! aggregate accuracy is computed from it and reveals a little of it, and the
//! per-answer outcomes ([`HfEvalArgs::keep_answers`]) reveal it outright. Neither
//! reveals more of the *training* data than the evaluated model already does.
use std::path::{Path, PathBuf};

use super::generate::Generator;
use crate::backend::dp::DpBackend;
use crate::backend::Backend;
use crate::data::builtin;
use crate::data::synthetic::{majority_baseline, Dataset, Split};
use crate::data::DataSource;
use crate::hf::conversation::{Conversations, Role, Template};
use crate::hf::image::AspectMode;
use crate::hf::tokenizer::Tokenizer;
use crate::model::Mllm;
use crate::train::checkpoint;
use crate::train::eval::evaluate;
use crate::{Error, Result};

/// Settings of `dualpriv eval`.
#[derive(Clone, Debug)]
pub struct EvalArgs {
    /// Run folder (its current checkpoint is evaluated).
    pub checkpoint: PathBuf,
    /// Test examples.
    pub test_examples: usize,
    /// Seed of the test split.
    pub data_seed: u64,
}

/// What `dualpriv eval` measured.
#[derive(Clone, Copy, Debug)]
pub struct EvalReport {
    /// Test examples evaluated.
    pub examples: usize,
    /// Accuracy of always answering the most frequent answer of the question's kind.
    pub majority_baseline: f64,
    /// The checkpoint's accuracy, with the token selection it was trained with.
    pub accuracy: f64,
}

/// Evaluates the current checkpoint of `a.checkpoint` on the test split: exact
/// match of the answer ([`evaluate`]). A run of the built-in task on a LLaVA folder
/// reads the split through that folder's tokenizer and image processor
/// ([`builtin::load`]); a run of a crate preset (before the built-in model became a
/// LLaVA folder) reads the task directly.
pub fn eval<B: DpBackend>(be: &B, a: &EvalArgs) -> Result<EvalReport> {
    let (st, folder) = checkpoint::load_state(&a.checkpoint)?;
    let (mcfg, mode) = st.model.build()?;
    let model = Mllm::load(be, &mcfg, &mode, &folder.join("model.safetensors"))?;
    let tokens = st.train.token_select();
    let image = mcfg.vision.image_size;
    let (accuracy, majority) = match st.model.preset.strip_prefix(checkpoint::HF_PRESET) {
        Some(dir) => {
            let tok = Tokenizer::from_file(Path::new(dir).join("tokenizer.json"))?;
            if !builtin::is_builtin_tokenizer(&tok) {
                return Err(Error::Config(format!(
                    "{}: the run fine-tuned {dir} on conversation data, not on the built-in \
                     task; evaluate it with `dualpriv eval --run {} --data JSON \
                     --image-folder DIR`",
                    a.checkpoint.display(),
                    a.checkpoint.display()
                )));
            }
            let (test, task) = builtin::load(
                Path::new(dir),
                Split::Test,
                a.test_examples,
                a.data_seed,
                image,
            )?;
            let text_len = st.train.text_len.max(test.max_text_len());
            (
                evaluate(be, &model, &test, tokens.as_ref(), text_len)?,
                majority_baseline(&task),
            )
        }
        None => {
            let test = Dataset::generate(Split::Test, a.test_examples, a.data_seed, image)?;
            let text_len = st.train.text_len.max(test.max_text_len());
            (
                evaluate(be, &model, &test, tokens.as_ref(), text_len)?,
                majority_baseline(&test),
            )
        }
    };
    Ok(EvalReport {
        examples: a.test_examples,
        majority_baseline: majority,
        accuracy,
    })
}

/// Settings of `dualpriv eval` on a transformers LLaVA folder or a `train --model`
/// run and LLaVA conversation JSON.
#[derive(Clone, Debug)]
pub struct HfEvalArgs {
    /// What to evaluate.
    pub model: HfEvalModel,
    /// The test conversations (LLaVA's JSON, every record ending with an answer).
    pub data: PathBuf,
    /// The folder the records' image paths are relative to.
    pub image_folder: Option<PathBuf>,
    /// The prompt template (use the one the model was trained with).
    pub template: Template,
    /// How images become squares (use the one the model was trained with).
    pub aspect: AspectMode,
    /// At most this many new tokens per answer.
    pub max_new_tokens: usize,
    /// Compare case-insensitively (Unicode lower case) as well as whitespace-trimmed.
    pub ignore_case: bool,
    /// Return every answer with its generation ([`HfEvalReport::answers`]). They
    /// reveal the test data (not the training data: ε does not cover the test set
    /// either way, since it is not trained on).
    pub keep_answers: bool,
}

/// The model `eval` runs on conversation data.
#[derive(Clone, Debug)]
pub enum HfEvalModel {
    /// A transformers LLaVA folder, with a PEFT adapter or not.
    Folder {
        /// The folder.
        model: PathBuf,
        /// The adapter folder.
        adapter: Option<PathBuf>,
    },
    /// The current checkpoint of a `train --model` run folder (with its token selection).
    Run(PathBuf),
}

/// One evaluated answer (only with [`HfEvalArgs::keep_answers`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnswerOutcome {
    /// The record's id.
    pub id: String,
    /// The turn index of the reference answer in the record.
    pub turn: usize,
    /// The reference answer.
    pub reference: String,
    /// The generated answer.
    pub generated: String,
    /// Whether they matched.
    pub correct: bool,
}

/// What `eval` measured on conversation data.
#[derive(Clone, Debug)]
pub struct HfEvalReport {
    /// Records read.
    pub records: usize,
    /// Answers (gpt turns) evaluated.
    pub answers: usize,
    /// Answers generated exactly.
    pub correct: usize,
    /// `correct / answers`.
    pub accuracy: f64,
    /// Per-answer outcomes, when asked for; empty otherwise.
    pub outcomes: Vec<AnswerOutcome>,
}

/// Exact match after trimming whitespace on both sides (and folding case when
/// `ignore_case`).
pub fn exact_match(generated: &str, reference: &str, ignore_case: bool) -> bool {
    let (g, r) = (generated.trim(), reference.trim());
    if ignore_case {
        g.to_lowercase() == r.to_lowercase()
    } else {
        g == r
    }
}

/// Exact-match accuracy of greedy generation on conversation data: for **every**
/// assistant turn of every record, the answer is generated greedily from the
/// conversation before it (the image, the earlier questions and the *reference*
/// earlier answers) and compared with the reference by [`exact_match`]. A
/// multi-turn record thus counts once per answer. A text-only record (no
/// `image`) is generated from its text alone.
pub fn eval_hf<B: Backend>(be: &B, a: &HfEvalArgs) -> Result<HfEvalReport> {
    // The data first: a bad file fails before the (slow) model load.
    let conv = Conversations::load(&a.data, a.image_folder.as_deref())?;
    let g = match &a.model {
        HfEvalModel::Folder { model, adapter } => Generator::open(be, model, adapter.as_deref())?,
        HfEvalModel::Run(dir) => Generator::from_run(be, dir)?,
    };
    let (mut answers, mut correct, mut outcomes) = (0usize, 0usize, Vec::new());
    for r in &conv.records {
        let pixels = match &r.image {
            Some(img) => g.pixels(&img.path, a.aspect)?,
            None => Vec::new(),
        };
        for (j, turn) in r.turns.iter().enumerate() {
            if turn.role != Role::Gpt {
                continue;
            }
            let (ids, pos) = g
                .encode_prompt(a.template, &r.turns[..j], r.image.is_some())
                .map_err(|e| {
                    Error::Format(format!(
                        "{}: record {} (id {:?}), answer at turn {j}: {e}",
                        a.data.display(),
                        r.index,
                        r.id
                    ))
                })?;
            let out = g.greedy(&ids, pos, &pixels, a.max_new_tokens)?;
            let ok = exact_match(&out.text, &turn.value, a.ignore_case);
            answers += 1;
            correct += usize::from(ok);
            if a.keep_answers {
                outcomes.push(AnswerOutcome {
                    id: r.id.clone(),
                    turn: j,
                    reference: turn.value.clone(),
                    generated: out.text,
                    correct: ok,
                });
            }
        }
    }
    Ok(HfEvalReport {
        records: conv.records.len(),
        answers,
        correct,
        accuracy: correct as f64 / answers.max(1) as f64,
        outcomes,
    })
}
