//! The built-in synthetic multimodal task: procedurally rendered shapes on textured
//! backgrounds, with single-token answers to questions about them. It needs no
//! downloads, is fully deterministic, and is sized for the tiny LLaVA-style model
//! (32×32 images, vocabulary ≤ 64), while images can be rendered at any size.
//!
//! # Scenes
//!
//! A scene holds 1–3 objects: colour and shape questions show exactly one (binding
//! a colour to a shape among several objects is more than the tiny model learns in
//! a CPU budget), count questions 1–3, position questions two. Every object has a distinct shape ([`ShapeKind`]:
//! circle, square, triangle, cross) *and* a distinct colour ([`Color`]: red, green,
//! blue, yellow, white, purple), so "the circle" and "the red object" always name
//! exactly one object. Objects are placed on a square canvas of [`SCENE_UNITS`] =
//! 32 units with side lengths of 6–12 units (12–20 for a lone object, so its colour
//! and shape fill a sizeable share of the patches) and bounding boxes at least
//! [`MIN_GAP`] units apart (non-overlapping). The canvas is rendered at the
//! requested pixel size (a unit is `image_size / 32` pixels), so the scene,
//! question and answer of an example do not depend on the image size; only the
//! pixels do. The background is a grey tone with low-amplitude stripes and pixel
//! noise, so most patches are near-duplicate background (what visual token pruning
//! exploits).
//!
//! # Questions (all answers are one token)
//!
//! | kind | template | answers |
//! |---|---|---|
//! | [`QuestionKind::Color`] | `what color is the <shape> ?` | 6 colours |
//! | [`QuestionKind::Shape`] | `what shape is the <color> object ?` | 4 shapes |
//! | [`QuestionKind::Count`] | `how many shapes are there ?` | `one` `two` `three` |
//! | [`QuestionKind::LeftRight`] | `is the <c1> shape left or right of the <c2> shape ?` | `left` `right` |
//! | [`QuestionKind::AboveBelow`] | `is the <c1> shape above or below the <c2> shape ?` | `above` `below` |
//!
//! Relative-position questions are only asked about pairs whose bounding boxes are
//! separated along the asked axis by at least [`MIN_GAP`] units, so the answer is
//! never borderline. Answer classes are balanced by construction within each kind
//! (uniform colour/shape/count, and the pair order is a fair coin).
//!
//! # Splits
//!
//! * [`Split::Public`], the non-private pretraining split: colour 1/32, shape
//!   11/32, count 10/32, left/right 5/32, above/below 5/32. It teaches the answer
//!   format, and keeps colour rare so the pretrained model barely knows it.
//! * [`Split::Private`], the private fine-tuning split: colour 50 %, and 12.5 % each
//!   of the other four kinds. Colour is what fine-tuning on private data can add;
//!   chance level on Test is about 0.28.
//! * [`Split::Test`]: held out, same distribution as Private, independent draws.
//!
//! Example `i` of a split is generated from its own RNG seeded by
//! `(seed, split, i)`, so generation is parallel and deterministic, and a prefix
//! of a larger dataset equals the smaller dataset. Rendering uses only IEEE basic
//! arithmetic and `sqrt` (no `sin`/`exp`), so the bytes are identical on every
//! platform.
//!
//! # Text layout
//!
//! An example's unpadded text is `[BOS, question…, SEP, answer]`. Collated
//! ([`Dataset::collate`]) it is padded with [`PAD`] to `text_len`,
//! `targets[t] = input_ids[t + 1]` (PAD at the end) and `loss_mask` is 1 at exactly
//! one position, [`Example::answer_position`] (the SEP), whose target is the answer.
//!
//! # Chance level
//!
//! With the default mixture the Test split's expected chance accuracy is
//! 0.5·1/6 + 0.125·(1/4 + 1/3) + 0.25·1/2 ≈ 0.281 for uniform guessing within the
//! question's answer set; always guessing the most frequent answer per kind does a
//! little better on a finite sample (classes are balanced only in expectation; the
//! demo's 1000-example Test split prints its own figure).
//! Note that the kinds split position questions by axis: a blind model that reads
//! "left or right" gets 50 % on them. [`Dataset::baselines`] computes both
//! baselines for a concrete dataset.
use std::fmt;
use std::path::Path;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::Batch;
use crate::error::{Error, Result};

/// Padding token id.
pub const PAD: u32 = 0;
/// Beginning-of-sequence token id (first token of every example).
pub const BOS: u32 = 1;
/// Separator between the question and the answer token.
pub const SEP: u32 = 2;

/// All tokens, indexed by id. Ids 0–2 are the special tokens.
const WORDS: [&str; 34] = [
    "<pad>", "<bos>", "<sep>", // special
    "what", "color", "is", "the", "shape", "object", "how", "many", "shapes", "are", "there",
    "left", "or", "right", "of", "above", "below", "?", // question words
    "red", "green", "blue", "yellow", "white", "purple", // colours
    "circle", "square", "triangle", "cross", // shapes
    "one", "two", "three", // counts
];

