//! The built-in task through the LLaVA path: the shipped tiny model is an ordinary
//! transformers LLaVA folder, and the task's records go through the tokenizer,
//! image processor and dataset a real LLaVA's data does.
//!
//! References: `scripts/make_tiny_fixture.py` (transformers' LlavaForConditionalGeneration,
//! AutoTokenizer and CLIPImageProcessorPil on `assets/tiny-pretrained`) →
//! `tests/data/tiny/refs.safetensors`.
mod common;

use std::path::{Path, PathBuf};

use dualpriv::backend::cpu::Cpu;
use dualpriv::data::builtin;
use dualpriv::data::synthetic::Split;
use dualpriv::data::DataSource;
use dualpriv::hf::dataset::LlavaDataset;
use dualpriv::hf::image::ImageProcessor;
use dualpriv::hf::load::load_llava;
use dualpriv::hf::tokenizer::Tokenizer;
use dualpriv::model::config::TrainMode;
use safetensors::SafeTensors;

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/tiny-pretrained")
}

const FIXTURE: &str = "tests/data/tiny/refs.safetensors";
const RECORDS: usize = 8;

#[test]
fn shipped_model_matches_transformers() {
    let dir = tiny();
    let bytes = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join(FIXTURE)).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let f32s = |k: &str| common::st_f32(&st, k);
    let ids = |k: &str| -> Vec<u32> {
        st.tensor(k)
            .unwrap()
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
            .collect()
    };
    let (data, _) = builtin::load(&dir, Split::Test, RECORDS, 2, 32).unwrap();
    let (model, report) = load_llava(&Cpu, &dir, &TrainMode::frozen(), 0).unwrap();
    // The tower's last layer and post_layernorm are written (for transformers) and
    // skipped (LLaVA reads layer −2).
    assert!(report.skipped.iter().any(|s| s.contains("post_layernorm")));
    let vocab = model.config().llm.vocab;
    let mut worst = 0.0f32;
    for i in 0..RECORDS {
        let ex = &data.examples()[i];
        assert_eq!(
            ex.input_ids,
            ids(&format!("input_ids.{i}")),
            "record {i}: token ids differ from transformers' AutoTokenizer"
        );
        let t = ex.input_ids.len();
        let batch = data.collate(&[i], t).unwrap();
        let px = f32s(&format!("pixel_values.{i}"));
        let gap = batch
            .images
            .iter()
            .zip(&px)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            gap <= 1e-6,
            "record {i}: pixel values {gap} from CLIPImageProcessorPil's"
        );
        let want = f32s(&format!("logits.{i}"));
        let got = model.logits(&Cpu, &batch, None).unwrap();
        assert_eq!(got.len(), t * vocab);
        for (a, b) in got.iter().zip(&want) {
            worst = worst.max((a - b).abs());
        }
    }
    assert!(
        worst <= 1e-4,
        "logits {worst} from transformers'; if assets/tiny-pretrained was re-pretrained, \
         rerun scripts/make_tiny_fixture.py"
    );
}

/// `dualpriv data synthetic` writes exactly what the demo and `train` render in
/// memory: the same ids, masks and pixels (equal fingerprints under any key).
#[test]
fn written_files_equal_the_in_memory_records() {
    let dir = tiny();
    let out = common::tmp_dir("builtin-write");
    let json = builtin::write(&out, Split::Private, 40, 7, 32).unwrap();
    let tok = Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let proc = ImageProcessor::from_file(dir.join("preprocessor_config.json")).unwrap();
    let from_disk =
        LlavaDataset::load(&json, Some(&out), &tok, proc, 32, builtin::options()).unwrap();
    let (in_memory, task) = builtin::load(&dir, Split::Private, 40, 7, 32).unwrap();
    assert_eq!(from_disk.len(), 40);
    let key = [3u8; 32];
    assert_eq!(from_disk.fingerprint(&key), in_memory.fingerprint(&key));
    // One label per record, on the answer token, which is the task's answer.
    let vocab = dualpriv::data::synthetic::Vocab;
    for (ex, t) in in_memory.examples().iter().zip(&task.examples) {
        let labels: Vec<u32> = (0..ex.input_ids.len())
            .filter(|&j| ex.loss_mask[j])
            .map(|j| ex.input_ids[j + 1])
            .collect();
        assert_eq!(labels.len(), 1);
        assert_eq!(tok.id_to_token(labels[0]).as_deref(), vocab.word(t.answer));
        assert!(ex.input_ids.len() <= builtin::MAX_TEXT_LEN);
    }
    // And a different seed is different data.
    let (other, _) = builtin::load(&dir, Split::Private, 40, 8, 32).unwrap();
    assert_ne!(other.fingerprint(&key), in_memory.fingerprint(&key));
}

/// A built-in run resumes through the LLaVA folder it started from (recorded in its
/// state), whatever `--init` says now, and continues from its checkpoint.
#[test]
fn a_builtin_run_resumes_from_its_own_folder() {
    use dualpriv::cmd::train::{prepare, TrainArgs};
    use dualpriv::model::Mllm;
    use dualpriv::train::method::Method;
    let root = common::tmp_dir("builtin-resume");
    let init = root.join("init");
    let cfg = builtin::model_config("tiny").unwrap();
    let base = Mllm::new(&Cpu, &cfg, &TrainMode::frozen(), 0).unwrap();
    builtin::write_model_folder(&Cpu, &base, &init).unwrap();
    let out = root.join("run");
    let a = TrainArgs {
        method: Method::Ghost,
        init: init.clone(),
        out: Some(out.clone()),
        noise_multiplier: Some(1.0),
        steps: 2,
        batch: 8,
        micro_batch: 8,
        train_examples: 32,
        eval_examples: 4,
        ..TrainArgs::default()
    };
    let first = prepare(&Cpu, &a).unwrap().run().unwrap();
    assert_eq!(first.steps, 2);
    let resumed = TrainArgs {
        init: root.join("no-such-folder"),
        out: None,
        resume: Some(out.clone()),
        steps: 3,
        ..a
    };
    let s = prepare(&Cpu, &resumed).unwrap().run().unwrap();
    assert_eq!(s.steps, 3, "the resume continues the run");
}
