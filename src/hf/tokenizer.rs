//! `tokenizer.json` (the Hugging Face `tokenizers` format llava-hf checkpoints ship)
//! through the pure-Rust `tokenizers` crate, with LLaVA's special tokens looked up by
//! name.
//!
//! Ids equal Python's `tokenizers.Tokenizer.encode(text).ids` (and transformers'
//! fast tokenizer): the same library does the work. One behaviour callers rely on:
//! added tokens (`<image>`, `</s>`, ...) split the text first and the normaliser runs
//! on each piece separately, so with Llama's `Prepend("▁")` normaliser the text right
//! after `<image>` or `</s>` starts with `▁`, exactly as at the start of a prompt.
use std::path::{Path, PathBuf};

use tokenizers::Tokenizer as HfTokenizer;

use crate::{Error, Result};

/// The beginning-of-sequence token of Llama / Vicuna.
pub const BOS: &str = "<s>";
/// The end-of-sequence token; LLaVA's `vicuna_v1` template also writes it as text
/// after each answer.
pub const EOS: &str = "</s>";
/// The placeholder the model replaces with the image features.
pub const IMAGE: &str = "<image>";
/// The padding token llava-hf checkpoints add (id 32001 in llava-1.5-7b-hf).
pub const PAD: &str = "<pad>";

/// A token's byte range `[start, end)` in the encoded text.
pub type ByteRange = (usize, usize);

/// A loaded `tokenizer.json` with the ids of [`BOS`], [`EOS`], [`IMAGE`] and [`PAD`].
pub struct Tokenizer {
    inner: HfTokenizer,
    path: PathBuf,
    bos: u32,
    eos: u32,
    pad: u32,
    image: u32,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("path", &self.path)
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("pad", &self.pad)
            .field("image", &self.image)
            .finish()
    }
}