/// Number of token ids the task uses (all ids are `< VOCAB_SIZE`). A model whose
/// vocabulary has at least this many entries (e.g. the tiny preset's 64) can consume
/// the task.
pub const VOCAB_SIZE: usize = WORDS.len();
const _: () = assert!(VOCAB_SIZE <= 64);

/// Side of the scene canvas in scene units; a unit is `image_size / SCENE_UNITS` pixels.
pub const SCENE_UNITS: f32 = 32.0;
/// Minimum gap, in scene units, between the bounding boxes of two objects, and
/// between the boxes of a pair asked about in a position question along its axis.
pub const MIN_GAP: f32 = 2.0;
/// Smallest accepted image side in pixels.
pub const MIN_IMAGE_SIZE: usize = 8;
/// Largest accepted image side in pixels.
pub const MAX_IMAGE_SIZE: usize = 4096;
/// Per-channel mean subtracted from `[0, 1]` pixel values (fixed constants, measured
/// once on the Private distribution; not computed from any dataset at run time).
pub const PIXEL_MEAN: [f32; 3] = [0.447, 0.438, 0.436];
/// Per-channel scale dividing the centred pixel values.
pub const PIXEL_STD: [f32; 3] = [0.152, 0.139, 0.152];

/// The token vocabulary: id ↔ word.
#[derive(Clone, Copy, Debug, Default)]
pub struct Vocab;

impl Vocab {
    /// The vocabulary.
    pub fn new() -> Self {
        Vocab
    }

    /// Number of ids ([`VOCAB_SIZE`]).
    pub fn len(&self) -> usize {
        VOCAB_SIZE
    }

    /// Always false.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The word of `id`, or `None` when out of range.
    pub fn word(&self, id: u32) -> Option<&'static str> {
        WORDS.get(id as usize).copied()
    }

    /// The id of `word`, or `None` when it is not in the vocabulary.
    pub fn id(&self, word: &str) -> Option<u32> {
        WORDS.iter().position(|w| *w == word).map(|i| i as u32)
    }

    /// Splits `text` on whitespace and maps each word to its id.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        text.split_whitespace()
            .map(|w| {
                self.id(w)
                    .ok_or_else(|| Error::Config(format!("word {w:?} is not in the vocabulary")))
            })
            .collect()
    }

    /// Words of `ids` joined by spaces; PAD is skipped and unknown ids print as `<id>`.
    pub fn decode(&self, ids: &[u32]) -> String {
        ids.iter()
            .filter(|&&id| id != PAD)
            .map(|&id| match self.word(id) {
                Some(w) => w.to_string(),
                None => format!("<{id}>"),
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Which split of the task to draw.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Split {
    /// Non-private pretraining split: colour and shape questions only.
    Public,
    /// Private fine-tuning split: all question kinds.
    Private,
    /// Held-out evaluation split, same distribution as Private.
    Test,
}

impl Split {
    fn tag(self) -> u64 {
        match self {
            Split::Public => 0x5055_424c,
            Split::Private => 0x5052_4956,
            Split::Test => 0x5445_5354,
        }
    }

    /// Probability of each kind in [`QuestionKind::ALL`] order.
    ///
    /// Public rarely asks about colour (1/32); Private and Test are half colour
    /// questions. Colour is what the tiny model learns fastest, so the demo's
    /// fine-tunes have a skill to acquire from the private data.
    pub fn kind_mix(self) -> [f64; 5] {
        match self {
            Split::Public => [1.0 / 32.0, 11.0 / 32.0, 10.0 / 32.0, 5.0 / 32.0, 5.0 / 32.0],
            Split::Private | Split::Test => [0.5, 0.125, 0.125, 0.125, 0.125],
        }
    }

    fn sample_kind(self, rng: &mut ChaCha8Rng) -> QuestionKind {
        // 32nds: exact for both mixtures.
        let r = rng.random_range(0..32u32);
        match self {
            Split::Public => match r {
                0 => QuestionKind::Color,
                1..=11 => QuestionKind::Shape,
                12..=21 => QuestionKind::Count,
                22..=26 => QuestionKind::LeftRight,
                _ => QuestionKind::AboveBelow,
            },
            Split::Private | Split::Test => match r {
                0..=15 => QuestionKind::Color,
                16..=19 => QuestionKind::Shape,
                20..=23 => QuestionKind::Count,
                24..=27 => QuestionKind::LeftRight,
                _ => QuestionKind::AboveBelow,
            },
        }
    }
}

/// The type of question an example asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum QuestionKind {
    /// `what color is the <shape> ?` → a colour.
    Color,
    /// `what shape is the <color> object ?` → a shape.
    Shape,
    /// `how many shapes are there ?` → one / two / three.
    Count,
    /// `is the <c1> shape left or right of the <c2> shape ?` → left / right.
    LeftRight,
    /// `is the <c1> shape above or below the <c2> shape ?` → above / below.
    AboveBelow,
}

impl QuestionKind {
    /// All kinds.
    pub const ALL: [QuestionKind; 5] = [
        QuestionKind::Color,
        QuestionKind::Shape,
        QuestionKind::Count,
        QuestionKind::LeftRight,
        QuestionKind::AboveBelow,
    ];

    /// A short name for printing.
    pub fn name(self) -> &'static str {
        match self {
            QuestionKind::Color => "color",
            QuestionKind::Shape => "shape",
            QuestionKind::Count => "count",
            QuestionKind::LeftRight => "left/right",
            QuestionKind::AboveBelow => "above/below",
        }
    }

    /// The token ids that can answer this kind of question.
    pub fn answer_set(self) -> Vec<u32> {
        let v = Vocab;
        let words: &[&str] = match self {
            QuestionKind::Color => &["red", "green", "blue", "yellow", "white", "purple"],
            QuestionKind::Shape => &["circle", "square", "triangle", "cross"],
            QuestionKind::Count => &["one", "two", "three"],
            QuestionKind::LeftRight => &["left", "right"],
            QuestionKind::AboveBelow => &["above", "below"],
        };
        words.iter().map(|w| v.id(w).unwrap_or(PAD)).collect()
    }

    /// True for the relative-position kinds.
    pub fn is_position(self) -> bool {
        matches!(self, QuestionKind::LeftRight | QuestionKind::AboveBelow)
    }
}

impl fmt::Display for QuestionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An object's shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ShapeKind {
    /// A disc.
    Circle,
    /// An axis-aligned square.
    Square,
    /// An upward-pointing isosceles triangle.
    Triangle,
    /// A plus sign.
    Cross,
}

