//! HF LLaVA `config.json` and safetensors checkpoints against transformers: the
//! defaults it fills in (tests/data/hf/configs.json from
//! scripts/make_config_fixture.py) and the four key layouts and three dtypes of the
//! fixture model (scripts/make_hf_fixture.py).
mod common;

use std::path::{Path, PathBuf};

use dualpriv::hf::checkpoint::{canonical_name, f16_to_f32, Checkpoint};
use dualpriv::hf::config::{LlavaConfig, ProjectorAct};
use dualpriv::model::config::VisionFeature;
use dualpriv::Error;
use serde_json::Value;

fn fixture(p: &str) -> PathBuf {
    common::hf_data().join(p)
}

const LAYOUTS: [&str; 4] = ["hub", "v5", "sharded", "memory"];

#[test]
fn config_defaults_match_transformers() {
    let text = std::fs::read_to_string(fixture("configs.json")).unwrap();
    let cases: Value = serde_json::from_str(&text).unwrap();
    let cases = cases.as_object().unwrap();
    assert_eq!(cases.len(), 3);
    for (name, case) in cases {
        let cfg_text = serde_json::to_string(&case["config"]).unwrap();
        let c = LlavaConfig::parse(&cfg_text, Path::new(name), name)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let r = &case["resolved"];
        let (v, t) = (&c.model.vision, &c.model.llm);
        let u = |x: &Value| x.as_u64().unwrap() as usize;
        assert_eq!(v.image_size, u(&r["vision"]["image_size"]), "{name}");
        assert_eq!(v.patch_size, u(&r["vision"]["patch_size"]), "{name}");
        assert_eq!(v.hidden, u(&r["vision"]["hidden"]), "{name}");
        assert_eq!(v.layers, u(&r["vision"]["layers"]), "{name}");
        assert_eq!(v.heads, u(&r["vision"]["heads"]), "{name}");
        assert_eq!(v.mlp, u(&r["vision"]["mlp"]), "{name}");
        assert_eq!(
            v.ln_eps,
            r["vision"]["ln_eps"].as_f64().unwrap() as f32,
            "{name}"
        );
        assert_eq!(t.hidden, u(&r["text"]["hidden"]), "{name}");
        assert_eq!(t.layers, u(&r["text"]["layers"]), "{name}");
        assert_eq!(t.heads, u(&r["text"]["heads"]), "{name}");
        assert_eq!(t.kv_heads, u(&r["text"]["kv_heads"]), "{name}");
        assert_eq!(t.mlp, u(&r["text"]["mlp"]), "{name}");
        assert_eq!(t.vocab, u(&r["text"]["vocab"]), "{name}");
        assert_eq!(
            t.rms_eps,
            r["text"]["rms_eps"].as_f64().unwrap() as f32,
            "{name}"
        );
        assert_eq!(
            t.rope_theta,
            r["text"]["rope_theta"].as_f64().unwrap() as f32,
            "{name}"
        );
        assert_eq!(c.max_positions, u(&r["text"]["max_positions"]), "{name}");
        assert_eq!(
            c.image_token_id as u64,
            r["image_token_id"].as_u64().unwrap(),
            "{name}"
        );
        assert_eq!(
            c.vision_feature_layer,
            r["vision_feature_layer"].as_i64().unwrap()
        );
        assert_eq!(
            c.model.projector.bias,
            r["projector_bias"].as_bool().unwrap(),
            "{name}"
        );
        assert_eq!(r["projector_act"], "gelu");
        assert_eq!(c.model.projector.act, ProjectorAct::Gelu);
        let want = match r["select_strategy"].as_str().unwrap() {
            "default" => VisionFeature::Patch,
            _ => VisionFeature::ClsPatch,
        };
        assert_eq!(v.feature, want, "{name}");
    }
}

#[test]
fn fixture_configs_agree_across_layouts() {
    // The Hub's partial config and transformers' full save describe one model.
    let hub = LlavaConfig::from_dir(&fixture("hub")).unwrap();
    for l in LAYOUTS {
        let c = LlavaConfig::from_dir(&fixture(l)).unwrap();
        assert_eq!(c.model.vision, hub.model.vision, "{l}");
        assert_eq!(c.model.llm, hub.model.llm, "{l}");
        assert_eq!(c.image_token_id, hub.image_token_id, "{l}");
        assert_eq!(c.pad_token_id, hub.pad_token_id, "{l}");
    }
    let prompts: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("prompts.json")).unwrap()).unwrap();
    assert_eq!(
        hub.image_token_id as u64,
        prompts["image_token_id"].as_u64().unwrap()
    );
    assert_eq!(hub.model.llm.kv_heads, 2);
    assert_eq!(hub.model.vision.layers, 3);
}

