//! LLaVA's conversation data: the JSON file, its validation, the two prompt templates
//! and the answer-only loss mask.
//!
//! The file (as `llava_v1_5_mix665k.json`) is a list of records
//! `{"id", "image"?, "conversations": [{"from": "human"|"gpt", "value"}, ...]}`, with
//! `image` relative to an image folder. [`Conversations::load`] checks every record
//! and every image path up front, so a training run does not fail hours in; each
//! error names the file, the record (index and id) and the fix. Images are only
//! located here (canonical path inside the folder, opens for reading); decoding is
//! [`image`](crate::hf::image)'s job, from [`TextExample::image`].
//!
//! [`Conversations::encode`] renders each record with a [`Template`], tokenises it and
//! marks the answer tokens:
//!
//! * [`Template::LlavaHf`]: the `chat_template` of `llava-hf/llava-1.5-7b-hf`
//!   (`USER: <image>\n{q} ASSISTANT: {a} USER: ...`), labels where transformers'
//!   `apply_chat_template(return_assistant_tokens_mask=True)` puts them;
//! * [`Template::VicunaV1`]: LLaVA-1.5's own training format (`conv_vicuna_v1`,
//!   system prompt, `</s>` after each answer), labels as LLaVA's `preprocess_v1`.
//!
//! Both are checked token for token against Python by `tests/hf_text.rs` (references
//! from `scripts/make_text_fixture.py`, whose docstring gives the Python side).
//!
//! Convention: `loss_mask[t]` is true when the prediction made at position `t`, of
//! `input_ids[t + 1]`, is in the loss (the crate's [`Batch`](crate::data::Batch)
//! layout: `targets[t] = input_ids[t + 1]`). The last position is never in the loss.
use std::path::{Component, Path, PathBuf};

use rayon::prelude::*;
use serde::Deserialize;

use crate::hf::tokenizer::{preview, Tokenizer, EOS, IMAGE};
use crate::{Error, Result};

/// The system prompt of LLaVA's `conv_vicuna_v1` (llava/conversation.py), which
/// LLaVA-1.5 was trained with. It says "user"; the "human" wording belongs to
/// `conv_vicuna_v0` and LLaVA-1.
pub const VICUNA_V1_SYSTEM: &str = "A chat between a curious user and an artificial \
     intelligence assistant. The assistant gives helpful, detailed, and polite answers to \
     the user's questions.";

/// Who speaks a turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `"from": "human"`: the question (`USER` in the prompt).
    Human,
    /// `"from": "gpt"`: the answer (`ASSISTANT`), the tokens the loss is on.
    Gpt,
}

impl Role {
    fn expected_at(turn: usize) -> Role {
        if turn.is_multiple_of(2) {
            Role::Human
        } else {
            Role::Gpt
        }
    }

    fn json_name(self) -> &'static str {
        match self {
            Role::Human => "human",
            Role::Gpt => "gpt",
        }
    }
}

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Turn {
    /// The speaker.
    pub role: Role,
    /// The text as written in the file (with `<image>` where the record has one).
    pub value: String,
}

/// A record's image: the path as written and where it resolved to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRef {
    /// The `"image"` field, relative to the image folder.
    pub relative: String,
    /// The canonical path (symlinks resolved), checked to lie inside the canonical
    /// image folder and to open for reading.
    pub path: PathBuf,
}

/// One validated record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Position in the file (0-based).
    pub index: usize,
    /// The `"id"` field (a number is kept as its JSON text).
    pub id: String,
    /// The image, if the record has one.
    pub image: Option<ImageRef>,
    /// Human and gpt turns alternating, starting with human and ending with gpt.
    /// Exactly one `<image>`, in a human turn, when [`Record::image`] is set; none
    /// otherwise.
    pub turns: Vec<Turn>,
}

/// A loaded and validated LLaVA conversation file.
#[derive(Clone, Debug)]
pub struct Conversations {
    /// The JSON file.
    pub path: PathBuf,
    /// The canonical image folder, if one was given.
    pub image_root: Option<PathBuf>,
    /// The records, in file order.
    pub records: Vec<Record>,
}