impl ShapeKind {
    /// All shapes.
    pub const ALL: [ShapeKind; 4] = [
        ShapeKind::Circle,
        ShapeKind::Square,
        ShapeKind::Triangle,
        ShapeKind::Cross,
    ];

    /// The shape's word.
    pub fn word(self) -> &'static str {
        match self {
            ShapeKind::Circle => "circle",
            ShapeKind::Square => "square",
            ShapeKind::Triangle => "triangle",
            ShapeKind::Cross => "cross",
        }
    }

    /// The shape's token id.
    pub fn token(self) -> u32 {
        Vocab.id(self.word()).unwrap_or(PAD)
    }

    /// Whether the point `(dx, dy)`, relative to the centre, in units of the half
    /// side `r`, lies inside the shape (`y` grows downwards).
    fn contains(self, dx: f32, dy: f32, r: f32) -> bool {
        match self {
            ShapeKind::Circle => dx * dx + dy * dy <= r * r,
            ShapeKind::Square => {
                let h = 0.9 * r;
                dx.abs() <= h && dy.abs() <= h
            }
            ShapeKind::Triangle => {
                // Apex at (0, -r), base from (-r, r) to (r, r).
                dy >= -r && dy <= r && dx.abs() <= 0.5 * (dy + r)
            }
            ShapeKind::Cross => {
                let w = r / 3.0;
                (dx.abs() <= w && dy.abs() <= r) || (dy.abs() <= w && dx.abs() <= r)
            }
        }
    }
}

/// An object's colour.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Color {
    /// Red.
    Red,
    /// Green.
    Green,
    /// Blue.
    Blue,
    /// Yellow.
    Yellow,
    /// White.
    White,
    /// Purple.
    Purple,
}

impl Color {
    /// All colours.
    pub const ALL: [Color; 6] = [
        Color::Red,
        Color::Green,
        Color::Blue,
        Color::Yellow,
        Color::White,
        Color::Purple,
    ];

    /// The colour's word.
    pub fn word(self) -> &'static str {
        match self {
            Color::Red => "red",
            Color::Green => "green",
            Color::Blue => "blue",
            Color::Yellow => "yellow",
            Color::White => "white",
            Color::Purple => "purple",
        }
    }

    /// The colour's token id.
    pub fn token(self) -> u32 {
        Vocab.id(self.word()).unwrap_or(PAD)
    }

    /// Nominal RGB in `[0, 1]` (each object jitters it by up to ±0.05 per channel).
    pub fn rgb(self) -> [f32; 3] {
        match self {
            Color::Red => [0.90, 0.12, 0.10],
            Color::Green => [0.10, 0.75, 0.15],
            Color::Blue => [0.15, 0.30, 0.95],
            Color::Yellow => [0.95, 0.88, 0.10],
            Color::White => [0.97, 0.97, 0.97],
            Color::Purple => [0.60, 0.18, 0.80],
        }
    }
}

