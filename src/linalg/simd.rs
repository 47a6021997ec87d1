//! This crate's single-precision GEMM for the shapes of its CPU step, compiled for
//! AVX-512 (16 lanes) and for AVX2 + FMA (8 lanes) from one generic body.
//!
//! Why not `matrixmultiply` alone: on the tiny and small presets a product is
//! thin (K = 128–512) and `matrixmultiply` packs both A and B on every call, into
//! a buffer it allocates per call; a profile of the tiny nonprivate step put 15 %
//! of it in that packing against 36 % in the arithmetic. This kernel reads A in
//! place, and B too when it is row-major and A has few rows (else it packs B
//! once per (K block, N block) into panels of two vectors' width): each step of the inner loop
//! broadcasts one value from each of up to `MR` rows of A (any strides) against
//! the vectors of one row of the B panel, into a block of C held in registers
//! (12 × 32 in 24 of AVX-512's 32 registers, 6 × 16 in 12 of AVX2's 16).
//! Packing B is K·N copies against M·N·K multiply-adds, so it vanishes once M is
//! more than a few rows.
//!
//! Each C value is one fused multiply-add chain in k order within a block of `KC`
//! (256), and the blocks are added to C in order, whatever the row or column range
//! a thread is given and whatever the vector width: a product gives bit-identical
//! results split over threads or not, and on AVX-512 or AVX2 (`tests/linalg.rs`
//! checks both). `beta = 0` never reads C (it may hold another buffer's stale
//! values or NaN).
//!
//! The straightforward triple loop it must agree with is `tests/linalg.rs`'s
//! reference; `matrixmultiply` stays the path on CPUs without AVX2 + FMA.
use std::arch::x86_64::*;
use std::cell::RefCell;

/// Depth of one packed block of B: a 12 × 256 block of A (12 KiB) stays in L1
/// while it meets every panel.
const KC: usize = 256;
/// Columns of one packed block of B: 256 × 512 values are 512 KiB, inside L2.
const NC: usize = 512;

/// Rows of A below which a row-major B is read in place rather than packed.
const DIRECT_ROWS: usize = 64;