#[derive(Deserialize)]
struct RawRecord {
    #[serde(default)]
    id: Option<RawId>,
    #[serde(default)]
    image: Option<String>,
    #[serde(default)]
    conversations: Option<Vec<RawTurn>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawId {
    Str(String),
    Num(serde_json::Number),
}

#[derive(Deserialize)]
struct RawTurn {
    #[serde(default)]
    from: Option<String>,
    #[serde(default)]
    value: Option<String>,
}

const SHAPE: &str = "a list of {\"id\", \"image\" (optional), \"conversations\": \
                     [{\"from\": \"human\" or \"gpt\", \"value\": text}, ...]}";

impl Conversations {
    /// Reads and validates `json`. `image_root` is the folder the `"image"` paths are
    /// relative to (LLaVA's `--image_folder`); it may be `None` for text-only data.
    ///
    /// Checks, each failing with an error that names the file, the record and the
    /// fix: the JSON shape; `id` and `conversations` present; every turn has `from`
    /// (`human` or `gpt`) and a non-empty `value`; turns alternate human, gpt, ...,
    /// ending with gpt; exactly one `<image>`, in a human turn, when the record has an
    /// image, and none when it has not; the image path is relative, has no `..`,
    /// resolves (after symlinks) inside the image folder to a file that opens.
    pub fn load(json: impl AsRef<Path>, image_root: Option<&Path>) -> Result<Self> {
        let path = json.as_ref().to_path_buf();
        let shown = path.display().to_string();
        let bytes = std::fs::read(&path).map_err(|e| Error::Io {
            path: shown.clone(),
            message: format!(
                "cannot read the conversation file: {e}. Pass LLaVA's conversation JSON \
                 ({SHAPE})"
            ),
        })?;
        let raw: Vec<RawRecord> = serde_json::from_slice(&bytes).map_err(|e| {
            Error::Format(format!(
                "{shown}: not LLaVA conversation JSON ({e}). Expected {SHAPE}"
            ))
        })?;
        if raw.is_empty() {
            return Err(Error::Format(format!(
                "{shown}: the file holds no records. Expected {SHAPE}"
            )));
        }
        let root = image_root.map(canonical_root).transpose()?;
        let records = raw
            .into_iter()
            .enumerate()
            .map(|(index, r)| validate(&shown, root.as_deref(), index, r))
            .collect::<Result<Vec<_>>>()?;
        Ok(Conversations {
            path,
            image_root: root,
            records,
        })
    }

    /// Records built in memory (the built-in task's, [`crate::data::builtin`]) as
    /// a conversation set named `name` (for messages), with the turn checks of
    /// [`Self::load`]. Their [`ImageRef::path`]s are names of in-memory images, not
    /// files: the dataset built from them must be given the pixels
    /// ([`crate::hf::dataset::Images::Memory`]).
    pub fn in_memory(name: PathBuf, records: Vec<Record>) -> Result<Self> {
        let shown = name.display().to_string();
        for r in &records {
            check_turns(&r.turns, r.image.is_some(), false)
                .map_err(|(msg, fix)| record_error(&shown, r.index, &r.id, &msg, &fix))?;
        }
        Ok(Conversations {
            path: name,
            image_root: None,
            records,
        })
    }

