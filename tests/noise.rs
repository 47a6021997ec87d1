//! Known answers (RFC 8439 ChaCha20, Random123 Philox), the cross-check against
//! `rand_chacha`, Gaussian statistics and tails for both generators, stream
//! independence, random access, and the CUDA noise against the CPU bit for bit.
mod common;
use dualpriv::dp::noise::{
    angle_parts, box_muller, chacha20_block, needs_angle_tail, needs_tail, philox4x32_10,
    radius_sq, radius_uniform, NoiseKey, RngKind, StreamKey,
};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

#[test]
fn philox_known_answers_random123() {
    assert_eq!(
        philox4x32_10([0; 4], [0; 2]),
        [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
    );
    assert_eq!(
        philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
        [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
    );
    assert_eq!(
        philox4x32_10(
            [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
            [0xa4093822, 0x299f31d0]
        ),
        [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
    );
}

fn hex_bytes(s: &str) -> Vec<u8> {
    s.split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect()
}

fn key_words(bytes: &[u8]) -> [u32; 8] {
    std::array::from_fn(|i| u32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap()))
}

fn serialize(w: &[u32; 16]) -> Vec<u8> {
    w.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// RFC 8439 §2.3.2: key 00 01 .. 1f, block count 1, nonce
/// 00:00:00:09:00:00:00:4a:00:00:00:00. In djb's layout the words 12..15 are
/// 1, 0x09000000, 0x4a000000, 0: counter = 1 | 0x09000000 << 32, nonce = 0x4a000000.
#[test]
fn chacha20_block_rfc8439_section_2_3_2() {
    let key = key_words(&(0u8..32).collect::<Vec<_>>());
    let got = chacha20_block(&key, 1 | (0x0900_0000 << 32), 0x4a00_0000);
    let want_state = [
        0xe4e7f110, 0x15593bd1, 0x1fdd0f50, 0xc47120a3, 0xc7f4d1c7, 0x0368c033, 0x9aaa2204,
        0x4e6cd4c3, 0x466482d2, 0x09aa9f07, 0x05d7c214, 0xa2028bd9, 0xd19c12b5, 0xb94e16de,
        0xe883d0cb, 0x4e3c50a2,
    ];
    assert_eq!(got, want_state);
    let serialized = hex_bytes(
        "10 f1 e7 e4 d1 3b 59 15 50 0f dd 1f a3 20 71 c4
         c7 d1 f4 c7 33 c0 68 03 04 22 aa 9a c3 d4 6c 4e
         d2 82 64 46 07 9f aa 09 14 c2 d7 05 d9 8b 02 a2
         b5 12 9c d1 de 16 4e b9 cb d0 83 e8 a2 50 3c 4e",
    );
    assert_eq!(serialize(&got), serialized);
    assert!(dualpriv::selfcheck::chacha20_rfc8439_ok());
}

/// RFC 8439 Appendix A.1, block-function test vectors #1..#5.
#[test]
fn chacha20_block_rfc8439_appendix_a1() {
    let zero = [0u32; 8];
    // #1: all-zero key, counter 0, nonce 0.
    assert_eq!(
        serialize(&chacha20_block(&zero, 0, 0)),
        hex_bytes(
            "76 b8 e0 ad a0 f1 3d 90 40 5d 6a e5 53 86 bd 28
             bd d2 19 b8 a0 8d ed 1a a8 36 ef cc 8b 77 0d c7
             da 41 59 7c 51 57 48 8d 77 24 e0 3f b8 d8 4a 37
             6a 43 b8 f4 15 18 a1 1c c3 87 b6 69 b2 ee 65 86"
        )
    );
    // #2: all-zero key, counter 1.
    assert_eq!(
        serialize(&chacha20_block(&zero, 1, 0)),
        hex_bytes(
            "9f 07 e7 be 55 51 38 7a 98 ba 97 7c 73 2d 08 0d
             cb 0f 29 a0 48 e3 65 69 12 c6 53 3e 32 ee 7a ed
             29 b7 21 76 9c e6 4e 43 d5 71 33 b0 74 d8 39 d5
             31 ed 1f 28 51 0a fb 45 ac e1 0a 1f 4b 79 4d 6f"
        )
    );
    // #3: key ending in 01, counter 1.
    let mut k = [0u8; 32];
    k[31] = 1;
    assert_eq!(
        serialize(&chacha20_block(&key_words(&k), 1, 0)),
        hex_bytes(
            "3a eb 52 24 ec f8 49 92 9b 9d 82 8d b1 ce d4 dd
             83 20 25 e8 01 8b 81 60 b8 22 84 f3 c9 49 aa 5a
             8e ca 00 bb b4 a7 3b da d1 92 b5 c4 2f 73 f2 fd
             4e 27 36 44 c8 b3 61 25 a6 4a dd eb 00 6c 13 a0"
        )
    );
    // #4: key 00 ff 00 .., counter 2.
    let mut k = [0u8; 32];
    k[1] = 0xff;
    assert_eq!(
        chacha20_block(&key_words(&k), 2, 0),
        [
            0xfb4dd572, 0x4bc42ef1, 0xdf922636, 0x327f1394, 0xa78dea8f, 0x5e269039, 0xa1bebbc1,
            0xcaf09aae, 0xa25ab213, 0x48a6b46c, 0x1b9d9bcb, 0x092c5be6, 0x546ca624, 0x1bec45d5,
            0x87f47473, 0x96f0992e,
        ]
    );
    // #5: zero key, counter 0, nonce 00 .. 00 02 (RFC word 15 = 0x02000000, i.e.
    // the high half of the djb nonce).
    assert_eq!(
        chacha20_block(&zero, 0, 0x0200_0000u64 << 32),
        [
            0x374dc6c2, 0x3736d58c, 0xb904e24a, 0xcd3f93ef, 0x88228b1a, 0x96a4dfb3, 0x5b76ab72,
            0xc727ee54, 0x0e0e978a, 0xf3145c95, 0x1b748ea8, 0xf786c297, 0x99c28f5f, 0x628314e8,
            0x398a19fa, 0x6ded1b53,
        ]
    );
}

/// `chacha20_block` against `rand_chacha::ChaCha20Rng` (djb layout: 64-bit word
/// position, 64-bit stream) on random keys, counters and nonces.
#[test]
fn chacha20_block_matches_rand_chacha() {
    let mut r = common::rng(1);
    for case in 0..200 {
        let mut seed = [0u8; 32];
        r.fill(&mut seed[..]);
        let counter: u64 = if case % 4 == 0 {
            u64::from(u32::MAX) - 1 + (case as u64 % 3)
        } else {
            r.random::<u64>() >> (case % 40)
        };
        let nonce: u64 = r.random();
        let mut c = ChaCha20Rng::from_seed(seed);
        c.set_stream(nonce);
        c.set_word_pos(u128::from(counter) * 16);
        let want: [u32; 16] = std::array::from_fn(|_| c.next_u32());
        assert_eq!(
            chacha20_block(&key_words(&seed), counter, nonce),
            want,
            "case {case}"
        );
    }
}

#[test]
fn insecure_seed_expansion_is_rand_chacha_and_debug_hides_the_key() {
    let k = StreamKey::from_insecure_seed(RngKind::Chacha20, 42);
    let mut c = ChaCha20Rng::seed_from_u64(42);
    let want: [u32; 8] = std::array::from_fn(|_| c.next_u32());
    assert_eq!(k.key, want);
    assert_eq!(k.rng, RngKind::Chacha20);
    let p = StreamKey::from_insecure_seed(RngKind::Philox, 42);
    assert_eq!(p.key, want);
    let dbg = format!("{k:?}");
    assert!(
        dbg.contains("<secret>") && dbg.contains("Chacha20"),
        "{dbg}"
    );
    for w in k.key {
        assert!(!dbg.contains(&format!("{w}")) && !dbg.contains(&format!("{w:x}")));
    }
    let key = NoiseKey {
        stream: k,
        tensor_id: 1,
        step: 2,
    };
    assert!(format!("{key:?}").contains("<secret>"));
}

#[test]
fn rng_kind_parses_displays_and_serializes() {
    assert_eq!("chacha20".parse::<RngKind>().unwrap(), RngKind::Chacha20);
    assert_eq!("philox".parse::<RngKind>().unwrap(), RngKind::Philox);
    assert_eq!(RngKind::default(), RngKind::Chacha20);
    let e = "aes".parse::<RngKind>().unwrap_err().to_string();
    assert!(e.contains("chacha20") && e.contains("philox"), "{e}");
    for k in [RngKind::Chacha20, RngKind::Philox] {
        assert_eq!(k.to_string().parse::<RngKind>().unwrap(), k);
        let j = serde_json::to_string(&k).unwrap();
        assert_eq!(j, format!("\"{k}\""));
        assert_eq!(serde_json::from_str::<RngKind>(&j).unwrap(), k);
    }
}

/// The documented layout, rebuilt here from the primitives.
#[test]
fn groups_follow_the_documented_layout() {
    for rng in [RngKind::Chacha20, RngKind::Philox] {
        let key = NoiseKey {
            stream: StreamKey::from_insecure_seed(rng, 7),
            tensor_id: 0xabcd_0123,
            step: 77,
        };
        for g in [0u64, 1, 5, (1 << 32) + 3, u64::MAX / 8] {
            let w: [u32; 16] = match rng {
                RngKind::Chacha20 => chacha20_block(
                    &key.stream.key,
                    g,
                    u64::from(key.tensor_id) | (u64::from(key.step) << 32),
                ),
                RngKind::Philox => {
                    let mut w = [0u32; 16];
                    for j in 0..4u64 {
                        let c = 4 * g + j;
                        let r = philox4x32_10(
                            [c as u32, (c >> 32) as u32, key.tensor_id, key.step],
                            [key.stream.key[0], key.stream.key[1]],
                        );
                        w[4 * j as usize..][..4].copy_from_slice(&r);
                    }
                    w
                }
            };
            let x: Vec<u64> = (0..8)
                .map(|k| u64::from(w[2 * k]) | (u64::from(w[2 * k + 1]) << 32))
                .collect();
            let z = key.normal_group(g);
            let tail = key.tail_words(g);
            for p in 0..4 {
                // Within a few 1e-15 of libm's Box–Muller on the same uniforms.
                let word = |k: usize| u64::from(tail[2 * k]) | (u64::from(tail[2 * k + 1]) << 32);
                let (y0, y1) = (word(2 * p), word(2 * p + 1));
                let r = libm_r2(x[2 * p], y0).sqrt();
                let (sn, cs) = libm_sincos(x[2 * p + 1], y1);
                let tol = 4e-15 * r.max(1.0);
                assert!((z[2 * p] - r * cs).abs() <= tol, "{rng} g={g} p={p}");
                assert!((z[2 * p + 1] - r * sn).abs() <= tol, "{rng} g={g} p={p}");
                assert_eq!(
                    box_muller(x[2 * p], x[2 * p + 1], || [y0, y1]),
                    [z[2 * p], z[2 * p + 1]]
                );
            }
            for l in 0..8 {
                assert_eq!(key.normal(8 * g + l).to_bits(), z[l as usize].to_bits());
            }
        }
    }
}

/// The hand-written ln and sincos against libm over the whole (0, 1] grid's range,
/// including both ends and the quadrant boundaries.
#[test]
fn box_muller_is_close_to_libm_everywhere() {
    let mut r = common::rng(3);
    let mut xs: Vec<u64> = vec![0, u64::MAX, 1 << 11, (1 << 63) - 1, 1 << 63];
    for q in 0..4u64 {
        for d in [0i64, -1, 1, -(1 << 32), 1 << 32, (1 << 61) - 1, -(1 << 61)] {
            // Angle words at the quarter turns q·2^62, ± a step, ± the refinement edge.
            xs.push((q << 62).wrapping_add(d as u64));
        }
    }
    for e in 0..63 {
        xs.push(1u64 << e);
        xs.push(r.random::<u64>() >> e);
    }
    xs.extend((0..20_000).map(|_| r.random::<u64>()));
    let mut worst: f64 = 0.0;
    for &x0 in &xs {
        for &x1 in xs.iter().step_by(97) {
            let [c, s] = box_muller(x0, x1, || [x1, x0]);
            let rr = libm_r2(x0, x1).sqrt();
            let (sn, cs) = libm_sincos(x1, x0);
            let e = (c - rr * cs).abs().max((s - rr * sn).abs()) / rr.max(1e-300);
            worst = worst.max(if rr == 0.0 { c.abs() + s.abs() } else { e });
        }
    }
    assert!(worst < 3e-15, "worst relative error {worst:e}");
    // ln alone through r: r² = −2 ln u to within 2 ulp-ish.
    for &x in &xs {
        let u = radius_uniform(x, 7);
        let want_r2 = libm_r2(x, 7);
        let [c, s] = box_muller(x, 0, || [7, 0]);
        let r2 = c * c + s * s;
        let want = if u < 0.999 { -2.0 * u.ln() } else { want_r2 };
        assert!(
            (r2 - want).abs() <= 8.0 * f64::EPSILON * want,
            "u={u}: {r2} vs {want}"
        );
    }
}

/// libm's (sin θ, cos θ) for the angle words (k, y): sin/cos of the offset from the
/// nearest axis, rotated by the quarter turn (θ itself in f64 would lose the offset).
fn libm_sincos(k: u64, y: u64) -> (f64, f64) {
    let (q, f) = angle_parts(k, y);
    let x = f * std::f64::consts::FRAC_PI_2;
    let (s, c) = (x.sin(), x.cos());
    match q & 3 {
        0 => (s, c),
        1 => (c, -s),
        2 => (-s, -c),
        _ => (-c, s),
    }
}

/// libm's r² = −2 ln u for the radius words (x, y): from 1 − u when u is near 1,
/// where the f64 u itself has lost the bits that matter.
fn libm_r2(x: u64, y: u64) -> f64 {
    let nx = !x;
    if nx < 1 << 53 {
        let v = if nx >> 32 != 0 {
            nx as f64 * 2f64.powi(-64)
        } else {
            nx as f64 * 2f64.powi(-64) + y as f64 * 2f64.powi(-128)
        };
        -2.0 * (-v).ln_1p()
    } else {
        -2.0 * radius_uniform(x, y).ln()
    }
}

/// Golden f64 normals (bit patterns) of the RFC 8439 key, tensor 3, step 11, groups
/// 0, 1 and 2^32 + 5. `tools/cuda-emu/noise_harness.cpp` checks the emulated CUDA
/// kernels against the same constants, so the CPU and the kernel source agree bit
/// for bit even where no GPU is available.
const GOLDEN: [(RngKind, u64, [u64; 8]); 6] = [
    (
        RngKind::Chacha20,
        0,
        [
            0xbfd2a6cbad2d5167,
            0x3fab15dd188d71d6,
            0x3ff30e75ab250805,
            0xbffe8105aacc7b46,
            0x3ff3e21413dded6c,
            0x3febda44bc09f11e,
            0xbfbf3cc99b0237db,
            0xbfdb275281f1a7c8,
        ],
    ),
    (
        RngKind::Chacha20,
        1,
        [
            0xbfe01f46521370b2,
            0x3fd98f188e70e7c1,
            0x3feb6b54203d806a,
            0xbfe3e0e7c27871d0,
            0x3fca011809a3e794,
            0x3ff3f5649c14ffc9,
            0x3ff01402e41743b1,
            0x3ff44cc72cc94699,
        ],
    ),
    (
        RngKind::Chacha20,
        (1 << 32) + 5,
        [
            0xbfea6d91d810c1c6,
            0x3fe5c55da9ec8796,
            0x3ff16d4b5c42194e,
            0xbff959a0c92a98eb,
            0xbfd0356ae26ddf84,
            0xbfc1eb09eca12579,
            0xbfe7bdddf07b83a7,
            0x3fceec650131cdcf,
        ],
    ),
    (
        RngKind::Philox,
        0,
        [
            0xbff2d56f9be537a9,
            0x3feda17d2644b448,
            0xbffa25a59dfff315,
            0x3ff033c2bfe8cb18,
            0xbfd28499c25c744e,
            0xbfe694f4bce1954d,
            0x3ff1a9b335952537,
            0x3fd97422e86f036a,
        ],
    ),
    (
        RngKind::Philox,
        1,
        [
            0x3ff4102dcf39c9cb,
            0x3ff53a8c18bd6e38,
            0xbfc0a661cc00b041,
            0xbfe39106f50617a6,
            0xbfeeae20c5682b48,
            0x3fefeb682a760fa0,
            0x3fee91b8503ff9f0,
            0x3ff19b6ec96fe0db,
        ],
    ),
    (
        RngKind::Philox,
        (1 << 32) + 5,
        [
            0xbfd468d8ea6a5136,
            0x3fca2c87c37a0bdc,
            0x3f27a5feefe65cee,
            0x3fdab37ac0d5fd7b,
            0xbff4eb4e34d6b489,
            0xbfd9db47fec53630,
            0xbffaa4c5aaed8754,
            0xc002a4537143568e,
        ],
    ),
];

#[test]
fn golden_normals_shared_with_the_cuda_emulator() {
    let key = key_words(&(0u8..32).collect::<Vec<_>>());
    for (rng, g, bits) in GOLDEN {
        let k = NoiseKey {
            stream: StreamKey { rng, key },
            tensor_id: 3,
            step: 11,
        };
        let got: Vec<u64> = k.normal_group(g).iter().map(|z| z.to_bits()).collect();
        assert_eq!(got, bits, "{rng} group {g}");
    }
}

const N: usize = 1_000_000;

fn samples(key: NoiseKey) -> Vec<f64> {
    let mut v = vec![0.0; N];
    key.fill(0, &mut v);
    v
}

fn key(rng: RngKind, seed: u64, tensor_id: u32, step: u32) -> NoiseKey {
    NoiseKey {
        stream: StreamKey::from_insecure_seed(rng, seed),
        tensor_id,
        step,
    }
}

#[test]
fn gaussian_moments_within_5_sigma() {
    for rng in [RngKind::Chacha20, RngKind::Philox] {
        let v = samples(key(rng, 42, 7, 3));
        let n = N as f64;
        let mean = v.iter().sum::<f64>() / n;
        let m2 = v.iter().map(|&x| (x - mean).powi(2)).sum::<f64>() / n;
        let m4 = v.iter().map(|&x| (x - mean).powi(4)).sum::<f64>() / n;
        // Standard errors: mean 1/√n; variance √(2/n); fourth moment √(96/n).
        assert!(mean.abs() < 5.0 / n.sqrt(), "{rng}: mean {mean}");
        assert!(
            (m2 - 1.0).abs() < 5.0 * (2.0 / n).sqrt(),
            "{rng}: variance {m2}"
        );
        assert!(
            (m4 - 3.0).abs() < 5.0 * (96.0 / n).sqrt(),
            "{rng}: kurtosis {m4}"
        );
        // Tail mass beyond 3σ: p = 0.0026998, binomial standard error.
        let tail = v.iter().filter(|x| x.abs() > 3.0).count() as f64 / n;
        let p = 0.002_699_8;
        assert!(
            (tail - p).abs() < 5.0 * (p * (1.0 - p) / n).sqrt(),
            "{rng}: tail {tail}"
        );
        assert!(v.iter().all(|x| x.is_finite()));
    }
}

/// The 32-bit uniforms capped |z| at sqrt(−2 ln 2⁻³²) = 6.66; the radius uniform now
/// reaches 2⁻¹²⁸, |z| ≤ sqrt(256 ln 2) = 13.32.
/// P(|z| > 5) = 5.7e-7, so 4·10⁶ normals would see none with probability 0.1; 2·10⁷
/// expect 11.5 (none: 1e-5). Also checks that the uniforms carry 53 bits.
#[test]
fn tails_go_beyond_5_and_uniforms_use_64_bits() {
    for rng in [RngKind::Chacha20, RngKind::Philox] {
        let k = key(rng, 5, 1, 0);
        let mut v = vec![0.0f64; 20_000_000];
        k.fill(0, &mut v);
        let max = v.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        let beyond5 = v.iter().filter(|x| x.abs() > 5.0).count();
        assert!(max > 5.0 && beyond5 >= 1, "{rng}: max |z| {max}");
        assert!(max < 13.33, "{rng}: max |z| {max} above the bound");
        // P(|z| > 5) = 5.733e-7: the count is Poisson(11.5); 5 sigma is ±17.
        let expect = 5.733e-7 * v.len() as f64;
        assert!(
            (beyond5 as f64 - expect).abs() < 5.0 * expect.sqrt() + 1.0,
            "{rng}: {beyond5} beyond 5, expected {expect}"
        );
    }
    // The deepest tail: x0 = 0 and tail word 0 give u0 = 2^-128 (θ = 0 exactly).
    let [c, s] = box_muller(0, 0, || [0, 0]);
    assert_eq!(s, 0.0);
    assert!((c - (2.0 * 128.0 * 2f64.ln()).sqrt()).abs() < 1e-13, "{c}");
    assert_eq!(radius_uniform(0, u64::MAX), 2f64.powi(-64));
    assert_eq!(radius_uniform(u64::MAX, 0), 1.0);
    assert_eq!(
        radius_uniform(1 << 32, 0),
        (2f64.powi(32) + 1.0) * 2f64.powi(-64)
    );
    // The tail words are drawn only near the ends of the radius and near the axes.
    let mut calls = 0;
    let away = 1 << 40; // 2^40 from the axis at 0
    box_muller(1 << 32, away, || {
        calls += 1;
        [0, 0]
    });
    assert_eq!(calls, 0);
    box_muller((1 << 32) - 1, away, || {
        calls += 1;
        [0, 0]
    });
    box_muller(1 << 40, (1 << 62) + 5, || {
        calls += 1;
        [0, 0]
    });
    assert_eq!(calls, 2);
    assert!(needs_angle_tail(u64::MAX) && !needs_angle_tail(1 << 33));
    // The angle uses all 64 bits of its word: within 2^53 of an axis the offset is
    // exact, so the lowest bit moves it (a 53-bit angle ignored the low 11 bits).
    let mut r = common::rng(9);
    for _ in 0..1000 {
        let m: u64 = r.random_range(1u64 << 33..1 << 52);
        let k = (1u64 << 62) + m;
        let (f0, f1) = (angle_parts(k, 0).1, angle_parts(k + 1, 0).1);
        assert_eq!(f0, m as f64 * 2f64.powi(-62));
        assert!(f1 > f0, "bit 0 of the angle word is ignored");
    }
}

/// Correlation of two streams must be within 5 standard errors (1/√n) of 0.
fn assert_uncorrelated(a: &[f64], b: &[f64], what: &str) {
    let n = a.len() as f64;
    let c = a.iter().zip(b).map(|(&x, &y)| x * y).sum::<f64>() / n;
    assert!(c.abs() < 5.0 / n.sqrt(), "{what}: correlation {c}");
    assert!(
        a.iter().zip(b).filter(|(x, y)| x == y).count() < 10,
        "{what}: streams coincide"
    );
}

#[test]
fn streams_are_independent_across_step_tensor_key_and_generator() {
    for rng in [RngKind::Chacha20, RngKind::Philox] {
        let base = samples(key(rng, 1, 0, 0));
        assert_uncorrelated(&base, &samples(key(rng, 1, 0, 1)), "step");
        assert_uncorrelated(&base, &samples(key(rng, 1, 1, 0)), "tensor id");
        assert_uncorrelated(&base, &samples(key(rng, 2, 0, 0)), "key");
        // Neighbouring elements (the Box–Muller pair, the pairs, the groups).
        for lag in [1, 2, 7, 8] {
            assert_uncorrelated(&base[..N - lag], &base[lag..], &format!("{rng} lag {lag}"));
        }
    }
    assert_uncorrelated(
        &samples(key(RngKind::Chacha20, 1, 0, 0)),
        &samples(key(RngKind::Philox, 1, 0, 0)),
        "generator",
    );
    // ChaCha20 uses all 256 key bits: flipping a high word changes the stream.
    let k = key(RngKind::Chacha20, 1, 0, 0);
    let mut k2 = k;
    k2.stream.key[7] ^= 1;
    assert_uncorrelated(&samples(k), &samples(k2), "key word 7");
}

#[test]
fn regeneration_is_random_access_and_split_invariant() {
    for rng in [RngKind::Chacha20, RngKind::Philox] {
        let key = key(rng, 0xdead_beef_0123, 9, 77);
        let mut whole = vec![0.0; 300_001];
        key.fill(0, &mut whole);
        for off in [0usize, 1, 2, 3, 5, 7, 8, 9, 50, 65, 70_001] {
            for len in [0usize, 1, 7, 8, 9, 63, 64, 65, 1000] {
                let mut part = vec![0.0; len];
                key.fill(off as u64, &mut part);
                assert_eq!(part, whole[off..off + len], "{rng} off {off} len {len}");
            }
            let mut part = vec![0.0; whole.len() - off];
            key.fill(off as u64, &mut part);
            assert_eq!(part, whole[off..], "{rng} off {off}");
        }
        for (i, &w) in whole.iter().enumerate().step_by(13) {
            assert_eq!(key.normal(i as u64).to_bits(), w.to_bits());
        }
        // add_scaled = (f64(y) + a·z) as f32 per element, for any split.
        let mut r = common::rng(4);
        let y0 = common::uniform(&mut r, 100_003);
        let a = 0.37;
        let want: Vec<f32> = y0
            .iter()
            .zip(&whole[5..])
            .map(|(&y, &z)| (f64::from(y) + a * z) as f32)
            .collect();
        let mut y = y0.clone();
        key.add_scaled(5, a, &mut y);
        assert_eq!(y, want);
        let mut y = y0.clone();
        let (l, rr) = y.split_at_mut(12_345);
        key.add_scaled(5, a, l);
        key.add_scaled(5 + 12_345, a, rr);
        assert_eq!(y, want);
        // Indices beyond 2^35 use the counter's high word.
        let far = 1u64 << 36;
        assert_ne!(key.normal(far), key.normal(far - (1 << 35)));
        assert_eq!(key.normal(far + 5), key.normal_group((far + 5) / 8)[5]);
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use super::*;
    use dualpriv::gpu::{gpu_or_skip, noise::noise_axpy};

    #[test]
    fn gpu_noise_matches_cpu_bit_for_bit() {
        let Some(gpu) = gpu_or_skip("gpu_noise_matches_cpu_bit_for_bit") else {
            return;
        };
        for rng in [RngKind::Chacha20, RngKind::Philox] {
            let key = key(rng, 0x1234_5678_9abc, 3, 11);
            for (offset, n) in [(0u64, N), (3, 1001), ((1u64 << 35) + 1, 4099)] {
                // Written (a·z) and accumulated (y + a·z), a ≠ 1 so the product counts.
                for (accumulate, a) in [(false, 1.0), (true, -0.3)] {
                    let mut r = common::rng(offset);
                    let y0 = if accumulate {
                        common::uniform(&mut r, n)
                    } else {
                        vec![0.0f32; n]
                    };
                    let mut want = y0.clone();
                    key.add_scaled(offset, a, &mut want);
                    let mut y = gpu.upload(&y0).unwrap();
                    noise_axpy(&gpu, key, offset, a, accumulate, &mut y).unwrap();
                    let got = gpu.download(&y).unwrap();
                    let bad = got
                        .iter()
                        .zip(&want)
                        .position(|(g, w)| g.to_bits() != w.to_bits());
                    assert!(
                        bad.is_none(),
                        "{rng} offset {offset} acc {accumulate}: first mismatch at {bad:?}"
                    );
                }
            }
        }
    }

    /// The device's raw ChaCha20 block function on the RFC 8439 §2.3.2 vector and
    /// Appendix A.1 #1/#2, and on random counters/nonces against the CPU.
    #[test]
    fn gpu_chacha20_block_rfc8439_and_random() {
        let Some(gpu) = gpu_or_skip("gpu_chacha20_block_rfc8439_and_random") else {
            return;
        };
        let rfc_key = key_words(&(0u8..32).collect::<Vec<_>>());
        let got = dualpriv::gpu::noise::chacha20_blocks(
            &gpu,
            &rfc_key,
            &[1 | (0x0900_0000 << 32)],
            &[0x4a00_0000],
        )
        .unwrap();
        assert_eq!(got[0][0], 0xe4e7f110);
        assert_eq!(got[0][15], 0x4e3c50a2);
        assert_eq!(
            got[0],
            chacha20_block(&rfc_key, 1 | (0x0900_0000 << 32), 0x4a00_0000)
        );
        let zero = dualpriv::gpu::noise::chacha20_blocks(&gpu, &[0; 8], &[0, 1], &[0, 0]).unwrap();
        assert_eq!(
            &serialize(&zero[0])[..8],
            &[0x76, 0xb8, 0xe0, 0xad, 0xa0, 0xf1, 0x3d, 0x90]
        );
        assert_eq!(
            &serialize(&zero[1])[..8],
            &[0x9f, 0x07, 0xe7, 0xbe, 0x55, 0x51, 0x38, 0x7a]
        );
        let mut r = common::rng(2);
        let key: [u32; 8] = std::array::from_fn(|_| r.random());
        let counters: Vec<u64> = (0..1000).map(|i| r.random::<u64>() >> (i % 64)).collect();
        let nonces: Vec<u64> = (0..1000).map(|_| r.random()).collect();
        let got = dualpriv::gpu::noise::chacha20_blocks(&gpu, &key, &counters, &nonces).unwrap();
        for (i, w) in got.iter().enumerate() {
            assert_eq!(
                *w,
                chacha20_block(&key, counters[i], nonces[i]),
                "block {i}"
            );
        }
    }

    /// The RFC 8439 §2.3.2 block on the GPU: a stream whose key is the RFC key and
    /// whose nonce (tensor_id | step << 32) is the RFC nonce 0x4a000000 gives group
    /// g = RFC counter its normals; noise_axpy with a = 1 on zeros must produce the
    /// normals computed on the CPU from the RFC's printed output words.
    #[test]
    fn gpu_chacha20_reproduces_the_rfc8439_block() {
        let Some(gpu) = gpu_or_skip("gpu_chacha20_reproduces_the_rfc8439_block") else {
            return;
        };
        let key = NoiseKey {
            stream: StreamKey {
                rng: RngKind::Chacha20,
                key: key_words(&(0u8..32).collect::<Vec<_>>()),
            },
            tensor_id: 0x4a00_0000,
            step: 0,
        };
        let rfc: [u32; 16] = [
            0xe4e7f110, 0x15593bd1, 0x1fdd0f50, 0xc47120a3, 0xc7f4d1c7, 0x0368c033, 0x9aaa2204,
            0x4e6cd4c3, 0x466482d2, 0x09aa9f07, 0x05d7c214, 0xa2028bd9, 0xd19c12b5, 0xb94e16de,
            0xe883d0cb, 0x4e3c50a2,
        ];
        let g = 1u64 | (0x0900_0000 << 32);
        let x = |k: usize| u64::from(rfc[2 * k]) | (u64::from(rfc[2 * k + 1]) << 32);
        let want: Vec<f32> = (0..4)
            .flat_map(|p| {
                box_muller(x(2 * p), x(2 * p + 1), || {
                    let t = key.tail_words(g);
                    let w = |k: usize| u64::from(t[2 * k]) | (u64::from(t[2 * k + 1]) << 32);
                    [w(2 * p), w(2 * p + 1)]
                })
            })
            .map(|z| z as f32)
            .collect();
        let mut y = gpu.zeros::<f32>(8).unwrap();
        noise_axpy(&gpu, key, g * 8, 1.0, true, &mut y).unwrap();
        let got = gpu.download(&y).unwrap();
        assert_eq!(
            got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
    }
}

/// The floating-point attack on the Gaussian mechanism (Mironov, CCS 2012) needs
/// outputs on a lattice coarser than their own rounding. In Box–Muller the deep
/// tail is where that happens: with u = k·2⁻⁵³ the radii of consecutive k differ
/// by ≈ 1/(k·r), wider than an f32 ulp of the output for k below ~10⁵ (a 1e-11
/// event per pair). The radius uniform keeps ≥ 32 significant bits down to 2⁻⁹⁶:
/// relative radius gaps stay below 2⁻³⁰, far inside an f32 ulp (2⁻²³).
#[test]
fn radii_are_dense_even_in_the_deep_tail() {
    let radius = |x: u64, y: u64| radius_sq(x, y).sqrt();
    let mut r = common::rng(17);
    let mut worst: f64 = 0.0;
    for _ in 0..20_000 {
        // Words at every magnitude, including the tail-block regime below 2^32.
        let e = r.random_range(0..64u32);
        let x: u64 = r.random::<u64>() >> e;
        let y: u64 = r.random::<u64>() | (1 << 63);
        let (a, b) = if x >> 32 != 0 {
            // The next representable u: x + 1 below 2^53, one f64 step above.
            let step = if x < 1 << 53 { 1 } else { 1 << 11 };
            (radius(x, 0), radius(x.saturating_add(step), 0))
        } else {
            (radius(x, y), radius(x, y.saturating_add(1 << 32)))
        };
        if a > 0.0 && b > 0.0 && a != b {
            worst = worst.max((a - b).abs() / a);
        }
    }
    assert!(worst < 2f64.powi(-30), "relative radius gap {worst:e}");
    // Near u = 1 (the smallest radii, r ≈ sqrt(2(1 − u))): 1 − u as an f64 would leave
    // rings √k·2⁻²⁶ apart; from the word itself they stay dense.
    let mut worst_small: f64 = 0.0;
    for _ in 0..20_000 {
        let e = r.random_range(0..64u32);
        let nx: u64 = r.random::<u64>() >> e;
        let y: u64 = r.random::<u64>() | (1 << 63);
        let x = !nx;
        let (a, b) = if !needs_tail(x) {
            let step = if nx < 1 << 53 { 1 } else { 1 << 11 };
            (radius(x, 0), radius(x.wrapping_sub(step), 0))
        } else {
            (radius(x, y), radius(x, y.saturating_add(1 << 32)))
        };
        if a > 0.0 && b > 0.0 && a != b {
            worst_small = worst_small.max((a - b).abs() / a);
        }
    }
    assert!(
        worst_small < 2f64.powi(-30),
        "small radii: relative gap {worst_small:e}"
    );
    // Against libm's log1p: r² within a few ulp where the series runs.
    for k in [1u64, 7, 1 << 20, (1 << 40) + 3, (1 << 53) - 1] {
        let (x, y) = (!k, 0x9e37_79b9_7f4a_7c15);
        let (got, want) = (radius_sq(x, y), libm_r2(x, y));
        assert!(
            (got - want).abs() <= 4.0 * f64::EPSILON * want,
            "!x = {k}: {got} vs {want}"
        );
    }
    // The old 53-bit radius had gaps of ~1% at the very end of its range.
    let old = |k: u64| (-2.0 * (k as f64 * 2f64.powi(-53)).ln()).sqrt();
    assert!((old(1) - old(2)) / old(1) > 5e-3);
}

#[test]
#[ignore]
fn print_golden() {
    let key = key_words(&(0u8..32).collect::<Vec<_>>());
    for (rng, g, _) in GOLDEN {
        let k = NoiseKey {
            stream: StreamKey { rng, key },
            tensor_id: 3,
            step: 11,
        };
        let bits: Vec<String> = k
            .normal_group(g)
            .iter()
            .map(|z| format!("0x{:016x}", z.to_bits()))
            .collect();
        println!("GOLD {} {} {}", rng.code(), g, bits.join(","));
    }
    for (x, y) in [
        (!7u64, 0u64),
        (!(1u64 << 40), 0),
        (!3u64, 0x9e37_79b9_7f4a_7c15),
    ] {
        println!(
            "RSQ 0x{x:016x} 0x{y:016x} 0x{:016x}",
            radius_sq(x, y).to_bits()
        );
    }
}

/// The review's lattice attack on the radii, replayed on the current sampler: the
/// adversary subtracts a candidate clipped sum from a released f32 pair, computes
/// the implied radius and asks whether it sits on the sampler's radius lattice (a
/// window of ±0.05 of a lattice step: chance is 10 %). With 53-bit radius words it
/// passed 1400/2000 (deep tail) and 1935/2000 (smallest radii) for the true
/// candidate; now both ends are refined by a second word, so it is at chance.
#[test]
fn the_radius_lattice_test_is_at_chance_at_both_ends() {
    let mut r = common::rng(23);
    let n = 4000;
    // (deep tail, smallest radii) hits; `refine` = false zeroes the tail words, which
    // leaves the radii on the 2^-64 lattice of the first word alone.
    let hits = |refine: bool, r: &mut rand_chacha::ChaCha8Rng| {
        let (mut tail_hits, mut centre_hits) = (0, 0);
        for _ in 0..n {
            let x1: u64 = r.random();
            let y: u64 = if refine { r.random() } else { 0 };
            // Deep tail: x0 < 2^16, where f32 rounding still resolves a 2^-64 lattice.
            let x0: u64 = r.random_range(0..1u64 << 16);
            let [z1, z2] = box_muller(x0, x1, || [y, y]);
            let s = [r.random_range(-0.5f32..0.5), r.random_range(-0.5f32..0.5)];
            let o = [(f64::from(s[0]) + z1) as f32, (f64::from(s[1]) + z2) as f32];
            let (e1, e2) = (
                f64::from(o[0]) - f64::from(s[0]),
                f64::from(o[1]) - f64::from(s[1]),
            );
            let k = (-(e1 * e1 + e2 * e2) / 2.0).exp() * 2f64.powi(64);
            tail_hits += usize::from((k - k.round()).abs() < 0.05);
            // Smallest radii: ~x0 < 2^16 (u within 2^-48 of 1), an empty batch (S = 0).
            let x0 = !r.random_range(0..1u64 << 16);
            let [z1, z2] = box_muller(x0, x1, || [y, y]);
            let o = [z1 as f32, z2 as f32];
            let rho2 = f64::from(o[0]).powi(2) + f64::from(o[1]).powi(2);
            let k = rho2 / 2.0 * 2f64.powi(64);
            centre_hits += usize::from((k - k.round()).abs() < 0.05);
        }
        (tail_hits, centre_hits)
    };
    let (tail_hits, centre_hits) = hits(true, &mut r);
    // Chance: Binomial(n, 0.1), mean 400, sd 19; 5 sd above chance fails.
    for (what, hits) in [("deep tail", tail_hits), ("smallest radii", centre_hits)] {
        assert!(
            hits < 400 + 95,
            "{what}: the lattice test passed {hits}/{n}"
        );
    }
    // Without the refinement the lattice shows at both ends (the test can fail).
    let (tail_coarse, centre_coarse) = hits(false, &mut r);
    assert!(
        tail_coarse > 2000 && centre_coarse > 2000,
        "unrefined radii: {tail_coarse}, {centre_coarse} of {n}"
    );
}

/// The third review's attack on the angle: near an axis one output of the pair is
/// tiny and f32 keeps its 24 significant bits, so with S = 0 (an empty batch) the
/// ratio o₁/o₀ = tan(πf/2) gives the offset f of the angle word from the axis; on a
/// 2⁻⁶² (or 53-bit) lattice it recovers the lattice index exactly, distinguishing
/// S = 0 from any other sum. With the tail-word refinement the index is at chance.
#[test]
fn the_angle_lattice_test_is_at_chance_near_the_axes() {
    let mut r = common::rng(29);
    let n = 4000;
    let hits = |refine: bool, r: &mut rand_chacha::ChaCha8Rng| {
        let mut hits = 0;
        for _ in 0..n {
            let m: i64 = r.random_range(-(1i64 << 16)..1 << 16);
            let x1 = m as u64; // quarter turn 0, offset m
            let x0: u64 = r.random::<u64>() | (1 << 40) | (1 << 62); // an ordinary radius
            let y1: u64 = if refine { r.random() } else { 0 };
            let [z0, z1] = box_muller(x0, x1, || [0, y1]);
            let (o0, o1) = (z0 as f32, z1 as f32);
            let k =
                f64::from(o1).atan2(f64::from(o0)) / std::f64::consts::FRAC_PI_2 * 2f64.powi(62);
            hits += usize::from((k - k.round()).abs() < 0.05);
        }
        hits
    };
    // Without the refinement the lattice shows (the test can fail) ...
    let coarse = hits(false, &mut r);
    assert!(coarse > 3000, "coarse angles: {coarse}/{n}");
    // ... with it the index is at chance: Binomial(n, 0.1), 5 sd above is 495.
    let fine = hits(true, &mut r);
    assert!(fine < 495, "the angle lattice test passed {fine}/{n}");
}

#[test]
fn noise_axpy_many_with_stored_directions_is_bitwise_regeneration() {
    // The CPU keeps the last call's directions and reuses them for the same keys
    // and lengths (DPZO's three perturbations of one step); every call must give
    // what regenerating gives, and a new key or a new length must not reuse them.
    use dualpriv::backend::cpu::Cpu;
    use dualpriv::backend::dp::DpBackend;
    use dualpriv::backend::Backend;
    let stream = StreamKey::from_insecure_seed(RngKind::Chacha20, 5);
    let key = |tensor_id: u32, step: u32| NoiseKey {
        stream,
        tensor_id,
        step,
    };
    let lens = [1024usize, 37, 5000, 8];
    let start: Vec<Vec<f32>> = lens
        .iter()
        .map(|&n| (0..n).map(|i| (i as f32 * 0.37).sin()).collect())
        .collect();
    let mut bufs: Vec<_> = start.iter().map(|v| Cpu.upload(v).unwrap()).collect();
    let mut want = start.clone();
    // (step, a, whether a tensor grows): the same draw three times, then a new
    // draw, then the new draw with a tensor one value longer (whose last value a
    // reuse of the stored directions would leave unperturbed).
    let calls: [(u32, f64, bool); 5] = [
        (3, 1e-3, false),
        (3, -2e-3, false),
        (3, 1e-3 - 0.25, false),
        (4, 0.5, false),
        (4, -0.5, true),
    ];
    for (c, &(step, a, longer)) in calls.iter().enumerate() {
        if longer {
            want[2].push(0.5);
            bufs[2] = Cpu.upload(&want[2]).unwrap();
        }
        for (t, w) in want.iter_mut().enumerate() {
            key(t as u32, step).add_scaled(0, a, w);
        }
        let mut pairs: Vec<_> = bufs
            .iter_mut()
            .enumerate()
            .map(|(t, b)| (b, key(t as u32, step)))
            .collect();
        Cpu.noise_axpy_many(&mut pairs, a).unwrap();
        for (t, (b, w)) in bufs.iter().zip(&want).enumerate() {
            let got = Cpu.download(b).unwrap();
            assert_eq!(got.len(), w.len());
            assert!(
                got.iter().zip(w).all(|(x, y)| x.to_bits() == y.to_bits()),
                "call {c}, tensor {t}: differs from regenerating"
            );
        }
    }
}
