//! Regenerable Gaussian noise from a counter-based generator: ChaCha20 (the default,
//! cryptographic) or Philox4x32-10 (`--rng philox`, fast but **not** cryptographic),
//! keyed by a 256-bit secret [`StreamKey`], with Box–Muller in f64 on top.
//!
//! Any kernel can regenerate noise(i) from its index alone, so the DP noise tensor
//! is never stored. `kernels/gaussian.cuh` (with `chacha.cuh` and `philox.cuh`) is
//! the CUDA twin, and produces the same bits.
//!
//! # Layout
//!
//! Element i of tensor `tensor_id` at step `step` belongs to group g = ⌊i/8⌋ and is
//! normal i mod 8 of that group. Each group is 16 random 32-bit words w\[0..16\]:
//!
//! - **ChaCha20** (RFC 8439 block function: 20 rounds, output = working state + input
//!   state). State words 0–3 are the constants "expand 32-byte k", 4–11 the key,
//!   12–13 the 64-bit block counter (lo, hi), 14–15 the 64-bit nonce (lo, hi): djb's
//!   original layout, the one `rand_chacha` uses. For group g: counter = g,
//!   nonce = tensor_id | (step << 32).
//! - **Philox4x32-10**: w\[4j..4j+4\] = Philox(counter = {(4g+j) as u32,
//!   ((4g+j) >> 32) as u32, tensor_id, step}, key = (key\[0\], key\[1\])), j = 0..3.
//!   Only 64 of the key's 256 bits are used.
//!
//! The words give eight u64s x_k = w\[2k\] | w\[2k+1\] << 32, four Box–Muller pairs
//! (x_2p, x_2p+1): r = sqrt(−2 ln u) from x_2p, θ = 2π·x_2p+1·2⁻⁶⁴ from x_2p+1,
//! normal 2p = r cos θ and normal 2p+1 = r sin θ, all in f64. Both keep ≥ 32
//! significant bits at every scale, so no released pair falls on a lattice coarse
//! enough to see through the f32 rounding of the released sum (the floating-point
//! attack of Mironov, CCS 2012, here on rings of equal radius and rays of equal
//! angle):
//! - the radius uniform ([`radius_uniform`]) is u = (x_2p + 1)·2⁻⁶⁴ when x_2p ≥ 2³²,
//!   and u = (x_2p·2⁶⁴ + y_2p + 1)·2⁻¹²⁸ below, with y_2p the same word of the
//!   group's *tail block* (the block of counter g | 2⁶³); near u = 1 (the smallest
//!   radii) ln u is taken from v = 1 − u directly ([`radius_sq`]), refined the same
//!   way when v < 2⁻³²;
//! - the angle's offset from the nearest axis ([`angle_parts`]) is refined by the
//!   tail word y_2p+1 when it is within 2³² units of the axis, where one output is
//!   tiny and f32 would store its lattice position exactly.
//!
//! The tail block is needed with probability ~2⁻²⁹ per pair. The largest |z| that can
//! occur is sqrt(2·128·ln 2) ≈ 13.3 (u = 2⁻¹²⁸); 53-bit uniforms stopped at 8.57 and
//! the old 32-bit ones at 6.66.
//!
//! # Bit-identical on every device
//!
//! `ln`, `sin` and `cos` are not taken from a math library (glibc's and CUDA's
//! differ in the last ulp). They are evaluated here with IEEE-754 additions,
//! multiplications, one division and one square root, each correctly rounded, in a
//! fixed order and without fused multiply-adds, and `kernels/gaussian.cuh` performs
//! the very same operations with `__dadd_rn` / `__dmul_rn` / `__ddiv_rn` /
//! `__dsqrt_rn`. So the f64 normals, and every f32 formed from them, are equal bit
//! for bit on the CPU and the GPU. The angle is reduced exactly, in integers: θ =
//! (π/2)(q + f) with q the nearest quarter turn of u_2p+1 and |f| ≤ 1/2 exact, then
//! Taylor polynomials of degree 17/18 on |x| ≤ π/4. `ln` splits u = 2ᵉ·m with
//! m ∈ [√½, √2) and sums the atanh series of s = (m−1)/(m+1) to s²¹. Both are within
//! a few ulp of the true values (checked against libm in `tests/noise.rs`).
//!
//! The noisy sums are formed in f64 too: `(f64(y) + a · z) as f32`, a plain product
//! then a plain sum, each rounded, so the CPU and the GPU round the same way.

