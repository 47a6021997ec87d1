//! Writes a model as a transformers LLaVA folder: `config.json`, `model.safetensors`
//! (transformers' own names, [`super::names::hf_name`]), a WordLevel `tokenizer.json`
//! with its `tokenizer_config.json`, and `preprocessor_config.json`.
//!
//! This is how the crate's own small models (the shipped `assets/tiny-pretrained`)
//! become ordinary LLaVA folders: every command then reads them through the one
//! loader ([`super::load::load_llava`]), tokenizer ([`super::tokenizer`]) and image
//! processor ([`super::image`]) a real `llava-hf/llava-1.5-7b-hf` goes through, and
//! transformers' `LlavaForConditionalGeneration.from_pretrained` reads them too
//! (`scripts/make_tiny_fixture.py` checks its logits against the crate's).
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use serde_json::{json, Map, Value};

use super::tokenizer::{BOS, EOS, IMAGE, PAD};
use crate::backend::Backend;
use crate::model::config::{ModelConfig, ProjectorAct, VisionFeature};
use crate::model::Mllm;
use crate::{Error, Result};

/// The unknown-word token of the WordLevel tokenizer.
pub const UNK: &str = "<unk>";

/// The special tokens of a [`word_level_tokenizer`], in id order: ids 0–4.
pub const SPECIALS: [&str; 5] = [UNK, BOS, EOS, PAD, IMAGE];

/// A WordLevel tokenizer over `words`: the [`SPECIALS`] (ids 0–4, as added tokens,
/// so `<image>` is matched in text before splitting), then `words` in order (ids
/// 5…). Text splits on whitespace and punctuation (`Whitespace`: `\w+|[^\w\s]+`), so
/// `"USER: <image>\nwhat is it ?"` is `USER`, `:`, `<image>`, `what`, …; decoding
/// joins words with spaces. The post-processor puts `<s>` in front, as Llama's
/// does (the crate bypasses it and adds the BOS by hand, for every tokenizer).
pub fn word_level_tokenizer(words: &[&str]) -> Result<Value> {
    let mut vocab = Map::new();
    for (id, w) in SPECIALS.iter().chain(words).enumerate() {
        if vocab.insert((*w).to_string(), json!(id)).is_some() {
            return Err(Error::Internal(format!(
                "the tokenizer's word list has {w:?} twice"
            )));
        }
    }
    let added: Vec<Value> = SPECIALS
        .iter()
        .enumerate()
        .map(|(id, t)| {
            json!({"id": id, "content": t, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": BOS, "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": BOS, "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {BOS: {"id": BOS, "ids": [1], "tokens": [BOS]}}
        },
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": UNK}
    }))
}

/// `tokenizer_config.json` for a [`word_level_tokenizer`], so that transformers'
/// `AutoTokenizer` finds the special tokens.
pub fn tokenizer_config(max_len: usize) -> Value {
    json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "pad_token": PAD,
        "model_max_length": max_len,
        "padding_side": "right",
        "add_bos_token": true,
        "extra_special_tokens": {"image_token": IMAGE}
    })
}

/// Token ids a LLaVA `config.json` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenIds {
    /// `<image>`.
    pub image: u32,
    /// `<pad>`.
    pub pad: u32,
    /// `<s>`.
    pub bos: u32,
    /// `</s>`.
    pub eos: u32,
}

/// The ids of a [`word_level_tokenizer`]'s specials.
pub const WORD_LEVEL_IDS: TokenIds = TokenIds {
    image: 4,
    pad: 3,
    bos: 1,
    eos: 2,
};

/// `config.json` of `cfg` as transformers' `LlavaConfig` writes it (every size
/// explicit, so no default of either side matters). Only what HF LLaVA can express
/// is accepted: a patch embedding without bias.
pub fn llava_config(cfg: &ModelConfig, ids: TokenIds, max_positions: usize) -> Result<Value> {
    let (v, l) = (&cfg.vision, &cfg.llm);
    if v.patch_bias {
        return Err(Error::Config(format!(
            "model {}: its patch embedding has a bias, which transformers' CLIP does not \
             have; build the model with patch_bias = false to write it as a LLaVA folder",
            cfg.name
        )));
    }
    Ok(json!({
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "image_token_index": ids.image,
        "pad_token_id": ids.pad,
        "projector_hidden_act": match cfg.projector.act {
            ProjectorAct::Gelu => "gelu",
            ProjectorAct::GeluTanh => "gelu_pytorch_tanh",
        },
        "multimodal_projector_bias": cfg.projector.bias,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": match v.feature {
            VisionFeature::Patch => "default",
            VisionFeature::ClsPatch => "full",
        },
        "image_seq_length": v.patches(),
        "tie_word_embeddings": false,
        "dtype": "float32",
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_act": "quick_gelu",
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "hidden_size": v.hidden,
            "intermediate_size": v.mlp,
            "num_hidden_layers": v.layers,
            "num_attention_heads": v.heads,
            "num_channels": 3,
            "layer_norm_eps": v.ln_eps,
            "projection_dim": v.hidden
        },
        "text_config": {
            "model_type": "llama",
            "hidden_act": "silu",
            "hidden_size": l.hidden,
            "intermediate_size": l.mlp,
            "num_hidden_layers": l.layers,
            "num_attention_heads": l.heads,
            "num_key_value_heads": l.kv_heads,
            "head_dim": l.head_dim(),
            "vocab_size": l.vocab,
            "rms_norm_eps": l.rms_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": l.rope_theta},
            "max_position_embeddings": max_positions,
            "attention_bias": false,
            "mlp_bias": false,
            "tie_word_embeddings": false,
            "pad_token_id": ids.pad,
            "bos_token_id": ids.bos,
            "eos_token_id": ids.eos
        }
    }))
}

