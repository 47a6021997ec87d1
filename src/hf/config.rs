//! `config.json` of a transformers `LlavaForConditionalGeneration` folder, with the
//! defaults transformers fills in, turned into the crate's [`ModelConfig`].
//!
//! Sub-configs on the Hub are partial: `llava-hf/llava-1.5-7b-hf` names only what
//! differs from `CLIPVisionConfig()` / `LlamaConfig()`. The defaults below are those
//! of transformers 5 (`models/clip/configuration_clip.py`,
//! `models/llama/configuration_llama.py`, `models/llava/configuration_llava.py`):
//! a sub-config given as a dict is filled from its class defaults; a sub-config that
//! is absent altogether is LLaVA's own default (CLIP ViT-L/14-336, Llama-7B).
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

pub use crate::model::config::ProjectorAct;
use crate::model::config::{LlmConfig, ModelConfig, ProjectorConfig, VisionConfig, VisionFeature};
use crate::{Error, Result};

/// What a LLaVA `config.json` says, with defaults filled in.
#[derive(Clone, Debug, PartialEq)]
pub struct LlavaConfig {
    /// The sizes, in the crate's terms (the projector's activation and biases
    /// included, the patch embedding without a bias). `name` is the folder name.
    pub model: ModelConfig,
    /// Token id whose positions receive the image features (`image_token_index`,
    /// alias `image_token_id`).
    pub image_token_id: u32,
    /// The vision layer whose output feeds the projector (`vision_feature_layer`);
    /// only −2 (or its positive equivalent) is supported.
    pub vision_feature_layer: i64,
    /// `pad_token_id` at the top level or in `text_config`, when given.
    pub pad_token_id: Option<u32>,
    /// `text_config.max_position_embeddings`.
    pub max_positions: usize,
}

/// The file being read, for error messages.
struct Ctx<'a> {
    path: &'a Path,
}

impl Ctx<'_> {
    fn err(&self, msg: impl std::fmt::Display) -> Error {
        Error::Config(format!("{}: {msg}", self.path.display()))
    }

    fn get<'v>(&self, obj: &'v Map<String, Value>, key: &str) -> Option<&'v Value> {
        obj.get(key).filter(|v| !v.is_null())
    }

    fn usize(
        &self,
        obj: &Map<String, Value>,
        sect: &str,
        key: &str,
        default: usize,
    ) -> Result<usize> {
        match self.get(obj, key) {
            None => Ok(default),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| {
                    self.err(format!("{sect}{key} = {v} is not a non-negative integer"))
                }),
        }
    }

    fn f64(&self, obj: &Map<String, Value>, sect: &str, key: &str, default: f64) -> Result<f64> {
        match self.get(obj, key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .ok_or_else(|| self.err(format!("{sect}{key} = {v} is not a finite number"))),
        }
    }

    fn str<'v>(
        &self,
        obj: &'v Map<String, Value>,
        sect: &str,
        key: &str,
        default: &'v str,
    ) -> Result<&'v str> {
        match self.get(obj, key) {
            None => Ok(default),
            Some(v) => v
                .as_str()
                .ok_or_else(|| self.err(format!("{sect}{key} = {v} is not a string"))),
        }
    }

    fn id(&self, obj: &Map<String, Value>, sect: &str, key: &str) -> Result<Option<u32>> {
        match self.get(obj, key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| self.err(format!("{sect}{key} = {v} is not a token id"))),
        }
    }
}

/// `CLIPVisionConfig()`'s defaults, used for keys missing from a given vision_config.
const CLIP_DEFAULT: (usize, usize, usize, usize, usize, usize) = (224, 32, 768, 12, 12, 3072);
/// LLaVA's vision tower when `vision_config` is absent: CLIP ViT-L/14-336.
const CLIP_LLAVA: (usize, usize, usize, usize, usize, usize) = (336, 14, 1024, 24, 16, 4096);

