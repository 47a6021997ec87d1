//! An AVX-512 single-precision GEMM for the shapes of this crate's CPU step.
//!
//! Why not `matrixmultiply` alone: on the tiny and small presets a product is
//! thin (K = 128–512) and `matrixmultiply` packs both A and B on every call; a
//! profile of the tiny nonprivate step put 15 % of it in that packing against
//! 36 % in the arithmetic. This kernel reads A in place, and B too when it is
//! row-major (else it packs B once per (K block, N block) into panels of 32
//! columns): each step of the inner loop
//! broadcasts one value from each of up to 12 rows of A (any strides) against two
//! 16-lane vectors of the B panel, into a 12 × 32 block of C held in 24 registers.
//! Packing B is K·N copies against M·N·K multiply-adds, so it vanishes once M is
//! more than a few rows.
//!
//! Each C value is summed in k order within a block of `KC` (256) and the blocks are
//! added to C in order, whatever the row or column range a thread is given, so
//! splitting a product over threads gives bit-identical results. `beta = 0`
//! never reads C (it may hold another buffer's stale values or NaN).
//!
//! The straightforward triple loop it must agree with is `tests/linalg.rs`'s
//! reference; `matrixmultiply` stays the path on CPUs without AVX-512F.
use std::arch::x86_64::*;
use std::cell::RefCell;

/// Rows of C per register block.
const MR: usize = 12;
/// Columns of C per register block: two 16-lane vectors, or one when C has at
/// most 16 columns (a LoRA A product, rank ≤ 16), so a narrow product does not
/// compute a half-empty second vector.
const NR: usize = 32;
/// Depth of one packed block of B: a 12 × 256 block of A (12 KiB) stays in L1
/// while it meets every panel.
const KC: usize = 256;
/// Columns of one packed block of B: 256 × 512 values are 512 KiB, inside L2.
const NC: usize = 512;

thread_local! {
    /// The packed block of B; grows to its largest use once per thread, so a
    /// steady-state step makes no allocation here.
    static PACKED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Whether this CPU runs [`sgemm`] (checked once by std, then a cached load).
pub fn available() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
}

/// `c[m×n] (row stride ldc) = alpha·a·b + beta·c` with `a[i,l]` at
/// `a + i·ars + l·acs` and `b[l,j]` at `b + l·brs + j·bcs`.
///
/// # Safety
/// The CPU has AVX-512F ([`available`]); every index of `a` (m × k), `b` (k × n)
/// and `c` (m × n) is in bounds of its allocation; `ldc ≥ n`, so rows of `c` do
/// not overlap; `c` does not alias `a` or `b`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: *const f32,
    ars: isize,
    acs: isize,
    b: *const f32,
    brs: isize,
    bcs: isize,
    beta: f32,
    c: *mut f32,
    ldc: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for i in 0..m {
            for j in 0..n {
                // SAFETY: (i, j) is inside c (caller's contract).
                unsafe {
                    let p = c.add(i * ldc + j);
                    *p = if beta == 0.0 { 0.0 } else { beta * *p };
                }
            }
        }
        return;
    }
    PACKED.with(|cell| {
        let mut packed = cell.borrow_mut();
        let nr = if n <= 16 { 16 } else { NR };
        let direct = bcs == 1 && brs > 0;
        let need = KC.min(k) * NC.min(n).div_ceil(nr) * nr;
        if packed.len() < need {
            packed.resize(need, 0.0);
        }
        for k0 in (0..k).step_by(KC) {
            let kc = KC.min(k - k0);
            let beta = if k0 == 0 { beta } else { 1.0 };
            for n0 in (0..n).step_by(NC) {
                let nc = NC.min(n - n0);
                // Row-major B (dY·W, a LoRA gradient's X, attention's V) is read in
                // place, its rows nr wide at stride brs; only a last panel narrower
                // than nr is packed (zero-padded). Otherwise every panel is packed.
                let full = if direct { nc / nr * nr } else { 0 };
                if full < nc {
                    // SAFETY: rows k0..k0+kc and columns n0+full..n0+nc of b are in
                    // bounds.
                    unsafe { pack_b(&mut packed, nr, b, brs, bcs, k0, kc, n0 + full, nc - full) };
                }
                for i0 in (0..m).step_by(MR) {
                    let mr = MR.min(m - i0);
                    // SAFETY: row i0, column k0 of a is in bounds.
                    let ap = unsafe { a.offset(i0 as isize * ars + k0 as isize * acs) };
                    for (p, j0) in (0..nc).step_by(nr).enumerate() {
                        let ncols = nr.min(nc - j0);
                        let (bp, bs) = if j0 < full {
                            // SAFETY: row k0, column n0 + j0 of b is in bounds.
                            let bp = unsafe { b.offset(k0 as isize * brs + (n0 + j0) as isize) };
                            (bp, brs as usize)
                        } else {
                            (packed[(p - full / nr) * kc * nr..].as_ptr(), nr)
                        };
                        // SAFETY: the block (i0.., n0 + j0..) of mr × ncols is in c.
                        let cp = unsafe { c.add(i0 * ldc + n0 + j0) };
                        let blk = Block {
                            kc,
                            a: ap,
                            ars,
                            acs,
                            b: bp,
                            bs,
                            c: cp,
                            ldc,
                            ncols,
                            alpha,
                            beta,
                        };
                        // SAFETY: as above; the packed panel holds kc × nr values.
                        unsafe {
                            if nr == 16 {
                                dispatch::<1>(mr, &blk)
                            } else {
                                dispatch::<2>(mr, &blk)
                            }
                        };
                    }
                }
            }
        }
    });
}