/// One object of a scene, in scene units (the canvas spans `[0, SCENE_UNITS)²`,
/// `y` grows downwards).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Object {
    /// Shape.
    pub shape: ShapeKind,
    /// Colour.
    pub color: Color,
    /// Centre x.
    pub cx: f32,
    /// Centre y.
    pub cy: f32,
    /// Side of the bounding box (6–12 units).
    pub size: f32,
}

impl Object {
    /// Bounding box `(x0, y0, x1, y1)`.
    pub fn bbox(&self) -> (f32, f32, f32, f32) {
        let r = 0.5 * self.size;
        (self.cx - r, self.cy - r, self.cx + r, self.cy + r)
    }
}

/// What an image shows: its objects, with pairwise distinct shapes and colours.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Scene {
    /// 1–3 objects.
    pub objects: Vec<Object>,
}

/// One example: an image, its unpadded text and its answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    /// `[3, S, S]` image, normalised per channel: `(x - PIXEL_MEAN[c]) / PIXEL_STD[c]`
    /// with `x` in `[0, 1]`.
    pub image: Vec<f32>,
    /// `[BOS, question…, SEP, answer]`, unpadded.
    pub input_ids: Vec<u32>,
    /// The answer token id (the last entry of `input_ids`).
    pub answer: u32,
    /// The question's kind.
    pub kind: QuestionKind,
    /// The rendered scene, for checking answers and debugging.
    pub scene: Scene,
}

impl Example {
    /// The question tokens (between BOS and SEP).
    /// Empty for a malformed (hand-built) example shorter than 3 tokens.
    pub fn question(&self) -> &[u32] {
        let len = self.input_ids.len();
        if len < 3 {
            return &[];
        }
        &self.input_ids[1..len - 2]
    }

    /// The position whose next-token target is the answer (the SEP position,
    /// `input_ids.len() - 2`); `loss_mask` is 1 exactly there.
    /// (Saturates at 0 for a malformed example shorter than 2 tokens.)
    pub fn answer_position(&self) -> usize {
        self.input_ids.len().saturating_sub(2)
    }
}

/// A generated split of the task.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// The examples, in index order.
    pub examples: Vec<Example>,
    /// Image side in pixels.
    pub image_size: usize,
    /// The split this dataset was drawn from.
    pub split: Split,
    /// The seed it was drawn with.
    pub seed: u64,
}

/// Chance-level accuracies of a dataset (see [`Dataset::baselines`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Baselines {
    /// Accuracy of always answering the most frequent answer of the question's kind
    /// (frequencies measured on this dataset).
    pub majority: f64,
    /// Expected accuracy of guessing uniformly within the kind's answer set.
    pub uniform: f64,
    /// Per-kind breakdown, for kinds present in the dataset.
    pub per_kind: Vec<KindBaseline>,
}

/// Chance level of one question kind.
#[derive(Clone, Debug, PartialEq)]
pub struct KindBaseline {
    /// The kind.
    pub kind: QuestionKind,
    /// Number of examples of this kind.
    pub count: usize,
    /// Its most frequent answer.
    pub majority_answer: u32,
    /// Fraction of its examples with that answer.
    pub majority: f64,
    /// `1 / |answer set|`.
    pub uniform: f64,
}

impl fmt::Display for Baselines {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "chance level: majority {:.4}, uniform {:.4}",
            self.majority, self.uniform
        )?;
        for k in &self.per_kind {
            write!(
                f,
                "\n  {:<12} n={:<6} majority {:.4} ({}), uniform {:.4}",
                k.kind.name(),
                k.count,
                k.majority,
                Vocab.word(k.majority_answer).unwrap_or("?"),
                k.uniform
            )?;
        }
        Ok(())
    }
}