use std::fmt;
use std::str::FromStr;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

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

/// "expand 32-byte k", the ChaCha constants (state words 0–3).
pub const CHACHA_CONSTANTS: [u32; 4] = [0x6170_7865, 0x3320_646e, 0x7962_2d32, 0x6b20_6574];

#[inline(always)]
fn quarter_round(s: &mut [u32; 16], a: usize, b: usize, c: usize, d: usize) {
    s[a] = s[a].wrapping_add(s[b]);
    s[d] = (s[d] ^ s[a]).rotate_left(16);
    s[c] = s[c].wrapping_add(s[d]);
    s[b] = (s[b] ^ s[c]).rotate_left(12);
    s[a] = s[a].wrapping_add(s[b]);
    s[d] = (s[d] ^ s[a]).rotate_left(8);
    s[c] = s[c].wrapping_add(s[d]);
    s[b] = (s[b] ^ s[c]).rotate_left(7);
}

/// The ChaCha20 block function (RFC 8439 §2.3: 20 rounds, then the input state is
/// added) in djb's layout: words 12–13 the 64-bit block counter (lo, hi), 14–15 the
/// 64-bit nonce (lo, hi). RFC 8439's 32-bit counter and 96-bit nonce map onto it as
/// counter = word12 | word13 << 32, nonce = word14 | word15 << 32.
pub fn chacha20_block(key: &[u32; 8], counter: u64, nonce: u64) -> [u32; 16] {
    let mut input = [0u32; 16];
    input[..4].copy_from_slice(&CHACHA_CONSTANTS);
    input[4..12].copy_from_slice(key);
    input[12] = counter as u32;
    input[13] = (counter >> 32) as u32;
    input[14] = nonce as u32;
    input[15] = (nonce >> 32) as u32;
    let mut s = input;
    for _ in 0..10 {
        quarter_round(&mut s, 0, 4, 8, 12);
        quarter_round(&mut s, 1, 5, 9, 13);
        quarter_round(&mut s, 2, 6, 10, 14);
        quarter_round(&mut s, 3, 7, 11, 15);
        quarter_round(&mut s, 0, 5, 10, 15);
        quarter_round(&mut s, 1, 6, 11, 12);
        quarter_round(&mut s, 2, 7, 8, 13);
        quarter_round(&mut s, 3, 4, 9, 14);
    }
    for (o, i) in s.iter_mut().zip(input) {
        *o = o.wrapping_add(i);
    }
    s
}

/// Lanes of [`chacha20_blocks`]: blocks computed side by side so the compiler can
/// keep one block per SIMD lane.
const LANES: usize = 4;

