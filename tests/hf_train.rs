//! Every method trains end to end on a transformers LLaVA checkpoint (the fixture of
//! scripts/make_hf_fixture.py) from LLaVA conversation JSON, through the same
//! trainer the built-in task uses: HF loader, tokenizer, Pillow-exact image
//! preprocessing, vicuna_v1 prompts and answer masks, the `<image>` splice.
mod common;

use std::path::{Path, PathBuf};

use dualpriv::backend::cpu::Cpu;
use dualpriv::data::DataSource;
use dualpriv::dp::key::RunKey;
use dualpriv::hf::conversation::Template;
use dualpriv::hf::dataset::{DataOptions, LlavaDataset};
use dualpriv::hf::image::{AspectMode, ImageProcessor};
use dualpriv::hf::load::load_llava;
use dualpriv::hf::tokenizer::Tokenizer;
use dualpriv::model::config::TrainMode;
use dualpriv::train::checkpoint::ModelSpec;
use dualpriv::train::method::Method;
use dualpriv::train::{TrainConfig, Trainer};

fn fixture(p: &str) -> PathBuf {
    common::hf_data().join(p)
}

/// Eight fixture images, one per record.
const IMAGES: [&str; 8] = [
    "image.png",
    "image/portrait.png",
    "image/grey.png",
    "image/palette.png",
    "image/rgba.png",
    "image/rgb16.png",
    "image/grey_alpha.png",
    "image/la16.png",
];

/// Eight records over the fixture's images, one multi-turn.
fn write_conversations(dir: &Path) -> PathBuf {
    // One image per record: records sharing an image are refused.
    let images = IMAGES;
    let qa = [
        ("What is in the picture?", "A red square."),
        ("Describe the image.", "There is a small green circle."),
        ("What colour is the shape?", "It is blue."),
        ("How many objects are there?", "Three."),
    ];
    let mut recs = Vec::new();
    for i in 0..8 {
        let (q, a) = qa[i % qa.len()];
        let mut conv = vec![
            serde_json::json!({"from": "human", "value": format!("<image>\n{q}")}),
            serde_json::json!({"from": "gpt", "value": a}),
        ];
        if i == 3 {
            conv.push(serde_json::json!({"from": "human", "value": "And where is it?"}));
            conv.push(serde_json::json!({"from": "gpt", "value": "In the top left corner."}));
        }
        recs.push(serde_json::json!({
            "id": format!("r{i}"),
            "image": images[i % images.len()],
            "conversations": conv,
        }));
    }
    common::write_records(dir, "train.json", &recs)
}

fn dataset(dir: &Path) -> LlavaDataset {
    let json = write_conversations(dir);
    let tok = Tokenizer::from_file(fixture("tokenizer.json")).unwrap();
    let proc = ImageProcessor::from_file(fixture("preprocessor_config.json")).unwrap();
    LlavaDataset::load(&json, Some(&fixture("")), &tok, proc, 56, opts(200)).unwrap()
}

fn opts(max_len: usize) -> DataOptions {
    DataOptions {
        template: Template::VicunaV1,
        max_len,
        aspect: AspectMode::Pad,
    }
}

