//! Memory-mapped safetensors checkpoints of transformers' LLaVA, in any of the key
//! layouts it writes, read one tensor at a time into f32.
//!
//! A folder holds `model.safetensors`, or shards listed in
//! `model.safetensors.index.json`. Keys are renamed to one canonical layout, the
//! in-memory `state_dict()` names of transformers 5's `LlavaForConditionalGeneration`:
//!
//! | layout | vision | projector | decoder | head |
//! |---|---|---|---|---|
//! | Hub (llava-hf) | `vision_tower.vision_model.*` | `multi_modal_projector.*` | `language_model.model.*` | `language_model.lm_head.weight` |
//! | v5 `save_pretrained` | `vision_tower.*` | `multi_modal_projector.*` | `language_model.model.*` | `language_model.lm_head.weight` |
//! | in memory (canonical) | `model.vision_tower.*` | `model.multi_modal_projector.*` | `model.language_model.*` | `lm_head.weight` |
//!
//! Host memory: a tensor is converted straight from the mapped file into the
//! caller's buffer, and its pages are then dropped from the mapping
//! (`MADV_DONTNEED`), so a load holds the converted model plus about one tensor.
use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::{Mmap, UncheckedAdvice};
use safetensors::tensor::{Dtype, SafeTensorError, SafeTensors};

use crate::{Error, Result};

/// One tensor of the checkpoint.
#[derive(Clone, Debug)]
pub struct TensorEntry {
    /// Its key in the file.
    pub file_key: String,
    /// Index into the checkpoint's files.
    file: usize,
    /// Stored element type.
    pub dtype: Dtype,
    /// Shape as stored.
    pub shape: Vec<usize>,
    /// Byte range within the file (header included in the offset).
    range: (usize, usize),
}

struct Shard {
    path: PathBuf,
    map: Mmap,
}

/// An opened checkpoint folder.
pub struct Checkpoint {
    dir: PathBuf,
    shards: Vec<Shard>,
    tensors: BTreeMap<String, TensorEntry>,
}

/// The canonical (in-memory) name of a key in any supported layout, or `None`
/// when the key belongs to none of them.
pub fn canonical_name(key: &str) -> Option<String> {
    if key.starts_with("model.vision_tower.")
        || key.starts_with("model.multi_modal_projector.")
        || key.starts_with("model.language_model.")
        || key == "lm_head.weight"
    {
        return Some(key.to_string());
    }
    if let Some(rest) = key.strip_prefix("vision_tower.") {
        // Hub checkpoints nest the CLIP transformer under vision_model.; v5 does not.
        let rest = rest.strip_prefix("vision_model.").unwrap_or(rest);
        return Some(format!("model.vision_tower.{rest}"));
    }
    if let Some(rest) = key.strip_prefix("multi_modal_projector.") {
        return Some(format!("model.multi_modal_projector.{rest}"));
    }
    if let Some(rest) = key.strip_prefix("language_model.model.") {
        return Some(format!("model.language_model.{rest}"));
    }
    if key == "language_model.lm_head.weight" {
        return Some("lm_head.weight".into());
    }
    None
}

fn io_err(path: &Path, e: impl std::fmt::Display, fix: &str) -> Error {
    Error::Io {
        path: path.display().to_string(),
        message: format!("{e}{fix}"),
    }
}

/// The dtypes [`Checkpoint::read_into`] converts.
fn supported(d: Dtype) -> bool {
    matches!(d, Dtype::F32 | Dtype::F16 | Dtype::BF16)
}

