//! `dualpriv generate`: greedy decoding with a transformers LLaVA folder (and
//! optionally a PEFT adapter) for one image and one question.
//!
//! The prompt is built by [`Template::generation_prompt`] (the same templates the
//! training data is rendered with), tokenised with the folder's `tokenizer.json`,
//! and the image preprocessed by [`ImageProcessor`] in the chosen [`AspectMode`],
//! so what the model sees at generation is what it saw in training. Decoding is
//! greedy: at each step the argmax of the last position's logits (the first index
//! on ties, as `torch.argmax`), until the stop token (`</s>`) or the token limit,
//! as transformers' `generate(do_sample=False)`; `tests/hf_generate.rs` checks the
//! ids against transformers on the fixture model, with and without an adapter.
//!
//! **No KV cache.** Each new token recomputes the whole forward (vision tower
//! included) over the prompt plus the tokens so far: `n` new tokens cost `n`
//! forwards, and memory is that of one forward of the final length (only the
//! last position goes through the LM head, [`Mllm::predict`]). Fine for
//! evaluation-sized answers; a cache is future work.
//!
//! **Text-only prompts** (no image) are refused for now: the model needs one image
//! per example. **Token pruning**: a model loaded from a folder uses LLaVA's own
//! visual tokens (every patch); [`Generator::from_run`] uses the token selection
//! the run trained with.
//!
//! Privacy: generation reads only the model (public, or covered by its run's ε) and
//! the caller's own prompt; it writes nothing.
use std::path::{Path, PathBuf};

use crate::backend::Backend;
use crate::data::Batch;
use crate::error::Setting;
use crate::hf::config::LlavaConfig;
use crate::hf::conversation::{Role, Template, Turn};
use crate::hf::image::{load_image, AspectMode, ImageProcessor};
use crate::hf::load::{apply_adapter, load_llava};
use crate::hf::peft::{read_adapter, Adapter};
use crate::hf::tokenizer::{Tokenizer, IMAGE};
use crate::model::config::{LoraTarget, TrainMode};
use crate::model::Mllm;
use crate::train::checkpoint::{self, HF_PRESET};
use crate::vision::tokens::TokenSelectConfig;
use crate::{Error, Result};

/// Settings of `dualpriv generate`.
#[derive(Clone, Debug)]
pub struct GenerateArgs {
    /// The transformers LLaVA folder.
    pub model: PathBuf,
    /// A PEFT LoRA adapter folder to apply, if any.
    pub adapter: Option<PathBuf>,
    /// The image (PNG or JPEG); `None` for a text-only prompt (no `<image>`).
    pub image: Option<PathBuf>,
    /// The question; must hold `<image>` exactly once when an image is given.
    pub prompt: String,
    /// The prompt template.
    pub template: Template,
    /// How the image becomes a square.
    pub aspect: AspectMode,
    /// At most this many new tokens.
    pub max_new_tokens: usize,
}

/// Why decoding stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// A stop token was generated (it is the last of [`Generation::ids`]).
    Stop,
    /// `max_new_tokens` were generated.
    MaxTokens,
    /// The sequence reached the model's `max_position_embeddings`.
    ContextFull,
}

/// What greedy decoding produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Generation {
    /// The prompt's token ids (BOS first, `<image>` once).
    pub prompt_ids: Vec<u32>,
    /// The generated ids, the stop token included when decoding stopped at one.
    pub ids: Vec<u32>,
    /// The generated text, special tokens (the stop token) left out.
    pub text: String,
    /// Why decoding stopped.
    pub stop: StopReason,
}

/// A loaded model with its tokenizer and image processor, ready to decode.
pub struct Generator<'a, B: Backend> {
    be: &'a B,
    model: Mllm<B>,
    tok: Tokenizer,
    processor: ImageProcessor,
    tokens: Option<TokenSelectConfig>,
    max_positions: usize,
    stop_ids: Vec<u32>,
}

/// The LoRA mode that holds `adapter`: its rank and α, on the decoder linears it
/// has tensors for (PEFT's common `q_proj`/`v_proj`-only adapters included).
fn adapter_mode(adapter: &Adapter, from: &Path) -> Result<TrainMode> {
    let targets: Vec<LoraTarget> = LoraTarget::ALL
        .into_iter()
        .filter(|t| {
            let m = format!(".{}.lora_", t.module());
            adapter.tensors.iter().any(|x| x.name.contains(&m))
        })
        .collect();
    if targets.is_empty() {
        return Err(Error::Format(format!(
            "{}: the adapter has no LoRA tensors on the decoder's q/k/v/o/gate/up/down \
             projections; pass a LoRA adapter of this LLaVA's language model (--adapter)",
            from.display()
        )));
    }
    let mode = TrainMode::Lora {
        rank: adapter.config.r,
        alpha: adapter.config.lora_alpha as f32,
        targets,
    };
    mode.validate()?;
    Ok(mode)
}

