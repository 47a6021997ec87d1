//! PEFT LoRA adapters: `adapter_config.json` + `adapter_model.safetensors`, read and
//! written in the format `peft.PeftModel.from_pretrained` loads (peft 0.21).
//!
//! Keys are `base_model.model.` + transformers' module names
//! ([`super::names::peft_key`]); A is `[r, in]`, B is `[out, r]` and the update is
//! `(α/r)·B·A`, the crate's own convention, so tensors move across unchanged. A
//! fully fine-tuned projector is saved under `modules_to_save`, as PEFT does.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde_json::{json, Value};

use super::checkpoint::view_to_f32;
use super::names::{from_peft_key, peft_key};
use crate::{Error, Result};

/// The fields of `adapter_config.json` the crate reads and writes.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterConfig {
    /// LoRA rank r.
    pub r: usize,
    /// LoRA α (scale α/r).
    pub lora_alpha: f64,
    /// `target_modules`: a regex over full module names, or a list of suffixes.
    pub target_modules: TargetModules,
    /// Modules saved in full (`modules_to_save`), e.g. `multi_modal_projector`.
    pub modules_to_save: Vec<String>,
    /// `base_model_name_or_path`.
    pub base_model: Option<String>,
}

/// PEFT's `target_modules`.
#[derive(Clone, Debug, PartialEq)]
pub enum TargetModules {
    /// A regex matched against the full module name (`re.fullmatch`).
    Regex(String),
    /// Module-name suffixes. For LLaVA a list also matches CLIP's q/k/v_proj, so
    /// the crate writes [`TargetModules::Regex`].
    List(Vec<String>),
}

/// The regex that limits LoRA to the language model's `modules`
/// (`q_proj`, …, `down_proj`): `.*language_model.*\.(q_proj|…)`.
pub fn language_model_regex(modules: &[&str]) -> String {
    format!(r".*language_model.*\.({})", modules.join("|"))
}

/// One adapter tensor under its crate name.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterTensor {
    /// Crate tensor name, e.g. `llm.layers.0.self_attn.q_proj.lora_A.weight`.
    pub name: String,
    /// Row-major shape.
    pub shape: Vec<usize>,
    /// Values.
    pub data: Vec<f32>,
}

/// A loaded adapter.
#[derive(Clone, Debug)]
pub struct Adapter {
    /// Its config.
    pub config: AdapterConfig,
    /// Its tensors, sorted by name.
    pub tensors: Vec<AdapterTensor>,
}

fn fmt_err(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::Format(format!("{}: {msg}", path.display()))
}

fn io_err(path: &Path, e: std::io::Error, fix: &str) -> Error {
    Error::Io {
        path: path.display().to_string(),
        message: format!("{e}{fix}"),
    }
}

/// Reads `dir/adapter_config.json`.
pub fn read_config(dir: &Path) -> Result<AdapterConfig> {
    let path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| {
        io_err(
            &path,
            e,
            "; a PEFT adapter folder holds adapter_config.json and adapter_model.safetensors",
        )
    })?;
    let v: Value =
        serde_json::from_str(&text).map_err(|e| fmt_err(&path, format!("not valid JSON: {e}")))?;
    let get = |k: &str| v.get(k).filter(|x| !x.is_null());
    let peft_type = get("peft_type").and_then(Value::as_str).unwrap_or("");
    if peft_type != "LORA" {
        return Err(fmt_err(
            &path,
            format!("peft_type is {peft_type:?}; only LORA adapters are supported"),
        ));
    }
    let r = get("r")
        .and_then(Value::as_u64)
        .filter(|&r| r > 0)
        .ok_or_else(|| fmt_err(&path, "r is missing or not a positive integer"))?
        as usize;
    let lora_alpha = get("lora_alpha")
        .and_then(Value::as_f64)
        .filter(|a| a.is_finite())
        .unwrap_or(8.0);
    // Variants that change the update's formula; silently ignoring them would give
    // a different model than PEFT's.
    for (flag, what) in [
        ("use_dora", "DoRA"),
        ("use_rslora", "rank-stabilised LoRA (scale α/√r)"),
        ("fan_in_fan_out", "fan_in_fan_out (Conv1D weights)"),
    ] {
        if get(flag).and_then(Value::as_bool) == Some(true) {
            return Err(fmt_err(
                &path,
                format!("{flag} is true: {what} is not supported"),
            ));
        }
    }
    if let Some(b) = get("bias").and_then(Value::as_str) {
        if b != "none" {
            return Err(fmt_err(
                &path,
                format!("bias is {b:?}; only \"none\" is supported"),
            ));
        }
    }
    for pat in ["rank_pattern", "alpha_pattern"] {
        if get(pat)
            .and_then(Value::as_object)
            .is_some_and(|m| !m.is_empty())
        {
            return Err(fmt_err(
                &path,
                format!("{pat} is set; per-module ranks or alphas are not supported"),
            ));
        }
    }
    let target_modules = match get("target_modules") {
        Some(Value::String(s)) => TargetModules::Regex(s.clone()),
        Some(Value::Array(a)) => TargetModules::List(
            a.iter()
                .map(|x| {
                    x.as_str()
                        .map(String::from)
                        .ok_or_else(|| fmt_err(&path, "target_modules holds a non-string"))
                })
                .collect::<Result<_>>()?,
        ),
        _ => return Err(fmt_err(&path, "target_modules is missing")),
    };
    let modules_to_save = match get("modules_to_save") {
        None => vec![],
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(String::from)
                    .ok_or_else(|| fmt_err(&path, "modules_to_save holds a non-string"))
            })
            .collect::<Result<_>>()?,
        Some(_) => return Err(fmt_err(&path, "modules_to_save is not a list")),
    };
    Ok(AdapterConfig {
        r,
        lora_alpha,
        target_modules,
        modules_to_save,
        base_model: get("base_model_name_or_path")
            .and_then(Value::as_str)
            .map(String::from),
    })
}

