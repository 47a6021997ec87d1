//! Training data: the built-in synthetic multimodal task and the batch layout the
//! model consumes.
pub mod builtin;
pub mod synthetic;

use crate::Result;

/// What the training loop needs of a dataset: examples by index, collated into
/// [`Batch`]es, and a keyed fingerprint for the privacy ledger. The built-in task
/// ([`synthetic::Dataset`]) and LLaVA conversation data
/// ([`crate::hf::dataset::LlavaDataset`]) both implement it, so every method trains
/// on either through the same code.
pub trait DataSource: Send + Sync {
    /// Number of examples (records): the DP unit.
    fn len(&self) -> usize;
    /// Whether there are no examples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The examples at `indices`, padded on the right to `text_len` tokens.
    fn collate(&self, indices: &[usize], text_len: usize) -> Result<Batch>;
    /// [`Self::collate`] into `out`, which it overwrites whole, reusing its
    /// buffers (a training step collates into one batch each step). The default
    /// replaces `out`.
    fn collate_into(&self, indices: &[usize], text_len: usize, out: &mut Batch) -> Result<()> {
        *out = self.collate(indices, text_len)?;
        Ok(())
    }
    /// The longest example's text length in tokens.
    fn max_text_len(&self) -> usize;
    /// A keyed hash of the whole dataset (the ledger's data fingerprint; keyed so
    /// that it reveals nothing about the data without the key).
    fn fingerprint(&self, key: &[u8; 32]) -> String;
    /// A cheap identity of the dataset, so checks of every example run once per
    /// dataset, not once per call.
    fn identity(&self) -> String;
}

/// A collated batch of examples, ready for the model.
///
/// The LLM sees `[visual tokens, text tokens]`; the text part is `input_ids`, and the
/// loss is cross-entropy at the positions where `loss_mask` is 1, predicting
/// `targets` (the next token, which is an answer token there).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Batch {
    /// B: examples in the batch (may be 0: Poisson sampling allows empty batches).
    pub size: usize,
    /// Image side in pixels (square images).
    pub image_size: usize,
    /// `[B, 3, S, S]` RGB images, values normalised to roughly zero mean, unit scale
    /// (per channel `(x - PIXEL_MEAN[c]) / PIXEL_STD[c]` with `x` in `[0, 1]`, see
    /// [`synthetic::PIXEL_MEAN`]).
    pub images: Vec<f32>,
    /// T: text tokens per example, after padding.
    pub text_len: usize,
    /// `[B, T]` prompt and answer token ids, padded with [`synthetic::PAD`].
    pub input_ids: Vec<u32>,
    /// `[B, T]` next-token targets (`input_ids` shifted left by one; PAD at the end).
    pub targets: Vec<u32>,
    /// `[B, T]` 1.0 at the positions whose loss counts, else 0.0 (no other values).
    /// An example's loss is the mean cross-entropy over its masked positions (0 when
    /// it has none), and [`crate::model::Mllm::predict`] reads its first one. The
    /// built-in task marks one per example, [`synthetic::Example::answer_position`].
    pub loss_mask: Vec<f32>,
    /// Dataset indices of the examples, for logging and debugging.
    pub example_ids: Vec<usize>,
    /// Where the visual tokens go. `None`: before the text (`[visual, text]`, the
    /// built-in task). `Some(p)`: per example, `p[i] = Some(j)` when example i's text
    /// has an `<image>` placeholder at position `j`, which the V visual tokens
    /// replace, with text on both sides as in LLaVA (`USER: <image>\n… ASSISTANT: …`;
    /// text position `j` then reads its logits from the last visual token, as
    /// transformers' expanded sequence does); `p[i] = None` when example i is
    /// text-only (a LLaVA record with no `"image"`): its sequence is its text alone,
    /// at positions `0..T`, and its slot of [`Batch::images`] is never read (the model
    /// runs the vision tower on zeros there, so the step's cost does not depend on
    /// which examples have images).
    pub image_pos: Option<Vec<Option<usize>>>,
}