impl Tokenizer {
    /// Loads `path`: a `tokenizer.json` file, or a folder that holds one (a
    /// llava-hf checkpoint folder).
    ///
    /// Truncation and padding settings stored in the file are switched off (as
    /// transformers does): [`Tokenizer::encode`] always returns every token, and
    /// truncation and padding are explicit steps of
    /// [`conversation`](crate::hf::conversation).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let mut path = path.as_ref().to_path_buf();
        if path.is_dir() {
            path = path.join("tokenizer.json");
        }
        let shown = path.display().to_string();
        let bytes = std::fs::read(&path).map_err(|e| Error::Io {
            path: shown.clone(),
            message: format!(
                "cannot read the tokenizer: {e}. Pass the tokenizer.json of a llava-hf \
                 checkpoint (or its folder)"
            ),
        })?;
        let mut inner = HfTokenizer::from_bytes(&bytes).map_err(|e| Error::Io {
            path: shown.clone(),
            message: format!(
                "not a Hugging Face tokenizers file: {e}. Pass the tokenizer.json of a \
                 llava-hf checkpoint (a sentencepiece tokenizer.model is not supported: \
                 convert it with transformers' LlamaTokenizerFast.save_pretrained)"
            ),
        })?;
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| Error::Internal(format!("switching off truncation of {shown}: {e}")))?;
        let mut tok = Tokenizer {
            inner,
            path,
            bos: 0,
            eos: 0,
            pad: 0,
            image: 0,
        };
        tok.bos = tok.special_id(BOS, false)?;
        // `</s>` and `<image>` appear as text in prompts, so they must be added
        // tokens that the text splitter recognises, not just vocabulary entries.
        tok.eos = tok.special_id(EOS, true)?;
        tok.image = tok.special_id(IMAGE, true)?;
        tok.pad = tok.special_id(PAD, false)?;
        Ok(tok)
    }

    fn special_id(&self, name: &str, in_text: bool) -> Result<u32> {
        let shown = self.path.display().to_string();
        let id = self.inner.token_to_id(name).ok_or_else(|| Error::Io {
            path: shown.clone(),
            message: format!(
                "the tokenizer has no token `{name}`, which LLaVA-1.5 needs. Use the \
                 tokenizer of a llava-hf/llava-1.5-*-hf checkpoint, or add `{name}` as a \
                 special token (transformers: tokenizer.add_special_tokens, then \
                 save_pretrained; resize the model's embeddings to match)"
            ),
        })?;
        if in_text {
            let got = self.encode(name, false)?;
            if got != [id] {
                return Err(Error::Io {
                    path: shown,
                    message: format!(
                        "`{name}` (id {id}) is in the vocabulary but the text `{name}` \
                         tokenises to {got:?}: it is not an added token. Add it to \
                         added_tokens with \"special\": true (transformers: \
                         tokenizer.add_special_tokens)"
                    ),
                });
            }
        }
        Ok(id)
    }

    /// The file this tokenizer was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Token ids of `text`, with one [`BOS`] id in front when `add_bos`.
    ///
    /// Equal to Python's `Tokenizer.encode(text).ids` for Llama-layout tokenizers
    /// (whose post-processor is `<s> $A`) when `add_bos`. Added tokens in `text`
    /// (`<image>`, `</s>`) become their ids.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        Ok(self.encode_with_offsets(text, add_bos)?.0)
    }

    /// [`Tokenizer::encode`] plus each token's byte range in `text` (`(0, 0)` for the
    /// BOS; tokens of one byte-fallback character share its range).
    pub fn encode_with_offsets(
        &self,
        text: &str,
        add_bos: bool,
    ) -> Result<(Vec<u32>, Vec<ByteRange>)> {
        // The post-processor is bypassed and BOS added by hand, so `add_bos` means
        // exactly one BOS whatever template the file's post-processor holds.
        let enc = self.inner.encode(text, false).map_err(|e| {
            Error::Format(format!(
                "{}: tokenising {:?}: {e}",
                self.path.display(),
                preview(text)
            ))
        })?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        let mut offsets = Vec::with_capacity(enc.len() + 1);
        if add_bos {
            ids.push(self.bos);
            offsets.push((0, 0));
        }
        ids.extend_from_slice(enc.get_ids());
        offsets.extend_from_slice(enc.get_offsets());
        Ok((ids, offsets))
    }

    /// The text of `ids` (for `generate`): the file's decoder (for Llama: `▁` to
    /// space, byte-fallback bytes to UTF-8, one leading space stripped). With
    /// `skip_special`, special tokens (`<s>`, `</s>`, `<image>`, `<pad>`, ...) are left
    /// out. Equal to Python's `Tokenizer.decode(ids, skip_special_tokens)`, except
    /// that an id outside the vocabulary is an error here (Python drops it).
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        if let Some(&bad) = ids.iter().find(|&&id| self.inner.id_to_token(id).is_none()) {
            return Err(Error::Config(format!(
                "token id {bad} is not in the vocabulary of {} ({} tokens): the ids come \
                 from a model whose vocabulary differs from this tokenizer; use the \
                 checkpoint's own tokenizer.json",
                self.path.display(),
                self.vocab_size()
            )));
        }
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| Error::Format(format!("{}: decoding {ids:?}: {e}", self.path.display())))
    }

    /// The id of `token` (a vocabulary entry or an added token), if any.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The piece of `id` (`▁`-marked for Llama), if `id` is in the vocabulary.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The special added tokens other than [`IMAGE`]: text that holds one of
    /// them would inject a control token (see
    /// [`conversation`](crate::hf::conversation)'s validation).
    pub(crate) fn control_tokens(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .inner
            .get_added_tokens_decoder()
            .into_values()
            // `</s>` even if not marked special: VicunaV1 splits rounds at it.
            .filter(|t| (t.special || t.content == EOS) && t.content != IMAGE)
            .filter(|t| !t.content.is_empty())
            .map(|t| t.content)
            .collect();
        v.sort();
        v
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of [`BOS`].
    pub fn bos_id(&self) -> u32 {
        self.bos
    }

    /// The id of [`EOS`]; `generate` stops there.
    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    /// The id of [`PAD`].
    pub fn pad_id(&self) -> u32 {
        self.pad
    }

    /// The id of [`IMAGE`] (`image_token_index` in the model's config.json).
    pub fn image_id(&self) -> u32 {
        self.image
    }
}

/// The first 60 characters of `s`, for error messages.
pub(crate) fn preview(s: &str) -> String {
    let mut out: String = s.chars().take(60).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}