/// `LANES` consecutive ChaCha20 blocks (counters `counter ..`), the same words as
/// [`chacha20_block`] on each, computed lane-parallel.
#[allow(clippy::needless_range_loop)] // lane loops index several arrays in step
fn chacha20_blocks(key: &[u32; 8], counter: u64, nonce: u64) -> [[u32; 16]; LANES] {
    let mut input = [[0u32; LANES]; 16];
    for w in 0..4 {
        input[w] = [CHACHA_CONSTANTS[w]; LANES];
    }
    for w in 0..8 {
        input[4 + w] = [key[w]; LANES];
    }
    for l in 0..LANES {
        let c = counter.wrapping_add(l as u64);
        input[12][l] = c as u32;
        input[13][l] = (c >> 32) as u32;
    }
    input[14] = [nonce as u32; LANES];
    input[15] = [(nonce >> 32) as u32; LANES];
    let mut s = input;
    #[inline(always)]
    fn qr(s: &mut [[u32; LANES]; 16], a: usize, b: usize, c: usize, d: usize) {
        for l in 0..LANES {
            s[a][l] = s[a][l].wrapping_add(s[b][l]);
            s[d][l] = (s[d][l] ^ s[a][l]).rotate_left(16);
            s[c][l] = s[c][l].wrapping_add(s[d][l]);
            s[b][l] = (s[b][l] ^ s[c][l]).rotate_left(12);
            s[a][l] = s[a][l].wrapping_add(s[b][l]);
            s[d][l] = (s[d][l] ^ s[a][l]).rotate_left(8);
            s[c][l] = s[c][l].wrapping_add(s[d][l]);
            s[b][l] = (s[b][l] ^ s[c][l]).rotate_left(7);
        }
    }
    for _ in 0..10 {
        qr(&mut s, 0, 4, 8, 12);
        qr(&mut s, 1, 5, 9, 13);
        qr(&mut s, 2, 6, 10, 14);
        qr(&mut s, 3, 7, 11, 15);
        qr(&mut s, 0, 5, 10, 15);
        qr(&mut s, 1, 6, 11, 12);
        qr(&mut s, 2, 7, 8, 13);
        qr(&mut s, 3, 4, 9, 14);
    }
    let mut out = [[0u32; 16]; LANES];
    for w in 0..16 {
        for l in 0..LANES {
            out[l][w] = s[w][l].wrapping_add(input[w][l]);
        }
    }
    out
}

/// Which counter-based generator produces the noise.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RngKind {
    /// ChaCha20 (RFC 8439 block function): cryptographic; the default.
    #[default]
    Chacha20,
    /// Philox4x32-10: fast, statistically good, but NOT cryptographic (its output
    /// reveals its 64-bit key); only for benchmarks and explicit opt-in.
    Philox,
}

impl RngKind {
    /// The lowercase name, as parsed by [`FromStr`].
    pub fn name(self) -> &'static str {
        match self {
            RngKind::Chacha20 => "chacha20",
            RngKind::Philox => "philox",
        }
    }

    /// The generator code in the kernels' launch structs (0 = ChaCha20, 1 = Philox).
    pub fn code(self) -> u32 {
        match self {
            RngKind::Chacha20 => 0,
            RngKind::Philox => 1,
        }
    }
}

impl fmt::Display for RngKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for RngKind {
    type Err = crate::Error;

    fn from_str(s: &str) -> crate::Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "chacha20" => Ok(RngKind::Chacha20),
            "philox" => Ok(RngKind::Philox),
            other => Err(crate::Error::Config(format!(
                "unknown noise generator {other:?}: expected \"chacha20\" (cryptographic, \
                 the default) or \"philox\" (fast, not cryptographic)"
            ))),
        }
    }
}

/// A 256-bit secret key of one noise domain (the caller has already separated domains).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct StreamKey {
    /// The generator.
    pub rng: RngKind,
    /// The secret key words (ChaCha20 state words 4–11; Philox uses words 0 and 1).
    pub key: [u32; 8],
}

impl fmt::Debug for StreamKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamKey")
            .field("rng", &self.rng)
            .field("key", &format_args!("<secret>"))
            .finish()
    }
}

impl StreamKey {
    /// Expands a public u64 into a key: ONLY for tests and `--insecure-seed`. The key
    /// is the first eight `next_u32` of `rand_chacha::ChaCha20Rng::seed_from_u64(seed)`,
    /// so anyone who knows the seed knows the noise.
    pub fn from_insecure_seed(rng: RngKind, seed: u64) -> Self {
        let mut r = ChaCha20Rng::seed_from_u64(seed);
        let mut key = [0u32; 8];
        for k in &mut key {
            *k = r.next_u32();
        }
        Self { rng, key }
    }
}