#[test]
fn every_method_trains_on_an_hf_checkpoint() {
    let dir = common::tmp_dir("hf_train");
    let data = dataset(&dir);
    assert_eq!(data.len(), 8);
    assert_eq!(data.stats().truncated, 0);
    let batch = data.collate(&[0, 3], data.max_text_len()).unwrap();
    assert_eq!(batch.images.len(), 2 * 3 * 56 * 56);
    let pos = batch.image_pos.clone().unwrap();
    let t = batch.text_len;
    for (i, p) in pos.iter().enumerate() {
        let p = p.expect("every record has an image");
        assert_eq!(batch.input_ids[i * t + p], 519, "the <image> token");
        assert!(batch.loss_mask[i * t..][..t].contains(&1.0));
        assert_eq!(
            batch.loss_mask[i * t + p],
            0.0,
            "no loss on the prompt's image"
        );
    }
    for method in Method::ALL {
        let mode = TrainMode::lora(4, 8.0);
        let (model, _) = load_llava(&Cpu, &fixture("hub"), &mode, 3).unwrap();
        let before: Vec<Vec<f32>> = model
            .trainable()
            .iter()
            .map(|p| model.param(p.id).to_vec())
            .collect();
        let spec = ModelSpec {
            preset: fixture("hub").display().to_string(),
            lora_rank: Some(4),
            lora_alpha: 8.0,
            full_groups: vec![],
        };
        let cfg = TrainConfig {
            steps: 3,
            batch: 4,
            micro_batch: 2,
            public_size: Some(8),
            keep_frac: if method == Method::Dualpriv { 0.5 } else { 1.0 },
            keep_tokens: (method == Method::Dualpriv).then_some(6),
            context_tokens: if method == Method::Dualpriv { 2 } else { 0 },
            ..TrainConfig::new(method, 4, data.max_text_len())
        };
        let mut tr =
            Trainer::with_key(&Cpu, model, spec, cfg, &data, RunKey::from_insecure_seed(5))
                .unwrap_or_else(|e| panic!("{method:?}: {e}"));
        let sum = tr
            .run(&data, 0)
            .unwrap_or_else(|e| panic!("{method:?}: {e}"));
        assert_eq!(sum.steps, 3, "{method:?}");
        let changed = tr
            .model
            .trainable()
            .iter()
            .zip(&before)
            .any(|(p, b)| tr.model.param(p.id) != b);
        assert!(changed, "{method:?}: no trainable tensor changed");
        assert!(
            tr.model
                .trainable()
                .iter()
                .all(|p| tr.model.param(p.id).iter().all(|v| v.is_finite())),
            "{method:?}: non-finite weights"
        );
    }
}

/// The eight image records plus two text-only ones (ShareGPT-style turns).
fn write_mixed_conversations(dir: &Path) -> PathBuf {
    let json = write_conversations(dir);
    let mut recs: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    recs.push(serde_json::json!({"id": "t0", "conversations": [
        {"from": "human", "value": "Write a haiku about rain."},
        {"from": "gpt", "value": "Grey clouds, soft drumming."}]}));
    recs.push(serde_json::json!({"id": "t1", "conversations": [
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."},
        {"from": "human", "value": "How are you?"}, {"from": "gpt", "value": "Fine."}]}));
    common::write_records(dir, "mixed.json", &recs)
}

