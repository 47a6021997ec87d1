//! A transformers LLaVA folder with a run's training merged in: what
//! `dualpriv export --merged OUT` writes.
//!
//! Every LoRA target's weight becomes W' = W + (α/r)·B·A (PEFT's `merge_and_unload`
//! rule, `peft/tuners/lora/layer.py`), a tensor trained in full (a fine-tuned
//! projector, say) is replaced by its trained value, and **every other tensor is
//! copied byte for byte**: same files (one `model.safetensors` or the same shards),
//! same safetensors header (keys, key layout, dtypes, order, metadata), including
//! the tensors the crate never reads (the vision layers after −2,
//! `post_layernorm`), so `LlavaForConditionalGeneration.from_pretrained(OUT)` finds
//! no missing or unexpected keys. The model's JSON and text files (config,
//! tokenizer, processor, chat template, generation config) and `tokenizer.model`
//! are copied; anything else in the folder (PyTorch `.bin` weights, a README) is not.
//!
//! **Precision.** Merged and replaced tensors are written in the base tensor's
//! dtype: an F32 base keeps W + (α/r)·B·A as computed in f32; an F16 or BF16 base
//! rounds it to nearest-even in that format, so the merged model's outputs differ
//! from base + adapter by that rounding (for BF16 about 2⁻⁹ of each weight, as in
//! `merge_and_unload` on a bf16 model).
//!
//! **Memory.** Tensors are streamed: a copied tensor goes from the mapped base file
//! straight to the output, a merged one holds one f32 copy of W while it is
//! formed; the model is never held whole, let alone twice.
//!
//! **Privacy.** The merged weights are a function of the public base model and the
//! released adapter (or trained tensors) only: post-processing, covered by the
//! run's ε, and nothing else about the training data is written.
use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use memmap2::{Mmap, UncheckedAdvice};
use safetensors::tensor::{Dtype, SafeTensors};

use super::checkpoint::{canonical_name, convert};
use super::names::crate_name;
use crate::model::config::{FullGroup, TrainMode};
use crate::{Error, Result};

/// What [`write_merged`] wrote.
#[derive(Clone, Debug, Default)]
pub struct MergeReport {
    /// Weights that received W + (α/r)·B·A.
    pub merged: usize,
    /// Tensors replaced by their fully trained values.
    pub replaced: usize,
    /// Tensors copied unchanged.
    pub copied: usize,
    /// The safetensors files written, in the base's names.
    pub weight_files: Vec<PathBuf>,
    /// Other files copied (config, tokenizer, processor, ...).
    pub other_files: Vec<PathBuf>,
    /// Dtypes of the merged or replaced tensors, for the log line about rounding.
    pub dtypes: Vec<String>,
}

/// Whether crate tensor `name` belongs to full fine-tuning group `g`.
fn in_group(name: &str, g: FullGroup) -> bool {
    let layer_module = |prefixes: &[&str]| {
        name.strip_prefix("llm.layers.")
            .and_then(|r| r.split_once('.'))
            .is_some_and(|(_, m)| prefixes.iter().any(|p| m.starts_with(p)))
    };
    match g {
        FullGroup::Projector => name.starts_with("projector."),
        FullGroup::Attention => layer_module(&[
            "self_attn.q_proj.",
            "self_attn.k_proj.",
            "self_attn.v_proj.",
            "self_attn.o_proj.",
        ]),
        FullGroup::Mlp => layer_module(&["mlp.gate_proj.", "mlp.up_proj.", "mlp.down_proj."]),
        FullGroup::LmHead => name == "llm.lm_head.weight",
        FullGroup::Embeddings => name == "llm.embed_tokens.weight",
    }
}

/// One tensor of a safetensors file.
struct Entry {
    key: String,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte range in the file (header included in the offsets).
    range: (usize, usize),
}

/// The tensors of a mapped safetensors file and the header's length in bytes
/// (8 + its JSON), checked by the safetensors crate (offsets within the file,
/// contiguous, matching each shape and dtype).
fn entries(map: &[u8], path: &Path, what: &str) -> Result<(usize, Vec<Entry>)> {
    let (n, meta) = SafeTensors::read_metadata(map)
        .map_err(|e| Error::Format(format!("{}: {e:?}; {what} is corrupt", path.display())))?;
    let data0 = 8 + n;
    let v = meta
        .tensors()
        .into_iter()
        .map(|(key, i)| Entry {
            key,
            dtype: i.dtype,
            shape: i.shape.clone(),
            range: (data0 + i.data_offsets.0, data0 + i.data_offsets.1),
        })
        .collect();
    Ok((data0, v))
}

