#!/usr/bin/env python3
"""Writes tests/data/hf/configs.json: LLaVA config.json inputs and the values
transformers resolves them to (defaults of partial or absent sub-configs, the
image_token_id alias, rope_theta vs rope_parameters). Needs transformers 5; not run
in CI. Run from the repository root: python scripts/make_config_fixture.py
"""
import json

from transformers import LlavaConfig

CASES = {
    "empty": {"model_type": "llava"},
    "partial_subconfigs": {
        "model_type": "llava",
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": 48,
                          "num_attention_heads": 4},
        "text_config": {"model_type": "llama", "rope_theta": 5000.0, "hidden_size": 64,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 32064},
        "image_token_id": 32001,
    },
    "v5_rope_parameters": {
        "model_type": "llava",
        "multimodal_projector_bias": False,
        "vision_feature_select_strategy": "full",
        "text_config": {"model_type": "llama", "vocab_size": 32064, "rms_norm_eps": 1e-05,
                        "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}},
        "image_token_index": 32000,
    },
}


def resolved(cfg):
    c = LlavaConfig(**cfg)
    v, t = c.vision_config, c.text_config
    return {
        "vision": {"image_size": v.image_size, "patch_size": v.patch_size,
                   "hidden": v.hidden_size, "layers": v.num_hidden_layers,
                   "heads": v.num_attention_heads, "mlp": v.intermediate_size,
                   "ln_eps": v.layer_norm_eps, "hidden_act": v.hidden_act},
        "text": {"hidden": t.hidden_size, "layers": t.num_hidden_layers,
                 "heads": t.num_attention_heads, "kv_heads": t.num_key_value_heads,
                 "mlp": t.intermediate_size, "vocab": t.vocab_size, "rms_eps": t.rms_norm_eps,
                 "rope_theta": t.rope_parameters["rope_theta"],
                 "max_positions": t.max_position_embeddings, "hidden_act": t.hidden_act},
        "image_token_id": c.image_token_index,
        "vision_feature_layer": c.vision_feature_layer,
        "select_strategy": c.vision_feature_select_strategy,
        "projector_bias": c.multimodal_projector_bias,
        "projector_act": c.projector_hidden_act,
    }


out = {name: {"config": cfg, "resolved": resolved(cfg)} for name, cfg in CASES.items()}
with open("tests/data/hf/configs.json", "w") as f:
    json.dump(out, f, indent=1)
print("wrote tests/data/hf/configs.json")
