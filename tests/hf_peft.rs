//! PEFT adapters against peft 0.21's own files: the fixture adapter
//! (tests/data/hf/adapter, saved by `PeftModel.save_pretrained` in
//! scripts/make_hf_fixture.py) is read under the crate's names, written back with
//! the same keys, and read back identical; the older key layout reads the same.
mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use dualpriv::hf::names::{crate_name, from_peft_key, hf_name, peft_key};
use dualpriv::hf::peft::{
    language_model_regex, read_adapter, read_config, write_adapter, TargetModules,
};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde_json::Value;

fn fixture(p: &str) -> PathBuf {
    common::hf_data().join(p)
}

const MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

fn keys(file: &Path) -> BTreeSet<String> {
    let bytes = std::fs::read(file).unwrap();
    SafeTensors::deserialize(&bytes)
        .unwrap()
        .names()
        .into_iter()
        .map(String::from)
        .collect()
}

#[test]
fn reads_peft_fixture_under_crate_names() {
    let a = read_adapter(&fixture("adapter")).unwrap();
    assert_eq!(a.config.r, 4);
    assert_eq!(a.config.lora_alpha, 8.0);
    assert_eq!(
        a.config.target_modules,
        TargetModules::Regex(language_model_regex(&MODULES))
    );
    assert_eq!(a.tensors.len(), 2 * 7 * 2);
    let (d, kv, mlp) = (32, 16, 64);
    for t in &a.tensors {
        assert!(t.name.starts_with("llm.layers."), "{}", t.name);
        let module = MODULES.iter().find(|m| t.name.contains(*m)).unwrap();
        let (inp, out) = match *module {
            "k_proj" | "v_proj" => (d, kv),
            "gate_proj" | "up_proj" => (d, mlp),
            "down_proj" => (mlp, d),
            _ => (d, d),
        };
        let want = if t.name.contains("lora_A") {
            vec![4, inp]
        } else {
            vec![out, 4]
        };
        assert_eq!(t.shape, want, "{}", t.name);
        assert!(t.data.iter().any(|v| *v != 0.0), "{} is all zero", t.name);
    }
}

#[test]
fn export_round_trips_with_peft_keys() {
    let src = fixture("adapter");
    let a = read_adapter(&src).unwrap();
    let dir = common::tmp_dir("peft_round_trip");
    let mut cfg = a.config.clone();
    cfg.base_model = Some("llava-hf/llava-1.5-7b-hf".into());
    write_adapter(&dir, &cfg, &a.tensors).unwrap();
    assert_eq!(
        keys(&dir.join("adapter_model.safetensors")),
        keys(&src.join("adapter_model.safetensors")),
        "exported keys differ from PEFT's"
    );
    let b = read_adapter(&dir).unwrap();
    assert_eq!(b.tensors, a.tensors);
    assert_eq!(b.config, cfg);
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap();
    for (k, want) in [
        ("peft_type", Value::from("LORA")),
        ("task_type", Value::from("CAUSAL_LM")),
        ("bias", Value::from("none")),
        ("fan_in_fan_out", Value::from(false)),
        ("inference_mode", Value::from(true)),
        ("r", Value::from(4)),
        (
            "base_model_name_or_path",
            Value::from("llava-hf/llava-1.5-7b-hf"),
        ),
    ] {
        assert_eq!(v[k], want, "{k}");
    }
    assert!(!dir.join("adapter_model.partial").exists());
}

#[test]
fn older_key_layout_reads_the_same() {
    let src = fixture("adapter");
    let a = read_adapter(&src).unwrap();
    let tmp = common::tmp_dir("peft_old_keys");
    let dir = common::old_layout_adapter(&src, &tmp);
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert!(st
        .names()
        .iter()
        .all(|k| k.starts_with("base_model.model.language_model.model.layers.")));
    let b = read_adapter(&dir).unwrap();
    assert_eq!(b.tensors, a.tensors);
}