/// Every tensor of every layout, converted to f32, equals the F32 Hub file's: the
/// fixture's weights are representable in F16 and BF16, so conversion must be exact.
#[test]
fn every_layout_and_dtype_reads_the_same_weights() {
    let hub = Checkpoint::open(&fixture("hub")).unwrap();
    let names: Vec<String> = hub.tensors().keys().cloned().collect();
    assert_eq!(names.len(), 80);
    assert!(names.contains(&"model.vision_tower.embeddings.class_embedding".to_string()));
    assert!(names.contains(&"lm_head.weight".to_string()));
    for l in LAYOUTS {
        let ck = Checkpoint::open(&fixture(l)).unwrap();
        let other: Vec<String> = ck.tensors().keys().cloned().collect();
        assert_eq!(other, names, "{l}: canonical names differ");
        let mut nonzero = 0usize;
        for (name, t) in hub.tensors() {
            let want = hub.read(name, &t.shape).unwrap();
            let got = ck.read(name, &t.shape).unwrap();
            assert!(
                want.iter()
                    .zip(&got)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{l}: {name} differs"
            );
            nonzero += want.iter().filter(|v| **v != 0.0).count();
        }
        assert!(nonzero > 10_000, "{l}: the fixture weights are mostly zero");
    }
    let dtypes = |l: &str| {
        let ck = Checkpoint::open(&fixture(l)).unwrap();
        let mut d: Vec<String> = ck
            .tensors()
            .values()
            .map(|t| format!("{:?}", t.dtype))
            .collect();
        d.dedup();
        d
    };
    assert_eq!(dtypes("hub"), ["F32"]);
    assert_eq!(dtypes("v5"), ["BF16"]);
    assert_eq!(dtypes("sharded"), ["F16"]);
}

#[test]
fn key_layouts_map_to_canonical_names() {
    let cases = [
        (
            "vision_tower.vision_model.encoder.layers.3.mlp.fc1.weight",
            "model.vision_tower.encoder.layers.3.mlp.fc1.weight",
        ),
        (
            "vision_tower.embeddings.patch_embedding.weight",
            "model.vision_tower.embeddings.patch_embedding.weight",
        ),
        (
            "multi_modal_projector.linear_1.bias",
            "model.multi_modal_projector.linear_1.bias",
        ),
        (
            "language_model.model.norm.weight",
            "model.language_model.norm.weight",
        ),
        ("language_model.lm_head.weight", "lm_head.weight"),
        (
            "model.language_model.embed_tokens.weight",
            "model.language_model.embed_tokens.weight",
        ),
        ("lm_head.weight", "lm_head.weight"),
    ];
    for (k, want) in cases {
        assert_eq!(canonical_name(k).as_deref(), Some(want), "{k}");
    }
    assert_eq!(canonical_name("text_model.embeddings.weight"), None);
}

