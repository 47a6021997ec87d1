//! `eˣ` in f32 written so loops over slices vectorise (no call, no branch), for the
//! f32 backend's SiLU, sigmoid and softmax: libm's `expf` was 5 % of a tiny step,
//! one scalar call per value.
//!
//! Cody–Waite range reduction `x = n·ln 2 + t`, |t| ≤ ln 2 / 2, then Cephes'
//! degree-6 minimax polynomial for `eᵗ` (Moshier, Cephes `expf.c`), then `2ⁿ` put
//! into the exponent bits. The unit test bounds the error against f64 `exp` at
//! 2 ulp over the whole finite range; CUDA's `expf` is documented at 2 ulp too.
//!
//! Also here: [`simd_fn`], which compiles a loop for AVX-512, for AVX2 + FMA and
//! as built, and runs the widest copy the CPU has ([`simd_tier`]).
use std::sync::atomic::{AtomicU8, Ordering::Relaxed};

/// `eˣ` within 2 ulp (relative 2.4e-7) for x ∈ [−87.33, 88.3]. Below it returns 0
/// and above `e^88.3`; NaN stays NaN. It never returns a subnormal: arithmetic on
/// subnormals is ~100× slower on x86, and a softmax row with a few very low scores
/// once made a whole training step 3× slower (a clamp at the low end returned
/// ~1e−38 for every score far below the row's maximum).
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n·LN2_HI is exact for |n| < 2⁹.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5·2²³: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    // Below −126·ln 2 ≈ −87.3365 the result is subnormal; the cut sits just
    // above it, where n = −126 and t > 0, so the smallest result is ≥ 2⁻¹²⁶.
    const LOW: f32 = -87.33;
    let xc = x.clamp(LOW, 88.3);
    // The rounded sum holds n in its low mantissa bits: 2ⁿ is formed from them
    // with integer arithmetic, as a float-to-int cast (saturating in Rust) does
    // not vectorise everywhere.
    let kb = (xc * LOG2E + ROUND).to_bits();
    let n = f32::from_bits(kb) - ROUND;
    let t = xc - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * t + 1.398_2e-3;
    let p = p * t + 8.333_452e-3;
    let p = p * t + 4.166_579_6e-2;
    let p = p * t + 1.666_666_5e-1;
    let p = p * t + 0.5; // Cephes: 5.0000001e-1, which rounds to 0.5 in f32
    let et = p * t * t + t + 1.0;
    // NaN passes the clamp and every step after it (and fails `x < LOW`).
    // n ∈ [−126, 127] after the clamp, so n + 127 is a valid biased exponent.
    let two_n = f32::from_bits(kb.wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23);
    let y = et * two_n;
    if x < LOW {
        0.0
    } else {
        y
    }
}

/// The widest instruction set [`simd_fn`] functions run on this CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SimdTier {
    /// As built: baseline x86-64 (SSE2, 4 lanes), or any other architecture.
    Plain = 0,
    /// AVX2 with FMA (8 lanes): AMD Zen, Intel since Haswell.
    Avx2 = 1,
    /// AVX-512 F/VL/DQ (16 lanes): Intel Xeon since Skylake-SP, AMD Zen 4.
    Avx512 = 2,
}

/// The tier detected, capped by [`limit_simd`] and `DUALPRIV_CPU_SIMD`; 0xff until
/// first needed.
static TIER: AtomicU8 = AtomicU8::new(0xff);
/// The cap [`limit_simd`] set (0xff: none).
static LIMIT: AtomicU8 = AtomicU8::new(0xff);

thread_local! {
    /// This thread's own cap ([`with_simd_limit`]); 0xff: none.
    static THREAD_LIMIT: std::cell::Cell<u8> = const { std::cell::Cell::new(0xff) };
}

fn detect() -> SimdTier {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("avx512vl") && has!("avx512dq") && has!("avx2") && has!("fma") {
            return SimdTier::Avx512;
        }
        if has!("avx2") && has!("fma") {
            return SimdTier::Avx2;
        }
    }
    SimdTier::Plain
}

