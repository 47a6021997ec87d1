//! Checkpoints that a crash can never turn into a privacy loss.
//!
//! Layout of a run folder:
//! ```text
//! DIR/CURRENT                         name of the complete checkpoint folder
//! DIR/step-00000012-<id>/model.safetensors   all weights (LoRA included)
//! DIR/step-00000012-<id>/optim.safetensors   optimizer moments by parameter id
//! DIR/step-00000012-<id>/state.json          config, step, draws, σ, privacy
//! DIR/metrics.jsonl
//! ```
//! A save ([`save`]) first records the steps in the privacy ledger, then writes a
//! fresh step-stamped folder, then makes it current with one atomic write of
//! `CURRENT`, then removes older folders. A crash at any point leaves either the
//! previous checkpoint current (and the ledger already counting the new steps) or
//! the new one; never a mix. Model and optimizer files carry the checkpoint's id and
//! step in their metadata, and resuming refuses a folder whose pieces disagree.
//!
//! The run's secret key is never written: a resume draws a fresh one (only an
//! `--insecure-seed` key, public anyway, is saved, so such runs replay). Files are
//! still created readable by the owner only; publish `model.safetensors`.
use std::collections::HashMap;
use std::path::Path;

use std::cell::Cell;
use std::path::PathBuf;

use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};

use super::step::{Moments, OptState};
use super::{io_err, PrivacyState, TrainConfig, Trainer};
use crate::backend::dp::DpBackend;
use crate::dp::accountant::ledger::write_durable;
use crate::dp::key::RunKey;
use crate::error::Setting;
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

/// The prefix of a [`ModelSpec::preset`] that names a transformers LLaVA folder.
pub const HF_PRESET: &str = "hf:";

impl ModelSpec {
    /// The model config and train mode this spec names. A preset `hf:DIR` is the
    /// transformers LLaVA folder DIR (its `config.json`).
    pub fn build(&self) -> Result<(ModelConfig, TrainMode)> {
        let cfg = match self.preset.strip_prefix(HF_PRESET) {
            Some(dir) => crate::hf::config::LlavaConfig::from_dir(Path::new(dir))?.model,
            None => ModelConfig::preset(&self.preset)?,
        };
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
    /// Random id of this checkpoint, also stamped into its model and optimizer files.
    pub checkpoint_id: String,
    /// Random id of the run (its identity in the privacy ledger).
    pub run_id: String,
    /// The model.
    pub model: ModelSpec,
    /// The run's configuration.
    pub train: TrainConfig,
    /// Logical steps done.
    pub step: u32,
    /// Sampling/noise draws used so far (≥ `step`); resuming continues after them.
    pub draws: u32,
    /// The noise multiplier.
    pub sigma: f64,
    /// Privacy spent.
    pub privacy: PrivacyState,
    /// Keyed fingerprint of the private training data.
    pub data_fingerprint: String,
    /// The privacy ledger the run records into.
    pub ledger: PathBuf,
    /// The key, saved only when it is public (`--insecure-seed`); a secure run's
    /// key is never written, and its resume draws a fresh one.
    #[serde(default)]
    pub key: Option<RunKey>,
}

/// Format version of `state.json`.
pub const VERSION: u32 = 2;
/// The file naming the current checkpoint folder.
pub const CURRENT: &str = "CURRENT";

thread_local! {
    static FAIL_AFTER: Cell<Option<u32>> = const { Cell::new(None) };
}

/// Test hook: the `n`-th durable write from now on this thread succeeds and then
/// reports an injected crash (`None` disarms). Lets tests stop a checkpoint after
/// every single file write.
#[doc(hidden)]
pub fn fail_after_writes(n: Option<u32>) {
    FAIL_AFTER.with(|f| f.set(n));
}

/// Called after each durable write (and folder removal) of the driver.
pub(crate) fn after_write(path: &Path) -> Result<()> {
    FAIL_AFTER.with(|f| match f.get() {
        Some(n) if n <= 1 => {
            f.set(None);
            Err(Error::Io {
                path: path.display().to_string(),
                message: "injected crash after this write (test hook)".into(),
            })
        }
        Some(n) => {
            f.set(Some(n - 1));
            Ok(())
        }
        None => Ok(()),
    })
}

/// A random 128-bit id as 32 hex digits.
pub fn random_id() -> Result<String> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(Error::entropy)?;
    Ok(crate::dp::key::to_hex(&b))
}

/// The current checkpoint folder of run folder `dir`, or `None` when it has none.
pub fn current(dir: &Path) -> Result<Option<PathBuf>> {
    let p = dir.join(CURRENT);
    match std::fs::read_to_string(&p) {
        Ok(name) => {
            let name = name.trim();
            if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
                return Err(Error::Format(format!(
                    "{}: {name:?} is not a checkpoint folder name",
                    p.display()
                )));
            }
            Ok(Some(dir.join(name)))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(&p, e)),
    }
}

/// The weights file of `dir`: its current checkpoint's, or `dir/model.safetensors`
/// for a plain model folder (a pretrained checkpoint).
pub fn model_path(dir: &Path) -> Result<PathBuf> {
    Ok(current(dir)?
        .unwrap_or_else(|| dir.to_path_buf())
        .join("model.safetensors"))
}