/// Explains a header that safetensors refused, naming an unknown dtype if that is
/// the cause (the crate only reports a serde error then).
fn header_error(path: &Path, map: &[u8], e: SafeTensorError) -> Error {
    let known = [
        "BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "I16",
        "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64",
    ];
    if let SafeTensorError::InvalidHeaderDeserialization(_) = e {
        let n = map
            .get(..8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
            .unwrap_or(0);
        let header = map
            .get(8..8usize.saturating_add(n))
            .and_then(|h| serde_json::from_slice::<serde_json::Value>(h).ok());
        if let Some(serde_json::Value::Object(h)) = header {
            for (name, info) in &h {
                if let Some(d) = info.get("dtype").and_then(|d| d.as_str()) {
                    if !known.contains(&d) {
                        return Error::Format(format!(
                            "{}: tensor {name} has dtype {d:?}, which safetensors does not know; \
                             save the checkpoint in float16, bfloat16 or float32",
                            path.display()
                        ));
                    }
                }
            }
        }
    }
    let hint = match e {
        SafeTensorError::MetadataIncompleteBuffer | SafeTensorError::InvalidHeaderLength => {
            "; the file is truncated or corrupt: download it again"
        }
        _ => "; the file is not a valid safetensors file: download or save it again",
    };
    Error::Format(format!("{}: {e:?}{hint}", path.display()))
}

impl Checkpoint {
    /// Opens `dir/model.safetensors`, or every shard named by
    /// `dir/model.safetensors.index.json`, and indexes their tensors under their
    /// canonical names. Keys of no known layout are an error.
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let files: Vec<PathBuf> = if index.is_file() {
            let text = std::fs::read_to_string(&index).map_err(|e| io_err(&index, e, ""))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::Format(format!("{}: not valid JSON: {e}", index.display())))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| {
                    Error::Format(format!(
                        "{}: no \"weight_map\" object; a shard index maps tensor names to files",
                        index.display()
                    ))
                })?;
            let mut names: Vec<String> = Vec::new();
            for (k, f) in map {
                let f = f.as_str().ok_or_else(|| {
                    Error::Format(format!(
                        "{}: weight_map[{k:?}] is not a file name",
                        index.display()
                    ))
                })?;
                if Path::new(f).components().count() != 1 {
                    return Err(Error::Format(format!(
                        "{}: shard {f:?} is not a plain file name in the folder",
                        index.display()
                    )));
                }
                if !names.iter().any(|n| n == f) {
                    names.push(f.to_string());
                }
            }
            names.sort();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else if single.is_file() {
            vec![single]
        } else {
            return Err(Error::Io {
                path: dir.display().to_string(),
                message: "neither model.safetensors nor model.safetensors.index.json is here; \
                          point at the folder of a transformers LLaVA checkpoint (PyTorch .bin \
                          checkpoints must be converted to safetensors first)"
                    .into(),
            });
        };

        let mut shards = Vec::with_capacity(files.len());
        let mut tensors = BTreeMap::new();
        for (fi, path) in files.iter().enumerate() {
            let file = File::open(path).map_err(|e| {
                io_err(
                    path,
                    e,
                    "; a shard listed in the index is missing: download it again",
                )
            })?;
            // SAFETY: the file is opened read-only and not modified by this process;
            // a checkpoint changed underneath a running load is outside the contract.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| io_err(path, e, ""))?;
            let (n, meta) =
                SafeTensors::read_metadata(&map).map_err(|e| header_error(path, &map, e))?;
            let base = 8 + n;
            for (key, info) in meta.tensors() {
                let name = canonical_name(&key).ok_or_else(|| {
                    Error::Format(format!(
                        "{}: tensor {key:?} belongs to no LLaVA key layout this crate reads \
                         (vision_tower.*, multi_modal_projector.*, language_model.*, model.*)",
                        path.display()
                    ))
                })?;
                let entry = TensorEntry {
                    file_key: key.clone(),
                    file: fi,
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    range: (base + info.data_offsets.0, base + info.data_offsets.1),
                };
                if let Some(prev) = tensors.insert(name.clone(), entry) {
                    return Err(Error::Format(format!(
                        "{}: tensor {name} appears twice ({:?} in {} and {key:?} here)",
                        path.display(),
                        prev.file_key,
                        files[prev.file].display()
                    )));
                }
            }
            shards.push(Shard {
                path: path.clone(),
                map,
            });
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            shards,
            tensors,
        })
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every tensor by canonical name.
    pub fn tensors(&self) -> &BTreeMap<String, TensorEntry> {
        &self.tensors
    }

    /// The file that holds tensor `name`.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.tensors
            .get(name)
            .map(|t| self.shards[t.file].path.as_path())
    }

    /// Converts tensor `name` into `out` (row-major f32), checking that its stored
    /// shape equals `shape`. Errors name the tensor, its file and both shapes.
    pub fn read_into(&self, name: &str, shape: &[usize], out: &mut [f32]) -> Result<()> {
        let t = self.tensors.get(name).ok_or_else(|| {
            Error::Format(format!(
                "{}: tensor {name} is missing from the checkpoint (looked for it under every \
                 known key layout); the folder is incomplete or not a LLaVA-1.5 model",
                self.dir.display()
            ))
        })?;
        let path = &self.shards[t.file].path;
        if t.shape != shape {
            return Err(Error::Format(format!(
                "{}: tensor {} has shape {:?}, but config.json implies {shape:?}; the config \
                 does not belong to these weights",
                path.display(),
                t.file_key,
                t.shape
            )));
        }
        if !supported(t.dtype) {
            return Err(Error::Format(format!(
                "{}: tensor {} is stored as {:?}; only F32, F16 and BF16 are read: save the \
                 model in one of them",
                path.display(),
                t.file_key,
                t.dtype
            )));
        }
        let n: usize = shape.iter().product();
        if out.len() != n {
            return Err(Error::Internal(format!(
                "read_into({name}): buffer of {} values for shape {shape:?}",
                out.len()
            )));
        }
        let map = &self.shards[t.file].map;
        let bytes = &map[t.range.0..t.range.1];
        convert(t.dtype, bytes, out)
            .ok_or_else(|| Error::Internal(format!("{name}: dtype passed supported()")))?;
        let _ = self.release(t);
        Ok(())
    }

    /// [`Self::read_into`] into a new vector.
    pub fn read(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let n = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| Error::Shape(format!("{name}: shape {shape:?} overflows")))?;
        let mut v = vec![0.0; n];
        self.read_into(name, shape, &mut v)?;
        Ok(v)
    }

    /// Drops a read tensor's pages from the mapping, so file pages do not pile up
    /// in the process's resident set on top of the converted copy.
    fn release(&self, t: &TensorEntry) -> std::io::Result<()> {
        let page = 4096;
        let start = t.range.0.div_ceil(page) * page;
        let end = (t.range.1 / page) * page;
        if end <= start {
            return Ok(());
        }
        // SAFETY: the mapping is private and read-only, and no reference into the
        // range outlives this call; later reads fault the pages back in from the file.
        unsafe {
            self.shards[t.file].map.unchecked_advise_range(
                UncheckedAdvice::DontNeed,
                start,
                end - start,
            )
        }
    }

    /// Canonical names of the tensors that no name in `used` refers to.
    pub fn unused<'a>(&'a self, used: &HashSet<String>) -> Vec<&'a str> {
        self.tensors
            .keys()
            .filter(|k| !used.contains(*k))
            .map(|k| k.as_str())
            .collect()
    }
}