/// The run's trained tensors, read from its (f32, crate-named) checkpoint.
struct Trained {
    path: PathBuf,
    map: Mmap,
    /// `(name, shape, byte range)` of every tensor.
    index: BTreeMap<String, Entry>,
}

impl Trained {
    fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: read-only mapping of a run checkpoint this process does not modify.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (_, list) = entries(&map, path, "the run's checkpoint")?;
        let index = list.into_iter().map(|e| (e.key.clone(), e)).collect();
        Ok(Self {
            path: path.to_path_buf(),
            map,
            index,
        })
    }

    /// Tensor `name` as f32 with its shape.
    fn read(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let Entry {
            shape,
            dtype,
            range: (a, b),
            ..
        } = self.index.get(name).ok_or_else(|| {
            Error::Format(format!(
                "{}: tensor {name} is missing from the run's checkpoint",
                self.path.display()
            ))
        })?;
        let mut out = vec![0.0; shape.iter().product()];
        let bytes = self.map.get(*a..*b).ok_or_else(|| {
            Error::Format(format!(
                "{}: tensor {name} lies outside the file; the checkpoint is truncated",
                self.path.display()
            ))
        })?;
        if bytes.len() != out.len() * dtype.bitsize() / 8 {
            return Err(Error::Format(format!(
                "{}: tensor {name} has {} bytes for shape {shape:?}",
                self.path.display(),
                bytes.len()
            )));
        }
        convert(*dtype, bytes, &mut out).ok_or_else(|| {
            Error::Format(format!(
                "{}: tensor {name} is {dtype:?}; dualpriv checkpoints hold F32",
                self.path.display()
            ))
        })?;
        Ok((shape.clone(), out))
    }
}

/// f32 to IEEE binary16, rounding to nearest-even (overflow to ±∞, NaN kept NaN).
pub fn f32_to_f16(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exp = ((bits >> 23) & 0xff) as i32;
    let man = bits & 0x7f_ffff;
    if exp == 0xff {
        return sign | 0x7c00 | if man != 0 { 0x200 } else { 0 };
    }
    // Unbiased exponent; f16 normals have e in [-14, 15].
    let e = exp - 127;
    if e > 15 {
        return sign | 0x7c00;
    }
    // The significand with its implicit bit (none for f32 subnormals, all of which
    // are far below f16's smallest subnormal and round to zero below).
    let full = if exp == 0 { man } else { man | 0x80_0000 };
    // Bits to drop: 13 for a normal result, more for a subnormal one.
    let shift: u32 = if e >= -14 { 13 } else { (13 - 14 - e) as u32 };
    if shift > 24 {
        return sign;
    }
    let kept = full >> shift;
    let rest = full & ((1u32 << shift) - 1);
    let half = 1u32 << (shift - 1);
    let round_up = rest > half || (rest == half && kept & 1 == 1);
    let kept = kept + u32::from(round_up);
    let out = if e >= -14 {
        // kept holds the implicit bit at 10; a carry into bit 11 bumps the exponent
        // (and may overflow to ∞, which the encoding gives for free).
        (((e + 15) as u32) << 10) + (kept - 0x400)
    } else {
        // Subnormal (a carry into bit 10 makes it the smallest normal, as encoded).
        kept
    };
    sign | out as u16
}

/// f32 to bfloat16, rounding to nearest-even (NaN kept NaN).
pub fn f32_to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) as u16) | 0x40;
    }
    let round = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(round) >> 16) as u16
}

/// `values` in `dtype`'s little-endian bytes.
fn encode(dtype: Dtype, values: &[f32], name: &str, file: &Path) -> Result<Vec<u8>> {
    Ok(match dtype {
        Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Dtype::BF16 => values
            .iter()
            .flat_map(|&v| f32_to_bf16(v).to_le_bytes())
            .collect(),
        Dtype::F16 => values
            .iter()
            .flat_map(|&v| f32_to_f16(v).to_le_bytes())
            .collect(),
        d => {
            return Err(Error::Format(format!(
                "{}: tensor {name} is stored as {d:?}; only F32, F16 and BF16 weights can be \
                 merged: save the base model in one of them",
                file.display()
            )))
        }
    })
}