/// Writes a complete checkpoint of `t` into run folder `dir` and makes it current.
/// The caller records the ledger first.
pub fn save<B: DpBackend>(t: &Trainer<'_, B>, dir: &Path, state: &CheckpointState) -> Result<()> {
    let name = format!("step-{:08}-{}", state.step, &state.checkpoint_id[..8]);
    let folder = dir.join(&name);
    std::fs::create_dir_all(&folder).map_err(|e| io_err(&folder, e))?;
    let tags = HashMap::from([
        ("checkpoint_id".to_string(), state.checkpoint_id.clone()),
        ("step".to_string(), state.step.to_string()),
    ]);
    let model = folder.join("model.safetensors");
    t.model.save_tagged(t.backend, &model, tags.clone())?;
    sync_file(&model)?;
    after_write(&model)?;
    let mut named: Vec<(String, Vec<u8>)> = Vec::new();
    let mut ids: Vec<&u32> = t.opt.moments.keys().collect();
    ids.sort();
    for id in ids {
        let mo = &t.opt.moments[id];
        for (tag, buf) in [("m", &mo.m), ("v", &mo.v)] {
            if let Some(b) = buf {
                let host = t.backend.download(b)?.into_vec(); // one-off: freed
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
        .map_err(|e| Error::Format(format!("serialising optimizer state: {e}")))?;
    let bytes = safetensors::serialize(views, Some(tags))
        .map_err(|e| Error::Format(format!("serialising optimizer state: {e}")))?;
    write_durable(&folder.join("optim.safetensors"), &bytes)?;
    let json = serde_json::to_vec_pretty(state)
        .map_err(|e| Error::Format(format!("serialising state: {e}")))?;
    write_durable(&folder.join("state.json"), &json)?;
    // The commit point: one atomic rename makes the complete folder current.
    write_durable(&dir.join(CURRENT), name.as_bytes())?;
    // Older (and unfinished) folders are garbage now.
    let entries = std::fs::read_dir(dir).map_err(|e| io_err(dir, e))?;
    for e in entries.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with("step-") && n != name {
            let p = e.path();
            std::fs::remove_dir_all(&p).map_err(|err| io_err(&p, err))?;
            after_write(&p)?;
        }
    }
    Ok(())
}

fn sync_file(p: &Path) -> Result<()> {
    std::fs::File::open(p)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_err(p, e))
}

/// The `__metadata__` of a safetensors file, reading only its header.
fn safetensors_meta(p: &Path) -> Result<HashMap<String, String>> {
    use std::io::Read;
    let mut f = std::fs::File::open(p).map_err(|e| io_err(p, e))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|e| io_err(p, e))?;
    let n = u64::from_le_bytes(len);
    if n > 100 << 20 {
        return Err(Error::Format(format!(
            "{}: safetensors header of {n} bytes",
            p.display()
        )));
    }
    let mut head = vec![0u8; n as usize];
    f.read_exact(&mut head).map_err(|e| io_err(p, e))?;
    let v: serde_json::Value = serde_json::from_slice(&head)
        .map_err(|e| Error::Format(format!("{}: not a safetensors header: {e}", p.display())))?;
    Ok(v.get("__metadata__")
        .and_then(|m| serde_json::from_value(m.clone()).ok())
        .unwrap_or_default())
}

/// Reads `state.json` of the current checkpoint of run folder `dir`, and checks
/// that its model and optimizer files belong to it (same checkpoint id and step);
/// returns the state and the checkpoint folder.
pub fn load_state(dir: &Path) -> Result<(CheckpointState, PathBuf)> {
    let folder = current(dir)?.ok_or_else(|| Error::Setting {
        setting: Setting::RunDir,
        message: format!(
            "{}: no checkpoint here (no {CURRENT} file); a run folder is the output folder of a \
             training run",
            dir.display()
        ),
    })?;
    let p = folder.join("state.json");
    let bytes = std::fs::read(&p).map_err(|e| io_err(&p, e))?;
    let s: CheckpointState = serde_json::from_slice(&bytes).map_err(|e| {
        Error::Format(format!(
            "{}: not a dualpriv checkpoint state (version {VERSION}): {e}",
            p.display()
        ))
    })?;
    if s.version != VERSION {
        return Err(Error::Format(format!(
            "{}: checkpoint version {} (expected {VERSION})",
            p.display(),
            s.version
        )));
    }
    for file in ["model.safetensors", "optim.safetensors"] {
        let f = folder.join(file);
        let meta = safetensors_meta(&f)?;
        let (id, step) = (meta.get("checkpoint_id"), meta.get("step"));
        if id != Some(&s.checkpoint_id) || step != Some(&s.step.to_string()) {
            return Err(Error::Format(format!(
                "{}: belongs to checkpoint {} at step {}, but {} is checkpoint {} at step {}; \
                 the folder mixes pieces of different checkpoints, so resuming is refused",
                f.display(),
                id.map_or("?", |v| v.as_str()),
                step.map_or("?", |v| v.as_str()),
                p.display(),
                s.checkpoint_id,
                s.step
            )));
        }
    }
    Ok((s, folder))
}
/// Reads the optimizer moments of a checkpoint folder onto the backend.
pub fn load_optim<B: DpBackend>(backend: &B, dir: &Path) -> Result<OptState<B>> {
    let p = dir.join("optim.safetensors");
    let bytes = std::fs::read(&p).map_err(|e| io_err(&p, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::Format(format!("{}: {e}", p.display())))?;
    let mut moments: HashMap<u32, Moments<B>> = HashMap::new();
    for (name, view) in st.tensors() {
        let (tag, id) = name
            .split_once('.')
            .and_then(|(t, i)| i.parse::<u32>().ok().map(|i| (t.to_string(), i)))
            .ok_or_else(|| Error::Format(format!("{}: unexpected tensor {name}", p.display())))?;
        if view.dtype() != Dtype::F32 {
            return Err(Error::Format(format!(
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
                return Err(Error::Format(format!(
                    "{}: unexpected tensor {name}",
                    p.display()
                )))
            }
        }
    }
    Ok(OptState { moments })
}