impl Dataset {
    /// Draws `n` examples of `split` with images of `image_size`×`image_size`
    /// pixels. Same arguments → identical bytes. `n = 0` gives an empty dataset.
    ///
    /// Errors ([`Error::Config`]): `image_size` outside
    /// `[MIN_IMAGE_SIZE, MAX_IMAGE_SIZE]`, or `n · 3 · image_size²` overflowing.
    pub fn generate(split: Split, n: usize, seed: u64, image_size: usize) -> Result<Dataset> {
        if !(MIN_IMAGE_SIZE..=MAX_IMAGE_SIZE).contains(&image_size) {
            return Err(Error::Config(format!(
                "image_size {image_size} is out of range [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}]"
            )));
        }
        let pixels = 3 * image_size * image_size;
        if n.checked_mul(pixels)
            .and_then(|v| v.checked_mul(4))
            .is_none_or(|b| b > isize::MAX as usize)
        {
            return Err(Error::Config(format!(
                "{n} images of {image_size}x{image_size} do not fit in memory"
            )));
        }
        let examples = (0..n)
            .into_par_iter()
            .map(|i| generate_example(split, seed, i as u64, image_size))
            .collect();
        Ok(Dataset {
            examples,
            image_size,
            split,
            seed,
        })
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    /// True when there are no examples.
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// Longest unpadded text (0 when empty): the smallest valid `text_len`.
    pub fn max_text_len(&self) -> usize {
        self.examples
            .iter()
            .map(|e| e.input_ids.len())
            .max()
            .unwrap_or(0)
    }

    /// Collates the examples at `indices` (repeats allowed) into a [`Batch`] with
    /// text padded to `text_len`. Empty `indices` give an empty batch (`size` 0).
    ///
    /// Errors ([`Error::Shape`]): an index out of range, an example whose text
    /// is longer than `text_len`, or a hand-edited example whose text is shorter
    /// than 3 tokens or does not end in its answer.
    pub fn collate(&self, indices: &[usize], text_len: usize) -> Result<Batch> {
        let mut batch = Batch::default();
        self.collate_into(indices, text_len, &mut batch)?;
        Ok(batch)
    }

    /// [`Self::collate`] into `batch`, every field overwritten, its buffers reused.
    pub fn collate_into(
        &self,
        indices: &[usize],
        text_len: usize,
        batch: &mut Batch,
    ) -> Result<()> {
        let b = indices.len();
        let pixels = 3 * self.image_size * self.image_size;
        batch.size = b;
        batch.image_size = self.image_size;
        batch.text_len = text_len;
        batch.image_pos = None;
        batch.images.clear();
        batch.images.reserve(b * pixels);
        for v in [&mut batch.input_ids, &mut batch.targets] {
            v.clear();
            v.resize(b * text_len, PAD);
        }
        batch.loss_mask.clear();
        batch.loss_mask.resize(b * text_len, 0.0);
        batch.example_ids.clear();
        batch.example_ids.extend_from_slice(indices);
        for (row, &idx) in indices.iter().enumerate() {
            let ex = self.examples.get(idx).ok_or_else(|| {
                Error::Shape(format!(
                    "example index {idx} is out of range for a dataset of {}",
                    self.len()
                ))
            })?;
            let len = ex.input_ids.len();
            if len < 3 || ex.input_ids[len - 1] != ex.answer {
                return Err(Error::Shape(format!(
                    "example {idx} is malformed: its text must be [BOS, question.., SEP, answer]"
                )));
            }
            if len > text_len {
                return Err(Error::Shape(format!(
                    "example {idx} has {len} text tokens, more than text_len {text_len} \
                     (use Dataset::max_text_len, {})",
                    self.max_text_len()
                )));
            }
            batch.images.extend_from_slice(&ex.image);
            let o = row * text_len;
            batch.input_ids[o..o + len].copy_from_slice(&ex.input_ids);
            batch.targets[o..o + len - 1].copy_from_slice(&ex.input_ids[1..]);
            batch.loss_mask[o + ex.answer_position()] = 1.0;
        }
        Ok(())
    }

    /// A keyed BLAKE3 hash (32 hex digits) of the image size, the number of examples
    /// and every example's image bytes, tokens and answer: equal fingerprints mean the
    /// same data. Keyed, because the fingerprint is stored in the ledger and in
    /// checkpoints: without the key (kept beside the ledger) it cannot be used to test
    /// whether a run was trained on a guessed dataset.
    pub fn fingerprint(&self, key: &[u8; 32]) -> String {
        let mut h = blake3::Hasher::new_keyed(key);
        h.update(&(self.image_size as u64).to_le_bytes());
        h.update(&(self.len() as u64).to_le_bytes());
        for ex in &self.examples {
            h.update(bytemuck::cast_slice(&ex.image));
            h.update(&(ex.input_ids.len() as u64).to_le_bytes());
            for id in &ex.input_ids {
                h.update(&id.to_le_bytes());
            }
            h.update(&ex.answer.to_le_bytes());
        }
        h.finalize().to_hex()[..32].to_string()
    }

    /// Chance-level accuracies: always guessing the most frequent answer of each
    /// kind (measured on this dataset), and guessing uniformly within each kind's
    /// answer set. Both are 0 for an empty dataset.
    pub fn baselines(&self) -> Baselines {
        let n = self.len();
        let mut per_kind = Vec::new();
        let (mut hits, mut uniform) = (0usize, 0.0f64);
        for kind in QuestionKind::ALL {
            let mut counts = [0usize; VOCAB_SIZE];
            let mut count = 0;
            for ex in self.examples.iter().filter(|e| e.kind == kind) {
                counts[ex.answer as usize] += 1;
                count += 1;
            }
            if count == 0 {
                continue;
            }
            // Most frequent answer; ties go to the smallest id.
            let (best, best_n) =
                counts
                    .iter()
                    .enumerate()
                    .fold((0, 0), |acc, (i, &c)| if c > acc.1 { (i, c) } else { acc });
            let u = 1.0 / kind.answer_set().len() as f64;
            hits += best_n;
            uniform += u * count as f64;
            per_kind.push(KindBaseline {
                kind,
                count,
                majority_answer: best as u32,
                majority: best_n as f64 / count as f64,
                uniform: u,
            });
        }
        let denom = n.max(1) as f64;
        Baselines {
            majority: hits as f64 / denom,
            uniform: uniform / denom,
            per_kind,
        }
    }
}

/// Majority-guess chance accuracy of `dataset` (shorthand for
/// `dataset.baselines().majority`).
pub fn majority_baseline(dataset: &Dataset) -> f64 {
    dataset.baselines().majority
}

/// The RNG of example `index` of `split` under `seed`.
fn example_rng(split: Split, seed: u64, index: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[0..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&split.tag().to_le_bytes());
    key[16..24].copy_from_slice(&index.to_le_bytes());
    key[24..32].copy_from_slice(b"dpsynth1");
    ChaCha8Rng::from_seed(key)
}

fn generate_example(split: Split, seed: u64, index: u64, image_size: usize) -> Example {
    let mut rng = example_rng(split, seed, index);
    let kind = split.sample_kind(&mut rng);
    let (scene, question, answer) = sample_question(kind, &mut rng);
    let image = render(&scene, image_size, &mut rng);
    let v = Vocab;
    let mut input_ids = Vec::with_capacity(question.len() + 3);
    input_ids.push(BOS);
    input_ids.extend(question.iter().map(|w| v.id(w).unwrap_or(PAD)));
    input_ids.push(SEP);
    input_ids.push(answer);
    Example {
        image,
        input_ids,
        answer,
        kind,
        scene,
    }
}

/// Samples a scene that can answer a question of `kind`, the question's words and
/// the answer id.
fn sample_question(kind: QuestionKind, rng: &mut ChaCha8Rng) -> (Scene, Vec<&'static str>, u32) {
    match kind {
        QuestionKind::Color | QuestionKind::Shape | QuestionKind::Count => {
            // Colour and shape questions show one object: binding a colour to a shape
            // among several objects is beyond what the tiny model learns in a CPU
            // budget. Counting uses 1–3 objects.
            let n = if kind == QuestionKind::Count {
                rng.random_range(1..=3usize)
            } else {
                1
            };
            let scene = sample_scene(n, rng);
            let target = scene.objects[rng.random_range(0..n)];
            match kind {
                QuestionKind::Color => (
                    scene,
                    vec!["what", "color", "is", "the", target.shape.word(), "?"],
                    target.color.token(),
                ),
                QuestionKind::Shape => (
                    scene,
                    vec![
                        "what",
                        "shape",
                        "is",
                        "the",
                        target.color.word(),
                        "object",
                        "?",
                    ],
                    target.shape.token(),
                ),
                _ => {
                    let word = ["one", "two", "three"][n - 1];
                    (
                        scene,
                        vec!["how", "many", "shapes", "are", "there", "?"],
                        Vocab.id(word).unwrap_or(PAD),
                    )
                }
            }
        }
        QuestionKind::LeftRight | QuestionKind::AboveBelow => {
            let horizontal = kind == QuestionKind::LeftRight;
            loop {
                let n = 2;
                let scene = sample_scene(n, rng);
                // Unordered pairs separated along the axis; ordered by coordinate.
                let mut pairs = Vec::new();
                for i in 0..n {
                    for j in 0..n {
                        if i != j && before(&scene.objects[i], &scene.objects[j], horizontal) {
                            pairs.push((i, j));
                        }
                    }
                }
                if pairs.is_empty() {
                    continue;
                }
                let (lo, hi) = pairs[rng.random_range(0..pairs.len())];
                // A fair coin decides which object is asked about: balanced answers.
                let (a, b, first) = if rng.random_bool(0.5) {
                    (lo, hi, true)
                } else {
                    (hi, lo, false)
                };
                let (ca, cb) = (scene.objects[a].color.word(), scene.objects[b].color.word());
                let (w1, w2, prep) = if horizontal {
                    ("left", "right", "of")
                } else {
                    ("above", "below", "the")
                };
                let answer = if first { w1 } else { w2 };
                let mut q = vec!["is", "the", ca, "shape", w1, "or", w2, prep];
                if horizontal {
                    q.push("the");
                }
                q.extend([cb, "shape", "?"]);
                return (scene, q, Vocab.id(answer).unwrap_or(PAD));
            }
        }
    }
}

/// Whether `a` lies entirely left of (`horizontal`) or above `b` with a gap of at
/// least [`MIN_GAP`].
fn before(a: &Object, b: &Object, horizontal: bool) -> bool {
    let (_, _, ax1, ay1) = a.bbox();
    let (bx0, by0, _, _) = b.bbox();
    if horizontal {
        ax1 + MIN_GAP <= bx0
    } else {
        ay1 + MIN_GAP <= by0
    }
}

/// `n` (1–3) non-overlapping objects with distinct shapes and colours.
fn sample_scene(n: usize, rng: &mut ChaCha8Rng) -> Scene {
    let mut shapes = ShapeKind::ALL;
    shapes.shuffle(rng);
    let mut colors = Color::ALL;
    colors.shuffle(rng);
    const MARGIN: f32 = 1.0;
    for _restart in 0..1000 {
        let mut objects: Vec<Object> = Vec::with_capacity(n);
        for k in 0..n {
            // A lone object is drawn larger: its colour and shape are then a
            // sizeable share of the patches, which a tiny model learns quickly.
            let size = if n == 1 {
                rng.random_range(12.0f32..=20.0)
            } else {
                rng.random_range(6.0f32..=12.0)
            };
            let r = 0.5 * size;
            let mut placed = false;
            for _try in 0..100 {
                let cx = rng.random_range(MARGIN + r..=SCENE_UNITS - MARGIN - r);
                let cy = rng.random_range(MARGIN + r..=SCENE_UNITS - MARGIN - r);
                let cand = Object {
                    shape: shapes[k],
                    color: colors[k],
                    cx,
                    cy,
                    size,
                };
                let clear = objects.iter().all(|o| {
                    before(o, &cand, true)
                        || before(&cand, o, true)
                        || before(o, &cand, false)
                        || before(&cand, o, false)
                });
                if clear {
                    objects.push(cand);
                    placed = true;
                    break;
                }
            }
            if !placed {
                break;
            }
        }
        if objects.len() == n {
            return Scene { objects };
        }
    }
    // Practically unreachable; a fixed valid layout keeps generation total.
    let slots = [(8.0, 8.0), (24.0, 8.0), (8.0, 24.0)];
    Scene {
        objects: (0..n)
            .map(|k| Object {
                shape: shapes[k],
                color: colors[k],
                cx: slots[k].0,
                cy: slots[k].1,
                size: 8.0,
            })
            .collect(),
    }
}

/// Renders `scene` at `s`×`s` pixels: grey background with stripes (a triangle
/// wave along a random direction) and pixel noise, anti-aliased objects (3×3
/// supersampling), then per-channel normalisation. Returns `[3, s, s]`.
fn render(scene: &Scene, s: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let unit = SCENE_UNITS / s as f32; // scene units per pixel
    let grey = rng.random_range(0.30f32..0.55);
    let tint: [f32; 3] = std::array::from_fn(|_| rng.random_range(-0.03f32..0.03));
    // Stripes: a triangle wave of the projection on a random unit direction.
    let (mut dx, mut dy) = (0.0f32, 0.0f32);
    while dx * dx + dy * dy < 0.01 {
        dx = rng.random_range(-1.0f32..1.0);
        dy = rng.random_range(-1.0f32..1.0);
    }
    let norm = (dx * dx + dy * dy).sqrt();
    let (dx, dy) = (dx / norm, dy / norm);
    let period = rng.random_range(4.0f32..10.0);
    let phase = rng.random_range(0.0f32..1.0);
    let amp = rng.random_range(0.02f32..0.06);
    let noise_amp = 0.03f32;

    let plane = s * s;
    let mut rgb = vec![0.0f32; 3 * plane];
    for py in 0..s {
        let v = (py as f32 + 0.5) * unit;
        for px in 0..s {
            let u = (px as f32 + 0.5) * unit;
            let t = (u * dx + v * dy) / period + phase;
            let frac = t - t.floor();
            let tri = 4.0 * (frac - 0.5).abs() - 1.0; // in [-1, 1]
            let base = grey + amp * tri;
            for (c, &tc) in tint.iter().enumerate() {
                rgb[c * plane + py * s + px] = base + tc;
            }
        }
    }
    // Objects, with per-object colour jitter and coverage by 3×3 supersampling.
    const SUB: [f32; 3] = [1.0 / 6.0, 0.5, 5.0 / 6.0];
    for o in &scene.objects {
        let nominal = o.color.rgb();
        let col: [f32; 3] = std::array::from_fn(|c| {
            (nominal[c] + rng.random_range(-0.05f32..0.05)).clamp(0.0, 1.0)
        });
        let r = 0.5 * o.size;
        let (x0, y0, x1, y1) = o.bbox();
        let px0 = ((x0 / unit).floor().max(0.0)) as usize;
        let py0 = ((y0 / unit).floor().max(0.0)) as usize;
        let px1 = ((x1 / unit).ceil() as usize).min(s);
        let py1 = ((y1 / unit).ceil() as usize).min(s);
        for py in py0..py1 {
            for px in px0..px1 {
                let mut hits = 0u32;
                for sy in SUB {
                    for sx in SUB {
                        let u = (px as f32 + sx) * unit - o.cx;
                        let v = (py as f32 + sy) * unit - o.cy;
                        hits += o.shape.contains(u, v, r) as u32;
                    }
                }
                if hits == 0 {
                    continue;
                }
                let a = hits as f32 / 9.0;
                for (c, &cc) in col.iter().enumerate() {
                    let p = &mut rgb[c * plane + py * s + px];
                    *p = (1.0 - a) * *p + a * cc;
                }
            }
        }
    }
    // Pixel noise (shared by the channels), clamp, normalise.
    for i in 0..plane {
        let n = noise_amp * rng.random_range(-1.0f32..1.0);
        for c in 0..3 {
            let p = &mut rgb[c * plane + i];
            *p = ((*p + n).clamp(0.0, 1.0) - PIXEL_MEAN[c]) / PIXEL_STD[c];
        }
    }
    rgb
}

/// The task's words (every token id of the task but the three specials), in id
/// order: the vocabulary the built-in LLaVA tokenizer is made of
/// ([`crate::data::builtin`]).
pub fn task_words() -> &'static [&'static str] {
    &WORDS[3..]
}

