//! Tensor names: the crate's model ([`crate::model`]) against transformers'
//! in-memory LLaVA names ([`super::checkpoint`]'s canonical layout) and PEFT's
//! adapter keys.
//!
//! The crate names its tensors after HF's modules, under three short roots:
//!
//! | crate | transformers (`LlavaForConditionalGeneration.state_dict()`) |
//! |---|---|
//! | `vision.patch_embed.weight` [D, 3p²] | `model.vision_tower.embeddings.patch_embedding.weight` [D, 3, p, p] |
//! | `vision.class_embedding` | `model.vision_tower.embeddings.class_embedding` |
//! | `vision.position_embedding` | `model.vision_tower.embeddings.position_embedding.weight` |
//! | `vision.pre_layrnorm.*`, `vision.layers.N.*` | `model.vision_tower.pre_layrnorm.*`, `model.vision_tower.encoder.layers.N.*` |
//! | `projector.*` | `model.multi_modal_projector.*` |
//! | `llm.embed_tokens.weight`, `llm.layers.N.*`, `llm.norm.weight` | `model.language_model.*` (same suffixes) |
//! | `llm.lm_head.weight` | `lm_head.weight` |
//!
//! The patch embedding is a `Conv2d` with stride = kernel in HF; its weight
//! `[D, 3, p, p]` is the crate's linear `[D, 3p²]` byte for byte, since patches are
//! flattened in (channel, row, column) order.

/// transformers' name of a crate tensor (`None` for names with no HF counterpart).
pub fn hf_name(name: &str) -> Option<String> {
    let map = |rest: &str, hf_root: &str| Some(format!("{hf_root}{rest}"));
    if let Some(rest) = name.strip_prefix("vision.") {
        return match rest {
            "patch_embed.weight" => map("", "model.vision_tower.embeddings.patch_embedding.weight"),
            "patch_embed.bias" => map("", "model.vision_tower.embeddings.patch_embedding.bias"),
            "class_embedding" => map("", "model.vision_tower.embeddings.class_embedding"),
            "position_embedding" => map(
                "",
                "model.vision_tower.embeddings.position_embedding.weight",
            ),
            _ if rest.starts_with("pre_layrnorm.") => map(rest, "model.vision_tower."),
            _ => rest
                .strip_prefix("layers.")
                .and_then(|r| map(r, "model.vision_tower.encoder.layers.")),
        };
    }
    if let Some(rest) = name.strip_prefix("projector.") {
        return map(rest, "model.multi_modal_projector.");
    }
    if name == "llm.lm_head.weight" {
        return Some("lm_head.weight".into());
    }
    name.strip_prefix("llm.")
        .and_then(|rest| map(rest, "model.language_model."))
}

/// The crate's name of a transformers tensor (inverse of [`hf_name`]).
pub fn crate_name(hf: &str) -> Option<String> {
    if hf == "lm_head.weight" {
        return Some("llm.lm_head.weight".into());
    }
    if let Some(rest) = hf.strip_prefix("model.vision_tower.") {
        return match rest {
            "embeddings.patch_embedding.weight" => Some("vision.patch_embed.weight".into()),
            "embeddings.patch_embedding.bias" => Some("vision.patch_embed.bias".into()),
            "embeddings.class_embedding" => Some("vision.class_embedding".into()),
            "embeddings.position_embedding.weight" => Some("vision.position_embedding".into()),
            _ if rest.starts_with("pre_layrnorm.") => Some(format!("vision.{rest}")),
            _ => rest
                .strip_prefix("encoder.layers.")
                .map(|r| format!("vision.layers.{r}")),
        };
    }
    if let Some(rest) = hf.strip_prefix("model.multi_modal_projector.") {
        return Some(format!("projector.{rest}"));
    }
    hf.strip_prefix("model.language_model.")
        .map(|rest| format!("llm.{rest}"))
}

/// Prefix PEFT puts before the model's own names (`PeftModel.base_model.model`).
pub const PEFT_PREFIX: &str = "base_model.model.";

/// PEFT's key for a crate tensor: `base_model.model.` + the transformers name, e.g.
/// `llm.layers.0.self_attn.q_proj.lora_A.weight` →
/// `base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight`.
pub fn peft_key(name: &str) -> Option<String> {
    hf_name(name).map(|h| format!("{PEFT_PREFIX}{h}"))
}

/// The crate name of a PEFT adapter key, in the key layout transformers 5 writes or
/// the older one (`base_model.model.language_model.model.layers…`,
/// `base_model.model.multi_modal_projector…`). PEFT drops the adapter name
/// (`.default`) from saved keys; a key that still has it is accepted too.
pub fn from_peft_key(key: &str) -> Option<String> {
    let rest = key.strip_prefix(PEFT_PREFIX)?;
    let rest = rest.replace(".default.weight", ".weight");
    let canonical = super::checkpoint::canonical_name(&rest)?;
    crate_name(&canonical)
}