    /// Renders, tokenises and labels every record with `template`, truncating each to
    /// `max_len` tokens.
    ///
    /// `max_len` counts the ids returned, where the image is its single `<image>`
    /// placeholder (as LLaVA's `model_max_length`); the model's sequence is
    /// `image_seq_length - 1` longer. A longer record is cut at `max_len` (the labels
    /// past the cut go with it) and counted in [`EncodeStats::truncated`]. A record is
    /// left out, and listed in [`EncodeStats::dropped`], when the cut removes its
    /// `<image>` or every answer token, or when `VicunaV1`'s label computation does not
    /// line up with the tokens (LLaVA's "tokenization mismatch", where it masks the
    /// whole record).
    ///
    /// Fails (naming the file, record and turn) when a turn holds a special token of
    /// the tokenizer other than `<image>` (`</s>`, `<s>`, `<pad>`, ...): the tokenizer
    /// would read it as a control token, and `VicunaV1` splits rounds at `</s>`.
    pub fn encode(
        &self,
        tok: &Tokenizer,
        template: Template,
        max_len: usize,
    ) -> Result<(Vec<TextExample>, EncodeStats)> {
        if max_len < 2 {
            return Err(Error::Config(format!(
                "max_len {max_len}: a text example needs at least 2 tokens (a prompt \
                 token and one target); use the model's context length"
            )));
        }
        let control = tok.control_tokens();
        let file = self.path.display().to_string();
        // Tokenising dominates (VicunaV1 tokenises each round twice more): in parallel,
        // then the results in file order so the first error is the first bad record.
        let labelled: Vec<Result<Labelled>> = self
            .records
            .par_iter()
            .map(|r| {
                check_control_tokens(&file, tok, &control, r)?;
                template.label(tok, r)
            })
            .collect();
        let mut stats = EncodeStats {
            records: self.records.len(),
            ..EncodeStats::default()
        };
        let mut out = Vec::with_capacity(self.records.len());
        for (r, labelled) in self.records.iter().zip(labelled) {
            let drop = |reason| Dropped {
                index: r.index,
                id: r.id.clone(),
                reason,
            };
            let (mut ids, is_label) = match labelled? {
                Some(v) => v,
                None => {
                    stats.dropped.push(drop(DropReason::TokenizationMismatch));
                    continue;
                }
            };
            let image_position = match r.image {
                Some(_) => {
                    let at: Vec<usize> = (0..ids.len())
                        .filter(|&k| ids[k] == tok.image_id())
                        .collect();
                    if at.len() != 1 {
                        return Err(record_error(
                            &file,
                            r.index,
                            &r.id,
                            &format!("has an image but {} `{IMAGE}` tokens", at.len()),
                            "build records with Conversations::load, which validates them",
                        ));
                    }
                    Some(at[0])
                }
                None => None,
            };
            stats.longest = stats.longest.max(ids.len());
            let truncated = ids.len() > max_len;
            if truncated {
                stats.truncated += 1;
                ids.truncate(max_len);
            }
            if image_position.is_some_and(|p| p >= max_len) {
                stats.dropped.push(drop(DropReason::ImageCut));
                continue;
            }
            let n = ids.len();
            let loss_mask: Vec<bool> = (0..n).map(|t| t + 1 < n && is_label[t + 1]).collect();
            if !loss_mask.contains(&true) {
                stats.dropped.push(drop(DropReason::AnswersCut));
                continue;
            }
            out.push(TextExample {
                index: r.index,
                id: r.id.clone(),
                input_ids: ids,
                loss_mask,
                image_position,
                image: r.image.as_ref().map(|i| i.path.clone()),
                truncated,
            });
        }
        stats.kept = out.len();
        Ok((out, stats))
    }
}

/// Token ids with BOS and, per token, whether it is a label; `None` for `VicunaV1`'s
/// tokenization mismatch.
type Labelled = Option<(Vec<u32>, Vec<bool>)>;

/// Fails when a turn of `r` holds a special token other than `<image>`.
fn check_control_tokens(file: &str, tok: &Tokenizer, control: &[String], r: &Record) -> Result<()> {
    for (j, t) in r.turns.iter().enumerate() {
        if let Some(c) = control.iter().find(|c| t.value.contains(c.as_str())) {
            return Err(record_error(
                file,
                r.index,
                &r.id,
                &format!(
                    "turn {j} ({:?}) contains `{c}`, which {} reads as a special control token",
                    preview(&t.value),
                    tok.path().display()
                ),
                "remove it from the text (only <image> may appear, once)",
            ));
        }
    }
    Ok(())
}

/// A prompt format: how turns become text, and which tokens are answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Template {
    /// The `chat_template` shipped with `llava-hf/llava-1.5-7b-hf` (transformers'
    /// `apply_chat_template`): `USER: <image>\n{q} ASSISTANT: {a} USER: {q2}
    /// ASSISTANT: {a2} `, BOS from the tokenizer, no system prompt and no `</s>`.
    /// The turn holding `<image>` renders as the image first, then its text without
    /// `<image>`, stripped. Labels: every token that overlaps `{a} ` (the answer and
    /// the space the template writes after it), as transformers' assistant mask.
    /// Without `</s>` the answers carry no stop token; use `VicunaV1` to train the
    /// one LLaVA-1.5 was trained with (and `generate` stops at).
    LlavaHf,
    /// LLaVA-1.5's training format (`conv_vicuna_v1`): [`VICUNA_V1_SYSTEM`], then
    /// `USER: {q} ASSISTANT: {a}</s>` per round (`sep` `" "`, `sep2` `"</s>"`); the
    /// `<image>` moved to the front of its turn (`"<image>\n" + rest.strip()`, as
    /// LLaVA's `preprocess_multimodal`).
    ///
    /// Labels as LLaVA's `preprocess_v1` (llava/train/train.py), reproduced
    /// literally: the BOS is masked; each round (text up to a `</s>`) advances a cursor
    /// by the token count of the round tokenised alone with BOS (the BOS standing in
    /// for the round's `</s>`), after masking the first `len(tokenise(instruction)) -
    /// 2` tokens, where the instruction ends with `" ASSISTANT: "` (one for the BOS,
    /// one because the space after `ASSISTANT:` merges into the answer's first token).
    /// This is its legacy-tokenizer path, the one LLaVA-1.5 was trained with
    /// (tokenizers 0.12; the later `- 1` for rounds after the first only runs for
    /// non-legacy tokenizers on tokenizers >= 0.14). Llama-layout `tokenizer.json`s
    /// behave as legacy: the normaliser prepends `▁` to the text after each `</s>`.
    /// With the Vicuna/Llama vocabulary the mask is exactly each answer plus its `</s>`;
    /// with a BPE that merges `ASSISTANT:▁` into one token (the test fixture) that
    /// token is labelled too, as `preprocess_v1` does. If the cursor does not end at
    /// the sequence length the record is dropped (LLaVA masks it whole).
    VicunaV1,
}

