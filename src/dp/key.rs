//! The run's secret key: the one source of every random choice the privacy
//! guarantee depends on.
//!
//! DP-SGD's ε assumes the adversary cannot predict which examples were sampled
//! (amplification by subsampling) nor the noise added to the clipped sums. Both
//! therefore come from one 256-bit key per run, drawn from the operating system's
//! entropy ([`RunKey::from_os`]) and kept in memory only: checkpoints do not store
//! it, and a resumed run draws a fresh one.
//! Each use gets its own sub-key ([`Domain`]), derived by the ChaCha20 stream
//! cipher keyed with the run key (a PRF), so no two mechanisms share a stream.
//!
//! A key expanded from a user-chosen number ([`RunKey::from_insecure_seed`]) is
//! public: anyone can recompute the batches and subtract the noise, so such a run
//! is reported as ε = ∞.
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::dp::noise::{RngKind, StreamKey};
use crate::{Error, Result};

/// What a derived sub-key is for. Distinct domains give independent streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u64)]
pub enum Domain {
    /// Poisson sampling of the logical batches.
    Sampling = 1,
    /// Gaussian noise on the clipped sums (and DPZO's scalar).
    Noise = 2,
    /// DPZO's perturbation directions z.
    Direction = 3,
    /// The heuristic noise on fused visual tokens (non-private runs only).
    Tokens = 4,
}

/// A run's 256-bit secret key, or a public one expanded from `--insecure-seed`.
#[derive(Clone, PartialEq, Eq)]
pub struct RunKey {
    bytes: [u8; 32],
    insecure_seed: Option<u64>,
}

impl std::fmt::Debug for RunKey {
    // Never print key material: logs and panics must not leak it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.insecure_seed {
            Some(s) => write!(f, "RunKey(insecure seed {s})"),
            None => f.write_str("RunKey(<secret>)"),
        }
    }
}

impl RunKey {
    /// A fresh secret key from the operating system's entropy source.
    pub fn from_os() -> Result<Self> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|e| {
            Error::entropy(format!("{e}; a DP run cannot start without a secret key"))
        })?;
        Ok(Self {
            bytes,
            insecure_seed: None,
        })
    }

    /// A public key expanded from `seed`, for tests and `--insecure-seed` runs:
    /// the batches and noise are then reproducible by anyone, so the run is not private.
    pub fn from_insecure_seed(seed: u64) -> Self {
        let mut bytes = [0u8; 32];
        ChaCha20Rng::seed_from_u64(seed).fill_bytes(&mut bytes);
        Self {
            bytes,
            insecure_seed: Some(seed),
        }
    }

    /// A key with these exact bytes (tests that pin a key).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self {
            bytes,
            insecure_seed: None,
        }
    }

    /// Whether the key came from `--insecure-seed` (and the run is therefore not private).
    pub fn is_insecure(&self) -> bool {
        self.insecure_seed.is_some()
    }

    /// The user-chosen seed of an insecure key.
    pub fn insecure_seed(&self) -> Option<u64> {
        self.insecure_seed
    }

    /// The sub-key of `domain`: the first 256 bits of ChaCha20(run key) on stream `domain`.
    pub fn derive(&self, domain: Domain) -> [u8; 32] {
        let mut rng = ChaCha20Rng::from_seed(self.bytes);
        rng.set_stream(domain as u64);
        let mut out = [0u8; 32];
        rng.fill_bytes(&mut out);
        out
    }

    /// The noise stream key of `domain` for generator `rng`.
    pub fn stream(&self, domain: Domain, rng: RngKind) -> StreamKey {
        let b = self.derive(domain);
        let mut key = [0u32; 8];
        for (w, c) in key.iter_mut().zip(b.chunks_exact(4)) {
            *w = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        StreamKey { rng, key }
    }

    /// A ChaCha20 generator for `domain`, on stream `stream` (the sampler's per-step draws).
    pub fn rng(&self, domain: Domain, stream: u64) -> ChaCha20Rng {
        let mut rng = ChaCha20Rng::from_seed(self.derive(domain));
        rng.set_stream(stream);
        rng
    }

    fn to_hex(&self) -> String {
        to_hex(&self.bytes)
    }
}

/// Lower-case hex of bytes.
pub(crate) fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// 32 bytes from exactly 64 hex digits.
pub(crate) fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    let s = s.as_bytes();
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (o, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
        *o = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(out)
}

/// The serialised form in `state.json`.
#[derive(Serialize, Deserialize)]
struct KeyRepr {
    hex: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    insecure_seed: Option<u64>,
}

impl Serialize for RunKey {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        KeyRepr {
            hex: self.to_hex(),
            insecure_seed: self.insecure_seed,
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for RunKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let r = KeyRepr::deserialize(d)?;
        let bytes = parse_hex32(&r.hex)
            .ok_or_else(|| serde::de::Error::custom("the run key must be 64 hex digits"))?;
        Ok(Self {
            bytes,
            insecure_seed: r.insecure_seed,
        })
    }
}
