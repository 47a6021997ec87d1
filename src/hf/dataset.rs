//! LLaVA conversation data as a [`DataSource`]: records tokenised with a prompt
//! template once at load, images decoded and preprocessed per batch (a dataset's
//! pixels would not fit in memory), collated with the `<image>` placeholder's
//! position so the model splices the visual tokens there.
//!
//! The DP unit is one record. A person with several records needs them grouped
//! into one record for person-level DP.
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::conversation::{Conversations, EncodeStats, Template, TextExample};
use super::image::{load_image, AspectMode, ImageProcessor};
use super::tokenizer::Tokenizer;
use crate::data::{Batch, DataSource};
use crate::{Error, Result};

/// How records become examples.
#[derive(Clone, Copy, Debug)]
pub struct DataOptions {
    /// The prompt template.
    pub template: Template,
    /// Longer records are truncated to this many tokens (and counted).
    pub max_len: usize,
    /// Crop (transformers) or pad to square (LLaVA-1.5's training).
    pub aspect: AspectMode,
}

/// A LLaVA conversation file ready for training.
pub struct LlavaDataset {
    path: PathBuf,
    examples: Vec<TextExample>,
    stats: EncodeStats,
    processor: ImageProcessor,
    mode: AspectMode,
    image_size: usize,
    pad_id: u32,
}

impl LlavaDataset {
    /// Loads `json` (LLaVA's conversation format, image paths relative to
    /// `image_root`), renders each record with the template, tokenises it (records
    /// longer than `max_len` are truncated and counted, those left without an
    /// answer dropped: [`Self::stats`]), and checks that `processor` makes images of
    /// the model's `image_size`.
    pub fn load(
        json: &Path,
        image_root: Option<&Path>,
        tok: &Tokenizer,
        processor: ImageProcessor,
        image_size: usize,
        opts: DataOptions,
    ) -> Result<Self> {
        let mode = opts.aspect;
        let conv = Conversations::load(json, image_root)?;
        let (examples, stats) = conv.encode(tok, opts.template, opts.max_len)?;
        if let Some(ex) = examples.iter().find(|e| e.image.is_none()) {
            return Err(Error::Config(format!(
                "{}: record {} (id {:?}) has no image; text-only records are not supported \
                 by the model yet: give it an image or leave it out",
                json.display(),
                ex.index,
                ex.id
            )));
        }
        let side = image_size as u32;
        let (w, h) = processor.output_size(side, side, mode);
        if (w, h) != (side, side) {
            return Err(Error::Config(format!(
                "{}: the image processor makes {w}×{h} images but the model's vision tower \
                 takes {side}×{side}; use the model folder's preprocessor_config.json",
                json.display()
            )));
        }
        Ok(Self {
            path: json.to_path_buf(),
            examples,
            stats,
            processor,
            mode,
            image_size,
            pad_id: tok.pad_id(),
        })
    }

    /// What tokenisation did: truncated and dropped records, the longest text.
    pub fn stats(&self) -> &EncodeStats {
        &self.stats
    }

    /// The encoded records.
    pub fn examples(&self) -> &[TextExample] {
        &self.examples
    }

    fn pixels(&self, ex: &TextExample) -> Result<Vec<f32>> {
        let path = ex
            .image
            .as_ref()
            .ok_or_else(|| Error::Internal(format!("record {} lost its image", ex.index)))?;
        let img = load_image(path)?;
        self.processor.preprocess(&img, self.mode)
    }
}

impl DataSource for LlavaDataset {
    fn len(&self) -> usize {
        self.examples.len()
    }

    fn collate(&self, indices: &[usize], text_len: usize) -> Result<Batch> {
        let b = indices.len();
        let exs: Vec<&TextExample> = indices
            .iter()
            .map(|&i| {
                self.examples.get(i).ok_or_else(|| {
                    Error::Shape(format!(
                        "example index {i} is out of range for {} records",
                        self.examples.len()
                    ))
                })
            })
            .collect::<Result<_>>()?;
        let pixels: Vec<Vec<f32>> = exs
            .par_iter()
            .map(|ex| self.pixels(ex))
            .collect::<Result<_>>()?;
        let mut batch = Batch {
            size: b,
            image_size: self.image_size,
            images: Vec::with_capacity(b * 3 * self.image_size * self.image_size),
            text_len,
            input_ids: Vec::with_capacity(b * text_len),
            targets: Vec::with_capacity(b * text_len),
            loss_mask: Vec::with_capacity(b * text_len),
            example_ids: indices.to_vec(),
            image_pos: Some(Vec::with_capacity(b)),
        };
        for (ex, px) in exs.iter().zip(pixels) {
            let p = ex.pad(text_len, self.pad_id)?;
            batch.images.extend_from_slice(&px);
            batch.input_ids.extend_from_slice(&p.input_ids);
            batch.targets.extend_from_slice(&p.targets);
            batch
                .loss_mask
                .extend(p.loss_mask.iter().map(|&m| if m { 1.0 } else { 0.0 }));
            let pos = ex.image_position.ok_or_else(|| {
                Error::Internal(format!(
                    "record {} has an image but no <image> token",
                    ex.index
                ))
            })?;
            if let Some(v) = batch.image_pos.as_mut() {
                v.push(pos);
            }
        }
        Ok(batch)
    }

    fn max_text_len(&self) -> usize {
        self.examples
            .iter()
            .map(|e| e.input_ids.len())
            .max()
            .unwrap_or(0)
    }

    fn fingerprint(&self, key: &[u8; 32]) -> String {
        let mut h = blake3::Hasher::new_keyed(key);
        h.update(&(self.examples.len() as u64).to_le_bytes());
        for ex in &self.examples {
            h.update(&(ex.input_ids.len() as u64).to_le_bytes());
            for id in &ex.input_ids {
                h.update(&id.to_le_bytes());
            }
            h.update(&ex.loss_mask.iter().map(|&m| m as u8).collect::<Vec<u8>>());
            // The image bytes, not their path: the same file name with other pixels
            // is other data. An unreadable image hashes as its error text, and
            // collating it fails the run before any step.
            match ex.image.as_ref().map(std::fs::read) {
                Some(Ok(bytes)) => h.update(&bytes),
                Some(Err(e)) => h.update(e.to_string().as_bytes()),
                None => h.update(b"no image"),
            };
        }
        h.finalize().to_hex()[..32].to_string()
    }

    fn identity(&self) -> String {
        format!("llava:{}:{}", self.path.display(), self.examples.len())
    }
}