#[test]
fn names_map_both_ways() {
    for (c, h) in [
        (
            "vision.patch_embed.weight",
            "model.vision_tower.embeddings.patch_embedding.weight",
        ),
        (
            "vision.class_embedding",
            "model.vision_tower.embeddings.class_embedding",
        ),
        (
            "vision.position_embedding",
            "model.vision_tower.embeddings.position_embedding.weight",
        ),
        (
            "vision.pre_layrnorm.bias",
            "model.vision_tower.pre_layrnorm.bias",
        ),
        (
            "vision.layers.1.self_attn.out_proj.weight",
            "model.vision_tower.encoder.layers.1.self_attn.out_proj.weight",
        ),
        (
            "projector.linear_2.bias",
            "model.multi_modal_projector.linear_2.bias",
        ),
        (
            "llm.embed_tokens.weight",
            "model.language_model.embed_tokens.weight",
        ),
        (
            "llm.layers.0.post_attention_layernorm.weight",
            "model.language_model.layers.0.post_attention_layernorm.weight",
        ),
        ("llm.norm.weight", "model.language_model.norm.weight"),
        ("llm.lm_head.weight", "lm_head.weight"),
    ] {
        assert_eq!(hf_name(c).as_deref(), Some(h), "{c}");
        assert_eq!(crate_name(h).as_deref(), Some(c), "{h}");
    }
    let k = peft_key("llm.layers.3.mlp.down_proj.lora_B.weight").unwrap();
    assert_eq!(
        k,
        "base_model.model.model.language_model.layers.3.mlp.down_proj.lora_B.weight"
    );
    assert_eq!(
        from_peft_key(&k).as_deref(),
        Some("llm.layers.3.mlp.down_proj.lora_B.weight")
    );
    assert_eq!(
        from_peft_key("base_model.model.multi_modal_projector.linear_1.weight").as_deref(),
        Some("projector.linear_1.weight")
    );
    assert_eq!(from_peft_key("model.language_model.norm.weight"), None);
}

fn write_cfg(dir: &Path, patch: &[(&str, Value)]) {
    let mut v: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    for (k, x) in patch {
        v[*k] = x.clone();
    }
    std::fs::write(dir.join("adapter_config.json"), v.to_string()).unwrap();
}

#[test]
fn hostile_adapters_are_errors_that_name_the_file() {
    let dir = common::tmp_dir("peft_hostile");
    let e = read_adapter(&dir).unwrap_err().to_string();
    assert!(e.contains("adapter_config.json"), "{e}");
    std::fs::copy(
        fixture("adapter/adapter_model.safetensors"),
        dir.join("adapter_model.safetensors"),
    )
    .unwrap();
    for (patch, needle) in [
        (vec![("peft_type", Value::from("IA3"))], "IA3"),
        (vec![("use_dora", Value::from(true))], "DoRA"),
        (vec![("use_rslora", Value::from(true))], "use_rslora"),
        (vec![("bias", Value::from("all"))], "bias"),
        (vec![("r", Value::from(0))], "r is missing"),
        (vec![("target_modules", Value::Null)], "target_modules"),
        (
            vec![("rank_pattern", serde_json::json!({"q_proj": 8}))],
            "rank_pattern",
        ),
        (vec![("r", Value::from(8))], "rank r = 8"),
    ] {
        write_cfg(&dir, &patch);
        let e = read_adapter(&dir).unwrap_err().to_string();
        assert!(
            e.contains("adapter_") && e.contains(needle),
            "{patch:?}: {e}"
        );
    }
    write_cfg(&dir, &[]);
    assert!(read_config(&dir).is_ok());
    // Truncated weights.
    let bytes = std::fs::read(fixture("adapter/adapter_model.safetensors")).unwrap();
    std::fs::write(
        dir.join("adapter_model.safetensors"),
        &bytes[..bytes.len() - 100],
    )
    .unwrap();
    let e = read_adapter(&dir).unwrap_err().to_string();
    assert!(
        e.contains("adapter_model.safetensors") && e.contains("truncated"),
        "{e}"
    );
    // LoRA on the vision tower.
    let z = vec![0u8; 4 * 4 * 32];
    let v = TensorView::new(Dtype::F32, vec![4, 32], &z).unwrap();
    let key = "base_model.model.model.vision_tower.encoder.layers.0.self_attn.q_proj.lora_A.weight";
    std::fs::write(
        dir.join("adapter_model.safetensors"),
        safetensors::serialize([(key, v)], None).unwrap(),
    )
    .unwrap();
    let e = read_adapter(&dir).unwrap_err().to_string();
    assert!(
        e.contains("vision_tower") && e.contains("language model"),
        "{e}"
    );
    // A stray full tensor that is not in modules_to_save.
    let z = vec![0u8; 4 * 32];
    let v = TensorView::new(Dtype::F32, vec![32], &z).unwrap();
    let key = "base_model.model.model.language_model.norm.weight";
    std::fs::write(
        dir.join("adapter_model.safetensors"),
        safetensors::serialize([(key, v)], None).unwrap(),
    )
    .unwrap();
    let e = read_adapter(&dir).unwrap_err().to_string();
    assert!(e.contains("modules_to_save"), "{e}");
}
