//! Held-out evaluation: accuracy at each example's answer position and the mean
//! per-example loss. Evaluating a released model on data that was not trained on
//! is post-processing, so it costs no privacy.
use crate::backend::dp::DpBackend;
use crate::data::DataSource;
use crate::model::Mllm;
use crate::vision::tokens::TokenSelectConfig;
use crate::{Error, Result};

/// Accuracy and mean loss on a held-out set.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EvalResult {
    /// Fraction of examples whose every answer token is the argmax (exact match).
    pub accuracy: f64,
    /// Mean per-example loss on the answer tokens.
    pub loss: f64,
}

/// Exact-match accuracy of `model` on `data`: the fraction of examples whose
/// argmax at every answer position (teacher-forced, [`Mllm::predict_masked`]) is
/// the answer token there. For the built-in task's one-token answers this is the
/// argmax at the answer position.
pub fn evaluate<B: DpBackend>(
    backend: &B,
    model: &Mllm<B>,
    data: &dyn DataSource,
    tokens: Option<&TokenSelectConfig>,
    text_len: usize,
) -> Result<f64> {
    Ok(evaluate_full(backend, model, data, tokens, text_len, false)?.accuracy)
}

/// Accuracy and (when `with_loss`) mean loss of `model` on `data`.
pub fn evaluate_full<B: DpBackend>(
    backend: &B,
    model: &Mllm<B>,
    data: &dyn DataSource,
    tokens: Option<&TokenSelectConfig>,
    text_len: usize,
    with_loss: bool,
) -> Result<EvalResult> {
    if data.is_empty() {
        return Err(Error::Config("the evaluation set is empty".into()));
    }
    let (mut correct, mut loss) = (0usize, 0.0f64);
    let idx: Vec<usize> = (0..data.len()).collect();
    for chunk in idx.chunks(64) {
        let batch = data.collate(chunk, text_len)?;
        let pred = model.predict_masked(backend, &batch, tokens)?;
        let t = batch.text_len;
        correct += pred
            .iter()
            .enumerate()
            .filter(|(i, p)| {
                let row = &batch.targets[i * t..][..t];
                let mask = &batch.loss_mask[i * t..][..t];
                let want = (0..t).filter(|&j| mask[j] != 0.0).map(|j| row[j]);
                p.iter().copied().eq(want)
            })
            .count();
        if with_loss {
            loss += model
                .per_example_loss(backend, &batch, tokens)?
                .iter()
                .map(|&l| f64::from(l))
                .sum::<f64>();
        }
    }
    let n = data.len() as f64;
    Ok(EvalResult {
        accuracy: correct as f64 / n,
        loss: if with_loss { loss / n } else { f64::NAN },
    })
}
