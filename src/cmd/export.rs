//! `dualpriv export`: a run's LoRA adapter as a PEFT adapter folder
//! (`adapter_config.json` + `adapter_model.safetensors`) that
//! `peft.PeftModel.from_pretrained(base, DIR)` loads onto the base model.
//!
//! The adapter is the run's released model, so it is covered by the run's ε (it is
//! post-processing of the noisy updates); a run that is not private (non-private
//! method, `insecure_seed`) exports just the same, and its state and ledger say so.
use std::fs::File;
use std::path::PathBuf;

use memmap2::Mmap;
use safetensors::tensor::SafeTensors;

use crate::error::Setting;
use crate::hf::checkpoint::view_to_f32;
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
