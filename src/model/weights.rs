//! The tensor store: every weight by name, seeded initialisation, and safetensors
//! checkpoints.
//!
//! Each tensor draws its initial values from its own ChaCha8 stream keyed by
//! (seed, FNV-1a hash of its name), so a tensor's init does not depend on which
//! other tensors exist: a LoRA model and a frozen model built with the same seed
//! share bit-identical base weights.
use std::collections::HashMap;
use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use super::lora::{Linear, LoraAdapter};
use super::TrainableParam;
use crate::backend::Backend;
use crate::{Error, Result};

/// How a tensor is initialised.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Init {
    /// N(0, std²).
    Normal(f64),
    /// U(−bound, bound).
    Uniform(f64),
    /// All ones (norm weights).
    Ones,
    /// All zeros (biases, LoRA B).
    Zeros,
}

/// One named tensor.
pub(crate) struct Tensor<B: Backend> {
    pub name: String,
    pub shape: Vec<usize>,
    pub buf: B::Buf,
}

/// All tensors of a model, in creation order (which fixes trainable ids).
pub(crate) struct Store<B: Backend> {
    pub tensors: Vec<Tensor<B>>,
    pub index: HashMap<String, usize>,
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Values per parallel chunk of a normal init (each chunk seeks its own position
/// in the tensor's stream, so the values do not depend on the chunking).
const INIT_CHUNK: usize = 1 << 16;

/// The initial values of tensor `name` under `seed`.
///
/// Normal inits are generated in parallel chunks: value i consumes exactly four
/// 32-bit words of the tensor's ChaCha8 stream (two u64 draws), so a chunk starting
/// at value s seeks to word 4s and the result is bit-identical to a serial pass
/// (`parallel_init_equals_serial` checks it). That makes the 7B presets' random
/// init take seconds instead of minutes.
pub(crate) fn init_values(name: &str, n: usize, init: Init, seed: u64) -> Vec<f32> {
    let stream = || ChaCha8Rng::seed_from_u64(seed ^ fnv1a(name));
    match init {
        Init::Ones => vec![1.0; n],
        Init::Zeros => vec![0.0; n],
        Init::Uniform(b) => {
            let mut rng = stream();
            (0..n).map(|_| rng.random_range(-b..b) as f32).collect()
        }
        Init::Normal(std) => {
            let mut out = vec![0.0f32; n];
            out.par_chunks_mut(INIT_CHUNK)
                .enumerate()
                .for_each(|(c, chunk)| {
                    let mut rng = stream();
                    rng.set_word_pos(4 * (c * INIT_CHUNK) as u128);
                    normal_fill(&mut rng, std, chunk);
                });
            out
        }
    }
}

/// Box–Muller normals from `rng`; 1 − u keeps the log argument in (0, 1].
fn normal_fill(rng: &mut ChaCha8Rng, std: f64, out: &mut [f32]) {
    for v in out {
        let (u1, u2): (f64, f64) = (rng.random(), rng.random());
        *v = (std * (-2.0 * (1.0 - u1).ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32;
    }
}

impl<B: Backend> Store<B> {
    pub fn new() -> Self {
        Self {
            tensors: Vec::new(),
            index: HashMap::new(),
        }
    }

    /// Adds a zero tensor, returning its index.
    pub fn add_zeros(&mut self, be: &B, name: String, shape: Vec<usize>) -> Result<usize> {
        let buf = be.zeros(shape.iter().product())?;
        Ok(self.push(name, shape, buf))
    }

    fn push(&mut self, name: String, shape: Vec<usize>, buf: B::Buf) -> usize {
        let idx = self.tensors.len();
        self.index.insert(name.clone(), idx);
        self.tensors.push(Tensor { name, shape, buf });
        idx
    }

    /// Adds a tensor initialised from `seed`, returning its index.
    pub fn add(
        &mut self,
        be: &B,
        name: String,
        shape: Vec<usize>,
        init: Init,
        seed: u64,
    ) -> Result<usize> {
        let n: usize = shape.iter().product();
        let buf = be.upload(&init_values(&name, n, init, seed))?;
        Ok(self.push(name, shape, buf))
    }

    pub fn buf(&self, idx: usize) -> &B::Buf {
        &self.tensors[idx].buf
    }

    /// Writes every tensor as f32 to a safetensors file with `meta` in its header.
    pub fn save(&self, be: &B, path: &Path, meta: HashMap<String, String>) -> Result<()> {
        let mut bytes = Vec::with_capacity(self.tensors.len());
        for t in &self.tensors {
            // A one-off copy: freed, not recycled.
            let host = be.download(&t.buf)?.into_vec();
            bytes.push(
                host.iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect::<Vec<u8>>(),
            );
        }
        let views = self
            .tensors
            .iter()
            .zip(&bytes)
            .map(|(t, b)| {
                TensorView::new(Dtype::F32, t.shape.clone(), b)
                    .map(|v| (t.name.clone(), v))
                    .map_err(|e| Error::Internal(format!("checkpoint tensor {}: {e}", t.name)))
            })
            .collect::<Result<Vec<_>>>()?;
        safetensors::serialize_to_file(views, Some(meta), path)
            .map_err(|e| Error::io(path, format!("cannot write checkpoint: {e}")))
    }

    /// Overwrites tensors from the bytes of a safetensors file (`path` is for
    /// messages). A tensor missing from the file is an error unless
    /// `may_be_missing(name)` (it then keeps its fresh init); a tensor in the file
    /// that the model lacks, a wrong shape or a non-f32 dtype is an error naming the
    /// tensor.
    pub fn load(
        &mut self,
        be: &B,
        file: &[u8],
        path: &Path,
        may_be_missing: impl Fn(&str) -> bool,
    ) -> Result<()> {
        let bad = |m: String| Error::Format(format!("checkpoint {}: {m}", path.display()));
        let st = SafeTensors::deserialize(file)
            .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let mut names = st.names();
        names.sort_unstable();
        for name in names {
            if !self.index.contains_key(name) {
                return Err(bad(format!(
                    "tensor '{name}' is not part of this model (different preset or training mode?)"
                )));
            }
        }
        for t in &mut self.tensors {
            let view = match st.tensor(&t.name) {
                Ok(v) => v,
                Err(_) if may_be_missing(&t.name) => continue,
                Err(_) => return Err(bad(format!("missing tensor '{}'", t.name))),
            };
            if view.dtype() != Dtype::F32 {
                return Err(bad(format!(
                    "tensor '{}' is {:?}, expected F32",
                    t.name,
                    view.dtype()
                )));
            }
            if view.shape() != t.shape.as_slice() {
                return Err(bad(format!(
                    "tensor '{}' has shape {:?}, expected {:?}",
                    t.name,
                    view.shape(),
                    t.shape
                )));
            }
            let host: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            t.buf = be.upload(&host)?;
        }
        Ok(())
    }
}

/// Reads a checkpoint file and its header metadata.
pub(crate) fn read_checkpoint(path: &Path) -> Result<(Vec<u8>, HashMap<String, String>)> {
    let file =
        std::fs::read(path).map_err(|e| Error::io(path, format!("cannot read checkpoint: {e}")))?;
    let (_, meta) = SafeTensors::read_metadata(&file).map_err(|e| {
        Error::Format(format!(
            "checkpoint {} is not a safetensors file: {e}",
            path.display()
        ))
    })?;
    let meta = meta.metadata().clone().unwrap_or_default();
    Ok((file, meta))
}

/// Creates tensors and linears, assigning trainable ids in creation order.
pub(crate) struct Builder<'a, B: Backend> {
    pub be: &'a B,
    pub store: Store<B>,
    pub trainable: Vec<TrainableParam>,
    /// Store index of each trainable id.
    pub train_idx: Vec<usize>,
    pub seed: u64,
    /// Non-LoRA tensors are zeros (a checkpoint overwrites them next).
    pub for_load: bool,
}

impl<'a, B: Backend> Builder<'a, B> {
    pub fn new(be: &'a B, seed: u64) -> Self {
        Self {
            be,
            store: Store::new(),
            trainable: Vec::new(),
            train_idx: Vec::new(),
            seed,
            for_load: false,
        }
    }

    /// Adds a tensor; a trainable one gets the next id.
    pub fn tensor(
        &mut self,
        name: String,
        shape: Vec<usize>,
        init: Init,
        train: bool,
    ) -> Result<(usize, Option<u32>)> {
        let len = shape.iter().product();
        let lora = name.contains(".lora_A.") || name.contains(".lora_B.");
        let idx = if self.for_load && !lora {
            self.store.add_zeros(self.be, name.clone(), shape.clone())?
        } else {
            self.store
                .add(self.be, name.clone(), shape.clone(), init, self.seed)?
        };
        if !train {
            return Ok((idx, None));
        }
        let id = self.trainable.len() as u32;
        self.trainable.push(TrainableParam {
            id,
            name,
            len,
            shape,
        });
        self.train_idx.push(idx);
        Ok((idx, Some(id)))
    }

    /// A frozen tensor.
    pub fn frozen(&mut self, name: String, shape: Vec<usize>, init: Init) -> Result<usize> {
        Ok(self.tensor(name, shape, init, false)?.0)
    }

    /// A linear `prefix.weight` (p×d, N(0, 0.02²)) with optional `prefix.bias`
    /// (zeros), trainable in full when `train`, with a LoRA adapter
    /// `prefix.lora_A.weight` (r×d, U(±1/√d)) / `prefix.lora_B.weight` (p×r, zeros)
    /// when `lora = Some((rank, alpha))`.
    pub fn linear(
        &mut self,
        prefix: &str,
        d: usize,
        p: usize,
        bias: bool,
        train: bool,
        lora: Option<(usize, f32)>,
    ) -> Result<Linear> {
        let (w, w_id) = self.tensor(
            format!("{prefix}.weight"),
            vec![p, d],
            Init::Normal(0.02),
            train,
        )?;
        let (bias, bias_id) = if bias {
            let (i, id) = self.tensor(format!("{prefix}.bias"), vec![p], Init::Zeros, train)?;
            (Some(i), id)
        } else {
            (None, None)
        };
        let lora = match lora {
            None => None,
            Some((rank, alpha)) => {
                let bound = 1.0 / (d.max(1) as f64).sqrt();
                let (a, a_id) = self.tensor(
                    format!("{prefix}.lora_A.weight"),
                    vec![rank, d],
                    Init::Uniform(bound),
                    true,
                )?;
                let (b, b_id) = self.tensor(
                    format!("{prefix}.lora_B.weight"),
                    vec![p, rank],
                    Init::Zeros,
                    true,
                )?;
                Some(LoraAdapter {
                    a,
                    b,
                    a_id: a_id.unwrap_or_default(),
                    b_id: b_id.unwrap_or_default(),
                    rank,
                    scale: alpha / rank as f32,
                })
            }
        };
        Ok(Linear {
            w,
            bias,
            d,
            p,
            w_id,
            bias_id,
            lora,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_init_equals_serial() {
        let n = 3 * INIT_CHUNK + 12_345;
        let par = init_values("layer.weight", n, Init::Normal(0.02), 7);
        let mut serial = vec![0.0f32; n];
        normal_fill(
            &mut ChaCha8Rng::seed_from_u64(7 ^ fnv1a("layer.weight")),
            0.02,
            &mut serial,
        );
        assert_eq!(par, serial);
    }
}