/// IEEE 754 binary16 values (the standard's own table), incl. subnormals and specials.
#[test]
fn f16_conversion_is_exact() {
    let cases: [(u16, f32); 10] = [
        (0x0000, 0.0),
        (0x8000, -0.0),
        (0x0001, 5.960_464_5e-8),
        (0x03ff, 6.097_555e-5),
        (0x0400, 6.103_515_6e-5),
        (0x3c00, 1.0),
        (0x3555, 0.333_251_95),
        (0xc000, -2.0),
        (0x7bff, 65504.0),
        (0x7c00, f32::INFINITY),
    ];
    for (h, want) in cases {
        let got = f16_to_f32(h);
        assert_eq!(
            got.to_bits(),
            want.to_bits(),
            "{h:#06x}: {got:e} vs {want:e}"
        );
    }
    assert!(f16_to_f32(0x7e00).is_nan());
    assert_eq!(f16_to_f32(0xfc00), f32::NEG_INFINITY);
    // Every subnormal m·2⁻²⁴ exactly, and every normal round-trips its ordering.
    for m in 1..1024u16 {
        assert_eq!(f16_to_f32(m), m as f32 * 2f32.powi(-24), "{m}");
    }
    let mut prev = 0.0f32;
    for h in 1..0x7c00u16 {
        let v = f16_to_f32(h);
        assert!(v > prev, "{h:#06x}");
        prev = v;
    }
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

fn format_err(e: Error) -> String {
    let s = e.to_string();
    assert!(matches!(e, Error::Format(_) | Error::Io { .. }), "{s}");
    s
}

#[test]
fn hostile_checkpoints_are_errors_that_name_the_file() {
    let dir = common::tmp_dir("hostile_checkpoints");
    // Truncated.
    let t = dir.join("truncated");
    copy_dir(&fixture("hub"), &t);
    let f = t.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let e = format_err(Checkpoint::open(&t).err().unwrap());
    assert!(
        e.contains("model.safetensors") && e.contains("truncated"),
        "{e}"
    );
    // Garbage.
    std::fs::write(&f, b"definitely not a safetensors file").unwrap();
    let e = format_err(Checkpoint::open(&t).err().unwrap());
    assert!(e.contains("model.safetensors"), "{e}");
    // Empty.
    std::fs::write(&f, b"").unwrap();
    let e = format_err(Checkpoint::open(&t).err().unwrap());
    assert!(e.contains("model.safetensors"), "{e}");
    // Unknown dtype.
    let header = br#"{"lm_head.weight":{"dtype":"Q4_K","shape":[2],"data_offsets":[0,2]}}"#;
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header);
    file.extend_from_slice(&[0, 0]);
    std::fs::write(&f, &file).unwrap();
    let e = format_err(Checkpoint::open(&t).err().unwrap());
    assert!(e.contains("Q4_K") && e.contains("lm_head.weight"), "{e}");
    // A dtype safetensors knows but this crate does not read.
    let header = br#"{"lm_head.weight":{"dtype":"I8","shape":[2],"data_offsets":[0,2]}}"#;
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header);
    file.extend_from_slice(&[0, 0]);
    std::fs::write(&f, &file).unwrap();
    let ck = Checkpoint::open(&t).unwrap();
    let e = format_err(ck.read("lm_head.weight", &[2]).err().unwrap());
    assert!(e.contains("I8") && e.contains("model.safetensors"), "{e}");
    // A key of no known layout.
    let header = br#"{"text_model.weight":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header);
    file.extend_from_slice(&[0; 4]);
    std::fs::write(&f, &file).unwrap();
    let e = format_err(Checkpoint::open(&t).err().unwrap());
    assert!(e.contains("text_model.weight"), "{e}");

    // A missing shard.
    let s = dir.join("sharded");
    copy_dir(&fixture("sharded"), &s);
    std::fs::remove_file(s.join("model-00002-of-00003.safetensors")).unwrap();
    let e = format_err(Checkpoint::open(&s).err().unwrap());
    assert!(
        e.contains("model-00002-of-00003.safetensors") && e.contains("missing"),
        "{e}"
    );
    // An index that points outside the folder.
    std::fs::write(
        s.join("model.safetensors.index.json"),
        r#"{"weight_map": {"lm_head.weight": "../hub/model.safetensors"}}"#,
    )
    .unwrap();
    let e = format_err(Checkpoint::open(&s).err().unwrap());
    assert!(e.contains("plain file name"), "{e}");

    // No weights at all.
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let e = format_err(Checkpoint::open(&empty).err().unwrap());
    assert!(e.contains("model.safetensors"), "{e}");

    // Shapes that disagree with the config, and a missing tensor.
    let hub = Checkpoint::open(&fixture("hub")).unwrap();
    let e = format_err(hub.read("lm_head.weight", &[521, 33]).err().unwrap());
    assert!(
        e.contains("language_model.lm_head.weight")
            && e.contains("[521, 32]")
            && e.contains("[521, 33]"),
        "{e}"
    );
    let e = format_err(
        hub.read(
            "model.language_model.layers.9.mlp.up_proj.weight",
            &[64, 32],
        )
        .err()
        .unwrap(),
    );
    assert!(e.contains("layers.9") && e.contains("missing"), "{e}");
}

#[test]
fn hostile_configs_are_errors_that_name_the_file() {
    let p = Path::new("cfg/config.json");
    let bad = [
        ("{", "not valid JSON"),
        ("[]", "not a JSON object"),
        (r#"{"model_type": "qwen2_vl"}"#, "qwen2_vl"),
        (
            r#"{"vision_config": {"model_type": "siglip_vision_model"}}"#,
            "siglip",
        ),
        (r#"{"vision_config": {"hidden_act": "gelu"}}"#, "quick_gelu"),
        (r#"{"text_config": {"model_type": "mistral"}}"#, "mistral"),
        (r#"{"text_config": {"hidden_size": -4}}"#, "hidden_size"),
        (r#"{"text_config": {"head_dim": 64}}"#, "head_dim"),
        (
            r#"{"text_config": {"rope_scaling": {"type": "linear", "factor": 2.0}}}"#,
            "rope_scaling",
        ),
        (r#"{"vision_feature_layer": [-2, -5]}"#, "list"),
        (r#"{"vision_feature_layer": -3}"#, "-3"),
        (r#"{"image_token_index": "32000"}"#, "token id"),
        (r#"{"projector_hidden_act": "relu"}"#, "relu"),
        (r#"{"vision_feature_select_strategy": "cls"}"#, "cls"),
        (
            r#"{"vision_config": {"image_size": 30, "patch_size": 14}}"#,
            "patch size",
        ),
        (r#"{"tie_word_embeddings": true}"#, "tie_word_embeddings"),
    ];
    for (text, needle) in bad {
        let e = LlavaConfig::parse(text, p, "cfg")
            .err()
            .unwrap_or_else(|| panic!("{text} parsed"));
        let s = e.to_string();
        assert!(
            s.contains("cfg/config.json") && s.contains(needle),
            "{text}: {s}"
        );
    }
    let e = LlavaConfig::from_dir(Path::new("/nonexistent/llava"))
        .err()
        .unwrap();
    assert!(e.to_string().contains("/nonexistent/llava"), "{e}");
}