/// Taylor coefficients (−1)^⌊n/2⌋ / n!, n = 2..=18, as exact bit patterns (the
/// nearest doubles); `kernels/gaussian.cuh` holds the same hex literals.
const INV_FACT: [f64; 17] = [
    f64::from_bits(0xbfe0000000000000), // -1/2!
    f64::from_bits(0xbfc5555555555555), // -1/3!
    f64::from_bits(0x3fa5555555555555), // 1/4!
    f64::from_bits(0x3f81111111111111), // 1/5!
    f64::from_bits(0xbf56c16c16c16c17), // -1/6!
    f64::from_bits(0xbf2a01a01a01a01a), // -1/7!
    f64::from_bits(0x3efa01a01a01a01a), // 1/8!
    f64::from_bits(0x3ec71de3a556c734), // 1/9!
    f64::from_bits(0xbe927e4fb7789f5c), // -1/10!
    f64::from_bits(0xbe5ae64567f544e4), // -1/11!
    f64::from_bits(0x3e21eed8eff8d898), // 1/12!
    f64::from_bits(0x3de6124613a86d09), // 1/13!
    f64::from_bits(0xbda93974a8c07c9d), // -1/14!
    f64::from_bits(0xbd6ae7f3e733b81f), // -1/15!
    f64::from_bits(0x3d2ae7f3e733b81f), // 1/16!
    f64::from_bits(0x3ce952c77030ad4a), // 1/17!
    f64::from_bits(0xbca6827863b97d97), // -1/18!
];
/// 1/(2k+1), k = 1..=10: the atanh series of ln.
const INV_ODD: [f64; 10] = [
    f64::from_bits(0x3fd5555555555555),
    f64::from_bits(0x3fc999999999999a),
    f64::from_bits(0x3fc2492492492492),
    f64::from_bits(0x3fbc71c71c71c71c),
    f64::from_bits(0x3fb745d1745d1746),
    f64::from_bits(0x3fb3b13b13b13b14),
    f64::from_bits(0x3fb1111111111111),
    f64::from_bits(0x3fae1e1e1e1e1e1e),
    f64::from_bits(0x3faaf286bca1af28),
    f64::from_bits(0x3fa8618618618618),
];
const SQRT2: f64 = f64::from_bits(0x3ff6a09e667f3bcd);
const FRAC_PI_2: f64 = f64::from_bits(0x3ff921fb54442d18);
/// ln 2 = LN2_HI + LN2_LO; LN2_HI has 21 trailing zero bits, so e·LN2_HI is exact.
const LN2_HI: f64 = f64::from_bits(0x3fe62e42fee00000);
const LN2_LO: f64 = f64::from_bits(0x3dea39ef35793c76);
/// 2⁻⁶², 2⁻⁶⁴, 2⁻¹²⁶ and 2⁻¹²⁸.
const TWO_M62: f64 = f64::from_bits(0x3c10000000000000);
const TWO_M126: f64 = f64::from_bits(0x3810000000000000);
const TWO_M64: f64 = f64::from_bits(0x3bf0000000000000);
const TWO_M128: f64 = f64::from_bits(0x37f0000000000000);
/// The largest |z| the sampler can produce: sqrt(−2 ln 2⁻¹²⁸) = sqrt(256 ln 2).
pub const MAX_ABS_NORMAL: f64 = 13.320_873_778_523_163;

/// Set in the block counter of a group's tail block (groups stay below 2⁶¹).
pub const TAIL_BIT: u64 = 1 << 63;

/// ln u for a positive normal double, with basic IEEE operations only (see the
/// module doc); within a few ulp of the true value.
#[inline(always)]
fn ln_pos(u: f64) -> f64 {
    let bits = u.to_bits();
    let mut e = ((bits >> 52) & 0x7ff) as i64 - 1023;
    let mut m = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | 0x3ff0_0000_0000_0000);
    if m > SQRT2 {
        m *= 0.5;
        e += 1;
    }
    let f = m - 1.0; // exact (Sterbenz)
    let s = f / (2.0 + f);
    let z = s * s;
    let mut p = INV_ODD[9];
    for c in INV_ODD[..9].iter().rev() {
        p = p * z + c;
    }
    let t = s + s;
    let ln_m = t + t * (z * p);
    let ef = e as f64;
    ef * LN2_HI + (ef * LN2_LO + ln_m)
}

/// Whether the angle word k lies within 2³² of a quarter turn, where its offset
/// needs the tail block's word (see [`angle_parts`]).
#[inline(always)]
pub fn needs_angle_tail(k: u64) -> bool {
    let q = k.wrapping_add(1 << 61) >> 62;
    let m = k.wrapping_sub(q << 62) as i64;
    m.unsigned_abs() >> 32 == 0
}