impl LlavaConfig {
    /// Reads `dir/config.json` (or a `config.json` path).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path: PathBuf = if dir.is_dir() {
            dir.join("config.json")
        } else {
            dir.to_path_buf()
        };
        let text = std::fs::read_to_string(&path).map_err(|e| Error::Io {
            path: path.display().to_string(),
            message: format!(
                "{e}; a transformers LLaVA folder holds config.json next to the weights"
            ),
        })?;
        let name = path
            .parent()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "llava".into());
        Self::parse(&text, &path, &name)
    }

    /// Parses the text of a `config.json`; `path` names it in errors.
    pub fn parse(text: &str, path: &Path, name: &str) -> Result<Self> {
        let c = Ctx { path };
        let root: Value = serde_json::from_str(text)
            .map_err(|e| Error::Format(format!("{}: not valid JSON: {e}", path.display())))?;
        let top = root
            .as_object()
            .ok_or_else(|| c.err("the top level is not a JSON object"))?;
        let mt = c.str(top, "", "model_type", "llava")?;
        if mt != "llava" {
            return Err(c.err(format!(
                "model_type is {mt:?}; only LLaVA-1.5 (\"llava\") folders are supported"
            )));
        }
        let empty = Map::new();
        let sub = |key: &str| -> Result<Option<&Map<String, Value>>> {
            match c.get(top, key) {
                None => Ok(None),
                Some(v) => v
                    .as_object()
                    .map(Some)
                    .ok_or_else(|| c.err(format!("{key} is not a JSON object"))),
            }
        };

        let vis_given = sub("vision_config")?;
        let vis = vis_given.unwrap_or(&empty);
        let vmt = c.str(vis, "vision_config.", "model_type", "clip_vision_model")?;
        if vmt != "clip_vision_model" {
            return Err(c.err(format!(
                "vision_config.model_type is {vmt:?}; only CLIP vision towers are supported"
            )));
        }
        let (img, patch, vh, vl, vheads, vmlp) = if vis_given.is_some() {
            CLIP_DEFAULT
        } else {
            CLIP_LLAVA
        };
        let v = "vision_config.";
        let act = c.str(vis, v, "hidden_act", "quick_gelu")?;
        if act != "quick_gelu" {
            return Err(c.err(format!(
                "vision_config.hidden_act is {act:?}; CLIP towers use quick_gelu, the only one supported"
            )));
        }
        let channels = c.usize(vis, v, "num_channels", 3)?;
        if channels != 3 {
            return Err(c.err(format!(
                "vision_config.num_channels is {channels}; RGB (3) only"
            )));
        }
        let vision = VisionConfig {
            image_size: c.usize(vis, v, "image_size", img)?,
            patch_size: c.usize(vis, v, "patch_size", patch)?,
            hidden: c.usize(vis, v, "hidden_size", vh)?,
            layers: c.usize(vis, v, "num_hidden_layers", vl)?,
            heads: c.usize(vis, v, "num_attention_heads", vheads)?,
            mlp: c.usize(vis, v, "intermediate_size", vmlp)?,
            ln_eps: c.f64(vis, v, "layer_norm_eps", 1e-5)? as f32,
            feature: match c.str(top, "", "vision_feature_select_strategy", "default")? {
                "default" => VisionFeature::Patch,
                "full" => VisionFeature::ClsPatch,
                s => {
                    return Err(c.err(format!(
                        "vision_feature_select_strategy is {s:?}; expected \"default\" or \"full\""
                    )))
                }
            },
            patch_bias: false,
        };

        let txt = sub("text_config")?.unwrap_or(&empty);
        let t = "text_config.";
        let tmt = c.str(txt, t, "model_type", "llama")?;
        if tmt != "llama" {
            return Err(c.err(format!(
                "text_config.model_type is {tmt:?}; only Llama decoders are supported"
            )));
        }
        let tact = c.str(txt, t, "hidden_act", "silu")?;
        if tact != "silu" {
            return Err(c.err(format!(
                "text_config.hidden_act is {tact:?}; Llama uses silu"
            )));
        }
        let hidden = c.usize(txt, t, "hidden_size", 4096)?;
        let heads = c.usize(txt, t, "num_attention_heads", 32)?;
        // transformers 5 keeps θ in rope_parameters; older files have rope_theta.
        let rope_obj = match c.get(txt, "rope_parameters") {
            Some(Value::Object(m)) => Some(m),
            Some(v) => {
                return Err(c.err(format!(
                    "text_config.rope_parameters = {v} is not an object"
                )))
            }
            None => None,
        };
        let theta_default = c.f64(txt, t, "rope_theta", 10000.0)?;
        let rope_theta = match rope_obj {
            Some(m) => {
                let kind = c.str(m, "text_config.rope_parameters.", "rope_type", "default")?;
                if kind != "default" {
                    return Err(c.err(format!(
                        "text_config.rope_parameters.rope_type is {kind:?}; only default RoPE is supported"
                    )));
                }
                c.f64(
                    m,
                    "text_config.rope_parameters.",
                    "rope_theta",
                    theta_default,
                )?
            }
            None => {
                if let Some(s) = c.get(txt, "rope_scaling") {
                    return Err(c.err(format!(
                        "text_config.rope_scaling = {s} is set; only unscaled RoPE is supported"
                    )));
                }
                theta_default
            }
        };
        let head_dim = c.usize(txt, t, "head_dim", hidden / heads.max(1))?;
        if head_dim * heads != hidden {
            return Err(c.err(format!(
                "text_config.head_dim = {head_dim} with {heads} heads does not equal hidden_size {hidden}; \
                 only head_dim = hidden_size / num_attention_heads is supported"
            )));
        }
        for flag in ["attention_bias", "mlp_bias", "tie_word_embeddings"] {
            if c.get(txt, flag).and_then(Value::as_bool) == Some(true) {
                return Err(c.err(format!(
                    "text_config.{flag} is true; LLaVA-1.5's Llama has none"
                )));
            }
        }
        if c.get(top, "tie_word_embeddings").and_then(Value::as_bool) == Some(true) {
            return Err(c.err("tie_word_embeddings is true; LLaVA-1.5 has a separate lm_head"));
        }
        let llm = LlmConfig {
            hidden,
            layers: c.usize(txt, t, "num_hidden_layers", 32)?,
            heads,
            kv_heads: c.usize(txt, t, "num_key_value_heads", heads)?,
            mlp: c.usize(txt, t, "intermediate_size", 11008)?,
            vocab: c.usize(txt, t, "vocab_size", 32000)?,
            rms_eps: c.f64(txt, t, "rms_norm_eps", 1e-6)? as f32,
            rope_theta: rope_theta as f32,
        };

        let image_token_id = match c.id(top, "", "image_token_index")? {
            Some(i) => i,
            None => c.id(top, "", "image_token_id")?.unwrap_or(32000),
        };
        // Not checked against vocab_size here: transformers' own defaults put the
        // image token at 32000 = vocab_size, and llava-hf grows the embedding to 32064;
        // the loader checks the id against the embedding table it actually reads.
        let vision_feature_layer = match c.get(top, "vision_feature_layer") {
            None => -2,
            Some(v) => v.as_i64().ok_or_else(|| {
                c.err(format!(
                    "vision_feature_layer = {v}: only a single layer is supported, not a list"
                ))
            })?,
        };
        // hidden_states has layers + 1 entries; −2 and layers − 1 are the same one.
        if vision_feature_layer != -2 && vision_feature_layer != vision.layers as i64 - 1 {
            return Err(c.err(format!(
                "vision_feature_layer is {vision_feature_layer}; only -2 (LLaVA-1.5's) is supported"
            )));
        }
        let projector_act = match c.str(top, "", "projector_hidden_act", "gelu")? {
            "gelu" => ProjectorAct::Gelu,
            "gelu_pytorch_tanh" | "gelu_new" => ProjectorAct::GeluTanh,
            a => {
                return Err(c.err(format!(
                    "projector_hidden_act is {a:?}; expected gelu (or gelu_pytorch_tanh)"
                )))
            }
        };
        let projector_bias = match c.get(top, "multimodal_projector_bias") {
            None => true,
            Some(v) => v.as_bool().ok_or_else(|| {
                c.err(format!("multimodal_projector_bias = {v} is not a boolean"))
            })?,
        };
        let pad_token_id = match c.id(top, "", "pad_token_id")? {
            Some(p) => Some(p),
            None => c.id(txt, t, "pad_token_id")?,
        };
        let model = ModelConfig {
            name: name.to_string(),
            vision,
            projector: ProjectorConfig {
                act: projector_act,
                bias: projector_bias,
            },
            llm,
        };
        model
            .validate()
            .map_err(|e| c.err(format!("the sizes are inconsistent: {e}")))?;
        Ok(Self {
            model,
            image_token_id,
            vision_feature_layer,
            pad_token_id,
            max_positions: c.usize(txt, t, "max_position_embeddings", 2048)?,
        })
    }
}