impl<'a, B: Backend> Generator<'a, B> {
    /// Loads the LLaVA folder `model_dir` (config, weights, `tokenizer.json`,
    /// `preprocessor_config.json`) and applies the PEFT adapter in `adapter`. An
    /// adapter of another base model fails with an error naming the adapter file
    /// and the first tensor that does not fit.
    pub fn open(be: &'a B, model_dir: &Path, adapter: Option<&Path>) -> Result<Self> {
        let (model, config) = match adapter {
            None => {
                let (m, rep) = load_llava(be, model_dir, &TrainMode::frozen(), 0)?;
                (m, rep.config)
            }
            Some(dir) => {
                let ad = read_adapter(dir)?;
                let mode = adapter_mode(&ad, dir)?;
                let (mut m, rep) = load_llava(be, model_dir, &mode, 0)?;
                apply_adapter(be, &mut m, &ad, dir).map_err(|e| {
                    Error::Config(format!(
                        "{e} (--adapter {}: is it an adapter of {}?)",
                        dir.display(),
                        model_dir.display()
                    ))
                })?;
                (m, rep.config)
            }
        };
        Self::assemble(be, model, model_dir, &config, None)
    }

    /// The current checkpoint of the run folder `run` (a `train --model` run) with
    /// the tokenizer and image processor of the LLaVA folder it trained, and the
    /// token selection it trained with.
    pub fn from_run(be: &'a B, run: &Path) -> Result<Self> {
        let (st, folder) = checkpoint::load_state(run)?;
        let dir = st
            .model
            .preset
            .strip_prefix(HF_PRESET)
            .ok_or_else(|| Error::Setting {
                setting: Setting::RunDir,
                message: format!(
                    "{}: the run trained the preset {:?}, not a transformers LLaVA folder; \
                 evaluate it with `eval --checkpoint`",
                    run.display(),
                    st.model.preset
                ),
            })?;
        let dir = PathBuf::from(dir);
        let config = LlavaConfig::from_dir(&dir)?;
        let (mcfg, mode) = st.model.build()?;
        let model = Mllm::load(be, &mcfg, &mode, &folder.join("model.safetensors"))?;
        Self::assemble(be, model, &dir, &config, st.train.token_select())
    }

    fn assemble(
        be: &'a B,
        model: Mllm<B>,
        dir: &Path,
        config: &LlavaConfig,
        tokens: Option<TokenSelectConfig>,
    ) -> Result<Self> {
        let tok = Tokenizer::from_file(dir.join("tokenizer.json"))?;
        let processor = ImageProcessor::from_file(dir.join("preprocessor_config.json"))?;
        if tok.image_id() != config.image_token_id {
            return Err(Error::Config(format!(
                "{}: `{IMAGE}` is token {} but config.json's image_token_index is {}; the \
                 tokenizer does not belong to this model",
                dir.join("tokenizer.json").display(),
                tok.image_id(),
                config.image_token_id
            )));
        }
        let stop_ids = vec![tok.eos_id()];
        Ok(Self {
            be,
            model,
            tok,
            processor,
            tokens,
            max_positions: config.max_positions,
            stop_ids,
        })
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tok
    }

    /// The model.
    pub fn model(&self) -> &Mllm<B> {
        &self.model
    }

    /// Replaces the stop tokens (default: the tokenizer's `</s>`), as
    /// transformers' `eos_token_id` argument of `generate`.
    pub fn set_stop_ids(&mut self, ids: Vec<u32>) {
        self.stop_ids = ids;
    }

    /// The generation prompt's ids for `turns` (question, answer, ..., question)
    /// and the position of its `<image>` token. Turns holding a control token of
    /// the tokenizer (`</s>`, `<s>`, ...) are refused, as in training data.
    pub fn encode_prompt(
        &self,
        template: Template,
        turns: &[Turn],
        has_image: bool,
    ) -> Result<(Vec<u32>, Option<usize>)> {
        let control = self.tok.control_tokens();
        for (j, t) in turns.iter().enumerate() {
            if let Some(c) = control.iter().find(|c| t.value.contains(c.as_str())) {
                return Err(Error::Config(format!(
                    "generation prompt: turn {j} contains `{c}`, which {} reads as a control \
                     token; remove it (only {IMAGE} may appear, once)",
                    self.tok.path().display()
                )));
            }
        }
        let text = template.generation_prompt(turns, has_image)?;
        let ids = self.tok.encode(&text, true)?;
        let at: Vec<usize> = (0..ids.len())
            .filter(|&k| ids[k] == self.tok.image_id())
            .collect();
        let pos = match (has_image, at.as_slice()) {
            (true, [p]) => Some(*p),
            (false, []) => None,
            _ => {
                return Err(Error::Internal(format!(
                "the prompt has {} `{IMAGE}` tokens after tokenising (image given: {has_image})",
                at.len()
            )))
            }
        };
        Ok((ids, pos))
    }

