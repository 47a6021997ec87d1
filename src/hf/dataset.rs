//! LLaVA conversation data as a [`DataSource`]: records tokenised with a prompt
//! template and every image decoded and preprocessed once, at load, collated with
//! the `<image>` placeholder's position so the model splices the visual tokens
//! there.
//!
//! **Why everything happens at load.** A step's time and memory are published
//! (`metrics.jsonl`, the progress bar). Decoding a sampled record's image inside
//! the step would make its time depend on that image (a large PNG shows up as a
//! slow step, so its record's sampling times leak), and re-reading the file could
//! fail mid-run, naming a record that was just sampled. So the preprocessed pixels,
//! `[N, 3, S, S]` f32, go to an unlinked temporary file that is memory-mapped
//! (the page cache holds what fits; nothing is left on disk after the process), and
//! a step only copies fixed-size slices.
//!
//! Records without an `"image"` (text-only turns, as the ShareGPT part of the
//! LLaVA-1.5 mix) are examples without visual tokens: their sequence is their text
//! alone, in the same padded batch as the others (see
//! [`Batch::image_pos`](crate::data::Batch::image_pos)); they have no pixels in the
//! cache and a zero image slot in the batch.
//!
//! The DP unit is one record. A person with several records needs them grouped
//! into one record for person-level DP; records that share an image are refused,
//! since that image would only be protected as a group.
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
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

/// Where a dataset's images come from.
#[derive(Clone, Copy)]
pub enum Images<'a> {
    /// The files the records name ([`crate::hf::conversation::ImageRef::path`]).
    Files,
    /// Rendered in memory: the image of the record at a given index (the built-in
    /// task, whose images are the PNGs `dualpriv data synthetic` writes, pixel for
    /// pixel).
    Memory(&'a (dyn Fn(usize) -> Result<image::RgbImage> + Sync)),
}

/// A LLaVA conversation file ready for training.
pub struct LlavaDataset {
    path: PathBuf,
    examples: Vec<TextExample>,
    stats: EncodeStats,
    /// `[I, 3, S, S]` f32 little-endian for the I records with an image, in order.
    pixels: Mmap,
    /// Per example, its image's slot in `pixels` (`None`: text-only).
    slot: Vec<Option<usize>>,
    image_size: usize,
    pad_id: u32,
    /// Unkeyed digest of the examples and pixels, for [`DataSource::identity`]
    /// (local only: the ledger's fingerprint is the keyed one).
    digest: String,
}

impl LlavaDataset {
    /// Loads `json` (LLaVA's conversation format, image paths relative to
    /// `image_root`), renders each record with the template, tokenises it (records
    /// longer than `max_len` are truncated and counted, those left without an
    /// answer dropped: [`Self::stats`]), and checks that `processor` makes images of
    /// the model's `image_size`. Records without an image are text-only examples;
    /// `image_root` may be `None` when no record has one.
    pub fn load(
        json: &Path,
        image_root: Option<&Path>,
        tok: &Tokenizer,
        processor: ImageProcessor,
        image_size: usize,
        opts: DataOptions,
    ) -> Result<Self> {
        let conv = Conversations::load(json, image_root)?;
        Self::from_conversations(&conv, Images::Files, tok, processor, image_size, opts)
    }

    /// [`Self::load`] for conversations already read (or built in memory), whose
    /// images come from `images`.
    pub fn from_conversations(
        conv: &Conversations,
        images: Images<'_>,
        tok: &Tokenizer,
        processor: ImageProcessor,
        image_size: usize,
        opts: DataOptions,
    ) -> Result<Self> {
        let json = conv.path.as_path();
        let mode = opts.aspect;
        let (examples, stats) = conv.encode(tok, opts.template, opts.max_len)?;
        let mut seen: HashMap<&Path, &TextExample> = HashMap::new();
        for ex in &examples {
            if let Some(img) = ex.image.as_deref() {
                if let Some(first) = seen.insert(img, ex) {
                    return Err(Error::Config(format!(
                        "{}: records {:?} and {:?} share the image {}; record-level DP would \
                         protect that image only as a group: merge them into one multi-turn \
                         record",
                        json.display(),
                        first.id,
                        ex.id,
                        img.display()
                    )));
                }
            }
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
        let pixels = preprocess_all(&examples, images, &processor, mode, image_size)?;
        let mut next = 0;
        let slot = examples
            .iter()
            .map(|e| {
                e.image.as_ref().map(|_| {
                    next += 1;
                    next - 1
                })
            })
            .collect();
        let mut ds = Self {
            path: json.to_path_buf(),
            examples,
            slot,
            stats,
            pixels,
            image_size,
            pad_id: tok.pad_id(),
            digest: String::new(),
        };
        ds.digest = ds.fingerprint(&[0; 32]);
        Ok(ds)
    }

    /// What tokenisation did: truncated and dropped records, the longest text.
    pub fn stats(&self) -> &EncodeStats {
        &self.stats
    }

    /// The encoded records.
    pub fn examples(&self) -> &[TextExample] {
        &self.examples
    }

    /// Example `i`'s preprocessed pixels, from the cache; zeros for a text-only
    /// record (the model never reads that slot).
    fn pixels(&self, i: usize) -> Box<dyn Iterator<Item = f32> + '_> {
        let n = 3 * self.image_size * self.image_size;
        match self.slot[i] {
            Some(k) => Box::new(
                self.pixels[k * n * 4..][..n * 4]
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            ),
            None => Box::new(std::iter::repeat_n(0.0, n)),
        }
    }
}