/// Text-only records (no `"image"`) load, collate beside image records with no
/// visual tokens and a zero image slot, have the loss they have alone, and train
/// with every DP method.
#[test]
fn text_only_records_train_beside_image_records() {
    let dir = common::tmp_dir("hf_train_text_only");
    let tok = Tokenizer::from_file(fixture("tokenizer.json")).unwrap();
    let proc = ImageProcessor::from_file(fixture("preprocessor_config.json")).unwrap();
    let json = write_mixed_conversations(&dir);
    let data =
        LlavaDataset::load(&json, Some(&fixture("")), &tok, proc.clone(), 56, opts(200)).unwrap();
    assert_eq!(data.len(), 10);
    let t = data.max_text_len();
    let batch = data.collate(&[8, 0, 9, 3], t).unwrap();
    let pos = batch.image_pos.clone().unwrap();
    assert!(pos[0].is_none() && pos[2].is_none() && pos[1].is_some() && pos[3].is_some());
    let per = 3 * 56 * 56;
    assert!(batch.images[..per].iter().all(|&v| v == 0.0));
    assert!(batch.images[per..2 * per].iter().any(|&v| v != 0.0));
    assert!(!batch.input_ids[..t].contains(&519), "no <image> token");

    let mode = TrainMode::lora(4, 8.0);
    let (mut model, _) = load_llava(&Cpu, &fixture("hub"), &mode, 3).unwrap();
    // Give LoRA B values so the adapters matter.
    for p in model.trainable().to_vec() {
        if p.name.contains("lora_B") {
            model.param_mut(p.id).iter_mut().for_each(|v| *v = 0.01);
        }
    }
    let all = model.per_example_loss(&Cpu, &batch, None).unwrap();
    for (k, &i) in [8usize, 0, 9, 3].iter().enumerate() {
        let one = data.collate(&[i], t).unwrap();
        let l = model.per_example_loss(&Cpu, &one, None).unwrap()[0];
        assert!(
            (all[k] - l).abs() <= 1e-5 * l.abs(),
            "record {i}: {} in the batch, {l} alone",
            all[k]
        );
        assert!(l > 0.0);
    }

    for method in Method::ALL {
        let (model, _) = load_llava(&Cpu, &fixture("hub"), &mode, 3).unwrap();
        let spec = ModelSpec {
            preset: fixture("hub").display().to_string(),
            lora_rank: Some(4),
            lora_alpha: 8.0,
            full_groups: vec![],
        };
        let cfg = TrainConfig {
            steps: 2,
            batch: 5,
            micro_batch: 3,
            public_size: Some(10),
            keep_tokens: (method == Method::Dualpriv).then_some(6),
            context_tokens: if method == Method::Dualpriv { 2 } else { 0 },
            ..TrainConfig::new(method, 5, data.max_text_len())
        };
        let mut tr =
            Trainer::with_key(&Cpu, model, spec, cfg, &data, RunKey::from_insecure_seed(7))
                .unwrap_or_else(|e| panic!("{method:?}: {e}"));
        let sum = tr
            .run(&data, 0)
            .unwrap_or_else(|e| panic!("{method:?}: {e}"));
        assert_eq!(sum.steps, 2, "{method:?}");
        assert!(
            tr.model
                .trainable()
                .iter()
                .all(|p| tr.model.param(p.id).iter().all(|v| v.is_finite())),
            "{method:?}: non-finite weights"
        );
    }

    // A file of text-only records needs no image folder.
    let only = dir.join("only.json");
    std::fs::write(
        &only,
        r#"[{"id": "x", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}]"#,
    )
    .unwrap();
    let d = LlavaDataset::load(&only, None, &tok, proc, 56, opts(100)).unwrap();
    let b = d.collate(&[0], d.max_text_len()).unwrap();
    assert_eq!(b.image_pos, Some(vec![None]));
}

#[test]
fn wrong_image_sizes_are_refused() {
    let dir = common::tmp_dir("hf_train_refusals");
    let tok = Tokenizer::from_file(fixture("tokenizer.json")).unwrap();
    let proc = ImageProcessor::from_file(fixture("preprocessor_config.json")).unwrap();
    let json = write_conversations(&dir);
    let e = LlavaDataset::load(&json, Some(&fixture("")), &tok, proc, 336, opts(100))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("56×56") && e.contains("336×336"), "{e}");
}