/// Maps a normalised `[3, s, s]` image back to 8-bit RGB, row-major interleaved
/// (the pixels of the PNG the image is written as).
pub fn to_rgb8(image: &[f32], image_size: usize) -> Result<Vec<u8>> {
    let plane = image_size * image_size;
    if image_size == 0 || image.len() != 3 * plane {
        return Err(Error::Shape(format!(
            "image has {} values, expected 3 x {image_size} x {image_size}",
            image.len()
        )));
    }
    let mut out = Vec::with_capacity(3 * plane);
    for i in 0..plane {
        for c in 0..3 {
            let x = image[c * plane + i] * PIXEL_STD[c] + PIXEL_MEAN[c];
            let x = if x.is_finite() {
                x.clamp(0.0, 1.0)
            } else {
                0.0
            };
            out.push((x * 255.0).round() as u8);
        }
    }
    Ok(out)
}

/// Encodes a normalised `[3, S, S]` image as a binary PPM (P6), undoing the
/// normalisation. Errors ([`Error::Shape`]) when `image.len() != 3·S²`.
pub fn encode_ppm(image: &[f32], image_size: usize) -> Result<Vec<u8>> {
    let rgb = to_rgb8(image, image_size)?;
    let mut out = format!("P6\n{image_size} {image_size}\n255\n").into_bytes();
    out.extend_from_slice(&rgb);
    Ok(out)
}

