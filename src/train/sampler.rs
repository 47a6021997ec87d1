//! Which examples form each logical batch.
//!
//! DP-SGD's accounting assumes Poisson sampling: every example joins step s's batch
//! independently with probability q = B_expected / N, so batch sizes vary and may be
//! zero. Draw s comes from ChaCha20 keyed by the run's secret key ([`RunKey`],
//! domain [`Domain::Sampling`]) on stream s: without the key nobody can tell which
//! examples a batch holds, which is what amplification by subsampling needs. Each
//! inclusion test compares a 53-bit uniform with q.
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::dp::key::{Domain, RunKey};
use crate::{Error, Result};

/// How logical batches are drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
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
    key: RunKey,
    rate: f64,
}

impl Sampler {
    /// A sampler over `n` examples with expected batch size `expected`, keyed by `key`.
    pub fn new(n: usize, expected: usize, mode: Sampling, key: &RunKey) -> Result<Self> {
        if n == 0 {
            return Err(Error::Config("the training set is empty".into()));
        }
        if expected == 0 || expected > n {
            return Err(Error::Config(format!(
                "expected batch size {expected} must be at least 1 and at most the training set size"
            )));
        }
        Ok(Self {
            n,
            expected,
            mode,
            key: key.clone(),
            rate: expected as f64 / n as f64,
        })
    }

    /// A Poisson sampler over `n` examples at rate q = `expected` / `public_size`,
    /// checked against the public size only: whether the private N is below the
    /// batch size (or zero) must not decide whether the run starts.
    pub fn with_public(
        n: usize,
        expected: usize,
        mode: Sampling,
        key: &RunKey,
        public_size: usize,
    ) -> Result<Self> {
        if mode == Sampling::Shuffle {
            return Self::new(n, expected, mode, key)?.with_public_size(public_size);
        }
        if expected == 0 {
            return Err(Error::Config(
                "the expected batch size must be at least 1".into(),
            ));
        }
        Self {
            n,
            expected,
            mode,
            key: key.clone(),
            rate: 1.0,
        }
        .with_public_size(public_size)
    }

    /// Poisson rate q = B_expected / `public_size` instead of the private N: under
    /// add/remove adjacency N differs between neighbours, so a q (and the σ
    /// calibrated from it) computed from N would publish it.
    pub fn with_public_size(mut self, public_size: usize) -> Result<Self> {
        if public_size < self.expected {
            return Err(Error::Config(format!(
                "public dataset size {public_size} is below the expected batch size {}",
                self.expected
            )));
        }
        self.rate = self.expected as f64 / public_size as f64;
        Ok(self)
    }

    /// The sampling rate q (Poisson): B_expected / N, or / the public size.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Indices of the examples in draw `draw`'s batch, ascending.
    pub fn batch(&self, draw: u32) -> Vec<usize> {
        match self.mode {
            Sampling::Poisson => {
                let mut rng = self.key.rng(Domain::Sampling, u64::from(draw));
                let q = self.rate();
                // rand's f64 is a 53-bit uniform in [0, 1): P(u < q) = q to 2⁻⁵³.
                (0..self.n).filter(|_| rng.random::<f64>() < q).collect()
            }
            Sampling::Shuffle => {
                let per_epoch = self.n / self.expected;
                let (epoch, k) = (draw as usize / per_epoch, draw as usize % per_epoch);
                let mut rng = self.key.rng(Domain::Sampling, 1 << 40 | epoch as u64);
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
