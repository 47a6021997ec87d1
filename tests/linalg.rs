//! The CPU GEMMs (`src/linalg`): the f32 path (this crate's AVX-512 kernel where
//! the CPU has it) and `matrixmultiply` against the obvious triple loop in f64,
//! over edge shapes (rows not a multiple of 12, columns not of 32, depth across
//! the 256 block), every transpose, alpha/beta, a NaN-filled output with beta = 0,
//! and one product split over threads against the same product on one thread.
//! Every kernel tier this CPU has (AVX-512, AVX2 + FMA, `matrixmultiply`) is
//! checked, and the two vector tiers against each other bitwise.
use dualpriv::backend::cpu::math::{limit_simd, simd_tier, SimdTier};
use dualpriv::linalg::{gemm_f32, gemm_f32_matrixmultiply, View};
use std::sync::Mutex;

/// Held by every test: one of them changes the process's SIMD tier, and the
/// bitwise comparisons must not see it change midway.
static TIER: Mutex<()> = Mutex::new(());

/// The tiers this CPU runs, widest first.
fn tiers() -> Vec<SimdTier> {
    limit_simd(None);
    let top = simd_tier();
    [SimdTier::Avx512, SimdTier::Avx2, SimdTier::Plain]
        .into_iter()
        .filter(|&t| t <= top)
        .collect()
}
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The reference: `alpha·a·b + beta·c` term by term in f64.
fn reference(alpha: f32, a: View<'_, f32>, b: View<'_, f32>, beta: f32, c: &[f32]) -> Vec<f64> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0f64;
            for l in 0..k {
                s += a.data[i * a.rs + l * a.cs] as f64 * b.data[l * b.rs + j * b.cs] as f64;
            }
            let old = if beta == 0.0 {
                0.0
            } else {
                beta as f64 * c[i * n + j] as f64
            };
            out[i * n + j] = alpha as f64 * s + old;
        }
    }
    out
}

fn rand_vec(r: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| r.random_range(-1.0f32..1.0)).collect()
}

/// A `rows × cols` view over `data`, stored transposed when `t`, with `pad`
/// unused values after each stored row (as attention's per-head views have: the
/// row stride is all heads' width).
fn view(data: &[f32], rows: usize, cols: usize, t: bool, pad: usize) -> View<'_, f32> {
    let (sr, sc) = if t { (cols, rows) } else { (rows, cols) };
    let v = View {
        data,
        rows: sr,
        cols: sc,
        rs: sc + pad,
        cs: 1,
    };
    if t {
        v.t()
    } else {
        v
    }
}

/// Values stored for a `rows × cols` matrix with `pad` after each stored row.
fn stored(rows: usize, cols: usize, t: bool, pad: usize) -> usize {
    let (sr, sc) = if t { (cols, rows) } else { (rows, cols) };
    sr * (sc + pad)
}

/// Guard values after a buffer: a read past A or B would bring NaN into C, and a
/// write past C would change them.
const GUARD: usize = 64;

type Gemm = fn(f32, View<'_, f32>, View<'_, f32>, f32, &mut [f32], usize);

fn check(gemm: Gemm, name: &str) {
    let mut r = ChaCha8Rng::seed_from_u64(7);
    let shapes = [
        (1, 1, 1),
        (3, 5, 7),
        (12, 32, 16),
        (13, 33, 17),
        (20, 16, 40),
        (5, 17, 3),
        (25, 64, 128),
        (31, 31, 32),
        (11, 70, 300),
        (40, 8, 513),
        (7, 600, 9),
        (24, 96, 0),
    ];
    for &(m, n, k) in &shapes {
        for (ta, tb, pad) in [
            (false, false, 0),
            (false, true, 0),
            (true, false, 0),
            (true, true, 0),
            (false, false, 5),
            (false, true, 3),
        ] {
            for (alpha, beta) in [(1.0f32, 0.0f32), (0.5, 1.0), (-2.0, 0.25)] {
                // Stored values, then NaN guards (and NaN in the row padding).
                let fill = |r: &mut ChaCha8Rng, len: usize| {
                    let mut v = rand_vec(r, len);
                    v.extend(std::iter::repeat_n(f32::NAN, GUARD));
                    v
                };
                let mut ad = fill(&mut r, stored(m, k, ta, pad));
                let mut bd = fill(&mut r, stored(k, n, tb, pad));
                for (d, rows, cols, t) in [(&mut ad, m, k, ta), (&mut bd, k, n, tb)] {
                    let (sr, sc) = if t { (cols, rows) } else { (rows, cols) };
                    for i in 0..sr {
                        d[i * (sc + pad) + sc..][..pad].fill(f32::NAN);
                    }
                }
                let a = view(&ad, m, k, ta, pad);
                let b = view(&bd, k, n, tb, pad);
                let mut c0 = if beta == 0.0 {
                    vec![f32::NAN; m * n]
                } else {
                    rand_vec(&mut r, m * n)
                };
                c0.extend(std::iter::repeat_n(7.0, GUARD));
                let want = reference(alpha, a, b, beta, &c0);
                let mut c = c0.clone();
                gemm(alpha, a, b, beta, &mut c, n);
                assert!(
                    c[m * n..].iter().all(|&g| g == 7.0),
                    "{name} m={m} n={n} k={k}: wrote past C"
                );
                for (idx, (&got, &w)) in c[..m * n].iter().zip(&want).enumerate() {
                    // f32 sums of k terms of size ≤ 1: error ≤ k·2⁻²⁴·|terms|.
                    let tol = 1e-6 * (k as f64 + 1.0) * (alpha.abs() as f64 + 1.0) + 1e-6;
                    assert!(
                        (got as f64 - w).abs() <= tol,
                        "{name} m={m} n={n} k={k} ta={ta} tb={tb} pad={pad} alpha={alpha} \
                         beta={beta} at {idx}: {got} vs {w}"
                    );
                }
            }
        }
    }
}