impl Template {
    /// The training prompt of `record`: every turn, answers included.
    pub fn prompt(&self, record: &Record) -> String {
        self.render(&record.turns, record.image.is_some(), false).0
    }

    /// The prompt for generating the next answer: `turns` (human, gpt, ..., human;
    /// `<image>` once in a human turn if `has_image`, else not at all) then the
    /// assistant's header `ASSISTANT:`, as LLaVA's `conv.get_prompt()` with an empty
    /// last message and transformers' `add_generation_prompt=True`. Tokenise it with
    /// BOS.
    pub fn generation_prompt(&self, turns: &[Turn], has_image: bool) -> Result<String> {
        check_turns(turns, has_image, true)
            .map_err(|(msg, fix)| Error::Config(format!("generation prompt: {msg}; {fix}")))?;
        Ok(self.render(turns, has_image, true).0)
    }

    /// The text and, for `LlavaHf`, the byte ranges of the assistant's generations.
    fn render(
        &self,
        turns: &[Turn],
        has_image: bool,
        generation: bool,
    ) -> (String, Vec<(usize, usize)>) {
        let mut s = String::new();
        let mut spans = Vec::new();
        match self {
            Template::LlavaHf => {
                for t in turns {
                    match t.role {
                        Role::Human => {
                            s.push_str("USER: ");
                            if has_image && t.value.contains(IMAGE) {
                                s.push_str(IMAGE);
                                s.push('\n');
                                s.push_str(py_strip(&t.value.replace(IMAGE, "")));
                            } else {
                                s.push_str(&t.value);
                            }
                            s.push(' ');
                        }
                        Role::Gpt => {
                            s.push_str("ASSISTANT: ");
                            let start = s.len();
                            s.push_str(&t.value);
                            s.push(' ');
                            spans.push((start, s.len()));
                        }
                    }
                }
            }
            Template::VicunaV1 => {
                s.push_str(VICUNA_V1_SYSTEM);
                s.push(' ');
                for t in turns {
                    let (role, sep) = match t.role {
                        Role::Human => ("USER", " "),
                        Role::Gpt => ("ASSISTANT", EOS),
                    };
                    s.push_str(role);
                    s.push_str(": ");
                    if has_image && t.value.contains(IMAGE) {
                        let moved = format!("{IMAGE}\n{}", py_strip(&t.value.replace(IMAGE, "")));
                        s.push_str(py_strip(&moved));
                    } else {
                        s.push_str(&t.value);
                    }
                    s.push_str(sep);
                }
            }
        }
        if generation {
            s.push_str("ASSISTANT:");
        }
        (s, spans)
    }

