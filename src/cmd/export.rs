//! `dualpriv export`: a run's LoRA adapter as a PEFT adapter folder
//! (`adapter_config.json` + `adapter_model.safetensors`) that
//! `peft.PeftModel.from_pretrained(base, DIR)` loads onto the base model
//! ([`export_peft`]), or the whole transformers LLaVA folder with the training
//! merged in ([`export_merged`], see [`crate::hf::merge`]).
//!
//! The adapter is the run's released model, so it is covered by the run's ε (it is
//! post-processing of the noisy updates), and so is the merged model, a function of
//! the public base and the adapter; a run that is not private (non-private method,
//! `insecure_seed`) exports just the same, and its state and ledger say so.
use std::fs::File;
use std::path::PathBuf;

use memmap2::Mmap;
use safetensors::tensor::SafeTensors;

use crate::error::Setting;
use crate::hf::checkpoint::view_to_f32;
use crate::hf::merge::{write_merged, MergeReport};
use crate::hf::peft::{
    language_model_regex, write_adapter, AdapterConfig, AdapterTensor, TargetModules,
};
use crate::model::config::LoraTarget;
use crate::train::checkpoint::{load_state, model_path, HF_PRESET};
use crate::{Error, Result};

/// Settings of `dualpriv export`.
#[derive(Clone, Debug)]
pub struct ExportArgs {
    /// The run folder (a `train` output folder).
    pub run: PathBuf,
    /// Where to write the PEFT adapter.
    pub peft: PathBuf,
}

/// What was exported.
#[derive(Clone, Debug)]
pub struct ExportReport {
    /// LoRA tensors written.
    pub tensors: usize,
    /// LoRA rank.
    pub r: usize,
    /// `base_model_name_or_path`: the HF folder the run started from, or its preset.
    pub base_model: String,
    /// Logical steps of the exported checkpoint.
    pub step: u32,
}

/// Writes the LoRA tensors of `a.run`'s current checkpoint as a PEFT adapter.
pub fn export_peft(a: &ExportArgs) -> Result<ExportReport> {
    let (state, _) = load_state(&a.run)?;
    let spec = &state.model;
    let r = spec.lora_rank.ok_or_else(|| Error::Setting {
        setting: Setting::RunDir,
        message: format!(
            "{}: the run fine-tuned {:?} in full, not LoRA; only LoRA runs export as PEFT adapters",
            a.run.display(),
            spec.full_groups
        ),
    })?;
    let path = model_path(&a.run)?;
    let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
    // SAFETY: read-only mapping of a checkpoint this process does not modify.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
    let st = SafeTensors::deserialize(&map).map_err(|e| {
        Error::Format(format!(
            "{}: {e:?}; the checkpoint is corrupt",
            path.display()
        ))
    })?;
    let mut tensors = Vec::new();
    for (name, view) in st.tensors() {
        if !(name.contains(".lora_A.") || name.contains(".lora_B.")) {
            continue;
        }
        let data = view_to_f32(&view).ok_or_else(|| {
            Error::Format(format!(
                "{}: {name} is {:?}; dualpriv checkpoints hold F32",
                path.display(),
                view.dtype()
            ))
        })?;
        tensors.push(AdapterTensor {
            name,
            shape: view.shape().to_vec(),
            data,
        });
    }
    if tensors.is_empty() {
        return Err(Error::Format(format!(
            "{}: no LoRA tensors in the checkpoint of a LoRA run",
            path.display()
        )));
    }
    tensors.sort_by(|x, y| x.name.cmp(&y.name));
    let modules: Vec<&str> = LoraTarget::ALL
        .iter()
        .map(|t| t.module().rsplit('.').next().unwrap_or(""))
        .collect();
    let base_model = spec
        .preset
        .strip_prefix(HF_PRESET)
        .unwrap_or(&spec.preset)
        .to_string();
    let cfg = AdapterConfig {
        r,
        lora_alpha: spec.lora_alpha as f64,
        target_modules: TargetModules::Regex(language_model_regex(&modules)),
        modules_to_save: vec![],
        base_model: Some(base_model.clone()),
    };
    write_adapter(&a.peft, &cfg, &tensors)?;
    Ok(ExportReport {
        tensors: tensors.len(),
        r,
        base_model,
        step: state.step,
    })
}

/// Settings of `dualpriv export --merged`.
#[derive(Clone, Debug)]
pub struct MergeArgs {
    /// The run folder (a `train --model HF_DIR` output folder).
    pub run: PathBuf,
    /// Where to write the merged transformers folder (new or empty).
    pub out: PathBuf,
}

/// Writes the base model of `a.run` (an HF run) with the current checkpoint's LoRA
/// merged in (or its fully trained tensors replaced) as a transformers LLaVA folder.
pub fn export_merged(a: &MergeArgs) -> Result<(MergeReport, u32)> {
    let (state, _) = load_state(&a.run)?;
    let spec = &state.model;
    let base = spec
        .preset
        .strip_prefix(HF_PRESET)
        .ok_or_else(|| Error::Setting {
            setting: Setting::RunDir,
            message: format!(
                "{}: the run trained the built-in preset {:?}, not a transformers LLaVA folder; \
             --merged needs a run of `train --model HF_DIR` (export this one with --peft, or \
             use its checkpoint directly)",
                a.run.display(),
                spec.preset
            ),
        })?;
    let base = PathBuf::from(base);
    if !base.join("config.json").is_file() {
        return Err(Error::Io {
            path: base.display().to_string(),
            message: format!(
                "the run {} was trained on this model folder, which no longer holds a \
                 config.json; put the base model back at this path",
                a.run.display()
            ),
        });
    }
    let (_, mode) = spec.build()?;
    let trained = model_path(&a.run)?;
    Ok((write_merged(&base, &trained, &mode, &a.out)?, state.step))
}
