//! Checkpoints: `model.safetensors` (all weights, LoRA included),
//! `optim.safetensors` (optimizer moments by parameter id) and `state.json` (the
//! config, step, σ, privacy history and data fingerprint). Every file is written
//! to a temporary name and renamed, and `state.json` goes last, so a crash never
//! leaves a state that points at half-written weights. Resuming redraws the same
//! batches and noise (both are keyed by the step), so it continues exactly.
use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};

use super::step::{Moments, OptState};
use super::{io_err, PrivacyState, TrainConfig, Trainer};
use crate::backend::dp::DpBackend;
use crate::model::{FullGroup, LoraTarget, ModelConfig, TrainMode};
use crate::{Error, Result};

/// Which model and what of it is trained; serialisable, unlike [`TrainMode`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// Preset name (`tiny`, `tinyllava-1b`, `llava-7b`).
    pub preset: String,
    /// LoRA rank, or `None` for full fine-tuning of `full_groups`.
    pub lora_rank: Option<usize>,
    /// LoRA alpha.
    pub lora_alpha: f32,
    /// Full fine-tuning groups: projector, attention, mlp, lm_head, embeddings.
    pub full_groups: Vec<String>,
}

impl ModelSpec {
    /// The model config and train mode this spec names.
    pub fn build(&self) -> Result<(ModelConfig, TrainMode)> {
        let cfg = ModelConfig::preset(&self.preset)?;
        let mode = match self.lora_rank {
            Some(r) => TrainMode::Lora {
                rank: r,
                alpha: self.lora_alpha,
                targets: LoraTarget::ALL.to_vec(),
            },
            None => TrainMode::Full {
                groups: self
                    .full_groups
                    .iter()
                    .map(|g| parse_group(g))
                    .collect::<Result<_>>()?,
            },
        };
        mode.validate()?;
        Ok((cfg, mode))
    }
}

fn parse_group(g: &str) -> Result<FullGroup> {
    Ok(match g {
        "projector" => FullGroup::Projector,
        "attention" => FullGroup::Attention,
        "mlp" => FullGroup::Mlp,
        "lm_head" => FullGroup::LmHead,
        "embeddings" => FullGroup::Embeddings,
        _ => {
            return Err(Error::Config(format!(
                "unknown group {g:?}: expected projector, attention, mlp, lm_head or embeddings"
            )))
        }
    })
}

/// `state.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckpointState {
    /// Format version.
    pub version: u32,
    /// The model.
    pub model: ModelSpec,
    /// The run's configuration.
    pub train: TrainConfig,
    /// Logical steps done.
    pub step: u32,
    /// The noise multiplier.
    pub sigma: f64,
    /// Privacy spent.
    pub privacy: PrivacyState,
    /// Fingerprint of the private training data.
    pub data_fingerprint: String,
}

const VERSION: u32 = 1;

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(|e| io_err(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io_err(path, e))
}

/// Writes a full checkpoint of `t` into `dir`.
pub fn save<B: DpBackend>(t: &Trainer<'_, B>, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let model_tmp = dir.join("model.safetensors.tmp");
    t.model.save(t.backend, &model_tmp)?;
    std::fs::rename(&model_tmp, dir.join("model.safetensors")).map_err(|e| io_err(dir, e))?;
    let mut named: Vec<(String, Vec<u8>)> = Vec::new();
    let mut ids: Vec<&u32> = t.opt.moments.keys().collect();
    ids.sort();
    for id in ids {
        let mo = &t.opt.moments[id];
        for (tag, buf) in [("m", &mo.m), ("v", &mo.v)] {
            if let Some(b) = buf {
                let host = t.backend.download(b)?;
                named.push((format!("{tag}.{id}"), bytemuck::cast_slice(&host).to_vec()));
            }
        }
    }
    let views = named
        .iter()
        .map(|(n, bytes)| {
            Ok((
                n.clone(),
                TensorView::new(Dtype::F32, vec![bytes.len() / 4], bytes)?,
            ))
        })
        .collect::<std::result::Result<Vec<_>, safetensors::SafeTensorError>>()
        .map_err(|e| Error::Config(format!("serialising optimizer state: {e}")))?;
    let bytes = safetensors::serialize(views, None)
        .map_err(|e| Error::Config(format!("serialising optimizer state: {e}")))?;
    write_atomic(&dir.join("optim.safetensors"), &bytes)?;
    let state = CheckpointState {
        version: VERSION,
        model: t.model_spec.clone(),
        train: t.cfg.clone(),
        step: t.step,
        sigma: t.sigma,
        privacy: t.privacy.clone(),
        data_fingerprint: t.data_fingerprint.clone(),
    };
    let json = serde_json::to_vec_pretty(&state)
        .map_err(|e| Error::Config(format!("serialising state: {e}")))?;
    write_atomic(&dir.join("state.json"), &json)
}

/// Reads `state.json` from a checkpoint folder.
pub fn load_state(dir: &Path) -> Result<CheckpointState> {
    let p = dir.join("state.json");
    let bytes = std::fs::read(&p).map_err(|e| io_err(&p, e))?;
    let s: CheckpointState = serde_json::from_slice(&bytes).map_err(|e| {
        Error::Config(format!(
            "{}: not a dualpriv checkpoint state: {e}",
            p.display()
        ))
    })?;
    if s.version != VERSION {
        return Err(Error::Config(format!(
            "{}: checkpoint version {} (expected {VERSION})",
            p.display(),
            s.version
        )));
    }
    Ok(s)
}

/// Reads the optimizer moments of a checkpoint folder onto the backend.
pub fn load_optim<B: DpBackend>(backend: &B, dir: &Path) -> Result<OptState<B>> {
    let p = dir.join("optim.safetensors");
    let bytes = std::fs::read(&p).map_err(|e| io_err(&p, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::Config(format!("{}: {e}", p.display())))?;
    let mut moments: HashMap<u32, Moments<B>> = HashMap::new();
    for (name, view) in st.tensors() {
        let (tag, id) = name
            .split_once('.')
            .and_then(|(t, i)| i.parse::<u32>().ok().map(|i| (t.to_string(), i)))
            .ok_or_else(|| Error::Config(format!("{}: unexpected tensor {name}", p.display())))?;
        if view.dtype() != Dtype::F32 {
            return Err(Error::Config(format!(
                "{}: tensor {name} is not f32",
                p.display()
            )));
        }
        let host: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let buf = backend.upload(&host)?;
        let e = moments.entry(id).or_insert(Moments { m: None, v: None });
        match tag.as_str() {
            "m" => e.m = Some(buf),
            "v" => e.v = Some(buf),
            _ => {
                return Err(Error::Config(format!(
                    "{}: unexpected tensor {name}",
                    p.display()
                )))
            }
        }
    }
    Ok(OptState { moments })
}