/// The angle θ = (π/2)(q + f) of word k (θ = 2π·k·2⁻⁶⁴ to within its cell): q, the
/// nearest quarter turn, and the offset f = m·2⁻⁶² with m = k − q·2⁶² exact in
/// integers, |f| ≤ 1/2. Near an axis (|m| < 2³²) the offset is refined by the tail
/// word y, f = (m·2⁶⁴ + y)·2⁻¹²⁶: the small coordinate r·sin(πf/2) is stored in f32
/// with 24 significant bits, so a 2⁻⁶² lattice of f would show (the third review
/// recovered m exactly for |m| ≤ 2²⁰ with 53-bit angles).
#[inline(always)]
pub fn angle_parts(k: u64, y: u64) -> (u64, f64) {
    let q = k.wrapping_add(1 << 61) >> 62; // 0..=3 (a full turn wraps to 0)
    let m = k.wrapping_sub(q << 62) as i64;
    let f = if needs_angle_tail(k) {
        m as f64 * TWO_M62 + y as f64 * TWO_M126
    } else {
        m as f64 * TWO_M62
    };
    (q, f)
}

/// (sin θ, cos θ) for the angle of word k ([`angle_parts`]): exact integer reduction
/// to the nearest quarter turn, then Taylor polynomials on |x| ≤ π/4.
#[inline(always)]
fn sincos_turn(k: u64, y: u64) -> (f64, f64) {
    let (q, f) = angle_parts(k, y);
    let x = f * FRAC_PI_2;
    let z = x * x;
    // sin: odd coefficients 1/3!, 1/5!, .., 1/17! (indices 1, 3, .., 15).
    let mut ps = INV_FACT[15];
    for i in [13, 11, 9, 7, 5, 3, 1] {
        ps = ps * z + INV_FACT[i];
    }
    let s = x + x * (z * ps);
    // cos: even coefficients 1/2!, 1/4!, .., 1/18! (indices 0, 2, .., 16).
    let mut pc = INV_FACT[16];
    for i in [14, 12, 10, 8, 6, 4, 2, 0] {
        pc = pc * z + INV_FACT[i];
    }
    let c = 1.0 + z * pc;
    match q & 3 {
        0 => (s, c),
        1 => (c, -s),
        2 => (-s, -c),
        _ => (-c, s),
    }
}

/// The radius uniform in (0, 1] of word x (and, only when x < 2³², the tail word
/// y): (x + 1)·2⁻⁶⁴, or (x·2⁶⁴ + y + 1)·2⁻¹²⁸, each rounded once to f64. At least
/// 32 significant bits at every scale down to 2⁻⁹⁶ (see the module doc for why).
#[inline(always)]
pub fn radius_uniform(x: u64, y: u64) -> f64 {
    if x >> 32 != 0 {
        (x as f64 + 1.0) * TWO_M64
    } else {
        (x as f64) * TWO_M64 + (y as f64 + 1.0) * TWO_M128
    }
}

/// 1/k for the series of −ln(1 − v), k = 2..7 (the same bit patterns as the kernel's).
const INV_K: [f64; 6] = [
    f64::from_bits(0x3fe0000000000000),
    f64::from_bits(0x3fd5555555555555),
    f64::from_bits(0x3fd0000000000000),
    f64::from_bits(0x3fc999999999999a),
    f64::from_bits(0x3fc5555555555555),
    f64::from_bits(0x3fc2492492492492),
];