fn tier_of(v: u8) -> SimdTier {
    match v {
        0 => SimdTier::Plain,
        1 => SimdTier::Avx2,
        _ => SimdTier::Avx512,
    }
}

/// `DUALPRIV_CPU_SIMD`'s cap: `plain` (also `none`, `sse2`), `avx2` or `avx512`, in
/// any case; another value is reported on stderr and caps nothing.
fn env_cap() -> SimdTier {
    let Ok(v) = std::env::var("DUALPRIV_CPU_SIMD") else {
        return SimdTier::Avx512;
    };
    match v.to_ascii_lowercase().as_str() {
        "plain" | "none" | "sse2" => SimdTier::Plain,
        "avx2" => SimdTier::Avx2,
        "avx512" | "" => SimdTier::Avx512,
        _ => {
            eprintln!(
                "dualpriv: DUALPRIV_CPU_SIMD={v:?} is not one of plain, avx2, avx512; ignored"
            );
            SimdTier::Avx512
        }
    }
}

/// The process-wide tier: detected, capped by the environment and [`limit_simd`].
fn global_tier() -> SimdTier {
    let t = TIER.load(Relaxed);
    if t != 0xff {
        return tier_of(t);
    }
    let t = detect().min(env_cap()).min(tier_of(LIMIT.load(Relaxed)));
    // Only the first detection stores; `limit_simd` stores its own result, which
    // a slower detection racing it must not overwrite.
    match TIER.compare_exchange(0xff, t as u8, Relaxed, Relaxed) {
        Ok(_) => t,
        Err(now) => tier_of(now),
    }
}

/// The tier [`simd_fn`] functions and the f32 GEMM run at: the CPU's widest,
/// unless capped by `DUALPRIV_CPU_SIMD` (`plain`, `avx2` or `avx512`, read once),
/// by [`limit_simd`] or, on this thread, by [`with_simd_limit`]. Two relaxed loads.
#[inline]
pub fn simd_tier() -> SimdTier {
    let t = global_tier();
    let local = THREAD_LIMIT.with(std::cell::Cell::get);
    if local == 0xff {
        t
    } else {
        t.min(tier_of(local))
    }
}

/// Caps [`simd_tier`] at `max` for the whole process (`None` lifts the cap). The
/// `simd_fn` loops give the same bits at every tier, but the f32 GEMM does not:
/// at `Plain` it is `matrixmultiply`, which rounds differently from the crate's
/// kernel. For benchmarks and for tests that hold the process to themselves.
pub fn limit_simd(max: Option<SimdTier>) {
    let cap = max.map_or(0xff, |t| t as u8);
    LIMIT.store(cap, Relaxed);
    let t = detect().min(env_cap()).min(tier_of(cap));
    TIER.store(t as u8, Relaxed);
}

