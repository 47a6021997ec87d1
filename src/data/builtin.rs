//! The built-in task as LLaVA data: the synthetic scenes ([`super::synthetic`]) as
//! LLaVA conversation records with PNG-exact images, read through the same
//! tokenizer, image processor and [`LlavaDataset`] a real LLaVA's data goes through.
//!
//! A record is `{"id": "private-000042", "image": "private/000042.png",
//! "conversations": [{"from": "human", "value": "<image>\nwhat color is the circle ?"},
//! {"from": "gpt", "value": "red"}]}`. The model folder (the shipped
//! `assets/tiny-pretrained`) holds a WordLevel `tokenizer.json` over the task's words
//! ([`tokenizer_words`]) and a `preprocessor_config.json` whose mean and std are the
//! task's [`PIXEL_MEAN`]/[`PIXEL_STD`]; with transformers' chat template the text is
//! `USER: <image>\n{question} ASSISTANT: {answer}`, the loss is on the one answer
//! token, and the visual tokens replace `<image>`.
//!
//! [`write()`] (`dualpriv data synthetic --out DIR`) writes the records as JSON and the
//! images as PNGs; [`load`] renders the same records and pixels in memory (no files),
//! and `tests/builtin.rs` checks the two give the same dataset, fingerprint for
//! fingerprint.
use std::path::{Path, PathBuf};

use image::RgbImage;
use serde_json::json;

use super::synthetic::{task_words, to_rgb8, Dataset, Split, PIXEL_MEAN, PIXEL_STD};
use super::DataSource;
use crate::hf::conversation::{Conversations, ImageRef, Record, Role, Template, Turn};
use crate::hf::dataset::{DataOptions, Images, LlavaDataset};
use crate::hf::image::{AspectMode, ImageProcessor};
use crate::hf::tokenizer::{Tokenizer, IMAGE};
use crate::{Error, Result};

/// The words of transformers' LLaVA chat template (`USER: … ASSISTANT: …`) as the
/// WordLevel tokenizer splits them.
pub const TEMPLATE_WORDS: [&str; 3] = ["USER", ":", "ASSISTANT"];

/// The built-in tokenizer's words after its special tokens: [`TEMPLATE_WORDS`],
/// then the task's words.
pub fn tokenizer_words() -> Vec<&'static str> {
    TEMPLATE_WORDS.iter().chain(task_words()).copied().collect()
}

/// The prompt template of the built-in task.
pub const TEMPLATE: Template = Template::LlavaHf;

/// Longest record, in tokens (the longest question, 12 words, in the template:
/// `<s> USER : <image>` + 12 + `ASSISTANT :` + answer = 19), rounded up. Records are
/// never truncated at this length; it is the run's public padding length.
pub const MAX_TEXT_LEN: usize = 20;

/// The file-name stem of a split's records and image folder.
pub fn split_name(split: Split) -> &'static str {
    match split {
        Split::Public => "public",
        Split::Private => "private",
        Split::Test => "test",
    }
}

/// Example `i`'s image path relative to the image folder.
fn image_name(split: Split, i: usize) -> String {
    format!("{}/{i:06}.png", split_name(split))
}

/// `task`'s examples as LLaVA records (image paths relative to the image folder).
pub fn records(task: &Dataset) -> Vec<Record> {
    task.examples
        .iter()
        .enumerate()
        .map(|(i, ex)| {
            let rel = image_name(task.split, i);
            let question: Vec<&str> = ex
                .question()
                .iter()
                .map(|&id| super::synthetic::Vocab.word(id).unwrap_or("?"))
                .collect();
            let answer = super::synthetic::Vocab.word(ex.answer).unwrap_or("?");
            Record {
                index: i,
                id: format!("{}-{i:06}", split_name(task.split)),
                image: Some(ImageRef {
                    relative: rel.clone(),
                    path: PathBuf::from(rel),
                }),
                turns: vec![
                    Turn {
                        role: Role::Human,
                        value: format!("{IMAGE}\n{}", question.join(" ")),
                    },
                    Turn {
                        role: Role::Gpt,
                        value: answer.to_string(),
                    },
                ],
            }
        })
        .collect()
}

/// Example `i`'s image as 8-bit RGB: the PNG's pixels.
pub fn rgb_image(task: &Dataset, i: usize) -> Result<RgbImage> {
    let ex = task
        .examples
        .get(i)
        .ok_or_else(|| Error::Internal(format!("example {i} of a dataset of {}", task.len())))?;
    let s = task.image_size as u32;
    let px = to_rgb8(&ex.image, task.image_size)?;
    RgbImage::from_raw(s, s, px)
        .ok_or_else(|| Error::Internal(format!("image {i} does not fill {s}×{s}")))
}

/// The built-in task's `split` (`n` examples drawn with `seed`) as a dataset for the
/// model in `model_dir`, read with its `tokenizer.json` and
/// `preprocessor_config.json`. Returns the task too, for its baselines.
pub fn load(
    model_dir: &Path,
    split: Split,
    n: usize,
    seed: u64,
    image_size: usize,
) -> Result<(LlavaDataset, Dataset)> {
    let task = Dataset::generate(split, n, seed, image_size)?;
    if task.is_empty() {
        return Err(Error::Config(format!(
            "the built-in {} split needs at least one example",
            split_name(split)
        )));
    }
    let tok = Tokenizer::from_file(model_dir.join("tokenizer.json"))?;
    let processor = ImageProcessor::from_file(model_dir.join("preprocessor_config.json"))?;
    let name = PathBuf::from(format!(
        "<built-in {} split, {n} examples, seed {seed}>",
        split_name(split)
    ));
    let conv = Conversations::in_memory(name, records(&task))?;
    let render = |i: usize| rgb_image(&task, i);
    let data = LlavaDataset::from_conversations(
        &conv,
        Images::Memory(&render),
        &tok,
        processor,
        image_size,
        options(),
    )?;
    if data.len() != task.len() {
        return Err(Error::Config(format!(
            "{}: {} of the built-in task's records did not fit; the model folder's \
             tokenizer.json is not the built-in one (write it with `dualpriv pretrain`)",
            model_dir.display(),
            task.len() - data.len()
        )));
    }
    Ok((data, task))
}