#[test]
fn gemm_f32_matches_the_triple_loop_at_every_tier() {
    let _g = TIER.lock().unwrap_or_else(|e| e.into_inner());
    for tier in tiers() {
        limit_simd(Some(tier));
        check(gemm_f32, &format!("gemm_f32 at {tier:?}"));
    }
    limit_simd(None);
}

#[test]
fn matrixmultiply_matches_the_triple_loop() {
    let _g = TIER.lock().unwrap_or_else(|e| e.into_inner());
    check(gemm_f32_matrixmultiply, "matrixmultiply");
}

#[test]
fn avx512_and_avx2_kernels_are_bit_identical() {
    // Both sum each value as one FMA chain in k order per 256-deep block.
    let _g = TIER.lock().unwrap_or_else(|e| e.into_inner());
    let tiers = tiers();
    if !tiers.contains(&SimdTier::Avx512) {
        eprintln!("skipped: this CPU has no AVX-512 (tiers {tiers:?})");
        return;
    }
    let mut r = ChaCha8Rng::seed_from_u64(11);
    for (m, n, k, ta, tb, beta) in [
        (37, 70, 300, false, true, 0.0f32),
        (13, 8, 600, true, false, 0.5),
        (100, 33, 40, false, false, -1.0),
        (31, 31, 32, false, true, 0.0),
    ] {
        let ad = rand_vec(&mut r, m * k);
        let bd = rand_vec(&mut r, k * n);
        let a = view(&ad, m, k, ta, 0);
        let b = view(&bd, k, n, tb, 0);
        let c0 = rand_vec(&mut r, m * n);
        let mut out = Vec::new();
        for tier in [SimdTier::Avx512, SimdTier::Avx2] {
            limit_simd(Some(tier));
            let mut c = c0.clone();
            gemm_f32(0.75, a, b, beta, &mut c, n);
            out.push(c);
        }
        limit_simd(None);
        assert!(
            out[0]
                .iter()
                .zip(&out[1])
                .all(|(x, y)| x.to_bits() == y.to_bits()),
            "m={m} n={n} k={k} ta={ta} tb={tb}: AVX-512 and AVX2 differ"
        );
    }
}

#[test]
fn gemm_f32_split_over_threads_is_bit_identical() {
    let _g = TIER.lock().unwrap_or_else(|e| e.into_inner());
    // Large enough to be split over the global pool's threads: by rows, by columns
    // (C wide and short), and by columns for a transposed B (X·Wᵀ, packed per job).
    if rayon::current_num_threads() < 2 {
        eprintln!("skipped: one rayon thread, so no product is split");
        return;
    }
    let mut r = ChaCha8Rng::seed_from_u64(9);
    for (m, n, k, tb, beta) in [
        (600, 128, 300, false, 0.0f32),
        (16, 900, 600, false, 0.0),
        (600, 256, 300, true, 0.5),
    ] {
        let ad = rand_vec(&mut r, m * k);
        let bd = rand_vec(&mut r, k * n);
        let a = View::row_major(&ad, m, k);
        let b = view(&bd, k, n, tb, 0);
        let c0 = rand_vec(&mut r, m * n);
        let mut split = c0.clone();
        gemm_f32(1.0, a, b, beta, &mut split, n);
        // Inside a rayon job a product runs whole on that thread.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let mut whole = c0.clone();
        pool.install(|| gemm_f32(1.0, a, b, beta, &mut whole, n));
        assert!(
            split
                .iter()
                .zip(&whole)
                .all(|(x, y)| x.to_bits() == y.to_bits()),
            "m={m} n={n} k={k} tb={tb}: split result differs"
        );
    }
}
