//! A transformers LLaVA folder into an [`Mllm`]: sizes from `config.json`, every
//! frozen weight from the safetensors, LoRA tensors freshly initialised (or from a
//! PEFT adapter, [`apply_adapter`]).
use std::collections::HashSet;
use std::path::Path;

use super::checkpoint::Checkpoint;
use super::config::LlavaConfig;
use super::names::hf_name;
use super::peft::Adapter;
use crate::backend::Backend;
use crate::model::config::TrainMode;
use crate::model::Mllm;
use crate::{Error, Result};

/// What a load read and what it left out.
#[derive(Clone, Debug)]
pub struct LoadReport {
    /// The parsed config.
    pub config: LlavaConfig,
    /// Tensors read.
    pub loaded: usize,
    /// Checkpoint tensors the computation never reads (the vision layers after
    /// layer −2, `post_layernorm`), by canonical name.
    pub skipped: Vec<String>,
}

impl LoadReport {
    /// One line for the log: how many tensors were read and which were skipped.
    pub fn summary(&self) -> String {
        let mut groups: Vec<String> = Vec::new();
        for s in &self.skipped {
            let g = s
                .strip_prefix("model.vision_tower.")
                .map(|r| match r.strip_prefix("encoder.layers.") {
                    Some(l) => format!("encoder.layers.{}.*", l.split('.').next().unwrap_or("")),
                    None => format!("{}.*", r.split('.').next().unwrap_or(r)),
                })
                .unwrap_or_else(|| s.clone());
            if !groups.contains(&g) {
                groups.push(g);
            }
        }
        format!(
            "loaded {} tensors; skipped {} the computation never reads ({})",
            self.loaded,
            self.skipped.len(),
            if groups.is_empty() {
                "none".into()
            } else {
                groups.join(", ")
            }
        )
    }
}

/// The shape transformers stores a crate tensor in (the patch embedding is a
/// `Conv2d` weight `[D, 3, p, p]`; everything else has the crate's shape).
fn stored_shape(name: &str, shape: &[usize], patch: usize) -> Vec<usize> {
    if name == "vision.patch_embed.weight" && shape.len() == 2 {
        vec![shape[0], 3, patch, patch]
    } else {
        shape.to_vec()
    }
}

/// Every tensor of `model` but the LoRA factors, as (crate name, transformers name,
/// the shape transformers stores it in).
pub(crate) fn hf_layout<B: Backend>(model: &Mllm<B>) -> Result<Vec<(String, String, Vec<usize>)>> {
    let patch = model.config().vision.patch_size;
    let mut out = Vec::new();
    for name in model.tensor_names() {
        if name.contains(".lora_A.") || name.contains(".lora_B.") {
            continue;
        }
        let hf = hf_name(name)
            .ok_or_else(|| Error::Internal(format!("tensor {name} has no transformers name")))?;
        let shape = model
            .tensor_shape(name)
            .ok_or_else(|| Error::Internal(format!("tensor {name} has no shape")))?;
        out.push((name.to_string(), hf, stored_shape(name, shape, patch)));
    }
    Ok(out)
}

/// Loads `dir` (config.json + safetensors) as a model in `mode`. LoRA tensors are
/// initialised from `seed`; every other tensor must be in the checkpoint with the
/// shape the config implies. Peak host memory: the model plus one tensor (the
/// host buffer of the largest; measured with `dualpriv inspect --model DIR`).
pub fn load_llava<B: Backend>(
    backend: &B,
    dir: &Path,
    mode: &TrainMode,
    seed: u64,
) -> Result<(Mllm<B>, LoadReport)> {
    let config = LlavaConfig::from_dir(dir)?;
    let ck = Checkpoint::open(dir)?;
    let embed = "model.language_model.embed_tokens.weight";
    let llm = &config.model.llm;
    if let Some(t) = ck.tensors().get(embed) {
        if t.shape != [llm.vocab, llm.hidden] {
            return Err(Error::Format(format!(
                "{}: {} has shape {:?}, but config.json says vocab_size {} × hidden_size {}; \
                 the config does not belong to these weights",
                ck.file_of(embed)
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                t.file_key,
                t.shape,
                llm.vocab,
                llm.hidden
            )));
        }
    }
    if config.image_token_id as usize >= llm.vocab {
        return Err(Error::Config(format!(
            "{}: image_token_index {} is outside the vocabulary of {} embeddings",
            dir.join("config.json").display(),
            config.image_token_id,
            llm.vocab
        )));
    }
    let mut model = Mllm::new_for_load(backend, &config.model, mode, seed)?;
    let mut used = HashSet::new();
    let mut host = Vec::new();
    for (name, hf, stored) in hf_layout(&model)? {
        let name = name.as_str();
        host.resize(stored.iter().product(), 0.0);
        ck.read_into(&hf, &stored, &mut host)?;
        let slot = model
            .tensor_mut(name)
            .ok_or_else(|| Error::Internal(format!("tensor {name} vanished")))?;
        // Free the zero placeholder before the upload: otherwise the placeholder,
        // the host copy and the uploaded tensor coexist (model + two tensors).
        *slot = backend.zeros(0)?;
        *slot = backend.upload(&host)?;
        used.insert(hf);
    }
    let skipped: Vec<String> = ck.unused(&used).into_iter().map(String::from).collect();
    let report = LoadReport {
        config,
        loaded: used.len(),
        skipped,
    };
    Ok((model, report))
}

/// Copies an adapter's tensors into `model`'s LoRA (and `modules_to_save`) tensors.
/// The adapter's rank and α must be the model's; every LoRA tensor of the model
/// must be in the adapter, and every adapter tensor must exist in the model.
pub fn apply_adapter<B: Backend>(
    backend: &B,
    model: &mut Mllm<B>,
    adapter: &Adapter,
    from: &Path,
) -> Result<()> {
    if let TrainMode::Lora { rank, alpha, .. } = model.mode() {
        if *rank != adapter.config.r || (*alpha as f64 - adapter.config.lora_alpha).abs() > 1e-6 {
            return Err(Error::Config(format!(
                "{}: the adapter has r = {} and lora_alpha = {}, but the model was built with \
                 rank {rank} and alpha {alpha}; build it with the adapter's values",
                from.display(),
                adapter.config.r,
                adapter.config.lora_alpha
            )));
        }
    }
    let mut given = HashSet::new();
    for t in &adapter.tensors {
        let shape = model.tensor_shape(&t.name).ok_or_else(|| {
            Error::Config(format!(
                "{}: the adapter has {}, which this model does not have (its LoRA targets or \
                 trainable groups differ from the adapter's)",
                from.display(),
                t.name
            ))
        })?;
        if shape != t.shape.as_slice() {
            return Err(Error::Format(format!(
                "{}: {} has shape {:?}, the model's is {shape:?}",
                from.display(),
                t.name,
                t.shape
            )));
        }
        let buf = backend.upload(&t.data)?;
        *model
            .tensor_mut(&t.name)
            .ok_or_else(|| Error::Internal(format!("tensor {} vanished", t.name)))? = buf;
        given.insert(t.name.as_str());
    }
    let missing: Vec<&str> = model
        .tensor_names()
        .into_iter()
        .filter(|n| (n.contains(".lora_A.") || n.contains(".lora_B.")) && !given.contains(n))
        .collect();
    if let Some(first) = missing.first() {
        return Err(Error::Config(format!(
            "{}: the adapter lacks {} of the model's LoRA tensors (first: {first}); its \
             target_modules cover fewer layers or modules than the model's",
            from.display(),
            missing.len()
        )));
    }
    Ok(())
}