thread_local! {
    /// The packed block of B; grows to its largest use once per thread, so a
    /// steady-state step makes no allocation here.
    static PACKED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// One instruction set's vector of f32 lanes: the operations the kernel and the
/// packing need. The methods are `#[inline(always)]` and called only from the
/// `#[target_feature]` entry points below, so the intrinsics inline there.
///
/// # Safety
/// Every method needs the CPU features of its implementation.
trait Isa {
    /// A vector of `L` f32 lanes.
    type V: Copy;
    /// Lanes per vector.
    const L: usize;
    /// Rows of C per register block when the block is two vectors wide.
    const MR2: usize;
    /// Rows per register block when it is one vector wide (C at most `L`
    /// columns: a LoRA A product), which leaves registers for more rows.
    const MR1: usize;
    unsafe fn zero() -> Self::V;
    unsafe fn splat(x: f32) -> Self::V;
    unsafe fn load(p: *const f32) -> Self::V;
    unsafe fn fmadd(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
    /// Lanes `j < n` from `p + j`, zero elsewhere; reads only those lanes.
    unsafe fn load_first(p: *const f32, n: usize) -> Self::V;
    /// Stores lanes `j < n` at `p + j`; writes only those.
    unsafe fn store_first(p: *mut f32, v: Self::V, n: usize);
    /// Lanes `j < n` from `p + j·stride`, zero elsewhere (`15·stride` fits an i32).
    unsafe fn gather_first(p: *const f32, stride: i32, n: usize) -> Self::V;
    /// Stores all lanes at `p`.
    unsafe fn store(p: *mut f32, v: Self::V);
}

/// AVX-512F.
struct Avx512;

impl Isa for Avx512 {
    type V = __m512;
    const L: usize = 16;
    const MR2: usize = 12;
    const MR1: usize = 12;
    #[inline(always)]
    unsafe fn zero() -> __m512 {
        _mm512_setzero_ps()
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> __m512 {
        _mm512_set1_ps(x)
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m512 {
        // SAFETY: the caller's.
        unsafe { _mm512_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn fmadd(a: __m512, b: __m512, c: __m512) -> __m512 {
        _mm512_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn mul(a: __m512, b: __m512) -> __m512 {
        _mm512_mul_ps(a, b)
    }
    #[inline(always)]
    unsafe fn load_first(p: *const f32, n: usize) -> __m512 {
        // SAFETY: the masked lanes are the caller's.
        unsafe { _mm512_maskz_loadu_ps(mask16(n), p) }
    }
    #[inline(always)]
    unsafe fn store_first(p: *mut f32, v: __m512, n: usize) {
        // SAFETY: the masked lanes are the caller's.
        unsafe { _mm512_mask_storeu_ps(p, mask16(n), v) }
    }
    #[inline(always)]
    unsafe fn gather_first(p: *const f32, stride: i32, n: usize) -> __m512 {
        let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        let idx = _mm512_mullo_epi32(lanes, _mm512_set1_epi32(stride));
        // SAFETY: the masked lanes are the caller's.
        unsafe { _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), mask16(n), idx, p) }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m512) {
        // SAFETY: the caller's.
        unsafe { _mm512_storeu_ps(p, v) }
    }
}

/// The lane mask of the first `n` (capped at 16) lanes.
#[inline(always)]
fn mask16(n: usize) -> __mmask16 {
    if n >= 16 {
        0xffff
    } else {
        ((1u32 << n) - 1) as __mmask16
    }
}

/// AVX2 with FMA.
struct Avx2;

impl Avx2 {
    /// All-ones in lanes `j < n`: the form AVX2's masked loads and stores take.
    #[inline(always)]
    unsafe fn mask(n: usize) -> __m256i {
        let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        _mm256_cmpgt_epi32(_mm256_set1_epi32(n.min(8) as i32), lanes)
    }
}

impl Isa for Avx2 {
    type V = __m256;
    const L: usize = 8;
    // 12 accumulators + 2 B vectors + 1 broadcast of AVX2's 16 registers.
    const MR2: usize = 6;
    // 12 accumulators + 1 + 1.
    const MR1: usize = 12;
    #[inline(always)]
    unsafe fn zero() -> __m256 {
        _mm256_setzero_ps()
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> __m256 {
        _mm256_set1_ps(x)
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m256 {
        // SAFETY: the caller's.
        unsafe { _mm256_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn fmadd(a: __m256, b: __m256, c: __m256) -> __m256 {
        _mm256_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn mul(a: __m256, b: __m256) -> __m256 {
        _mm256_mul_ps(a, b)
    }
    #[inline(always)]
    unsafe fn load_first(p: *const f32, n: usize) -> __m256 {
        // SAFETY: masked-off lanes are not read (vmaskmovps does not fault on them).
        unsafe {
            if n >= 8 {
                _mm256_loadu_ps(p)
            } else {
                _mm256_maskload_ps(p, Self::mask(n))
            }
        }
    }
    #[inline(always)]
    unsafe fn store_first(p: *mut f32, v: __m256, n: usize) {
        // SAFETY: masked-off lanes are not written.
        unsafe {
            if n >= 8 {
                _mm256_storeu_ps(p, v)
            } else {
                _mm256_maskstore_ps(p, Self::mask(n), v)
            }
        }
    }
    #[inline(always)]
    unsafe fn gather_first(p: *const f32, stride: i32, n: usize) -> __m256 {
        let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let idx = _mm256_mullo_epi32(lanes, _mm256_set1_epi32(stride));
        let m = _mm256_castsi256_ps(Self::mask(n));
        // SAFETY: only lanes whose mask is set are read.
        unsafe { _mm256_mask_i32gather_ps::<4>(_mm256_setzero_ps(), p, idx, m) }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m256) {
        // SAFETY: the caller's.
        unsafe { _mm256_storeu_ps(p, v) }
    }
}

/// One product `c[m×n] (row stride ldc) = alpha·a·b + beta·c`, with `a[i,l]` at
/// `a + i·ars + l·acs` and `b[l,j]` at `b + l·brs + j·bcs`.
#[allow(missing_docs)] // the fields are the formula's symbols
pub struct Gemm {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub alpha: f32,
    pub a: *const f32,
    pub ars: isize,
    pub acs: isize,
    pub b: *const f32,
    pub brs: isize,
    pub bcs: isize,
    pub beta: f32,
    pub c: *mut f32,
    pub ldc: usize,
}

/// Runs `g` in AVX-512.
///
/// # Safety
/// The CPU has AVX-512F (`backend::cpu::math::simd_tier` is `Avx512`); every index of `a` (m × k), `b` (k × n)
/// and `c` (m × n) is in bounds of its allocation; `ldc ≥ n`, so rows of `c` do
/// not overlap; `c` does not alias `a` or `b`.
#[target_feature(enable = "avx512f")]
pub unsafe fn sgemm_avx512(g: &Gemm) {
    // SAFETY: the caller's contract; the features are enabled here.
    unsafe { sgemm::<Avx512>(g) }
}

/// Runs `g` in AVX2 + FMA.
///
/// # Safety
/// As [`sgemm_avx512`], with AVX2 and FMA (tier `Avx2` or above) instead of AVX-512F.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn sgemm_avx2(g: &Gemm) {
    // SAFETY: the caller's contract; the features are enabled here.
    unsafe { sgemm::<Avx2>(g) }
}

/// The product, blocked over (K, N) and then over register blocks.
///
/// # Safety
/// As [`sgemm_avx512`], with `I`'s features enabled in the caller.
#[inline(always)]
unsafe fn sgemm<I: Isa>(g: &Gemm) {
    let (m, k, n) = (g.m, g.k, g.n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for i in 0..m {
            for j in 0..n {
                // SAFETY: (i, j) is inside c (caller's contract).
                unsafe {
                    let p = g.c.add(i * g.ldc + j);
                    *p = if g.beta == 0.0 { 0.0 } else { g.beta * *p };
                }
            }
        }
        return;
    }
    // Not `PACKED.with(|cell| …)` around the body: a closure does not inherit the
    // caller's target features, so every intrinsic in it would become a call.
    let cell: *const RefCell<Vec<f32>> = PACKED.with(|cell| cell as *const _);
    // SAFETY: the thread-local outlives this call on this thread.
    let cell = unsafe { &*cell };
    {
        let mut packed = cell.borrow_mut();
        // One vector of columns when C is that narrow, else two.
        let nv = if n <= I::L { 1 } else { 2 };
        let nr = nv * I::L;
        let mr_max = if nv == 1 { I::MR1 } else { I::MR2 };
        // Row-major B is read in place only for a short A (a LoRA weight
        // gradient's 8 rows): each block of rows re-reads a panel, and a panel
        // strided across B's rows costs more to re-read than a packed one (AMD
        // EPYC, AVX2: small's dY·W 7.4 ms in place against 5.4 packed, LoRA A's
        // gradient 0.035 against 0.056).
        let direct = g.bcs == 1 && g.brs > 0 && m < DIRECT_ROWS;
        let need = KC.min(k) * NC.min(n).div_ceil(nr) * nr;
        if packed.len() < need {
            packed.resize(need, 0.0);
        }
        for k0 in (0..k).step_by(KC) {
            let kc = KC.min(k - k0);
            let beta = if k0 == 0 { g.beta } else { 1.0 };
            for n0 in (0..n).step_by(NC) {
                let nc = NC.min(n - n0);
                // A `direct` B (a LoRA gradient's X) is read in place, its rows nr
                // wide at stride brs; only a last panel narrower than nr is packed
                // (zero-padded). Otherwise every panel is packed.
                let full = if direct { nc / nr * nr } else { 0 };
                if full < nc {
                    // SAFETY: rows k0..k0+kc and columns n0+full..n0+nc of b are in
                    // bounds; `packed` holds `need` values.
                    unsafe {
                        pack_b::<I>(
                            &mut packed,
                            nr,
                            g.b,
                            g.brs,
                            g.bcs,
                            k0,
                            kc,
                            n0 + full,
                            nc - full,
                        )
                    };
                }
                for i0 in (0..m).step_by(mr_max) {
                    let mr = mr_max.min(m - i0);
                    // SAFETY: row i0, column k0 of a is in bounds.
                    let ap = unsafe { g.a.offset(i0 as isize * g.ars + k0 as isize * g.acs) };
                    for (p, j0) in (0..nc).step_by(nr).enumerate() {
                        let ncols = nr.min(nc - j0);
                        let (bp, bs) = if j0 < full {
                            // SAFETY: row k0, column n0 + j0 of b is in bounds.
                            let bp =
                                unsafe { g.b.offset(k0 as isize * g.brs + (n0 + j0) as isize) };
                            (bp, g.brs as usize)
                        } else {
                            (packed[(p - full / nr) * kc * nr..].as_ptr(), nr)
                        };
                        // SAFETY: the block (i0.., n0 + j0..) of mr × ncols is in c.
                        let cp = unsafe { g.c.add(i0 * g.ldc + n0 + j0) };
                        let blk = Block {
                            kc,
                            a: ap,
                            ars: g.ars,
                            acs: g.acs,
                            b: bp,
                            bs,
                            c: cp,
                            ldc: g.ldc,
                            ncols,
                            alpha: g.alpha,
                            beta,
                        };
                        // SAFETY: as above; the panel holds kc × nr values.
                        unsafe {
                            if nv == 1 {
                                dispatch::<I, 1>(mr, &blk)
                            } else {
                                dispatch::<I, 2>(mr, &blk)
                            }
                        };
                    }
                }
            }
        }
    }
}

/// Copies `b[k0..k0+kc, n0..n0+nc]` into panels of `nr` columns, each `kc × nr`
/// row-major, zero-padding the last panel's missing columns.
///
/// # Safety
/// That block of `b` is in bounds; `packed` holds `kc · ⌈nc/nr⌉ · nr` values;
/// `I`'s features are enabled in the caller.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn pack_b<I: Isa>(
    packed: &mut [f32],
    nr: usize,
    b: *const f32,
    brs: isize,
    bcs: isize,
    k0: usize,
    kc: usize,
    n0: usize,
    nc: usize,
) {
    // A transposed B (a linear layer's Wᵀ, attention's Kᵀ) is gathered, one
    // vector of strided values at a time, when its offsets fit an i32: the
    // per-head products of attention are small enough that scalar packing cost
    // as much as their arithmetic.
    let gather = bcs != 1
        && bcs
            .checked_mul(I::L as isize - 1)
            .is_some_and(|t| i32::try_from(t).is_ok());
    for (p, j0) in (0..nc).step_by(nr).enumerate() {
        let w = nr.min(nc - j0);
        let panel = &mut packed[p * kc * nr..(p + 1) * kc * nr];
        for l in 0..kc {
            let dst = &mut panel[l * nr..(l + 1) * nr];
            // SAFETY: row k0 + l, columns n0 + j0 .. n0 + j0 + w of b are in bounds.
            let row = unsafe { b.offset((k0 + l) as isize * brs + (n0 + j0) as isize * bcs) };
            if bcs == 1 || gather {
                // Masked vector copies: a memcpy call per row of a few values cost
                // more than the copy (4 % of a tiny step, mostly attention's
                // per-head products).
                for h in 0..nr / I::L {
                    let lanes = w.saturating_sub(I::L * h);
                    // SAFETY: the lanes read are columns < w of the row; dst holds
                    // nr values.
                    unsafe {
                        let v = if lanes == 0 {
                            I::zero()
                        } else if bcs == 1 {
                            I::load_first(row.add(I::L * h), lanes)
                        } else {
                            I::gather_first(
                                row.offset((I::L * h) as isize * bcs),
                                bcs as i32,
                                lanes,
                            )
                        };
                        I::store(dst.as_mut_ptr().add(I::L * h), v);
                    }
                }
            } else {
                for (j, d) in dst[..w].iter_mut().enumerate() {
                    // SAFETY: column j < w of the row.
                    *d = unsafe { *row.offset(j as isize * bcs) };
                }
                dst[w..].fill(0.0);
            }
        }
    }
}

/// One register block's operands.
struct Block {
    kc: usize,
    a: *const f32,
    ars: isize,
    acs: isize,
    /// A `kc × L·NV` panel of B: packed, or B itself when row-major.
    b: *const f32,
    /// Values between consecutive rows of the panel.
    bs: usize,
    c: *mut f32,
    ldc: usize,
    /// Columns of C to write (≤ L·NV).
    ncols: usize,
    alpha: f32,
    beta: f32,
}

/// Runs the `mr`-row block kernel (`mr` ≤ 12) on `NV` vectors of columns.
///
/// # Safety
/// As [`kernel`].
#[inline(always)]
unsafe fn dispatch<I: Isa, const NV: usize>(mr: usize, blk: &Block) {
    // SAFETY (each arm): the caller's contract, with R = mr rows.
    unsafe {
        match mr {
            12 => kernel::<I, 12, NV>(blk),
            11 => kernel::<I, 11, NV>(blk),
            10 => kernel::<I, 10, NV>(blk),
            9 => kernel::<I, 9, NV>(blk),
            8 => kernel::<I, 8, NV>(blk),
            7 => kernel::<I, 7, NV>(blk),
            6 => kernel::<I, 6, NV>(blk),
            5 => kernel::<I, 5, NV>(blk),
            4 => kernel::<I, 4, NV>(blk),
            3 => kernel::<I, 3, NV>(blk),
            2 => kernel::<I, 2, NV>(blk),
            _ => kernel::<I, 1, NV>(blk),
        }
    }
}

/// `C[R × ncols] = alpha · A[R × kc] · Bpanel[kc × L·NV] + beta · C`.
///
/// # Safety
/// `I`'s features are enabled in the caller; `R` rows of A at the block's
/// strides, the panel and `R × ncols` values of C are in bounds.
#[inline(always)]
unsafe fn kernel<I: Isa, const R: usize, const NV: usize>(blk: &Block) {
    // SAFETY (whole body): the caller's contract.
    unsafe {
        let mut acc = [[I::zero(); NV]; R];
        // Row pointers advance by acs per step of k; LLVM keeps them in registers.
        let mut rows = [blk.a; R];
        for (i, r) in rows.iter_mut().enumerate() {
            *r = blk.a.offset(i as isize * blk.ars);
        }
        let mut bp = blk.b;
        for _ in 0..blk.kc {
            // The panel holds kc rows of L·NV values at stride bs; each row
            // pointer stays inside its row of A for kc steps.
            let mut bv = [I::zero(); NV];
            for (h, v) in bv.iter_mut().enumerate() {
                *v = I::load(bp.add(I::L * h));
            }
            for i in 0..R {
                let av = I::splat(*rows[i]);
                for h in 0..NV {
                    acc[i][h] = I::fmadd(av, bv[h], acc[i][h]);
                }
                // wrapping: after the last step the pointer may leave A (unused).
                rows[i] = rows[i].wrapping_offset(blk.acs);
            }
            bp = bp.wrapping_add(blk.bs);
        }
        let alpha = I::splat(blk.alpha);
        let beta = I::splat(blk.beta);
        for (i, row) in acc.iter().enumerate() {
            for (h, v) in row.iter().enumerate() {
                let lanes = blk.ncols.saturating_sub(I::L * h);
                if lanes == 0 {
                    continue;
                }
                // The lanes written are columns < ncols of row i of C.
                let p = blk.c.add(i * blk.ldc + I::L * h);
                let out = if blk.beta == 0.0 {
                    I::mul(alpha, *v)
                } else {
                    let old = I::load_first(p, lanes);
                    I::fmadd(alpha, *v, I::mul(beta, old))
                };
                I::store_first(p, out, lanes);
            }
        }
    }
}