/// Reads an adapter folder: its config and every tensor under its crate name.
/// LoRA outside the language model, ranks that disagree with `r`, and keys of no
/// known layout are errors.
pub fn read_adapter(dir: &Path) -> Result<Adapter> {
    let config = read_config(dir)?;
    let path = dir.join("adapter_model.safetensors");
    let bytes = std::fs::read(&path).map_err(|e| {
        io_err(
            &path,
            e,
            "; PyTorch adapter_model.bin files must be converted to safetensors first",
        )
    })?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| {
        fmt_err(
            &path,
            format!("{e:?}; the file is truncated or not safetensors: save the adapter again"),
        )
    })?;
    let mut tensors = Vec::new();
    for (key, view) in st.tensors() {
        let name = from_peft_key(&key).ok_or_else(|| {
            fmt_err(
                &path,
                format!(
                    "key {key:?} is not a LLaVA PEFT key (base_model.model.<transformers name>)"
                ),
            )
        })?;
        let is_lora = name.contains(".lora_A.") || name.contains(".lora_B.");
        if is_lora && !name.starts_with("llm.layers.") {
            return Err(fmt_err(
                &path,
                format!("{key}: LoRA outside the language model's layers is not supported (only the decoder's linears take LoRA here)"),
            ));
        }
        if !is_lora
            && !config
                .modules_to_save
                .iter()
                .any(|m| key.contains(&format!(".{m}.")))
        {
            return Err(fmt_err(
                &path,
                format!("{key} is neither a LoRA tensor nor part of modules_to_save"),
            ));
        }
        let shape = view.shape().to_vec();
        if is_lora {
            let rank_dim = if name.contains(".lora_A.") {
                shape.first()
            } else {
                shape.get(1)
            };
            if shape.len() != 2 || rank_dim != Some(&config.r) {
                return Err(fmt_err(
                    &path,
                    format!("{key} has shape {shape:?}, which does not have rank r = {} from adapter_config.json", config.r),
                ));
            }
        }
        tensors.push(AdapterTensor {
            name,
            shape,
            data: to_f32(&path, &key, &view)?,
        });
    }
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Adapter { config, tensors })
}

fn to_f32(path: &Path, key: &str, v: &TensorView<'_>) -> Result<Vec<f32>> {
    view_to_f32(v).ok_or_else(|| {
        fmt_err(
            path,
            format!(
                "{key} is stored as {:?}; only F32, F16 and BF16 are read",
                v.dtype()
            ),
        )
    })
}

/// Writes `dir/adapter_config.json` and `dir/adapter_model.safetensors` (F32) so
/// that `peft.PeftModel.from_pretrained(base, dir)` loads them. Each file is written
/// to a temporary name and renamed, so a crash leaves no half-written adapter.
pub fn write_adapter(dir: &Path, config: &AdapterConfig, tensors: &[AdapterTensor]) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e, ""))?;
    let target = match &config.target_modules {
        TargetModules::Regex(s) => json!(s),
        TargetModules::List(l) => json!(l),
    };
    let cfg = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": 0.0,
        "target_modules": target,
        "modules_to_save": if config.modules_to_save.is_empty() { Value::Null } else { json!(config.modules_to_save) },
        "base_model_name_or_path": config.base_model,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "use_dora": false,
        "use_rslora": false,
    });
    let mut data: BTreeMap<String, (Vec<usize>, Vec<u8>)> = BTreeMap::new();
    for t in tensors {
        let key = peft_key(&t.name).ok_or_else(|| {
            Error::Internal(format!("tensor {} has no transformers name", t.name))
        })?;
        if t.shape.iter().product::<usize>() != t.data.len() {
            return Err(Error::Internal(format!(
                "tensor {}: shape {:?} but {} values",
                t.name,
                t.shape,
                t.data.len()
            )));
        }
        let bytes = t.data.iter().flat_map(|v| v.to_le_bytes()).collect();
        if data.insert(key.clone(), (t.shape.clone(), bytes)).is_some() {
            return Err(Error::Internal(format!("tensor {key} given twice")));
        }
    }
    let views: Vec<(String, TensorView<'_>)> = data
        .iter()
        .map(|(k, (shape, bytes))| {
            TensorView::new(Dtype::F32, shape.clone(), bytes)
                .map(|v| (k.clone(), v))
                .map_err(|e| Error::Internal(format!("{k}: {e:?}")))
        })
        .collect::<Result<_>>()?;
    let meta = Some(std::collections::HashMap::from([(
        "format".to_string(),
        "pt".to_string(),
    )]));
    let st = safetensors::serialize(views, meta)
        .map_err(|e| Error::Internal(format!("serialising the adapter: {e:?}")))?;
    let text = serde_json::to_string_pretty(&cfg).map_err(|e| Error::Internal(e.to_string()))?;
    write_atomic(&dir.join("adapter_model.safetensors"), &st)?;
    write_atomic(&dir.join("adapter_config.json"), text.as_bytes())
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp: PathBuf = path.with_extension("partial");
    std::fs::write(&tmp, bytes).map_err(|e| io_err(&tmp, e, ""))?;
    std::fs::rename(&tmp, path).map_err(|e| io_err(path, e, ""))
}