/// r² = −2 ln u for the radius uniform of (x, y) ([`radius_uniform`]), with u near 1
/// handled through v = 1 − u = (!x)·2⁻⁶⁴ (refined by y below 2⁻³²) and the series
/// −ln(1 − v) = v(1 + v/2 + … + v⁶/7) for v < 2⁻¹¹: forming 1 − v in f64 would put
/// the small radii on rings of radius √k·2⁻²⁶, resolvable through f32 rounding when
/// the clipped sum is 0 (an empty batch). `y` is read only when x or !x is below 2³².
#[inline(always)]
pub fn radius_sq(x: u64, y: u64) -> f64 {
    let nx = !x;
    if nx >= 1 << 53 {
        return -2.0 * ln_pos(radius_uniform(x, y));
    }
    let v = if nx >> 32 != 0 {
        nx as f64 * TWO_M64
    } else {
        nx as f64 * TWO_M64 + y as f64 * TWO_M128
    };
    let mut p = INV_K[5];
    for c in INV_K[..5].iter().rev() {
        p = p * v + c;
    }
    2.0 * (v * (p * v + 1.0))
}

/// Whether the pair whose radius word is x needs its tail word.
#[inline(always)]
pub fn needs_tail(x: u64) -> bool {
    x >> 32 == 0 || !x >> 32 == 0
}

/// Box–Muller on two 64-bit random words: the normals (r cos θ, r sin θ) with
/// r = sqrt([`radius_sq`](x0, y0)) and θ from [`angle_parts`](x1, y1). `tail` gives
/// the tail words (y0, y1) and is called (once) only when x0 or x1 needs them
/// ([`needs_tail`], [`needs_angle_tail`]; probability ~2⁻²⁹).
#[inline(always)]
pub fn box_muller(x0: u64, x1: u64, tail: impl FnOnce() -> [u64; 2]) -> [f64; 2] {
    let [y0, y1] = if needs_tail(x0) || needs_angle_tail(x1) {
        tail()
    } else {
        [0, 0]
    };
    let r = radius_sq(x0, y0).sqrt();
    let (s, c) = sincos_turn(x1, y1);
    [r * c, r * s]
}

fn word64(w: &[u32; 16], k: usize) -> u64 {
    u64::from(w[2 * k]) | (u64::from(w[2 * k + 1]) << 32)
}

/// The eight normals of a group's words; `tail` gives its tail block (rarely needed).
#[inline(always)]
fn normals_of_words(w: &[u32; 16], tail: impl Fn() -> [u32; 16]) -> [f64; 8] {
    let mut out = [0.0; 8];
    for p in 0..4 {
        let [a, b] = box_muller(word64(w, 2 * p), word64(w, 2 * p + 1), || {
            let t = tail();
            [word64(&t, 2 * p), word64(&t, 2 * p + 1)]
        });
        out[2 * p] = a;
        out[2 * p + 1] = b;
    }
    out
}

/// One noise stream: a domain key, a tensor and a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NoiseKey {
    /// The secret key of the noise domain, and its generator.
    pub stream: StreamKey,
    /// A stable id of the tensor the noise is added to.
    pub tensor_id: u32,
    /// The logical training step.
    pub step: u32,
}

/// Elements per parallel block of [`NoiseKey::fill`] / [`NoiseKey::add_scaled`]:
/// ~25 µs of sampling (~50 ns per normal), so a 1024-value LoRA factor runs on
/// two threads. A multiple of the [`LANES`] ChaCha20 blocks of 8 normals.
const PAR_BLOCK: usize = 1 << 9;

impl NoiseKey {
    /// Normals per group (one ChaCha20 block, or four Philox calls).
    pub const GROUP: u64 = 8;

    fn nonce(&self) -> u64 {
        u64::from(self.tensor_id) | (u64::from(self.step) << 32)
    }

    /// The 16 random words of group g (see the module doc for the layout).
    pub fn group_words(&self, g: u64) -> [u32; 16] {
        self.block_words(g, 0)
    }

    /// The words of group g's tail block (see [`radius_uniform`]).
    pub fn tail_words(&self, g: u64) -> [u32; 16] {
        self.block_words(g, TAIL_BIT)
    }

    fn block_words(&self, g: u64, tail: u64) -> [u32; 16] {
        match self.stream.rng {
            RngKind::Chacha20 => chacha20_block(&self.stream.key, g | tail, self.nonce()),
            RngKind::Philox => {
                let k = [self.stream.key[0], self.stream.key[1]];
                let mut w = [0u32; 16];
                for j in 0..4u64 {
                    let c = g.wrapping_mul(4).wrapping_add(j) | tail;
                    let r =
                        philox4x32_10([c as u32, (c >> 32) as u32, self.tensor_id, self.step], k);
                    w[4 * j as usize..4 * j as usize + 4].copy_from_slice(&r);
                }
                w
            }
        }
    }

