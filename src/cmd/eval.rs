//! `dualpriv eval`: test accuracy of a checkpoint written by `train` or `pretrain`.
use std::path::PathBuf;

use crate::backend::dp::DpBackend;
use crate::data::synthetic::{majority_baseline, Dataset, Split};
use crate::model::Mllm;
use crate::train::checkpoint;
use crate::train::eval::evaluate;
use crate::Result;

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

/// Evaluates the current checkpoint of `a.checkpoint` on the test split.
pub fn eval<B: DpBackend>(be: &B, a: &EvalArgs) -> Result<EvalReport> {
    let (st, folder) = checkpoint::load_state(&a.checkpoint)?;
    let (mcfg, mode) = st.model.build()?;
    let model = Mllm::load(be, &mcfg, &mode, &folder.join("model.safetensors"))?;
    let test = Dataset::generate(
        Split::Test,
        a.test_examples,
        a.data_seed,
        mcfg.vision.image_size,
    )?;
    let tokens = st.train.token_select();
    let text_len = st.train.text_len.max(test.max_text_len());
    let accuracy = evaluate(be, &model, &test, tokens.as_ref(), text_len)?;
    Ok(EvalReport {
        examples: a.test_examples,
        majority_baseline: majority_baseline(&test),
        accuracy,
    })
}