/// Writes a normalised `[3, S, S]` image to `path` as a binary PPM, for humans to
/// look at. A malformed image is an [`std::io::ErrorKind::InvalidInput`] error.
pub fn write_ppm(path: &Path, image: &[f32], image_size: usize) -> std::io::Result<()> {
    let bytes = encode_ppm(image, image_size)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
    std::fs::write(path, bytes)
}

/// A text sketch of a normalised `[3, S, S]` image, one character per pixel:
/// `.` background, else the initial of the nearest object colour
/// (`R G B Y W P`). Handy for printing 32×32 examples in a terminal; approximate
/// (anti-aliased edges can show a neighbouring colour's letter).
pub fn ascii_preview(image: &[f32], image_size: usize) -> Result<String> {
    let rgb = to_rgb8(image, image_size)?;
    let mut out = String::with_capacity(image_size * (image_size + 1));
    for y in 0..image_size {
        for x in 0..image_size {
            let i = 3 * (y * image_size + x);
            let p: [f32; 3] = std::array::from_fn(|c| rgb[i + c] as f32 / 255.0);
            let chroma =
                p.iter().cloned().fold(0.0f32, f32::max) - p.iter().cloned().fold(1.0f32, f32::min);
            let ch = if chroma < 0.25 && p[0] < 0.8 {
                '.'
            } else {
                let (mut best, mut best_d) = ('.', f32::INFINITY);
                for col in Color::ALL {
                    let q = col.rgb();
                    let d: f32 = (0..3).map(|c| (p[c] - q[c]) * (p[c] - q[c])).sum();
                    if d < best_d {
                        best_d = d;
                        best = col
                            .word()
                            .chars()
                            .next()
                            .unwrap_or('?')
                            .to_ascii_uppercase();
                    }
                }
                best
            };
            out.push(ch);
        }
        out.push('\n');
    }
    Ok(out)
}

impl super::DataSource for Dataset {
    fn len(&self) -> usize {
        Dataset::len(self)
    }
    fn collate(&self, indices: &[usize], text_len: usize) -> Result<Batch> {
        Dataset::collate(self, indices, text_len)
    }
    fn collate_into(&self, indices: &[usize], text_len: usize, out: &mut Batch) -> Result<()> {
        Dataset::collate_into(self, indices, text_len, out)
    }
    fn max_text_len(&self) -> usize {
        Dataset::max_text_len(self)
    }
    fn fingerprint(&self, key: &[u8; 32]) -> String {
        Dataset::fingerprint(self, key)
    }
    fn identity(&self) -> String {
        format!("synthetic:{:?}:{}:{}", self.split, self.seed, self.len())
    }
}