/// W + scale·B·A for W `[p, d]`, B `[p, r]`, A `[r, d]` (f32, row-major), in place.
fn add_low_rank(w: &mut [f32], b: &[f32], a: &[f32], p: usize, r: usize, d: usize, scale: f32) {
    // SAFETY: the slices hold p·d, p·r and r·d values (checked by the caller), and
    // the strides describe row-major matrices of those shapes.
    unsafe {
        matrixmultiply::sgemm(
            p,
            r,
            d,
            scale,
            b.as_ptr(),
            r as isize,
            1,
            a.as_ptr(),
            d as isize,
            1,
            1.0,
            w.as_mut_ptr(),
            d as isize,
            1,
        );
    }
}

/// The weight files of a base folder: the shards its index names, or
/// `model.safetensors`.
fn weight_files(base: &Path) -> Result<Vec<String>> {
    let index = base.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::Format(format!("{}: not valid JSON: {e}", index.display())))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| {
                Error::Format(format!("{}: no \"weight_map\" object", index.display()))
            })?;
        let mut names: Vec<String> = Vec::new();
        for f in map.values() {
            let f = f
                .as_str()
                .filter(|f| Path::new(f).components().count() == 1);
            let f = f.ok_or_else(|| {
                Error::Format(format!(
                    "{}: a weight_map entry is not a plain file name in the folder",
                    index.display()
                ))
            })?;
            if !names.iter().any(|n| n == f) {
                names.push(f.to_string());
            }
        }
        names.sort();
        Ok(names)
    } else if base.join("model.safetensors").is_file() {
        Ok(vec!["model.safetensors".into()])
    } else {
        Err(Error::Io {
            path: base.display().to_string(),
            message: "neither model.safetensors nor model.safetensors.index.json is here; the \
                      run's base model folder has changed since training"
                .into(),
        })
    }
}

/// Whether a non-weight file of the base folder belongs in the merged folder.
fn copied_file(name: &str) -> bool {
    let ext = Path::new(name).extension().and_then(|e| e.to_str());
    matches!(ext, Some("json" | "txt" | "jinja" | "model")) && !name.ends_with(".safetensors")
}

/// Refuses an existing `out` that is not an empty folder, then creates it.
fn prepare_out(out: &Path) -> Result<()> {
    match std::fs::read_dir(out) {
        Ok(mut it) => {
            if it.next().is_some() {
                return Err(Error::Io {
                    path: out.display().to_string(),
                    message: "the folder is not empty; give a new or empty folder for the merged \
                              model (nothing in it was changed)"
                        .into(),
                });
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))
        }
        Err(e) => Err(Error::Io {
            path: out.display().to_string(),
            message: format!("{e}; give a new or empty folder for the merged model"),
        }),
    }
}

/// Drops `range`'s pages from `map` once they are written (as the loader does), so
/// a 7B merge does not pile the base's pages into the resident set.
fn release(map: &Mmap, (a, b): (usize, usize)) {
    let page = 4096;
    let (start, end) = (a.div_ceil(page) * page, (b / page) * page);
    if end > start {
        // SAFETY: private read-only mapping; no reference into the range is alive,
        // and later reads fault the pages back in from the file.
        let _ =
            unsafe { map.unchecked_advise_range(UncheckedAdvice::DontNeed, start, end - start) };
    }
}

