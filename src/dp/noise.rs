//! Regenerable Gaussian noise: Philox4x32-10 (Salmon et al., SC'11) keyed by the
//! seed, with counter (group, tensor id, step), and Box–Muller on top.
//!
//! Element i of tensor `tensor_id` at step `step` gets the normal
//! `noise(i) = BoxMuller(Philox(ctr = {g, g >> 32, tensor_id, step}, key = seed))[i mod 4]`
//! with g = ⌊i/4⌋. Any kernel can regenerate noise(i) from its index alone, so the
//! DP noise tensor is never stored. `kernels/philox.cuh` is the CUDA twin.

use rayon::prelude::*;

/// Philox multiplier for word 0.
pub const M0: u32 = 0xD251_1F53;
/// Philox multiplier for word 2.
pub const M1: u32 = 0xCD9E_8D57;
/// Key increment (golden ratio) for key word 0.
pub const W0: u32 = 0x9E37_79B9;
/// Key increment (√3 − 1) for key word 1.
pub const W1: u32 = 0xBB67_AE85;

/// Ten rounds of Philox4x32 on counter `c` with key `k`.
pub fn philox4x32_10(mut c: [u32; 4], mut k: [u32; 2]) -> [u32; 4] {
    for _ in 0..10 {
        let p0 = u64::from(M0) * u64::from(c[0]);
        let p1 = u64::from(M1) * u64::from(c[2]);
        let (hi0, lo0) = ((p0 >> 32) as u32, p0 as u32);
        let (hi1, lo1) = ((p1 >> 32) as u32, p1 as u32);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
        k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
    }
    c
}

/// Maps 32 random bits to a uniform in (0, 1]; never 0, so the log is finite.
fn uniform_open0(x: u32) -> f64 {
    (f64::from(x) + 1.0) * (1.0 / 4_294_967_296.0)
}

/// Identifies one noise stream: a seed, a tensor and a training step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NoiseKey {
    /// The run's secret seed.
    pub seed: u64,
    /// A stable id of the tensor the noise is added to.
    pub tensor_id: u32,
    /// The logical training step.
    pub step: u32,
}

impl NoiseKey {
    /// The four standard normals of elements 4g .. 4g+3.
    ///
    /// Box–Muller runs in f64, as on the GPU, so the rounded f32 normals agree
    /// bit for bit except when CUDA's and libm's f64 log/sin/cos (within 1–2 ulp)
    /// straddle an f32 rounding boundary: about 1e-9 of values, off by one ulp.
    pub fn normal4(&self, g: u64) -> [f32; 4] {
        let r = philox4x32_10(
            [g as u32, (g >> 32) as u32, self.tensor_id, self.step],
            [self.seed as u32, (self.seed >> 32) as u32],
        );
        let two_pi = std::f64::consts::TAU;
        let r0 = (-2.0 * uniform_open0(r[0]).ln()).sqrt();
        let r1 = (-2.0 * uniform_open0(r[2]).ln()).sqrt();
        let (s0, c0) = (two_pi * uniform_open0(r[1])).sin_cos();
        let (s1, c1) = (two_pi * uniform_open0(r[3])).sin_cos();
        [
            (r0 * c0) as f32,
            (r0 * s0) as f32,
            (r1 * c1) as f32,
            (r1 * s1) as f32,
        ]
    }

    /// The standard normal noise(i).
    pub fn normal(&self, i: u64) -> f32 {
        self.normal4(i >> 2)[(i & 3) as usize]
    }

    /// Fills `out` with noise(offset .. offset + out.len()), one Philox call per
    /// group of four, in parallel over 64 Ki-element blocks (counter-based, so the
    /// split does not change the values).
    pub fn fill(&self, offset: u64, out: &mut [f32]) {
        const BLOCK: usize = 1 << 16;
        if out.len() <= BLOCK {
            return self.fill_serial(offset, out);
        }
        out.par_chunks_mut(BLOCK)
            .enumerate()
            .for_each(|(b, chunk)| self.fill_serial(offset + (b * BLOCK) as u64, chunk));
    }

    fn fill_serial(&self, offset: u64, out: &mut [f32]) {
        let mut i = 0usize;
        while i < out.len() {
            let e = offset + i as u64;
            let z = self.normal4(e >> 2);
            let lane = (e & 3) as usize;
            let take = (4 - lane).min(out.len() - i);
            out[i..i + take].copy_from_slice(&z[lane..lane + take]);
            i += take;
        }
    }
}

// TEMPORARY (replaced by the ChaCha20 branch): the key types the driver codes against.
/// Which counter-based generator produces the noise.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RngKind {
    /// ChaCha20.
    #[default]
    Chacha20,
    /// Philox.
    Philox,
}
/// A 256-bit key of one noise domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StreamKey {
    /// Generator.
    pub rng: RngKind,
    /// Key words.
    pub key: [u32; 8],
}
impl StreamKey {
    /// TEMPORARY shim until the ChaCha20 branch lands.
    pub fn seed64(&self) -> u64 {
        u64::from(self.key[0]) | u64::from(self.key[1]) << 32
    }
}
impl std::str::FromStr for RngKind {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s {
            "chacha20" => Ok(Self::Chacha20),
            "philox" => Ok(Self::Philox),
            _ => Err(crate::Error::Config(format!("rng {s:?}: expected chacha20 or philox"))),
        }
    }
}
