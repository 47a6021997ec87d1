//! `dualpriv export --merged`: the base LLaVA folder with the LoRA merged in (or a
//! fully trained projector replaced), written in the base's dtype and key layout,
//! against the crate's own base + adapter; the f16/bf16 rounding; hostile input.
//! transformers' side: `scripts/make_textonly_fixture.py --check-merged`.
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use dualpriv::backend::cpu::{Cpu, Cpu64};
use dualpriv::backend::Backend;
use dualpriv::data::Batch;
use dualpriv::hf::checkpoint::f16_to_f32;
use dualpriv::hf::load::{apply_adapter, load_llava};
use dualpriv::hf::merge::{f32_to_bf16, f32_to_f16, write_merged};
use dualpriv::hf::peft::read_adapter;
use dualpriv::model::config::{FullGroup, LoraTarget, TrainMode};
use dualpriv::model::Mllm;
use safetensors::tensor::SafeTensors;

fn fixture(p: &str) -> PathBuf {
    common::hf_data().join(p)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The fixture's image prompt and a text-only prompt in one batch (image slot of
/// the text-only example unused).
fn prompts() -> Batch {
    let bytes = std::fs::read(fixture("refs.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let words = |k: &str| -> Vec<[u8; 4]> {
        st.tensor(k)
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|c| [c[0], c[1], c[2], c[3]])
            .collect()
    };
    let ids = |k: &str| -> Vec<u32> {
        words(k)
            .into_iter()
            .map(|w| i32::from_le_bytes(w) as u32)
            .collect()
    };
    let (img_ids, txt_ids) = (ids("input_ids"), ids("text_input_ids"));
    let t = img_ids.len().max(txt_ids.len());
    let pad = |v: &[u32]| {
        let mut v = v.to_vec();
        v.resize(t, 520);
        v
    };
    let mut pixels: Vec<f32> = words("pixel_values")
        .into_iter()
        .map(f32::from_le_bytes)
        .collect();
    let per = pixels.len();
    pixels.extend(std::iter::repeat_n(0.0, per));
    let p = img_ids.iter().position(|&i| i == 519).unwrap();
    let mut input_ids = pad(&img_ids);
    input_ids.extend(pad(&txt_ids));
    Batch {
        size: 2,
        image_size: 56,
        images: pixels,
        text_len: t,
        input_ids,
        targets: vec![0; 2 * t],
        loss_mask: vec![0.0; 2 * t],
        example_ids: vec![0, 1],
        image_pos: Some(vec![Some(p), None]),
    }
}

/// `layout` with the fixture's PEFT adapter, and its mode.
fn with_adapter(layout: &str) -> (Mllm<Cpu>, TrainMode) {
    with_adapter_on(&Cpu, layout)
}

fn with_adapter_on<B: Backend>(be: &B, layout: &str) -> (Mllm<B>, TrainMode) {
    let adapter = read_adapter(&fixture("adapter")).unwrap();
    let mode = TrainMode::Lora {
        rank: adapter.config.r,
        alpha: adapter.config.lora_alpha as f32,
        targets: LoraTarget::ALL.to_vec(),
    };
    let (mut m, _) = load_llava(be, &fixture(layout), &mode, 7).unwrap();
    apply_adapter(be, &mut m, &adapter, &fixture("adapter")).unwrap();
    (m, mode)
}

/// The logits rows of real (non-pad) tokens.
fn real_rows(b: &Batch, logits: &[f32]) -> Vec<f32> {
    let vocab = logits.len() / b.input_ids.len();
    b.input_ids
        .iter()
        .enumerate()
        .filter(|(_, &id)| id != 520)
        .flat_map(|(r, _)| logits[r * vocab..][..vocab].to_vec())
        .collect()
}

/// The merged model (f32) is as close to the exact (f64) base + adapter as the
/// crate's own f32 base + adapter is: both are f32 evaluations of one function
/// (x·(W + sBA) against x·W + s·(x·A)·B, and W + sBA rounded once to f32), so
/// neither should be more than a small factor from the truth; a wrong merge (a
/// missing scale, a transposed product) is off by the adapter's whole effect,
/// ≳ 1e-2 here. On real tokens only: a pad row's logits are never used.
fn check_against_f64(b: &Batch, merged: &[f32], unmerged: &[f32], truth: &[f32], what: &str) {
    let (m, u, t) = (
        real_rows(b, merged),
        real_rows(b, unmerged),
        real_rows(b, truth),
    );
    let (em, eu, d) = (
        max_abs_diff(&m, &t),
        max_abs_diff(&u, &t),
        max_abs_diff(&m, &u),
    );
    println!(
        "{what}: max |Δ logits| vs base + adapter {d:.2e}; vs the f64 truth: merged {em:.2e}, \
         base + adapter (f32) {eu:.2e}"
    );
    assert!(
        em <= 3.0 * eu.max(2e-6),
        "{what}: merged is {em:e} from the f64 truth, the unmerged f32 model {eu:e}"
    );
    assert!(
        d < 1e-4,
        "{what}: merged differs from base + adapter by {d}"
    );
}

/// Every tensor of a folder's safetensors files: file key → (dtype, shape, bytes).
fn tensors_of(dir: &Path) -> Vec<(String, String, Vec<usize>, Vec<u8>)> {
    let mut out = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    for f in files {
        let bytes = std::fs::read(&f).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut v: Vec<_> = st
            .tensors()
            .into_iter()
            .map(|(k, t)| {
                (
                    k,
                    format!("{:?}", t.dtype()),
                    t.shape().to_vec(),
                    t.data().to_vec(),
                )
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        out.extend(v);
    }
    out
}

fn is_lora_target(key: &str) -> bool {
    key.contains("language_model")
        && [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
        .iter()
        .any(|m| key.contains(&format!(".{m}.weight")))
}

/// An F32 base: the merged folder, loaded with no LoRA, gives base + adapter's
/// logits up to f32 rounding ([`check_against_f64`]). Every non-target tensor,
/// the skipped ones included, is copied byte for byte in the same key layout, and
/// the side files are copied.
#[test]
fn merged_f32_folder_gives_base_plus_adapter_logits() {
    let dir = common::tmp_dir("hf_merge_f32");
    let (m, mode) = with_adapter("hub");
    let ckpt = dir.join("run.safetensors");
    m.save(&Cpu, &ckpt).unwrap();
    let out = dir.join("merged");
    let rep = write_merged(&fixture("hub"), &ckpt, &mode, &out).unwrap();
    assert_eq!((rep.merged, rep.replaced), (14, 0), "{rep:?}");
    assert_eq!(rep.dtypes, ["F32"]);

    let b = prompts();
    let want = m.logits(&Cpu, &b, None).unwrap();
    let (merged, lr) = load_llava(&Cpu, &out, &TrainMode::frozen(), 0).unwrap();
    let got = merged.logits(&Cpu, &b, None).unwrap();
    let (m64, _) = with_adapter_on(&Cpu64, "hub");
    let truth = m64.logits(&Cpu64, &b, None).unwrap();
    check_against_f64(&b, &got, &want, &truth, "f32 merged");
    let (base, _) = load_llava(&Cpu, &fixture("hub"), &TrainMode::frozen(), 0).unwrap();
    let moved = max_abs_diff(&base.logits(&Cpu, &b, None).unwrap(), &want);
    assert!(
        moved > 1e-2,
        "the adapter barely changes the logits ({moved})"
    );
    assert!(lr.skipped.iter().any(|s| s.contains("post_layernorm")));

    let (a, o) = (tensors_of(&fixture("hub")), tensors_of(&out));
    assert_eq!(a.len(), o.len());
    let mut changed = 0;
    for (x, y) in a.iter().zip(&o) {
        assert_eq!(
            (&x.0, &x.1, &x.2),
            (&y.0, &y.1, &y.2),
            "key, dtype or shape"
        );
        if is_lora_target(&x.0) {
            assert_ne!(x.3, y.3, "{} was not merged", x.0);
            changed += 1;
        } else {
            assert_eq!(x.3, y.3, "{} was not copied unchanged", x.0);
        }
    }
    assert_eq!(changed, 14);
    assert!(o.iter().any(|t| t.0.contains("post_layernorm")));
    assert!(o.iter().any(|t| t.0.contains("encoder.layers.2.")));
    for f in [
        "config.json",
        "tokenizer.json",
        "preprocessor_config.json",
        "processor_config.json",
    ] {
        assert_eq!(
            std::fs::read(fixture("hub").join(f)).unwrap(),
            std::fs::read(out.join(f)).unwrap(),
            "{f}"
        );
    }
}

/// F16 shards and a BF16 v5 save: same files and key layout as the base, and each
/// merged weight is exactly the f32 merge rounded to nearest-even in the base's
/// dtype (the fixture's weights are the same values in every layout).
#[test]
fn half_precision_bases_round_the_merge_to_their_dtype() {
    let dir = common::tmp_dir("hf_merge_half");
    let (m, mode) = with_adapter("hub");
    let ckpt = dir.join("run.safetensors");
    m.save(&Cpu, &ckpt).unwrap();
    let f32_out = dir.join("f32");
    write_merged(&fixture("hub"), &ckpt, &mode, &f32_out).unwrap();
    let reference: std::collections::HashMap<String, Vec<f32>> = tensors_of(&f32_out)
        .into_iter()
        .map(|(k, _, _, b)| {
            let k = k.replace("vision_model.", "");
            let v = b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (k, v)
        })
        .collect();
    let b = prompts();
    let want = m.logits(&Cpu, &b, None).unwrap();
    for (layout, dtype) in [("sharded", "F16"), ("v5", "BF16")] {
        let out = dir.join(layout);
        let rep = write_merged(&fixture(layout), &ckpt, &mode, &out).unwrap();
        assert_eq!(rep.merged, 14, "{layout}");
        assert_eq!(rep.dtypes, [dtype], "{layout}");
        let names = |d: &Path| {
            let mut v: Vec<String> = std::fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        assert_eq!(names(&fixture(layout)), names(&out), "{layout}: files");
        let (base, merged) = (tensors_of(&fixture(layout)), tensors_of(&out));
        for (x, y) in base.iter().zip(&merged) {
            assert_eq!((&x.0, &x.1, &x.2), (&y.0, &y.1, &y.2), "{layout}");
            if !is_lora_target(&x.0) {
                assert_eq!(x.3, y.3, "{layout}: {} changed", x.0);
                continue;
            }
            let r = &reference[&x.0.replace("vision_model.", "")];
            let round: Vec<u8> = r
                .iter()
                .flat_map(|&v| {
                    if dtype == "F16" {
                        f32_to_f16(v)
                    } else {
                        f32_to_bf16(v)
                    }
                    .to_le_bytes()
                })
                .collect();
            assert_eq!(y.3, round, "{layout}: {} is not the rounded merge", x.0);
        }
        // It loads. Its logits move by the rounding (the byte check above is the
        // test): this random fixture amplifies weight perturbations ~10³× (its f32
        // logits are ~1e-4 from f64), so bf16's 2⁻⁹ shows as ~0.4 here.
        let (mm, _) = load_llava(&Cpu, &out, &TrainMode::frozen(), 0).unwrap();
        let got = mm.logits(&Cpu, &b, None).unwrap();
        assert!(got.iter().all(|v| v.is_finite()));
        let d = max_abs_diff(&real_rows(&b, &got), &real_rows(&b, &want));
        println!("{layout} ({dtype}) merged vs f32 base + adapter: max |Δ logits| = {d:.2e}");
    }
}

/// A fully fine-tuned projector is written as trained; everything else is copied,
/// and the merged folder computes exactly what the trained model does.
#[test]
fn a_fully_trained_projector_is_replaced() {
    let dir = common::tmp_dir("hf_merge_full");
    let mode = TrainMode::Full {
        groups: vec![FullGroup::Projector],
    };
    let (mut m, _) = load_llava(&Cpu, &fixture("hub"), &mode, 7).unwrap();
    for p in m.trainable().to_vec() {
        for (j, v) in m.param_mut(p.id).iter_mut().enumerate() {
            *v += 0.01 * ((j % 7) as f32 - 3.0);
        }
    }
    let ckpt = dir.join("run.safetensors");
    m.save(&Cpu, &ckpt).unwrap();
    let out = dir.join("merged");
    let rep = write_merged(&fixture("hub"), &ckpt, &mode, &out).unwrap();
    assert_eq!((rep.merged, rep.replaced), (0, 4), "{rep:?}");
    let (mm, _) = load_llava(&Cpu, &out, &TrainMode::frozen(), 0).unwrap();
    let b = prompts();
    assert_eq!(
        mm.logits(&Cpu, &b, None).unwrap(),
        m.logits(&Cpu, &b, None).unwrap()
    );
    for (x, y) in tensors_of(&fixture("hub")).iter().zip(&tensors_of(&out)) {
        assert_eq!(
            x.3 == y.3,
            !x.0.starts_with("multi_modal_projector."),
            "{}",
            x.0
        );
    }
}

/// Every f16 value survives f32 → f16; halfway cases round to even; overflow is ∞.
#[test]
fn f16_and_bf16_rounding_is_nearest_even() {
    for h in 0..=u16::MAX {
        let x = f16_to_f32(h);
        if x.is_nan() {
            assert!(f16_to_f32(f32_to_f16(x)).is_nan());
        } else {
            assert_eq!(f32_to_f16(x), h, "{h:#06x} = {x:e}");
        }
    }
    // Halfway between 1 and 1 + 2⁻¹⁰: to 1 (even); just above: up.
    assert_eq!(f32_to_f16(1.0 + 2f32.powi(-11)), 0x3c00);
    assert_eq!(f32_to_f16(1.0 + 3.0 * 2f32.powi(-11)), 0x3c02);
    assert_eq!(f32_to_f16(1.0 + 2f32.powi(-11) + 2f32.powi(-20)), 0x3c01);
    // Subnormals: 2⁻²⁵ is halfway to the smallest one and rounds to 0 (even).
    assert_eq!(f32_to_f16(2f32.powi(-25)), 0);
    assert_eq!(f32_to_f16(2f32.powi(-25) * 1.01), 1);
    assert_eq!(f32_to_f16(-2f32.powi(-24) * 1.5), 0x8002);
    assert_eq!(f32_to_f16(65520.0), 0x7c00);
    assert_eq!(f32_to_f16(65519.0), 0x7bff);
    assert_eq!(f32_to_f16(f32::NEG_INFINITY), 0xfc00);
    // bfloat16.
    assert_eq!(f32_to_bf16(1.0), 0x3f80);
    assert_eq!(f32_to_bf16(f32::from_bits(0x3f80_8000)), 0x3f80);
    assert_eq!(f32_to_bf16(f32::from_bits(0x3f81_8000)), 0x3f82);
    assert_eq!(f32_to_bf16(f32::from_bits(0x3f80_8001)), 0x3f81);
    assert_eq!(f32_to_bf16(f32::MAX), 0x7f80);
    assert!(f32::from_bits((f32_to_bf16(f32::NAN) as u32) << 16).is_nan());
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_dualpriv")
}

/// Four records with images for a short CLI run.
fn write_data(dir: &Path) -> PathBuf {
    let images = [
        "image.png",
        "image/portrait.png",
        "image/grey.png",
        "image/rgba.png",
    ];
    let recs: Vec<serde_json::Value> = images
        .iter()
        .enumerate()
        .map(|(i, img)| {
            serde_json::json!({"id": i, "image": img, "conversations": [
                {"from": "human", "value": "<image>\nWhat is in the picture?"},
                {"from": "gpt", "value": "A red square."}]})
        })
        .collect();
    common::write_records(dir, "train.json", &recs)
}

/// `train --model` then `export --merged` (with `--peft` in the same call): the
/// merged folder reproduces the trained checkpoint; an existing non-empty output
/// folder and a run of the built-in preset are refused with messages naming them.
#[test]
fn cli_exports_a_merged_model_and_refuses_bad_targets() {
    let dir = common::tmp_dir("hf_merge_cli");
    let json = write_data(&dir);
    let run = dir.join("run");
    let out = Command::new(bin())
        .args(["train", "--method", "dpsgd", "--noise-multiplier", "1"])
        .args(["--steps", "2", "--batch", "2", "--micro-batch", "2"])
        .args([
            "--lora-rank",
            "4",
            "--lora-alpha",
            "8",
            "--insecure-seed",
            "3",
        ])
        .args(["--public-size", "4", "--max-text-len", "64", "--lr", "0.5"])
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
    assert!(
        out.status.success(),
        "train failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (merged, adapter) = (dir.join("merged"), dir.join("adapter"));
    let out = Command::new(bin())
        .args(["export", "--run"])
        .arg(&run)
        .arg("--peft")
        .arg(&adapter)
        .arg("--merged")
        .arg(&merged)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "export failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("14 LoRA weights merged"), "{text}");
    assert!(adapter.join("adapter_model.safetensors").is_file());

    let mode = TrainMode::lora(4, 8.0);
    let (_, rep) = load_llava(&Cpu, &fixture("hub"), &mode, 0).unwrap();
    let ckpt = dualpriv::train::checkpoint::model_path(&run).unwrap();
    let trained = Mllm::load(&Cpu, &rep.config.model, &mode, &ckpt).unwrap();
    let trained64 = Mllm::load(&Cpu64, &rep.config.model, &mode, &ckpt).unwrap();
    let (mm, _) = load_llava(&Cpu, &merged, &TrainMode::frozen(), 0).unwrap();
    let b = prompts();
    check_against_f64(
        &b,
        &mm.logits(&Cpu, &b, None).unwrap(),
        &trained.logits(&Cpu, &b, None).unwrap(),
        &trained64.logits(&Cpu64, &b, None).unwrap(),
        "CLI merged vs trained checkpoint",
    );

    // The output folder exists and is not empty: refused, untouched.
    let before = std::fs::read(merged.join("config.json")).unwrap();
    let out = Command::new(bin())
        .args(["export", "--run"])
        .arg(&run)
        .arg("--merged")
        .arg(&merged)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(merged.to_str().unwrap()) && err.contains("not empty"),
        "{err}"
    );
    assert_eq!(std::fs::read(merged.join("config.json")).unwrap(), before);

    // Neither --peft nor --merged.
    let out = Command::new(bin())
        .args(["export", "--run"])
        .arg(&run)
        .output()
        .unwrap();
    assert!(!out.status.success());

    // A run of the built-in task is a run on a LLaVA folder too: it merges.
    let cfg = dualpriv::data::builtin::model_config("tiny").unwrap();
    let init = dir.join("init");
    let base = Mllm::new(&Cpu, &cfg, &TrainMode::frozen(), 0).unwrap();
    dualpriv::data::builtin::write_model_folder(&Cpu, &base, &init).unwrap();
    let tiny_run = dir.join("tiny-run");
    let out = Command::new(bin())
        .args(["train", "--method", "ghost", "--train-examples", "16"])
        .args([
            "--batch",
            "4",
            "--micro-batch",
            "4",
            "--noise-multiplier",
            "1",
        ])
        .args(["--steps", "1", "--insecure-seed", "1"])
        .arg("--init")
        .arg(&init)
        .arg("--out")
        .arg(&tiny_run)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let merged = dir.join("m2");
    let out = Command::new(bin())
        .args(["export", "--run"])
        .arg(&tiny_run)
        .arg("--merged")
        .arg(&merged)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (m, _) = load_llava(&Cpu, &merged, &TrainMode::frozen(), 0).unwrap();
    assert_eq!(m.config().llm.vocab, cfg.llm.vocab);
    for f in ["tokenizer.json", "preprocessor_config.json"] {
        assert!(merged.join(f).is_file(), "{f} is not copied");
    }
}

/// Writes a merged folder of the fixture + its adapter and the crate's base +
/// adapter logits beside it, to `target/merged-export/`, for
/// `scripts/make_textonly_fixture.py --check-merged target/merged-export/merged`.
/// Run by hand: `cargo test --test hf_merge -- --ignored merged_for_transformers_check`.
#[test]
#[ignore]
fn merged_for_transformers_check() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/merged-export");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let (m, mode) = with_adapter("hub");
    let ckpt = root.join("run.safetensors");
    m.save(&Cpu, &ckpt).unwrap();
    write_merged(&fixture("hub"), &ckpt, &mode, &root.join("merged")).unwrap();
    // The image prompt alone, as the script runs it.
    let mut b = prompts();
    let t = b.text_len;
    let n = b.input_ids[..t].iter().rposition(|&i| i != 520).unwrap() + 1;
    b = Batch {
        size: 1,
        images: b.images[..b.images.len() / 2].to_vec(),
        text_len: n,
        input_ids: b.input_ids[..n].to_vec(),
        targets: vec![0; n],
        loss_mask: vec![0.0; n],
        example_ids: vec![0],
        image_pos: Some(vec![b.image_pos.unwrap()[0]]),
        ..b
    };
    let logits = m.logits(&Cpu, &b, None).unwrap();
    let bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(root.join("merged_logits.f32"), bytes).unwrap();
    println!("wrote {}", root.display());
}