    /// See [`Labelled`].
    fn label(&self, tok: &Tokenizer, record: &Record) -> Result<Labelled> {
        let (prompt, spans) = self.render(&record.turns, record.image.is_some(), false);
        match self {
            Template::LlavaHf => {
                let (ids, offsets) = tok.encode_with_offsets(&prompt, true)?;
                // A token is a label when it overlaps a generation span (zero-width
                // tokens such as the BOS never do).
                let is_label = offsets
                    .iter()
                    .map(|&(a, b)| spans.iter().any(|&(s, e)| a < e && b > s))
                    .collect();
                Ok(Some((ids, is_label)))
            }
            Template::VicunaV1 => {
                let ids = tok.encode(&prompt, true)?;
                let n = ids.len();
                let mut is_label = vec![true; n];
                let sep = " ASSISTANT: ";
                let mut cur = 1usize;
                is_label[..cur.min(n)].fill(false);
                for round in prompt.split(EOS) {
                    if round.is_empty() {
                        break;
                    }
                    let parts: Vec<&str> = round.split(sep).collect();
                    if parts.len() != 2 {
                        break;
                    }
                    let instruction = format!("{}{sep}", parts[0]);
                    let round_len = tok.encode(round, true)?.len();
                    let instruction_len = tok.encode(&instruction, true)?.len().saturating_sub(2);
                    let end = (cur + instruction_len).min(n);
                    if cur < end {
                        is_label[cur..end].fill(false);
                    }
                    cur += round_len;
                }
                if cur < n {
                    is_label[cur..].fill(false);
                }
                Ok((cur == n).then_some((ids, is_label)))
            }
        }
    }
}

/// One tokenised record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextExample {
    /// The record's position in the file.
    pub index: usize,
    /// The record's id.
    pub id: String,
    /// Token ids, BOS first, at most `max_len`; the image is one `<image>` id.
    pub input_ids: Vec<u32>,
    /// Same length as `input_ids`: true at `t` when the prediction of
    /// `input_ids[t + 1]` is in the loss (an answer token follows). False at the end.
    pub loss_mask: Vec<bool>,
    /// Where the `<image>` id is, for records with an image.
    pub image_position: Option<usize>,
    /// The image to decode (canonical path), for records with an image.
    pub image: Option<PathBuf>,
    /// Whether the record was cut at `max_len`.
    pub truncated: bool,
}

/// A [`TextExample`] right-padded to a fixed length (the crate's batch layout).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Padded {
    /// `input_ids` then the pad id.
    pub input_ids: Vec<u32>,
    /// `targets[t] = input_ids[t + 1]`, the pad id at the end and over the padding.
    pub targets: Vec<u32>,
    /// `loss_mask`, false over the padding.
    pub loss_mask: Vec<bool>,
}

impl TextExample {
    /// Per-token labels in transformers' convention (`labels[t]` is `input_ids[t]`
    /// where it is a target, else -100, unshifted), for comparing with Python.
    pub fn hf_labels(&self) -> Vec<i64> {
        (0..self.input_ids.len())
            .map(|t| {
                if t > 0 && self.loss_mask[t - 1] {
                    i64::from(self.input_ids[t])
                } else {
                    -100
                }
            })
            .collect()
    }

    /// Right-pads to `len` with `pad_id` (right padding only: positions keep their
    /// meaning, and the image stays at [`TextExample::image_position`]). Fails when
    /// the example is longer than `len`.
    pub fn pad(&self, len: usize, pad_id: u32) -> Result<Padded> {
        let n = self.input_ids.len();
        if n > len {
            return Err(Error::Shape(format!(
                "example {} (id {}) has {n} tokens, more than the padded length {len}; \
                 encode with max_len <= {len}",
                self.index, self.id
            )));
        }
        let mut input_ids = self.input_ids.clone();
        input_ids.resize(len, pad_id);
        let mut targets: Vec<u32> = input_ids.iter().skip(1).copied().collect();
        targets.push(pad_id);
        targets[n.saturating_sub(1)..].fill(pad_id);
        let mut loss_mask = self.loss_mask.clone();
        loss_mask.resize(len, false);
        Ok(Padded {
            input_ids,
            targets,
            loss_mask,
        })
    }
}