/// The practitioner's path through the binary: `train --model --data
/// --image-folder`, then `export --peft`; the exported adapter applied to a fresh
/// load of the base model gives the trained run's logits.
#[test]
fn cli_trains_an_hf_model_and_exports_a_peft_adapter() {
    use dualpriv::hf::load::apply_adapter;
    use dualpriv::hf::peft::read_adapter;
    use dualpriv::model::Mllm;
    use std::process::Command;

    let dir = common::tmp_dir("hf_cli");
    let json = write_conversations(&dir);
    let (run, adapter) = (dir.join("run"), dir.join("adapter"));
    let bin = env!("CARGO_BIN_EXE_dualpriv");
    let out = Command::new(bin)
        .args([
            "train",
            "--method",
            "dualpriv",
            "--noise-multiplier",
            "1",
            "--steps",
            "2",
        ])
        .args([
            "--batch",
            "4",
            "--micro-batch",
            "2",
            "--lora-rank",
            "4",
            "--lora-alpha",
            "8",
        ])
        .args([
            "--keep-tokens",
            "6",
            "--context-tokens",
            "2",
            "--insecure-seed",
            "3",
            "--public-size",
            "16",
            "--max-text-len",
            "96",
        ])
        .arg("--model")
        .arg(fixture("hub"))
        .arg("--data")
        .arg(&json)
        .arg("--image-folder")
        .arg(fixture(""))
        .arg("--out")
        .arg(&run)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "train failed: {err}");
    // q = batch / public size, not the private record count (8).
    assert!(err.contains("q = 0.2500"), "{err}");
    // Padded to the public --max-text-len, not to the (private) longest record.
    let (state, _) = dualpriv::train::checkpoint::load_state(&run).unwrap();
    assert_eq!(state.train.text_len, 96);
    let out = Command::new(bin)
        .args(["export", "--run"])
        .arg(&run)
        .arg("--peft")
        .arg(&adapter)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "export failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("exported 28 LoRA tensors"), "{text}");

    // The run's own checkpoint against the base model + exported adapter.
    let a = read_adapter(&adapter).unwrap();
    assert_eq!(
        a.config.base_model.as_deref(),
        Some(fixture("hub").to_str().unwrap())
    );
    let mode = TrainMode::lora(4, 8.0);
    let (mut base, rep) = load_llava(&Cpu, &fixture("hub"), &mode, 99).unwrap();
    apply_adapter(&Cpu, &mut base, &a, &adapter).unwrap();
    let ckpt = dualpriv::train::checkpoint::model_path(&run).unwrap();
    let trained = Mllm::load(&Cpu, &rep.config.model, &mode, &ckpt).unwrap();
    let data = dataset(&dir);
    let b = data.collate(&[0, 1], data.max_text_len()).unwrap();
    let want = trained.logits(&Cpu, &b, None).unwrap();
    let got = base.logits(&Cpu, &b, None).unwrap();
    assert_eq!(
        got, want,
        "exported adapter + base differs from the trained checkpoint"
    );
    // Training changed the model: LoRA B started at zero.
    let (fresh, _) = load_llava(&Cpu, &fixture("hub"), &mode, 99).unwrap();
    assert_ne!(fresh.logits(&Cpu, &b, None).unwrap(), want);
}

/// Images are decoded once, at load: a step's time does not depend on which
/// image was sampled, and a file changed or removed mid-run cannot fail a step
/// (which would name a record just sampled). Records sharing an image are refused.
#[test]
fn images_are_read_once_and_never_shared() {
    let dir = common::tmp_dir("hf_train_cache");
    let src = fixture("");
    let root = dir.join("root");
    std::fs::create_dir_all(root.join("image")).unwrap();
    for f in IMAGES {
        std::fs::copy(src.join(f), root.join(f)).unwrap();
    }
    let json = write_conversations(&dir);
    let tok = Tokenizer::from_file(fixture("tokenizer.json")).unwrap();
    let proc = ImageProcessor::from_file(fixture("preprocessor_config.json")).unwrap();
    let data = LlavaDataset::load(&json, Some(&root), &tok, proc.clone(), 56, opts(200)).unwrap();
    let before = data.collate(&[2, 5], 200).unwrap();
    // Overwrite one and delete another: the dataset keeps what it loaded.
    std::fs::write(root.join(IMAGES[2]), b"not a png any more").unwrap();
    std::fs::remove_file(root.join(IMAGES[5])).unwrap();
    let after = data.collate(&[2, 5], 200).unwrap();
    assert_eq!(before.images, after.images);
    assert!(before.images.iter().any(|v| *v != 0.0));
    // No cache file is left in the temporary folder.
    let prefix = format!("dualpriv-pixels-{}-", std::process::id());
    let left = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .count();
    assert_eq!(left, 0, "a pixel cache file is left on disk");

    // Two records naming one image.
    let shared = dir.join("shared.json");
    let text = std::fs::read_to_string(&json)
        .unwrap()
        .replace(IMAGES[1], IMAGES[0]);
    std::fs::write(&shared, text).unwrap();
    let e = LlavaDataset::load(&shared, Some(&src), &tok, proc, 56, opts(200))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("share the image") && e.contains("merge"), "{e}");
}
