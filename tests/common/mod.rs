//! Helpers shared by the integration tests.
#![allow(dead_code)]
pub mod device;
pub mod fd;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use dualpriv::data::synthetic::Dataset;
use dualpriv::train::checkpoint::ModelSpec;
use dualpriv::train::method::Method;
use dualpriv::train::TrainConfig;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The tiny preset with LoRA r = 4 on every linear.
pub fn tiny_lora() -> ModelSpec {
    tiny_lora_rank(4)
}

/// The tiny preset with LoRA rank `r` (alpha 2r) on every linear.
pub fn tiny_lora_rank(r: usize) -> ModelSpec {
    ModelSpec {
        preset: "tiny".into(),
        lora_rank: Some(r),
        lora_alpha: 2.0 * r as f32,
        full_groups: vec![],
    }
}

/// The tiny preset with full fine-tuning of projector, attention, MLP and LM head.
pub fn tiny_full() -> ModelSpec {
    ModelSpec {
        preset: "tiny".into(),
        lora_rank: None,
        lora_alpha: 0.0,
        full_groups: ["projector", "attention", "mlp", "lm_head"]
            .map(String::from)
            .to_vec(),
    }
}

/// Deterministic RNG for a test.
pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// `n` uniform values in [-1, 1).
pub fn uniform(r: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| r.random_range(-1.0f32..1.0)).collect()
}

/// The test config most tests start from: `method` on `d` with batch 4, one step,
/// σ = 1 when private, and the run's text length. Tests change fields with
/// struct-update syntax.
pub fn train_cfg(method: Method, d: &Dataset) -> TrainConfig {
    TrainConfig::new(method, 4, d.max_text_len())
}

/// A fresh, empty folder for one test: unique per process, test name and call, so
/// tests running in parallel (or twice) never share files. Removed on drop unless
/// the test is panicking, so a failure leaves its files to inspect.
pub struct TmpDir(PathBuf);

impl TmpDir {
    /// The folder.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Keeps the folder after the test (to inspect what it wrote) and returns its
    /// path.
    pub fn keep(mut self) -> PathBuf {
        std::mem::take(&mut self.0)
    }
}

impl std::ops::Deref for TmpDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TmpDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        // An empty path is a folder given up by `keep`.
        if !std::thread::panicking() && !self.0.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// See [`TmpDir`]. `name` should be the test's name.
pub fn tmp_dir(name: &str) -> TmpDir {
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let n = CALLS.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("dualpriv-test-{}-{name}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    TmpDir(dir)
}

/// Largest |a-b| / max(|b|, floor) over two slices: the one relative-error measure
/// of the test suite. With `floor` = [`max_abs`]`(b)` it is the error relative to
/// b's scale.
pub fn rel_err(a: &[f32], b: &[f32], floor: f32) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(floor))
        .fold(0.0, f32::max)
}

/// Largest |v| (0 for an empty slice): the scale an f32 sum's error is judged
/// against.
pub fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0.0f32, |m, x| m.max(x.abs()))
}

/// Relative difference of two f64 values.
pub fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-300)
}

/// `tests/data/hf`, the HF fixture folder: under the crate that built the test, or,
/// for a test binary shipped elsewhere (the GPU bundle of scripts/gpu-test.sh, run
/// from a copy of the repository), under the working directory.
pub fn hf_data() -> PathBuf {
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/hf");
    if built.is_dir() {
        return built;
    }
    let here = PathBuf::from("tests/data/hf");
    assert!(
        here.is_dir(),
        "the HF fixture is neither at {} nor under the working directory; run from the repository root",
        built.display()
    );
    here
}

/// Writes LLaVA conversation records to `dir/name` as JSON and returns the path.
pub fn write_records(dir: &Path, name: &str, recs: &[serde_json::Value]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_string(recs).unwrap()).unwrap();
    path
}

/// Writes the PEFT adapter at `src` into `dir` with its keys in the older PEFT
/// layout (`base_model.model.language_model.model.layers…`); returns `dir`.
pub fn old_layout_adapter(src: &Path, dir: &Path) -> PathBuf {
    use safetensors::tensor::{SafeTensors, TensorView};
    let bytes = std::fs::read(src.join("adapter_model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let old: Vec<(String, TensorView<'_>)> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| {
            let k = k.replace(
                "base_model.model.model.language_model.",
                "base_model.model.language_model.model.",
            );
            (k, v)
        })
        .collect();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(
        src.join("adapter_config.json"),
        dir.join("adapter_config.json"),
    )
    .unwrap();
    std::fs::write(
        dir.join("adapter_model.safetensors"),
        safetensors::serialize(old, None).unwrap(),
    )
    .unwrap();
    dir.to_path_buf()
}

/// The f32 values of tensor `key` of a safetensors reference file.
pub fn st_f32(st: &safetensors::SafeTensors, key: &str) -> Vec<f32> {
    st.tensor(key)
        .unwrap_or_else(|e| panic!("reference tensor {key}: {e}"))
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}