/// Whether `tok` is the built-in task's tokenizer ([`write_model_files`]): every
/// special and word at its id, and nothing else. A model folder with another
/// tokenizer (a real LLaVA's) was not made for the built-in task.
pub fn is_builtin_tokenizer(tok: &Tokenizer) -> bool {
    let words = tokenizer_words();
    let all: Vec<&str> = crate::hf::write::SPECIALS
        .iter()
        .copied()
        .chain(words.iter().copied())
        .collect();
    tok.vocab_size() == all.len()
        && all
            .iter()
            .enumerate()
            .all(|(id, w)| tok.token_to_id(w) == Some(id as u32))
}

/// How the built-in records become examples.
pub fn options() -> DataOptions {
    DataOptions {
        template: TEMPLATE,
        max_len: MAX_TEXT_LEN,
        aspect: AspectMode::Crop,
    }
}

/// The `preprocessor_config.json` of a model trained on the built-in task: the
/// task's pixel statistics instead of CLIP's.
pub fn preprocessor_config(image_size: usize) -> serde_json::Value {
    crate::hf::write::preprocessor_config(image_size, PIXEL_MEAN, PIXEL_STD)
}

/// Writes the built-in task's `split` (`n` examples, `seed`, `image_size` pixels) as
/// LLaVA data under `dir`: `{split}.json` and the images `{split}/NNNNNN.png`
/// (`dualpriv data synthetic`). Returns the JSON's path. The folder may exist; the
/// files are overwritten.
pub fn write(dir: &Path, split: Split, n: usize, seed: u64, image_size: usize) -> Result<PathBuf> {
    let task = Dataset::generate(split, n, seed, image_size)?;
    let img_dir = dir.join(split_name(split));
    std::fs::create_dir_all(&img_dir).map_err(|e| Error::io(&img_dir, e))?;
    let recs = records(&task);
    let mut out = Vec::with_capacity(recs.len());
    for r in &recs {
        let img = r
            .image
            .as_ref()
            .ok_or_else(|| Error::Internal(format!("record {} has no image", r.index)))?;
        let path = dir.join(&img.relative);
        rgb_image(&task, r.index)?
            .save_with_format(&path, image::ImageFormat::Png)
            .map_err(|e| Error::io(&path, format!("cannot write the PNG: {e}")))?;
        out.push(json!({
            "id": r.id,
            "image": img.relative,
            "conversations": r.turns.iter().map(|t| json!({
                "from": if t.role == Role::Human { "human" } else { "gpt" },
                "value": t.value,
            })).collect::<Vec<_>>(),
        }));
    }
    let json_path = dir.join(format!("{}.json", split_name(split)));
    crate::hf::write::write_json(&json_path, &serde_json::Value::Array(out))?;
    Ok(json_path)
}

/// Writes the files of a model folder for the built-in task, all but the weights:
/// `config.json` of `cfg`, the WordLevel `tokenizer.json` over [`tokenizer_words`]
/// with its `tokenizer_config.json`, and [`preprocessor_config`].
pub fn write_model_files(dir: &Path, cfg: &crate::model::config::ModelConfig) -> Result<()> {
    use crate::hf::write::{
        llava_config, tokenizer_config, word_level_tokenizer, write_json, SPECIALS, WORD_LEVEL_IDS,
    };
    let words = tokenizer_words();
    if SPECIALS.len() + words.len() > cfg.llm.vocab {
        return Err(Error::Config(format!(
            "model {}: its vocabulary of {} is smaller than the built-in task's {} tokens",
            cfg.name,
            cfg.llm.vocab,
            SPECIALS.len() + words.len()
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    // RoPE has no learned positions, so this only bounds prompts (`generate`):
    // Llama's default, far above the task's 19 text + 16 visual tokens.
    let positions = 2048;
    write_json(
        &dir.join("config.json"),
        &llava_config(cfg, WORD_LEVEL_IDS, positions)?,
    )?;
    write_json(&dir.join("tokenizer.json"), &word_level_tokenizer(&words)?)?;
    write_json(
        &dir.join("tokenizer_config.json"),
        &tokenizer_config(MAX_TEXT_LEN),
    )?;
    write_json(
        &dir.join("preprocessor_config.json"),
        &preprocessor_config(cfg.vision.image_size),
    )
}

/// The preset's sizes as an ordinary LLaVA: no patch-embedding bias (transformers'
/// CLIP has none) and the exact (erf) GELU in the projector, as llava-1.5's.
pub fn model_config(preset: &str) -> Result<crate::model::config::ModelConfig> {
    let mut cfg = crate::model::config::ModelConfig::preset(preset)?;
    cfg.vision.patch_bias = false;
    cfg.projector.act = crate::model::config::ProjectorAct::Gelu;
    Ok(cfg)
}

/// Writes `model` as a LLaVA folder for the built-in task: [`write_model_files`]
/// and the weights ([`crate::hf::write::save_weights`]).
pub fn write_model_folder<B: crate::backend::Backend>(
    backend: &B,
    model: &crate::model::Mllm<B>,
    dir: &Path,
) -> Result<()> {
    write_model_files(dir, model.config())?;
    crate::hf::write::save_weights(backend, model, &dir.join("model.safetensors"))
}