/// Copies `b[k0..k0+kc, n0..n0+nc]` into panels of `nr` columns, each `kc × nr`
/// row-major, zero-padding the last panel's missing columns.
///
/// # Safety
/// That block of `b` is in bounds; `packed` holds `kc · ⌈nc/nr⌉ · nr` values.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
unsafe fn pack_b(
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
    for (p, j0) in (0..nc).step_by(nr).enumerate() {
        let w = nr.min(nc - j0);
        let panel = &mut packed[p * kc * nr..(p + 1) * kc * nr];
        for l in 0..kc {
            let dst = &mut panel[l * nr..(l + 1) * nr];
            // SAFETY: row k0 + l, columns n0 + j0 .. n0 + j0 + w of b are in bounds.
            let row = unsafe { b.offset((k0 + l) as isize * brs + (n0 + j0) as isize * bcs) };
            if bcs == 1 {
                // Masked vector copies: a memcpy call per row of ≤ 32 values cost
                // more than the copy (4 % of a tiny step, mostly attention's
                // per-head products).
                for h in 0..nr / 16 {
                    let m = mask(w.saturating_sub(16 * h));
                    if m == 0 {
                        dst[16 * h..16 * h + 16].fill(0.0);
                        continue;
                    }
                    // SAFETY: the masked lanes are columns < w of the row, so the
                    // vector's first lane (column 16h < w) is in bounds; dst holds
                    // nr values.
                    unsafe {
                        let v = _mm512_maskz_loadu_ps(m, row.add(16 * h));
                        _mm512_storeu_ps(dst.as_mut_ptr().add(16 * h), v);
                    }
                }
                continue;
            } else if let Some(idx) = gather_index(bcs, nr) {
                // A transposed B (a linear layer's Wᵀ, attention's Kᵀ): one gather
                // of 16 strided values per vector instead of 16 scalar copies; the
                // per-head products of attention are small enough that scalar
                // packing cost as much as their arithmetic.
                for (h, ix) in idx.iter().take(nr / 16).enumerate() {
                    let m = mask(w.saturating_sub(16 * h));
                    if m == 0 {
                        dst[16 * h..16 * h + 16].fill(0.0);
                        continue;
                    }
                    // SAFETY: the masked lanes read columns < w of the row; dst
                    // holds nr values.
                    unsafe {
                        let v = _mm512_mask_i32gather_ps::<4>(
                            _mm512_setzero_ps(),
                            m,
                            *ix,
                            row.offset(16 * h as isize * bcs),
                        );
                        _mm512_storeu_ps(dst.as_mut_ptr().add(16 * h), v);
                    }
                }
                continue;
            } else {
                for (j, d) in dst[..w].iter_mut().enumerate() {
                    // SAFETY: column j < w of the row.
                    *d = unsafe { *row.offset(j as isize * bcs) };
                }
            }
            dst[w..].fill(0.0);
        }
    }
}

/// The lane offsets `0, bcs, …, 15·bcs` of a gather, per 16-column vector of a
/// panel `nr` wide (`None` when they overflow an i32: a scalar copy then).
#[target_feature(enable = "avx512f")]
fn gather_index(bcs: isize, nr: usize) -> Option<[__m512i; 2]> {
    let top = bcs.checked_mul(15)?;
    i32::try_from(top).ok()?;
    i32::try_from(bcs).ok()?;
    let b = bcs as i32;
    let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let v = _mm512_mullo_epi32(lanes, _mm512_set1_epi32(b));
    debug_assert!(nr <= 32);
    // The second vector starts 16 columns on (its base pointer moves), so the
    // same offsets serve both.
    Some([v, v])
}