/// Writes `base` (a transformers LLaVA folder) with the training in `trained` (a run
/// checkpoint of a model in `mode`, crate-named f32 tensors) merged in, to `out`,
/// which must not exist or be empty. See the module docs for what is merged,
/// copied and rounded.
pub fn write_merged(
    base: &Path,
    trained: &Path,
    mode: &TrainMode,
    out: &Path,
) -> Result<MergeReport> {
    let files = weight_files(base)?;
    let run = Trained::open(trained)?;
    let (scale, groups): (Option<f32>, Vec<FullGroup>) = match mode {
        TrainMode::Lora { rank, alpha, .. } => (Some(*alpha / *rank as f32), vec![]),
        TrainMode::Full { groups } => (None, groups.clone()),
    };
    prepare_out(out)?;
    let mut rep = MergeReport::default();
    let mut lora_used: HashSet<String> = HashSet::new();
    for fname in &files {
        let src = base.join(fname);
        let file = File::open(&src).map_err(|e| Error::io(&src, e))?;
        // SAFETY: read-only mapping of the base model, which this process does not modify.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&src, e))?;
        let (data0, mut tensors) = entries(&map, &src, "the base model file")?;
        tensors.sort_by_key(|t| t.range);
        let dst = out.join(fname);
        let f = File::create(&dst).map_err(|e| Error::io(&dst, e))?;
        let mut w = BufWriter::with_capacity(1 << 22, f);
        let werr = |e: std::io::Error| Error::io(&dst, e);
        // The header verbatim: the output's tensors keep their dtype, shape and
        // offsets, so the header describes it exactly.
        w.write_all(&map[..data0]).map_err(werr)?;
        let mut cursor = data0;
        for Entry {
            key,
            dtype,
            shape,
            range,
        } in &tensors
        {
            if range.0 > cursor {
                w.write_all(&map[cursor..range.0]).map_err(werr)?;
            }
            let name = canonical_name(key).and_then(|c| crate_name(&c));
            let stem = name.as_deref().and_then(|n| n.strip_suffix(".weight"));
            let lora = stem.map(|s| (format!("{s}.lora_A.weight"), format!("{s}.lora_B.weight")));
            let numel: usize = shape.iter().product();
            let new_values: Option<Vec<f32>> = match (&lora, scale) {
                (Some((an, bn)), Some(scale)) if run.index.contains_key(an) => {
                    let (ash, a) = run.read(an)?;
                    let (bsh, b) = run.read(bn)?;
                    let (p, d) = match shape.as_slice() {
                        [p, d] => (*p, *d),
                        _ => (0, 0),
                    };
                    let r = ash.first().copied().unwrap_or(0);
                    if ash != [r, d] || bsh != [p, r] || p * d == 0 {
                        return Err(Error::Format(format!(
                            "{}: {key} is {shape:?} but the run's LoRA A is {ash:?} and B \
                             {bsh:?}; the run was trained on another base model",
                            src.display()
                        )));
                    }
                    let mut wv = vec![0.0; numel];
                    convert(*dtype, &map[range.0..range.1], &mut wv).ok_or_else(|| {
                        Error::Format(format!(
                            "{}: {key} is stored as {dtype:?}; only F32, F16 and BF16 weights \
                             can be merged",
                            src.display()
                        ))
                    })?;
                    add_low_rank(&mut wv, &b, &a, p, r, d, scale);
                    lora_used.insert(an.clone());
                    rep.merged += 1;
                    Some(wv)
                }
                _ => match name.as_deref() {
                    Some(n) if groups.iter().any(|&g| in_group(n, g)) => {
                        let (tsh, t) = run.read(n)?;
                        if tsh.iter().product::<usize>() != numel {
                            return Err(Error::Format(format!(
                                "{}: {key} is {shape:?} but the run's {n} is {tsh:?}; the run \
                                 was trained on another base model",
                                src.display()
                            )));
                        }
                        rep.replaced += 1;
                        Some(t)
                    }
                    _ => None,
                },
            };
            match new_values {
                Some(v) => {
                    let bytes = encode(*dtype, &v, key, &src)?;
                    w.write_all(&bytes).map_err(werr)?;
                    let d = format!("{dtype:?}");
                    if !rep.dtypes.contains(&d) {
                        rep.dtypes.push(d);
                    }
                }
                None => {
                    w.write_all(&map[range.0..range.1]).map_err(werr)?;
                    rep.copied += 1;
                }
            }
            release(&map, *range);
            cursor = cursor.max(range.1);
        }
        if map.len() > cursor {
            w.write_all(&map[cursor..]).map_err(werr)?;
        }
        w.flush().map_err(werr)?;
        w.into_inner()
            .map_err(|e| Error::io(&dst, e.error()))?
            .sync_all()
            .map_err(werr)?;
        rep.weight_files.push(dst);
    }
    // Every trained tensor must have landed somewhere.
    if let Some(missing) = run
        .index
        .keys()
        .find(|k| k.ends_with(".lora_A.weight") && !lora_used.contains(*k))
    {
        return Err(Error::Format(format!(
            "{}: the run's {missing} has no base weight in {}; the run was trained on another \
             base model (the merged folder {} is incomplete: delete it)",
            trained.display(),
            base.display(),
            out.display()
        )));
    }
    let mut others: Vec<PathBuf> = Vec::new();
    for entry in std::fs::read_dir(base).map_err(|e| Error::io(base, e))? {
        let entry = entry.map_err(|e| Error::io(base, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_file =
            entry.file_type().map(|t| t.is_file()).unwrap_or(false) || entry.path().is_file();
        if is_file && copied_file(&name) && !files.contains(&name) {
            others.push(entry.path());
        }
    }
    others.sort();
    for p in others {
        let dst = out.join(p.file_name().unwrap_or_default());
        std::fs::copy(&p, &dst).map_err(|e| Error::io(&p, e))?;
        rep.other_files.push(dst);
    }
    Ok(rep)
}
