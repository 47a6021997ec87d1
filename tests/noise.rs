//! Philox known answers, Gaussian statistics, stream independence, and the CUDA
//! noise against the CPU reference.
use dualpriv::dp::noise::{philox4x32_10, NoiseKey};

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

const N: usize = 1_000_000;

fn samples(key: NoiseKey) -> Vec<f32> {
    let mut v = vec![0.0; N];
    key.fill(0, &mut v);
    v
}

#[test]
fn gaussian_moments_within_5_sigma() {
    let v = samples(NoiseKey {
        seed: 42,
        tensor_id: 7,
        step: 3,
    });
    let n = N as f64;
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    let m2 = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
    let m4 = v.iter().map(|&x| (x as f64 - mean).powi(4)).sum::<f64>() / n;
    // Standard errors: mean 1/√n; variance √(2/n); fourth moment √(96/n).
    assert!(mean.abs() < 5.0 / n.sqrt(), "mean {mean}");
    assert!((m2 - 1.0).abs() < 5.0 * (2.0 / n).sqrt(), "variance {m2}");
    assert!((m4 - 3.0).abs() < 5.0 * (96.0 / n).sqrt(), "kurtosis {m4}");
    // Tail mass beyond 3σ: p = 0.0026998, binomial standard error.
    let tail = v.iter().filter(|x| x.abs() > 3.0).count() as f64 / n;
    let p = 0.002_699_8;
    assert!(
        (tail - p).abs() < 5.0 * (p * (1.0 - p) / n).sqrt(),
        "tail {tail}"
    );
    assert!(v.iter().all(|x| x.is_finite()));
}

/// Correlation of two streams must be within 5 standard errors (1/√n) of 0.
fn assert_uncorrelated(a: &[f32], b: &[f32], what: &str) {
    let n = a.len() as f64;
    let c = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| x as f64 * y as f64)
        .sum::<f64>()
        / n;
    assert!(c.abs() < 5.0 / n.sqrt(), "{what}: correlation {c}");
    assert!(
        a.iter().zip(b).filter(|(x, y)| x == y).count() < 10,
        "{what}: streams coincide"
    );
}

#[test]
fn streams_are_independent_across_step_tensor_and_seed() {
    let base = samples(NoiseKey {
        seed: 1,
        tensor_id: 0,
        step: 0,
    });
    assert_uncorrelated(
        &base,
        &samples(NoiseKey {
            seed: 1,
            tensor_id: 0,
            step: 1,
        }),
        "step",
    );
    assert_uncorrelated(
        &base,
        &samples(NoiseKey {
            seed: 1,
            tensor_id: 1,
            step: 0,
        }),
        "tensor id",
    );
    assert_uncorrelated(
        &base,
        &samples(NoiseKey {
            seed: 2,
            tensor_id: 0,
            step: 0,
        }),
        "seed",
    );
    // Neighbouring elements of one stream (the two Box–Muller outputs, the two pairs).
    assert_uncorrelated(&base[..N - 1], &base[1..], "lag 1");
    assert_uncorrelated(&base[..N - 2], &base[2..], "lag 2");
}

#[test]
fn regeneration_is_random_access() {
    let key = NoiseKey {
        seed: 0xdead_beef_0123,
        tensor_id: 9,
        step: 77,
    };
    let mut whole = vec![0.0; 103];
    key.fill(0, &mut whole);
    for off in [0usize, 1, 2, 3, 5, 50] {
        let mut part = vec![0.0; 103 - off];
        key.fill(off as u64, &mut part);
        assert_eq!(part, whole[off..]);
    }
    for (i, &w) in whole.iter().enumerate() {
        assert_eq!(key.normal(i as u64), w);
    }
    // Indices beyond 2^34 use the counter's second word.
    let far = 1u64 << 36;
    assert_ne!(key.normal(far), key.normal(far - (1 << 34)));
    assert_eq!(key.normal(far + 5), key.normal4((far + 5) >> 2)[1]);
}

#[cfg(feature = "cuda")]
#[test]
fn gpu_noise_matches_cpu_bit_for_bit() {
    use dualpriv::gpu::{gpu_or_skip, noise::noise_axpy};
    let Some(gpu) = gpu_or_skip("gpu_noise_matches_cpu_bit_for_bit") else {
        return;
    };
    let key = NoiseKey {
        seed: 0x1234_5678_9abc,
        tensor_id: 3,
        step: 11,
    };
    for (offset, n) in [(0u64, N), (3, 1001), ((1u64 << 34) + 1, 4099)] {
        let mut want = vec![0.0f32; n];
        key.fill(offset, &mut want);
        let mut y = gpu.zeros::<f32>(n).unwrap();
        noise_axpy(&gpu, key, offset, 1.0, false, &mut y).unwrap();
        let got = gpu.download(&y).unwrap();
        // f64 Box–Muller on both sides: equal bits except for rare double-rounding
        // cases, which may differ by one ulp.
        let mut exact = 0;
        for (g, w) in got.iter().zip(&want) {
            let ulps = (g.to_bits() as i64 - w.to_bits() as i64).abs();
            assert!(ulps <= 1, "offset {offset}: {g} vs {w}");
            exact += (ulps == 0) as usize;
        }
        assert!(
            exact as f64 >= 0.9999 * n as f64,
            "only {exact}/{n} bit-exact"
        );
    }
}