    /// `image` decoded and preprocessed for the model, `[3, S, S]`.
    pub fn pixels(&self, image: &Path, aspect: AspectMode) -> Result<Vec<f32>> {
        let s = self.model.config().vision.image_size as u32;
        let (w, h) = self.processor.output_size(s, s, aspect);
        if (w, h) != (s, s) {
            return Err(Error::Config(format!(
                "the image processor makes {w}×{h} images but the vision tower takes {s}×{s}; \
                 use the model folder's preprocessor_config.json"
            )));
        }
        self.processor.preprocess(&load_image(image)?, aspect)
    }

    /// Greedy decoding from `prompt_ids` (its `<image>` at `image_pos`, the image's
    /// preprocessed `pixels`): at most `max_new` tokens, stopping after a stop token
    /// or when the sequence fills the model's context.
    pub fn greedy(
        &self,
        prompt_ids: &[u32],
        image_pos: Option<usize>,
        pixels: &[f32],
        max_new: usize,
    ) -> Result<Generation> {
        let s = self.model.config().vision.image_size;
        // A text-only prompt (no `<image>`) is its text alone; the model zeroes the
        // pixels of its slot, so any buffer of the right size will do.
        let (visual, pixels) = match image_pos {
            Some(_) => (
                self.model.visual_tokens(self.tokens.as_ref()),
                pixels.to_vec(),
            ),
            None => (1, vec![0.0; 3 * s * s]),
        };
        // The decoder's sequence: the text with `<image>` replaced by the visual tokens.
        let seq_len = |text: usize| text + visual - 1;
        if seq_len(prompt_ids.len()) > self.max_positions {
            return Err(Error::Config(format!(
                "the prompt is {} tokens with the image's {visual}, more than the model's \
                 max_position_embeddings {}; shorten it",
                seq_len(prompt_ids.len()),
                self.max_positions
            )));
        }
        let mut ids = prompt_ids.to_vec();
        let mut stop = StopReason::MaxTokens;
        for _ in 0..max_new {
            if seq_len(ids.len()) >= self.max_positions {
                stop = StopReason::ContextFull;
                break;
            }
            let t = ids.len();
            let mut loss_mask = vec![0.0; t];
            loss_mask[t - 1] = 1.0;
            let batch = Batch {
                size: 1,
                image_size: s,
                images: pixels.clone(),
                text_len: t,
                input_ids: ids.clone(),
                targets: vec![0; t],
                loss_mask,
                example_ids: vec![0],
                image_pos: Some(vec![image_pos]),
            };
            let next = self
                .model
                .predict(self.be, &batch, self.tokens.as_ref())?
                .first()
                .copied()
                .ok_or_else(|| Error::Internal("predict returned no token".into()))?;
            ids.push(next);
            if self.stop_ids.contains(&next) {
                stop = StopReason::Stop;
                break;
            }
        }
        let new = ids.split_off(prompt_ids.len());
        let text = self.tok.decode(&new, true)?;
        Ok(Generation {
            prompt_ids: ids,
            ids: new,
            text,
            stop,
        })
    }
}

/// `dualpriv generate`: loads `a.model` (and `a.adapter`), builds the prompt from
/// `a.prompt` and `a.image`, and decodes greedily.
pub fn generate<B: Backend>(be: &B, a: &GenerateArgs) -> Result<Generation> {
    let has_marker = a.prompt.contains(IMAGE);
    let image = match (&a.image, has_marker) {
        (Some(img), true) => img,
        (Some(img), false) => {
            return Err(Error::Config(format!(
                "--prompt has no `{IMAGE}` but --image {} is given; put `{IMAGE}` where the \
                 image goes, e.g. --prompt \"{IMAGE}\\n{}\"",
                img.display(),
                a.prompt
            )))
        }
        (None, true) => {
            return Err(Error::Config(format!(
                "--prompt holds `{IMAGE}` but no --image is given; pass --image FILE"
            )))
        }
        (None, false) => {
            let g = Generator::open(be, &a.model, a.adapter.as_deref())?;
            let turns = [Turn {
                role: Role::Human,
                value: a.prompt.clone(),
            }];
            let (ids, pos) = g.encode_prompt(a.template, &turns, false)?;
            return g.greedy(&ids, pos, &[], a.max_new_tokens);
        }
    };
    if a.prompt.matches(IMAGE).count() != 1 {
        return Err(Error::Config(format!(
            "--prompt holds `{IMAGE}` {} times; the model takes one image, so write it once",
            a.prompt.matches(IMAGE).count()
        )));
    }
    // Checked before the (slow) model load, so a typo fails at once.
    if !image.is_file() {
        return Err(Error::Io {
            path: image.display().to_string(),
            message: "--image: no such file; pass a PNG or JPEG".into(),
        });
    }
    let g = Generator::open(be, &a.model, a.adapter.as_deref())?;
    let turns = [Turn {
        role: Role::Human,
        value: a.prompt.clone(),
    }];
    let (ids, pos) = g.encode_prompt(a.template, &turns, true)?;
    let pixels = g.pixels(image, a.aspect)?;
    g.greedy(&ids, pos, &pixels, a.max_new_tokens)
}