/// Decodes and preprocesses every record's image (in parallel, a bounded number
/// at a time; text-only records have none) into an unlinked, memory-mapped
/// temporary file.
fn preprocess_all(
    examples: &[TextExample],
    images: Images<'_>,
    processor: &ImageProcessor,
    mode: AspectMode,
    image_size: usize,
) -> Result<Mmap> {
    let dir = std::env::temp_dir();
    let mut name = [0u8; 8];
    getrandom::fill(&mut name).map_err(Error::entropy)?;
    let path = dir.join(format!(
        "dualpriv-pixels-{}-{:016x}.f32",
        std::process::id(),
        u64::from_le_bytes(name)
    ));
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true).write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let file = opts.open(&path).map_err(|e| Error::io(&path, e))?;
    // Unlinked at once: the open file and its mapping stay valid, and nothing with
    // private pixels is left behind, whatever ends the process.
    let _ = std::fs::remove_file(&path);
    let mut w = std::io::BufWriter::new(&file);
    let per = 3 * image_size * image_size;
    let with_image: Vec<&TextExample> = examples.iter().filter(|e| e.image.is_some()).collect();
    for chunk in with_image.chunks(64) {
        let done: Vec<Vec<f32>> = chunk
            .par_iter()
            .map(|ex| {
                let img = ex.image.as_ref().ok_or_else(|| {
                    Error::Internal(format!("record {} lost its image", ex.index))
                })?;
                let rgb = match images {
                    Images::Files => load_image(img)?,
                    Images::Memory(f) => f(ex.index)?,
                };
                let px = processor.preprocess(&rgb, mode)?;
                if px.len() != per {
                    return Err(Error::Internal(format!(
                        "{}: preprocessed to {} values, not 3·{image_size}²",
                        img.display(),
                        px.len()
                    )));
                }
                Ok(px)
            })
            .collect::<Result<_>>()?;
        for px in done {
            let bytes: Vec<u8> = px.iter().flat_map(|v| v.to_le_bytes()).collect();
            w.write_all(&bytes).map_err(|e| Error::io(&path, e))?;
        }
    }
    w.flush().map_err(|e| Error::io(&path, e))?;
    drop(w);
    if with_image.is_empty() {
        // A zero-length file cannot be mapped everywhere; map nothing instead.
        return memmap2::MmapOptions::new()
            .len(1)
            .map_anon()
            .and_then(|m| m.make_read_only())
            .map_err(|e| Error::io(&path, e));
    }
    // SAFETY: the file is private to this process (created here, mode 0600,
    // unlinked) and no longer written.
    unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))
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
        for (ex, &i) in exs.iter().zip(indices) {
            let p = ex.pad(text_len, self.pad_id)?;
            batch.images.extend(self.pixels(i));
            batch.input_ids.extend_from_slice(&p.input_ids);
            batch.targets.extend_from_slice(&p.targets);
            batch
                .loss_mask
                .extend(p.loss_mask.iter().map(|&m| if m { 1.0 } else { 0.0 }));
            let pos = match (&ex.image, ex.image_position) {
                (Some(_), Some(p)) => Some(p),
                (None, None) => None,
                _ => {
                    return Err(Error::Internal(format!(
                        "record {}: an image without an <image> token, or the reverse",
                        ex.index
                    )))
                }
            };
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
            h.update(&[u8::from(ex.image.is_some())]);
        }
        // The pixels trained on, not the image paths: the same file name with other
        // pixels is other data.
        let images = self.slot.iter().flatten().count();
        h.update(&self.pixels[..images * 3 * self.image_size * self.image_size * 4]);
        h.finalize().to_hex()[..32].to_string()
    }

    fn identity(&self) -> String {
        format!("llava:{}:{}", self.path.display(), self.digest)
    }
}