/// Little-endian F32/F16/BF16 bytes to f32, exact for all three; `None` for any
/// other dtype. The one decoder of the HF checkpoints and PEFT adapters.
pub(crate) fn convert(dtype: Dtype, bytes: &[u8], out: &mut [f32]) -> Option<()> {
    match dtype {
        Dtype::F32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        Dtype::BF16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
            }
        }
        Dtype::F16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16_to_f32(u16::from_le_bytes([b[0], b[1]]));
            }
        }
        _ => return None,
    }
    Some(())
}

/// [`convert`] of a whole safetensors view into a new vector.
pub(crate) fn view_to_f32(v: &safetensors::tensor::TensorView<'_>) -> Option<Vec<f32>> {
    let mut out = vec![0.0; v.shape().iter().product()];
    convert(v.dtype(), v.data(), &mut out).map(|()| out)
}

/// IEEE binary16 to binary32, exact (subnormals, infinities and NaN payloads kept).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, m) => {
            // Subnormal: value m·2⁻²⁴; normalise into binary32.
            let shift = m.leading_zeros() - 21; // bring the top set bit to position 10
            let m = (m << shift) & 0x3ff;
            sign | ((127 - 15 + 1 - shift) << 23) | (m << 13)
        }
        (0x1f, m) => sign | 0x7f80_0000 | (m << 13),
        (e, m) => sign | ((e + 127 - 15) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}