/// What [`Conversations::encode`] did to the records.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EncodeStats {
    /// Records in the file.
    pub records: usize,
    /// Examples returned.
    pub kept: usize,
    /// Records longer than `max_len` (cut; dropped ones included).
    pub truncated: usize,
    /// The longest record in tokens before the cut (to choose `max_len`).
    pub longest: usize,
    /// Records left out, with the reason.
    pub dropped: Vec<Dropped>,
}

/// A record [`Conversations::encode`] left out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dropped {
    /// Position in the file.
    pub index: usize,
    /// The record's id.
    pub id: String,
    /// Why.
    pub reason: DropReason,
}

/// Why a record has no example.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// Every answer token lies past `max_len`.
    AnswersCut,
    /// The `<image>` token lies past `max_len`.
    ImageCut,
    /// `VicunaV1`: the round token counts do not add up to the tokenised prompt (the
    /// tokenizer does not behave like Llama's legacy one here); LLaVA prints
    /// "tokenization mismatch" and masks the record.
    TokenizationMismatch,
}

fn record_error(file: &str, index: usize, id: &str, msg: &str, fix: &str) -> Error {
    Error::Format(format!("{file}: record {index} (id {id:?}): {msg}; {fix}"))
}

fn validate(file: &str, root: Option<&Path>, index: usize, raw: RawRecord) -> Result<Record> {
    let id = match raw.id {
        Some(RawId::Str(s)) => s,
        Some(RawId::Num(n)) => n.to_string(),
        None => {
            return Err(record_error(
                file,
                index,
                "?",
                "has no \"id\"",
                "give every record an \"id\" (a string or a number)",
            ))
        }
    };
    let err = |msg: &str, fix: &str| record_error(file, index, &id, msg, fix);
    let raw_turns = raw.conversations.ok_or_else(|| {
        err(
            "has no \"conversations\"",
            "add \"conversations\": [{\"from\": \"human\", \"value\": ...}, {\"from\": \"gpt\", \
             \"value\": ...}]",
        )
    })?;
    let mut turns = Vec::with_capacity(raw_turns.len());
    for (j, t) in raw_turns.into_iter().enumerate() {
        let role = match t.from.as_deref() {
            Some("human") => Role::Human,
            Some("gpt") => Role::Gpt,
            Some(other) => {
                return Err(err(
                    &format!("turn {j} is from {other:?}"),
                    "LLaVA's roles are \"human\" (the question) and \"gpt\" (the answer)",
                ))
            }
            None => {
                return Err(err(
                    &format!("turn {j} has no \"from\""),
                    "set \"from\" to \"human\" or \"gpt\"",
                ))
            }
        };
        let value = t.value.ok_or_else(|| {
            err(
                &format!("turn {j} has no \"value\""),
                "give every turn its text in \"value\"",
            )
        })?;
        turns.push(Turn { role, value });
    }
    check_turns(&turns, raw.image.is_some(), false).map_err(|(msg, fix)| err(&msg, &fix))?;
    let image = match raw.image {
        Some(rel) => Some(resolve_image(root, &rel).map_err(|(msg, fix)| err(&msg, &fix))?),
        None => None,
    };
    Ok(Record {
        index,
        id,
        image,
        turns,
    })
}

