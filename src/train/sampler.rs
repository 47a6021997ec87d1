//! Which examples form each logical batch.
//!
//! DP-SGD's accounting assumes Poisson sampling: every example joins step s's batch
//! independently with probability q = B_expected / N, so batch sizes vary and may be
//! zero. The randomness of step s comes from its own ChaCha stream, so any step can
//! be re-drawn exactly (resuming needs no sampler state beyond the step number).
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// How logical batches are drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sampling {
    /// Poisson sampling with rate q = B_expected / N: what the accountant assumes.
    Poisson,
    /// Shuffled fixed-size batches, epoch by epoch. The privacy accounting then does
    /// **not** hold (it assumes Poisson sampling); only for comparison runs.
    Shuffle,
}

/// Draws the batch of each step.
#[derive(Clone, Debug)]
pub struct Sampler {
    n: usize,
    expected: usize,
    mode: Sampling,
    seed: u64,
}

impl Sampler {
    /// A sampler over `n` examples with expected batch size `expected`.
    pub fn new(n: usize, expected: usize, mode: Sampling, seed: u64) -> Result<Self> {
        if n == 0 {
            return Err(Error::Config("the training set is empty".into()));
        }
        if expected == 0 || expected > n {
            return Err(Error::Config(format!(
                "expected batch size {expected} must be in 1..={n} (the training set size)"
            )));
        }
        Ok(Self {
            n,
            expected,
            mode,
            seed,
        })
    }

    /// The sampling rate q = B_expected / N.
    pub fn rate(&self) -> f64 {
        self.expected as f64 / self.n as f64
    }

    /// Indices of the examples in step `step`'s batch, ascending.
    pub fn batch(&self, step: u32) -> Vec<usize> {
        match self.mode {
            Sampling::Poisson => {
                let mut rng = ChaCha20Rng::seed_from_u64(self.seed);
                rng.set_stream(u64::from(step));
                let q = self.rate();
                (0..self.n).filter(|_| rng.random::<f64>() < q).collect()
            }
            Sampling::Shuffle => {
                let per_epoch = self.n / self.expected;
                let (epoch, k) = (step as usize / per_epoch, step as usize % per_epoch);
                let mut rng = ChaCha20Rng::seed_from_u64(self.seed);
                rng.set_stream(1 << 40 | epoch as u64);
                let mut perm: Vec<usize> = (0..self.n).collect();
                for i in (1..self.n).rev() {
                    perm.swap(i, rng.random_range(0..=i));
                }
                let mut b = perm[k * self.expected..(k + 1) * self.expected].to_vec();
                b.sort_unstable();
                b
            }
        }
    }
}
