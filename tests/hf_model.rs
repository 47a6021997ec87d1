//! The crate's model on a transformers LLaVA checkpoint against transformers itself:
//! the fixture of scripts/make_hf_fixture.py (random LlavaForConditionalGeneration
//! with perturbed norms, biases and embeddings) in four key layouts and three
//! dtypes, its vision features at layer −2, image features and logits, and a PEFT
//! adapter's logits (tests/data/hf/refs.safetensors).
mod common;

use std::path::{Path, PathBuf};

use dualpriv::backend::cpu::Cpu;
use dualpriv::data::Batch;
use dualpriv::hf::config::LlavaConfig;
use dualpriv::hf::load::{apply_adapter, load_llava, LoadReport};
use dualpriv::hf::peft::{read_adapter, Adapter};
use dualpriv::model::config::{LoraTarget, TrainMode};
use dualpriv::model::Mllm;
use safetensors::tensor::SafeTensors;

fn fixture(p: &str) -> PathBuf {
    common::hf_data().join(p)
}

struct Refs {
    pixel_values: Vec<f32>,
    input_ids: Vec<u32>,
    hidden_m2: Vec<f32>,
    features: Vec<f32>,
    logits: Vec<f32>,
    adapter_logits: Vec<f32>,
}

fn refs() -> Refs {
    let bytes = std::fs::read(fixture("refs.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let f32s = |k: &str| common::st_f32(&st, k);
    let ids = |k: &str| -> Vec<u32> {
        st.tensor(k)
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as u32)
            .collect()
    };
    Refs {
        pixel_values: f32s("pixel_values"),
        input_ids: ids("input_ids"),
        hidden_m2: f32s("vision_hidden_m2"),
        features: f32s("image_features"),
        logits: f32s("logits"),
        adapter_logits: f32s("adapter_logits"),
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A one-example batch of `ids` (the `<image>` placeholder at `image_pos`).
fn batch(ids: &[u32], pixels: &[f32], size: usize, image_pos: Option<usize>) -> Batch {
    let t = ids.len();
    Batch {
        size: 1,
        image_size: size,
        images: pixels.to_vec(),
        text_len: t,
        input_ids: ids.to_vec(),
        targets: vec![0; t],
        loss_mask: vec![0.0; t],
        example_ids: vec![0],
        image_pos: image_pos.map(|p| vec![Some(p)]),
    }
}

/// transformers' logits over the expanded sequence `[text<p, V image rows,
/// text>p]`, at the rows the crate reads for its T text positions.
fn hf_rows_at_text(hf: &[f32], vocab: usize, t: usize, p: usize, v: usize) -> Vec<f32> {
    (0..t)
        .flat_map(|j| {
            let row = if j < p { j } else { j + v - 1 };
            hf[row * vocab..][..vocab].to_vec()
        })
        .collect()
}

#[test]
fn features_and_logits_match_transformers_on_every_layout() {
    let r = refs();
    for layout in ["hub", "v5", "sharded", "memory"] {
        let (m, rep) = load_llava(&Cpu, &fixture(layout), &TrainMode::frozen(), 0).unwrap();
        let c = &rep.config;
        // Layer 2 of 3 and post_layernorm are never read (features come from −2).
        assert!(
            rep.skipped.iter().any(|s| s.contains("encoder.layers.2.")),
            "{layout}"
        );
        assert!(
            rep.skipped.iter().any(|s| s.contains("post_layernorm")),
            "{layout}"
        );
        assert!(
            rep.skipped
                .iter()
                .all(|s| s.starts_with("model.vision_tower.")),
            "{layout}"
        );
        assert!(rep.summary().contains("skipped"), "{}", rep.summary());
        let size = c.model.vision.image_size;
        let (hidden, feats) = m.image_features(&Cpu, &r.pixel_values, 1, None).unwrap();
        let dh = max_abs_diff(&hidden, &r.hidden_m2);
        let df = max_abs_diff(&feats, &r.features);
        assert!(dh < 1e-4, "{layout}: vision hidden states differ by {dh}");
        assert!(df < 1e-4, "{layout}: image features differ by {df}");

        let p = r
            .input_ids
            .iter()
            .position(|&i| i == c.image_token_id)
            .unwrap();
        let b = batch(&r.input_ids, &r.pixel_values, size, Some(p));
        let logits = m.logits(&Cpu, &b, None).unwrap();
        let vocab = c.model.llm.vocab;
        let v = m.visual_tokens(None);
        let want = hf_rows_at_text(&r.logits, vocab, r.input_ids.len(), p, v);
        let dl = max_abs_diff(&logits, &want);
        assert!(dl < 1e-4, "{layout}: logits differ by {dl}");
        // Not vacuous: the logits vary by much more than the tolerance.
        let spread = want.iter().fold(0.0f32, |a, x| a.max(x.abs()));
        assert!(spread > 0.1, "{layout}: logits are nearly zero ({spread})");
        println!("{layout}: max |Δ| hidden {dh:.2e}, features {df:.2e}, logits {dl:.2e}");
    }
}

/// The fixture's first prompt as a one-example batch, and its `<image>` position.
fn prompt_batch(r: &Refs, c: &LlavaConfig) -> (Batch, usize) {
    let p = r
        .input_ids
        .iter()
        .position(|&i| i == c.image_token_id)
        .unwrap();
    let b = batch(
        &r.input_ids,
        &r.pixel_values,
        c.model.vision.image_size,
        Some(p),
    );
    (b, p)
}

/// The Hub layout with the fixture's PEFT adapter in its LoRA tensors.
fn hub_with_fixture_adapter() -> (Mllm<Cpu>, LoadReport, Adapter) {
    let adapter = read_adapter(&fixture("adapter")).unwrap();
    let mode = TrainMode::Lora {
        rank: adapter.config.r,
        alpha: adapter.config.lora_alpha as f32,
        targets: LoraTarget::ALL.to_vec(),
    };
    let (mut m, rep) = load_llava(&Cpu, &fixture("hub"), &mode, 7).unwrap();
    apply_adapter(&Cpu, &mut m, &adapter, &fixture("adapter")).unwrap();
    (m, rep, adapter)
}

#[test]
fn adapter_gives_peft_logits() {
    let r = refs();
    let (m, rep, _) = hub_with_fixture_adapter();
    let c = &rep.config;
    let (b, p) = prompt_batch(&r, c);
    let logits = m.logits(&Cpu, &b, None).unwrap();
    let (vocab, v) = (c.model.llm.vocab, m.visual_tokens(None));
    let want = hf_rows_at_text(&r.adapter_logits, vocab, r.input_ids.len(), p, v);
    let base = hf_rows_at_text(&r.logits, vocab, r.input_ids.len(), p, v);
    let d = max_abs_diff(&logits, &want);
    assert!(d < 1e-4, "adapter logits differ from PEFT's by {d}");
    // The adapter really changes the model.
    assert!(max_abs_diff(&want, &base) > 1e-2);
    println!("adapter: max |Δ| logits {d:.2e}");
}

/// `(input_ids, logits)` of a text-only prompt: `text_*` in refs.safetensors
/// (make_hf_fixture.py) or textonly_refs.safetensors (make_textonly_fixture.py).
fn text_only_refs(file: &str, prefix: &str) -> (Vec<u32>, Vec<f32>) {
    let bytes = std::fs::read(fixture(file)).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let words = |k: &str| -> Vec<[u8; 4]> {
        st.tensor(k)
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|c| [c[0], c[1], c[2], c[3]])
            .collect()
    };
    let ids = words(&format!("{prefix}input_ids"))
        .into_iter()
        .map(|w| i32::from_le_bytes(w) as u32)
        .collect();
    let logits = words(&format!("{prefix}logits"))
        .into_iter()
        .map(f32::from_le_bytes)
        .collect();
    (ids, logits)
}

/// The image prompt and the two text-only prompts as one right-padded batch, with
/// NaN in the text-only examples' image slots; and each prompt's length.
fn mixed_batch(
    r: &Refs,
    texts: &[(Vec<u32>, Vec<f32>); 2],
    c: &LlavaConfig,
) -> (Batch, [usize; 3]) {
    let s = c.model.vision.image_size;
    let lens = [r.input_ids.len(), texts[0].0.len(), texts[1].0.len()];
    let t = *lens.iter().max().unwrap();
    let pad = |ids: &[u32]| -> Vec<u32> {
        let mut v = ids.to_vec();
        v.resize(t, 520);
        v
    };
    let p = r
        .input_ids
        .iter()
        .position(|&i| i == c.image_token_id)
        .unwrap();
    let mut input_ids = pad(&r.input_ids);
    input_ids.extend(pad(&texts[0].0));
    input_ids.extend(pad(&texts[1].0));
    // The text-only slots hold garbage: the model must not read them.
    let mut images = r.pixel_values.clone();
    images.extend(std::iter::repeat_n(f32::NAN, 2 * 3 * s * s));
    let b = Batch {
        size: 3,
        image_size: s,
        images,
        text_len: t,
        input_ids,
        targets: vec![0; 3 * t],
        loss_mask: vec![0.0; 3 * t],
        example_ids: vec![0, 1, 2],
        image_pos: Some(vec![Some(p), None, None]),
    };
    (b, lens)
}

/// One batch holding the image prompt and two text-only prompts (no `<image>`, no
/// visual tokens), right-padded to a common length: each example's logits equal
/// transformers' for that prompt alone (`pixel_values` omitted for the text-only
/// ones), on every layout.
#[test]
fn mixed_text_only_batch_matches_transformers() {
    let r = refs();
    let texts = [
        text_only_refs("refs.safetensors", "text_"),
        text_only_refs("textonly_refs.safetensors", ""),
    ];
    for layout in ["hub", "v5", "sharded", "memory"] {
        let (m, rep) = load_llava(&Cpu, &fixture(layout), &TrainMode::frozen(), 0).unwrap();
        let c = &rep.config;
        let (vocab, v) = (c.model.llm.vocab, m.visual_tokens(None));
        let (b, lens) = mixed_batch(&r, &texts, c);
        let t = b.text_len;
        let p = b.image_pos.as_ref().unwrap()[0].unwrap();
        let logits = m.logits(&Cpu, &b, None).unwrap();
        let row = |i: usize, n: usize| logits[i * t * vocab..][..n * vocab].to_vec();
        let want0 = hf_rows_at_text(&r.logits, vocab, lens[0], p, v);
        let d0 = max_abs_diff(&row(0, lens[0]), &want0);
        let d1 = max_abs_diff(&row(1, lens[1]), &texts[0].1);
        let d2 = max_abs_diff(&row(2, lens[2]), &texts[1].1);
        assert!(d0 < 1e-4, "{layout}: image prompt logits differ by {d0}");
        assert!(
            d1 < 1e-4,
            "{layout}: text-only prompt 1 logits differ by {d1}"
        );
        assert!(
            d2 < 1e-4,
            "{layout}: text-only prompt 2 logits differ by {d2}"
        );
        let spread = texts[1].1.iter().fold(0.0f32, |a, x| a.max(x.abs()));
        assert!(spread > 0.1, "{layout}: logits are nearly zero ({spread})");
        println!(
            "{layout}: mixed batch max |Δ| logits {d0:.2e} (image), {d1:.2e}, {d2:.2e} (text-only)"
        );
    }
}

/// The same checkpoint and prompt on the CUDA backend (strict FP32) against the
/// CPU. Skips without a driver; fails under `DUALPRIV_REQUIRE_GPU=1`.
#[cfg(feature = "cuda")]
#[test]
fn cuda_forward_matches_the_cpu() {
    use dualpriv::backend::cuda::cuda_strict_or_skip;
    let Some(gpu) = cuda_strict_or_skip("hf_model::cuda_forward_matches_the_cpu") else {
        return;
    };
    let r = refs();
    let (cpu, rep) = load_llava(&Cpu, &fixture("sharded"), &TrainMode::frozen(), 0).unwrap();
    let (dev, _) = load_llava(&gpu, &fixture("sharded"), &TrainMode::frozen(), 0).unwrap();
    let c = &rep.config;
    let (b, _) = prompt_batch(&r, c);
    let want = cpu.logits(&Cpu, &b, None).unwrap();
    let got = dev.logits(&gpu, &b, None).unwrap();
    let d = max_abs_diff(&got, &want);
    assert!(d < 1e-4, "CUDA logits differ from the CPU's by {d}");
    // A batch mixing the image prompt with two text-only prompts.
    let texts = [
        text_only_refs("refs.safetensors", "text_"),
        text_only_refs("textonly_refs.safetensors", ""),
    ];
    let (mb, _) = mixed_batch(&r, &texts, c);
    let want = cpu.logits(&Cpu, &mb, None).unwrap();
    let got = dev.logits(&gpu, &mb, None).unwrap();
    let d = max_abs_diff(&got, &want);
    assert!(
        d < 1e-4,
        "CUDA logits of a mixed batch differ from the CPU's by {d}"
    );
    let (_, fc) = cpu.image_features(&Cpu, &r.pixel_values, 1, None).unwrap();
    let (_, fg) = dev.image_features(&gpu, &r.pixel_values, 1, None).unwrap();
    assert!(max_abs_diff(&fg, &fc) < 1e-4);
}

/// Writes an adapter through the crate's exporter, with the crate's logits under
/// it, to `target/peft-export/` for `scripts/make_hf_fixture.py --check-export`
/// (peft loading the crate's files). Run by hand:
/// `cargo test --test hf_model -- --ignored export_for_peft_check`.
#[test]
#[ignore]
fn export_for_peft_check() {
    let r = refs();
    let (m, rep, adapter) = hub_with_fixture_adapter();
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/peft-export");
    dualpriv::hf::peft::write_adapter(&out, &adapter.config, &adapter.tensors).unwrap();
    let c = &rep.config;
    let (b, _) = prompt_batch(&r, c);
    let logits = m.logits(&Cpu, &b, None).unwrap();
    let bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(out.join("logits.f32"), bytes).unwrap();
    println!("wrote {}", out.display());
}