/// Role order, non-empty values and the `<image>` count; the message and the fix.
fn check_turns(
    turns: &[Turn],
    has_image: bool,
    for_generation: bool,
) -> std::result::Result<(), (String, String)> {
    if turns.is_empty() {
        return Err((
            "has no turns".into(),
            "give a human question and, for training, the gpt answer".into(),
        ));
    }
    for (j, t) in turns.iter().enumerate() {
        let want = Role::expected_at(j);
        if t.role != want {
            let fix = if j == 0 {
                "start with the human turn (LLaVA's train.py silently drops a leading gpt \
                 turn; remove it)"
            } else {
                "turns must alternate human, gpt, human, gpt, ..."
            };
            return Err((
                format!(
                    "turn {j} is from \"{}\" where \"{}\" was expected",
                    t.role.json_name(),
                    want.json_name()
                ),
                fix.into(),
            ));
        }
        if t.value.is_empty() {
            return Err((
                format!("turn {j} has an empty \"value\""),
                "give the text or remove the turn with its partner".into(),
            ));
        }
    }
    let last = turns[turns.len() - 1].role;
    if for_generation && last != Role::Human {
        return Err((
            "the last turn is from \"gpt\"".into(),
            "end with the human question to answer".into(),
        ));
    }
    if !for_generation && last != Role::Gpt {
        return Err((
            "ends with a human turn, which has no answer to learn".into(),
            "add the gpt answer or remove the last turn".into(),
        ));
    }
    let counts: Vec<usize> = turns
        .iter()
        .map(|t| t.value.matches(IMAGE).count())
        .collect();
    let total: usize = counts.iter().sum();
    if has_image && total != 1 {
        return Err((
            format!("has an image but {total} `{IMAGE}` tokens in its turns"),
            format!("put exactly one `{IMAGE}` in a human turn (LLaVA writes \"{IMAGE}\\n\" before the first question)"),
        ));
    }
    if !has_image && total != 0 {
        return Err((
            format!("has no \"image\" but {total} `{IMAGE}` token(s) in its turns"),
            format!("add the \"image\" path or remove `{IMAGE}` from the text"),
        ));
    }
    if let Some(j) = (0..turns.len()).find(|&j| counts[j] > 0 && turns[j].role == Role::Gpt) {
        return Err((
            format!("`{IMAGE}` is in turn {j}, an answer"),
            "move it to a human turn: the image is input, not something to predict".into(),
        ));
    }
    Ok(())
}

fn canonical_root(root: &Path) -> Result<PathBuf> {
    let shown = root.display().to_string();
    let canon = std::fs::canonicalize(root).map_err(|e| Error::Io {
        path: shown.clone(),
        message: format!(
            "cannot open the image folder: {e}. Pass the folder that the \"image\" paths of \
             the conversation file are relative to (LLaVA's --image_folder)"
        ),
    })?;
    if !canon.is_dir() {
        return Err(Error::Io {
            path: shown,
            message: "the image folder is not a folder. Pass the folder that the \"image\" \
                      paths are relative to"
                .into(),
        });
    }
    Ok(canon)
}

/// Path-level checks of an image: relative, no `..`, inside the root after symlinks,
/// a file that opens. Decoding is `hf::image`'s.
fn resolve_image(
    root: Option<&Path>,
    rel: &str,
) -> std::result::Result<ImageRef, (String, String)> {
    let root = root.ok_or_else(|| {
        (
            format!("has the image {rel:?} but no image folder was given"),
            "pass the folder the image paths are relative to (LLaVA's --image_folder)".into(),
        )
    })?;
    let p = Path::new(rel);
    if rel.is_empty() {
        return Err((
            "has an empty \"image\" path".into(),
            "give the image's path relative to the image folder, or remove \"image\"".into(),
        ));
    }
    if p.components()
        .any(|c| matches!(c, Component::RootDir | Component::Prefix(_)))
    {
        return Err((
            format!("the image path {rel:?} is absolute"),
            format!(
                "write it relative to the image folder {} (absolute paths could read any file)",
                root.display()
            ),
        ));
    }
    if p.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err((
            format!("the image path {rel:?} contains `..`"),
            format!(
                "image paths must stay inside the image folder {}; pass a higher folder \
                 instead",
                root.display()
            ),
        ));
    }
    let joined = root.join(p);
    let canon = std::fs::canonicalize(&joined).map_err(|e| {
        (
            format!("the image {} cannot be found ({e})", joined.display()),
            "check the image folder and the path (a broken symlink also fails here)".into(),
        )
    })?;
    if !canon.starts_with(root) {
        return Err((
            format!(
                "the image {} resolves to {}, outside the image folder {} (a symlink leads out)",
                joined.display(),
                canon.display(),
                root.display()
            ),
            "copy the file into the image folder or pass a folder that contains it".into(),
        ));
    }
    if !canon.is_file() {
        return Err((
            format!("the image {} is not a file", joined.display()),
            "point \"image\" at an image file".into(),
        ));
    }
    if let Err(e) = std::fs::File::open(&canon) {
        return Err((
            format!("the image {} cannot be opened ({e})", joined.display()),
            "make it readable by this user".into(),
        ));
    }
    Ok(ImageRef {
        relative: rel.to_string(),
        path: canon,
    })
}

/// Python's `str.strip()`: Rust's `trim` plus U+001C..U+001F, which Python counts as
/// whitespace and Unicode's White_Space does not.
fn py_strip(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}