    /// The eight standard normals of elements 8g .. 8g+7.
    pub fn normal_group(&self, g: u64) -> [f64; 8] {
        normals_of_words(&self.group_words(g), || self.tail_words(g))
    }

    /// The standard normal noise(i).
    pub fn normal(&self, i: u64) -> f64 {
        self.normal_group(i / Self::GROUP)[(i % Self::GROUP) as usize]
    }

    /// Calls `f(first, normals)` for every group overlapping elements
    /// `offset .. offset + len`, in order; ChaCha20 blocks are made `LANES` at a time.
    #[inline(always)]
    fn for_groups(&self, offset: u64, len: usize, mut f: impl FnMut(u64, &[f64; 8])) {
        if len == 0 {
            return;
        }
        let (first, last) = (
            offset / Self::GROUP,
            (offset + len as u64 - 1) / Self::GROUP,
        );
        let mut g = first;
        if self.stream.rng == RngKind::Chacha20 {
            let nonce = self.nonce();
            while g + LANES as u64 <= last + 1 {
                let blocks = chacha20_blocks(&self.stream.key, g, nonce);
                for (l, w) in blocks.iter().enumerate() {
                    let gl = g + l as u64;
                    f(gl, &normals_of_words(w, || self.tail_words(gl)));
                }
                g += LANES as u64;
            }
        }
        while g <= last {
            f(g, &self.normal_group(g));
            g += 1;
        }
    }

    /// The part of group `g` that falls in `offset .. offset + len`, as
    /// (lane range in the group, index range in the output).
    #[inline(always)]
    fn overlap(
        offset: u64,
        len: usize,
        g: u64,
    ) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
        let start = (g * Self::GROUP).max(offset);
        let end = ((g + 1) * Self::GROUP).min(offset + len as u64);
        let lane = (start - g * Self::GROUP) as usize;
        let n = (end - start) as usize;
        let at = (start - offset) as usize;
        (lane..lane + n, at..at + n)
    }

    fn fill_serial(&self, offset: u64, out: &mut [f64]) {
        self.for_groups(offset, out.len(), |g, z| {
            let (lanes, dst) = Self::overlap(offset, out.len(), g);
            out[dst].copy_from_slice(&z[lanes]);
        });
    }

    fn add_scaled_serial(&self, offset: u64, a: f64, y: &mut [f32]) {
        let len = y.len();
        self.for_groups(offset, len, |g, z| {
            let (lanes, dst) = Self::overlap(offset, len, g);
            for (y, z) in y[dst].iter_mut().zip(&z[lanes]) {
                *y = (f64::from(*y) + a * z) as f32;
            }
        });
    }

    /// Fills `out` with noise(offset .. offset + out.len()), in parallel over blocks
    /// (counter-based, so the split does not change the values).
    pub fn fill(&self, offset: u64, out: &mut [f64]) {
        if out.len() <= PAR_BLOCK {
            return self.fill_serial(offset, out);
        }
        out.par_chunks_mut(PAR_BLOCK)
            .enumerate()
            .for_each(|(b, chunk)| self.fill_serial(offset + (b * PAR_BLOCK) as u64, chunk));
    }

    /// `y[j] ← (f64(y[j]) + a · z(offset + j)) as f32`: a plain f64 product, then a
    /// plain f64 sum (no fused multiply-add), rounded once to f32, as the kernels do.
    pub fn add_scaled(&self, offset: u64, a: f64, y: &mut [f32]) {
        if y.len() <= PAR_BLOCK {
            return self.add_scaled_serial(offset, a, y);
        }
        y.par_chunks_mut(PAR_BLOCK)
            .enumerate()
            .for_each(|(b, chunk)| {
                self.add_scaled_serial(offset + (b * PAR_BLOCK) as u64, a, chunk)
            });
    }
}