/// `preprocessor_config.json` of a `CLIPImageProcessor` for `size`×`size` images:
/// bicubic resize of the short side to `size`, centre crop to `size`, ×1/255, then
/// `(x − mean) / std` per channel.
pub fn preprocessor_config(size: usize, mean: [f32; 3], std: [f32; 3]) -> Value {
    json!({
        "image_processor_type": "CLIPImageProcessor",
        "processor_class": "LlavaProcessor",
        "do_resize": true,
        "size": {"shortest_edge": size},
        "resample": 3,
        "do_center_crop": true,
        "crop_size": {"height": size, "width": size},
        "do_rescale": true,
        "rescale_factor": 1.0 / 255.0,
        "do_normalize": true,
        "image_mean": mean,
        "image_std": std,
        "do_convert_rgb": true
    })
}

/// Writes `value` as pretty JSON to `path`.
pub fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| Error::Internal(format!("{}: {e}", path.display())))?;
    std::fs::write(path, text + "\n").map_err(|e| Error::io(path, e))
}

/// Writes every tensor of `model` except the LoRA factors to `path` in f32 under
/// transformers' in-memory names (`model.vision_tower.…`, `model.language_model.…`,
/// `lm_head.weight`); the patch embedding goes out as the `Conv2d` weight
/// `[D, 3, p, p]`. The tower's layers after −2 and `post_layernorm`, which the
/// crate never builds, are written as the identity. A LoRA model's factors are not
/// written (merge them first, [`super::merge`]).
pub fn save_weights<B: Backend>(backend: &B, model: &Mllm<B>, path: &Path) -> Result<()> {
    let cfg = model.config();
    let mut named = Vec::new();
    for (name, hf, shape) in super::load::hf_layout(model)? {
        let name = name.as_str();
        let buf = model
            .tensor(name)
            .ok_or_else(|| Error::Internal(format!("tensor {name} vanished")))?;
        let bytes: Vec<u8> = backend
            .download(buf)?
            .into_vec() // a one-off copy: freed, not recycled
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        named.push((hf, shape, bytes));
    }
    // LLaVA reads the tower at layer −2, so the crate never builds the last layer
    // or `post_layernorm`. They go out as the identity (zero weights make both
    // residual blocks add nothing; unit LayerNorm gains), so transformers finds
    // every tensor of its CLIP and the tower's own last output is layer −2's, normed.
    let v = &cfg.vision;
    let f32_bytes = |n: usize, x: f32| -> Vec<u8> {
        std::iter::repeat_n(x.to_le_bytes(), n).flatten().collect()
    };
    let tower = "model.vision_tower.";
    let mut unused: Vec<(String, Vec<usize>, f32)> = Vec::new();
    for last in v.layers_run()..v.layers {
        let l = format!("{tower}encoder.layers.{last}.");
        for ln in ["layer_norm1", "layer_norm2"] {
            unused.push((format!("{l}{ln}.weight"), vec![v.hidden], 1.0));
            unused.push((format!("{l}{ln}.bias"), vec![v.hidden], 0.0));
        }
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            unused.push((
                format!("{l}self_attn.{proj}.weight"),
                vec![v.hidden, v.hidden],
                0.0,
            ));
            unused.push((format!("{l}self_attn.{proj}.bias"), vec![v.hidden], 0.0));
        }
        unused.push((format!("{l}mlp.fc1.weight"), vec![v.mlp, v.hidden], 0.0));
        unused.push((format!("{l}mlp.fc1.bias"), vec![v.mlp], 0.0));
        unused.push((format!("{l}mlp.fc2.weight"), vec![v.hidden, v.mlp], 0.0));
        unused.push((format!("{l}mlp.fc2.bias"), vec![v.hidden], 0.0));
    }
    unused.push((format!("{tower}post_layernorm.weight"), vec![v.hidden], 1.0));
    unused.push((format!("{tower}post_layernorm.bias"), vec![v.hidden], 0.0));
    for (name, shape, x) in unused {
        let bytes = f32_bytes(shape.iter().product(), x);
        named.push((name, shape, bytes));
    }
    let views = named
        .iter()
        .map(|(n, s, b)| {
            TensorView::new(Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::Internal(format!("tensor {n}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), path)
        .map_err(|e| Error::io(path, format!("cannot write the weights: {e}")))
}
