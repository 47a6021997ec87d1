//! Held-out evaluation: accuracy at each example's answer position and the mean
//! per-example loss. Evaluating a released model on data that was not trained on
//! is post-processing, so it costs no privacy.
use crate::backend::dp::DpBackend;
use crate::data::synthetic::Dataset;
use crate::model::Mllm;
use crate::vision::tokens::TokenSelectConfig;
use crate::{Error, Result};

/// Accuracy and mean loss on a held-out set.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EvalResult {
    /// Fraction of answers predicted exactly.
    pub accuracy: f64,
    /// Mean per-example loss on the answer token.
    pub loss: f64,
}

/// Accuracy of `model` on `data`: the argmax at each example's answer position.
pub fn evaluate<B: DpBackend>(
    backend: &B,
    model: &Mllm<B>,
    data: &Dataset,
    tokens: Option<&TokenSelectConfig>,
    text_len: usize,
) -> Result<f64> {
    Ok(evaluate_full(backend, model, data, tokens, text_len, false)?.accuracy)
}

/// Accuracy and (when `with_loss`) mean loss of `model` on `data`.
pub fn evaluate_full<B: DpBackend>(
    backend: &B,
    model: &Mllm<B>,
    data: &Dataset,
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
        let pred = model.predict(backend, &batch, tokens)?;
        correct += chunk
            .iter()
            .zip(&pred)
            .filter(|(&i, &p)| data.examples[i].answer == p)
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