/// One register block's operands.
struct Block {
    kc: usize,
    a: *const f32,
    ars: isize,
    acs: isize,
    /// A `kc × 16·NV` panel of B: packed, or B itself when row-major.
    b: *const f32,
    /// Values between consecutive rows of the panel.
    bs: usize,
    c: *mut f32,
    ldc: usize,
    /// Columns of C to write (≤ 16·NV).
    ncols: usize,
    alpha: f32,
    beta: f32,
}

/// Runs the `mr`-row block kernel (`mr` ≤ [`MR`]) on `NV` vectors of columns.
///
/// # Safety
/// As [`kernel`].
unsafe fn dispatch<const NV: usize>(mr: usize, blk: &Block) {
    // SAFETY (each arm): the caller's contract, with R = mr rows.
    unsafe {
        match mr {
            12 => kernel::<12, NV>(blk),
            11 => kernel::<11, NV>(blk),
            10 => kernel::<10, NV>(blk),
            9 => kernel::<9, NV>(blk),
            8 => kernel::<8, NV>(blk),
            7 => kernel::<7, NV>(blk),
            6 => kernel::<6, NV>(blk),
            5 => kernel::<5, NV>(blk),
            4 => kernel::<4, NV>(blk),
            3 => kernel::<3, NV>(blk),
            2 => kernel::<2, NV>(blk),
            _ => kernel::<1, NV>(blk),
        }
    }
}

/// `C[R × ncols] = alpha · A[R × kc] · Bpanel[kc × 16·NV] + beta · C`.
///
/// # Safety
/// AVX-512F is available; `R` rows of A at the block's strides, the packed panel
/// and `R × ncols` values of C are in bounds.
#[target_feature(enable = "avx512f")]
unsafe fn kernel<const R: usize, const NV: usize>(blk: &Block) {
    let mut acc = [[_mm512_setzero_ps(); NV]; R];
    // Row pointers advance by acs per step of k; LLVM keeps them in registers.
    let mut rows = [blk.a; R];
    for (i, r) in rows.iter_mut().enumerate() {
        // SAFETY: row i of the block is in bounds.
        *r = unsafe { blk.a.offset(i as isize * blk.ars) };
    }
    let mut bp = blk.b;
    for _ in 0..blk.kc {
        // SAFETY: the panel holds kc rows of 16·NV values at stride bs; each row
        // pointer stays inside its row of A for kc steps.
        unsafe {
            let mut bv = [_mm512_setzero_ps(); NV];
            for (h, v) in bv.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(bp.add(16 * h));
            }
            for i in 0..R {
                let av = _mm512_set1_ps(*rows[i]);
                for h in 0..NV {
                    acc[i][h] = _mm512_fmadd_ps(av, bv[h], acc[i][h]);
                }
                // wrapping: after the last step the pointer may leave A (unused).
                rows[i] = rows[i].wrapping_offset(blk.acs);
            }
            bp = bp.wrapping_add(blk.bs);
        }
    }
    let mut masks: [__mmask16; NV] = [0; NV];
    for (h, m) in masks.iter_mut().enumerate() {
        *m = mask(blk.ncols.saturating_sub(16 * h));
    }
    let alpha = _mm512_set1_ps(blk.alpha);
    let beta = _mm512_set1_ps(blk.beta);
    for (i, row) in acc.iter().enumerate() {
        for (h, v) in row.iter().enumerate() {
            if masks[h] == 0 {
                continue;
            }
            // SAFETY: the masked lanes are columns < ncols of row i of C.
            unsafe {
                let p = blk.c.add(i * blk.ldc + 16 * h);
                let out = if blk.beta == 0.0 {
                    _mm512_mul_ps(alpha, *v)
                } else {
                    let old = _mm512_maskz_loadu_ps(masks[h], p);
                    _mm512_fmadd_ps(alpha, *v, _mm512_mul_ps(beta, old))
                };
                _mm512_mask_storeu_ps(p, masks[h], out);
            }
        }
    }
}

/// The lane mask of the first `w` (≤ 16) lanes.
fn mask(w: usize) -> __mmask16 {
    if w >= 16 {
        0xffff
    } else {
        ((1u32 << w) - 1) as __mmask16
    }
}