/// Runs `f` with [`simd_tier`] capped at `max` on this thread only (so tests
/// running alongside are not affected; work `f` hands to other threads is not
/// capped).
pub fn with_simd_limit<R>(max: SimdTier, f: impl FnOnce() -> R) -> R {
    struct Restore(u8);
    impl Drop for Restore {
        fn drop(&mut self) {
            THREAD_LIMIT.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(THREAD_LIMIT.with(|c| c.replace(max as u8)));
    f()
}

/// Defines a function whose body is compiled three times, for AVX-512, for AVX2
/// with FMA and as built, and runs the widest copy this CPU has ([`simd_tier`]).
///
/// The crate is built for baseline x86-64 (SSE2), so a plain loop is vectorised
/// 4 lanes wide; a binary built with `-C target-cpu=native` would not run on
/// another machine. The body becomes an `#[inline(always)]` function called from
/// `#[target_feature]` wrappers and from the plain path, so LLVM inlines and
/// vectorises it in each. (Passing a closure to a `target_feature` function does
/// not do this reliably: the closure then has two callers and a large one is
/// compiled once, as built; four of the CPU's hot loops ran 4 lanes wide so.)
/// Results are the same in every copy: LLVM does not reorder floating-point
/// operations (no fast-math, no contraction into FMA; an explicit `mul_add` is
/// fused in each, by the instruction or by libm), so a reduction keeps the order
/// it is written in; `tests` below compares the copies bitwise.
macro_rules! simd_fn {
    (
        $(#[$m:meta])*
        $vis:vis fn $name:ident $(<$($g:ident: $bound:path),*>)? ($($a:ident: $t:ty),* $(,)?) $(-> $r:ty)?
        $body:block
    ) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name $(<$($g: $bound),*>)? ($($a: $t),*) $(-> $r)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body $(<$($g: $bound),*>)? ($($a: $t),*) $(-> $r)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn wide $(<$($g: $bound),*>)? ($($a: $t),*) $(-> $r)? {
                body($($a),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn mid $(<$($g: $bound),*>)? ($($a: $t),*) $(-> $r)? {
                body($($a),*)
            }
            #[cfg(target_arch = "x86_64")]
            match $crate::backend::cpu::math::simd_tier() {
                // SAFETY: the features each copy is compiled for were detected.
                $crate::backend::cpu::math::SimdTier::Avx512 => return unsafe { wide($($a),*) },
                // SAFETY: as above.
                $crate::backend::cpu::math::SimdTier::Avx2 => return unsafe { mid($($a),*) },
                $crate::backend::cpu::math::SimdTier::Plain => {}
            }
            body($($a),*)
        }
    };
}
pub(crate) use simd_fn;

/// f64 sum of `f(i)` for i in 0..n in eight interleaved partial sums (lane i % 8),
/// combined pairwise: a fixed order, so the result does not depend on the CPU,
/// and eight independent additions in flight instead of one dependent chain (a
/// 128-value row sum was latency-bound at 4 cycles per value).
#[inline(always)]
pub fn sum8(n: usize, f: impl Fn(usize) -> f64) -> f64 {
    let mut acc = [0.0f64; 8];
    let full = n / 8 * 8;
    let mut i = 0;
    while i < full {
        for (l, a) in acc.iter_mut().enumerate() {
            *a += f(i + l);
        }
        i += 8;
    }
    for (l, a) in acc.iter_mut().enumerate().take(n - full) {
        *a += f(full + l);
    }
    ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]))
}

/// Sets flush-to-zero and denormals-are-zero (MXCSR) on the calling thread, so
/// SSE/AVX arithmetic treats subnormal inputs and results as 0; threads it
/// creates afterwards (the rayon pool's, on first use) inherit the setting
/// (POSIX: a new thread inherits the creating thread's floating-point
/// environment). The `dualpriv` binary calls it first thing, as TensorFlow and XLA
/// do on their CPU threads.
///
/// Why: x86 takes a microcode assist on every subnormal operand, ~100× a normal
/// operation. In `dualpriv bench --method all` a method run after `nonprivate`
/// took 1.7× its own time (58–66 ms against 36 ms at tiny B = 32) until this was
/// set: values under 2⁻¹²⁶ formed in the attention backward (P ⊙ (dP − Σ dP⊙P) of
/// tiny probabilities) and in the per-example gradients built from them. Only
/// values below the smallest normal change (2⁻¹²⁶ ≈ 1.2e−38 in f32, 2⁻¹⁰²² in f64;
/// the setting is process-wide, so the f64 accountant and checkpoint merging run
/// under it too, where no value comes near 2⁻¹⁰²²; the noise sampler forms no
/// subnormal). A library caller decides for its own threads; the crate's tests run
/// without it, and the binary skips it when `DUALPRIV_IEEE_SUBNORMALS` is set (to
/// any value). Rust and LLVM assume the default
/// floating-point environment, so constant-folded code still computes with
/// subnormals where the running code flushes them: the two can differ below
/// 2⁻¹²⁶, and nowhere else.
pub fn flush_subnormals_on_this_thread() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: MXCSR bits 15 (FTZ) and 6 (DAZ) are defined on every x86-64 CPU
    // with SSE2; setting them changes only how subnormals are treated.
    #[allow(deprecated)]
    unsafe {
        use std::arch::x86_64::{_mm_getcsr, _mm_setcsr};
        _mm_setcsr(_mm_getcsr() | 0x8040);
    }
}

#[cfg(test)]
mod tests {
    use super::exp_f32;

    /// Units in the last place of `want` (an f32 value) between it and `got`.
    fn ulps(got: f32, want: f64) -> f64 {
        let w = want as f32;
        let ulp = (f32::from_bits(w.to_bits() + 1) - w) as f64;
        (got as f64 - want).abs() / ulp
    }

    #[test]
    fn within_two_ulp_of_exp() {
        // Every 97th f32 in [−87.33, 88.3] (about 22 million values).
        let (lo, hi) = (-87.33f32, 88.3f32);
        let mut worst = (0.0, 0.0f32);
        let mut check = |x: f32| {
            let u = ulps(exp_f32(x), (x as f64).exp());
            if u > worst.0 {
                worst = (u, x);
            }
        };
        let mut b = lo.to_bits();
        while f32::from_bits(b) < 0.0 {
            check(f32::from_bits(b));
            b = b.saturating_sub(97);
        }
        let mut b = 0u32;
        while f32::from_bits(b) <= hi {
            check(f32::from_bits(b));
            b += 97;
        }
        assert!(worst.0 <= 2.0, "{} ulp at x = {}", worst.0, worst.1);
    }

    super::simd_fn! {
        fn probe(x: &[f32], y: &mut [f32]) -> f64 {
            for (y, &v) in y.iter_mut().zip(x) {
                *y = exp_f32(-v.abs()) / (1.0 + v * v);
            }
            super::sum8(y.len(), |i| f64::from(y[i])) + y.iter().map(|&v| f64::from(v)).sum::<f64>()
        }
    }

    #[test]
    fn simd_fn_is_bitwise_the_plain_loop() {
        use super::{detect, simd_tier, with_simd_limit, SimdTier};
        let x: Vec<f32> = (0..10_007).map(|i| (i as f32 - 5000.0) * 0.0173).collect();
        let mut plain = vec![0.0; x.len()];
        let mut ps = 0.0;
        for (y, &v) in plain.iter_mut().zip(&x) {
            *y = exp_f32(-v.abs()) / (1.0 + v * v);
        }
        let mut acc = [0.0f64; 8];
        for (i, &v) in plain.iter().enumerate() {
            acc[i % 8] += f64::from(v);
        }
        ps += ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
        ps += plain.iter().map(|&v| f64::from(v)).sum::<f64>();
        // Every copy this CPU can run, capped on this thread only.
        for tier in [SimdTier::Avx512, SimdTier::Avx2, SimdTier::Plain] {
            if tier > detect() {
                continue;
            }
            let (wide, ws) = with_simd_limit(tier, || {
                assert!(simd_tier() <= tier);
                let mut wide = vec![0.0; x.len()];
                let ws = probe(&x, &mut wide);
                (wide, ws)
            });
            assert!(
                plain
                    .iter()
                    .zip(&wide)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{tier:?}"
            );
            assert_eq!(ps.to_bits(), ws.to_bits(), "{tier:?}");
        }
    }

    #[test]
    fn edges() {
        assert!(exp_f32(f32::NAN).is_nan());
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(-1000.0), 0.0);
        assert_eq!(exp_f32(-87.34), 0.0);
        // No subnormal anywhere below the cut or above it.
        let mut x = -88.0f32;
        while x < -86.0 {
            let y = exp_f32(x);
            assert!(y == 0.0 || y.is_normal(), "exp({x}) = {y:e} is subnormal");
            x += 1e-5;
        }
        assert!(exp_f32(1000.0).is_finite() && exp_f32(1000.0) > 1e38);
        assert!((exp_f32(1.0) - std::f32::consts::E).abs() <= f32::EPSILON * 3.0);
    }
}
