//! Safe wrappers over the CPU GEMMs: this crate's kernel for f32 where the CPU
//! has AVX-512F or AVX2 + FMA ([`simd`]), `matrixmultiply`'s packed GEMM
//! otherwise and for f64.
//!
//! A [`View`] is a slice plus (rows, cols, row stride, col stride), so transposes
//! are free: swap the strides. Bounds are checked once per call.
//!
//! Both run on the calling thread, so a large product is split into
//! one block of rows (or of columns, when C is wide and short, as a LoRA or
//! weight gradient is) per rayon thread; each block is an independent
//! single-threaded GEMM writing a disjoint part of C.

/// A strided matrix view over a slice.
#[derive(Clone, Copy, Debug)]
pub struct View<'a, T> {
    /// Backing storage.
    pub data: &'a [T],
    /// Number of rows.
    pub rows: usize,
    /// Number of columns.
    pub cols: usize,
    /// Elements between consecutive rows.
    pub rs: usize,
    /// Elements between consecutive columns.
    pub cs: usize,
}

impl<'a, T> View<'a, T> {
    /// A densely packed row-major `rows × cols` matrix.
    pub fn row_major(data: &'a [T], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose, without copying.
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    fn check(&self) {
        if self.rows > 0 && self.cols > 0 {
            let last = (self.rows - 1) * self.rs + (self.cols - 1) * self.cs;
            assert!(last < self.data.len(), "matrix view out of bounds");
        }
    }
}

/// Multiply-adds below which a product runs on one thread (about 10 µs of work;
/// a rayon fork costs a few µs).
const PARALLEL_MACS: usize = 1 << 18;

/// The raw C pointer shared by the column blocks of a split product.
#[derive(Clone, Copy)]
struct CPtr<T>(*mut T);
// SAFETY: each job writes a disjoint set of C's elements (its own rows or columns).
unsafe impl<T> Send for CPtr<T> {}
unsafe impl<T> Sync for CPtr<T> {}

impl<T> CPtr<T> {
    /// The pointer (a method, so closures capture the `Send` wrapper, not the field).
    fn get(self) -> *mut T {
        self.0
    }
}

/// `[start, end)` of block `i` of `n` split into `parts` near-equal blocks.
fn block(n: usize, parts: usize, i: usize) -> (usize, usize) {
    (n * i / parts, n * (i + 1) / parts)
}

macro_rules! gemm_fn {
    ($name:ident, $t:ty, $kernel:ident) => {
        /// Row-major `c[m×n] = alpha·a·b + beta·c` with `a` m×k and `b` k×n views.
        ///
        /// # Panics
        /// On inconsistent shapes: these are internal invariants, never user input.
        pub fn $name(
            alpha: $t,
            a: View<'_, $t>,
            b: View<'_, $t>,
            beta: $t,
            c: &mut [$t],
            n_c: usize,
        ) {
            let (m, k, n) = (a.rows, a.cols, b.cols);
            assert_eq!(b.rows, k, "gemm inner dimensions differ");
            assert_eq!(n_c, n, "gemm output columns differ");
            assert!(c.len() >= m * n, "gemm output too small");
            a.check();
            b.check();
            if m == 0 || n == 0 {
                return;
            }
            let threads = rayon::current_num_threads();
            // Nested inside a rayon job (attention's per-head products) a product
            // may split too: rayon's join lets the calling worker take part, and
            // the products there are mostly below the threshold anyway.
            let parts = if m * n * k < PARALLEL_MACS {
                1
            } else {
                threads.min(m.max(n) / 8).max(1)
            };
            let (ars, acs) = (a.rs as isize, a.cs as isize);
            let (brs, bcs) = (b.rs as isize, b.cs as isize);
            // SAFETY (every call below): each block reads a sub-view of the
            // checked a and b and writes its own rows or columns of c, all within
            // the bounds checked above.
            // Each block counts its allocations as the GEMM's on the thread that
            // runs it (`crate::mem::gemm_scope`).
            let run = |m: usize, n: usize, a: *const $t, b: *const $t, c: *mut $t| unsafe {
                crate::mem::gemm_scope(|| {
                    $kernel(
                        m,
                        k,
                        n,
                        alpha,
                        a,
                        ars,
                        acs,
                        b,
                        brs,
                        bcs,
                        beta,
                        c,
                        n_c as isize,
                        1,
                    )
                });
            };
            if parts == 1 {
                run(m, n, a.data.as_ptr(), b.data.as_ptr(), c.as_mut_ptr());
            } else {
                // One job per block of rows (or of columns, when C is wide and
                // short), over a raw pointer: no per-call Vec of chunks.
                use rayon::prelude::*;
                let cp = CPtr(c.as_mut_ptr());
                // A transposed B (X·Wᵀ) is packed by each job; split its columns
                // so the jobs pack disjoint parts (on small, packing all of Wᵀ
                // per thread was 5 % of a step).
                let by_rows = m >= n && !(b.cs != 1 && n >= 64 * parts && k >= 64);
                (0..parts).into_par_iter().for_each(|i| {
                    if by_rows {
                        let (r0, r1) = block(m, parts, i);
                        // SAFETY: row r0 of a and of c are inside the checked views.
                        let (ap, cq) =
                            unsafe { (a.data.as_ptr().add(r0 * a.rs), cp.get().add(r0 * n_c)) };
                        run(r1 - r0, n, ap, b.data.as_ptr(), cq);
                    } else {
                        let (c0, c1) = block(n, parts, i);
                        // SAFETY: column c0 of b and of c are inside the checked views.
                        let (bp, cq) =
                            unsafe { (b.data.as_ptr().add(c0 * b.cs), cp.get().add(c0)) };
                        run(m, c1 - c0, a.data.as_ptr(), bp, cq);
                    }
                });
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
pub mod simd;

/// `matrixmultiply::sgemm`'s contract, run by this crate's kernel ([`simd`]) at
/// the widest tier the CPU has (`backend::cpu::math::simd_tier`, which
/// `DUALPRIV_CPU_SIMD` caps), by `matrixmultiply` without AVX2.
///
/// # Safety
/// As `matrixmultiply::sgemm`.
#[allow(clippy::too_many_arguments)]
unsafe fn sgemm(
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
    rsc: isize,
    csc: isize,
) {
    #[cfg(target_arch = "x86_64")]
    if csc == 1 && rsc >= 0 {
        use crate::backend::cpu::math::{simd_tier, SimdTier};
        let g = simd::Gemm {
            m,
            k,
            n,
            alpha,
            a,
            ars,
            acs,
            b,
            brs,
            bcs,
            beta,
            c,
            ldc: rsc as usize,
        };
        // SAFETY (both): the same operands; C is row-major with row stride rsc;
        // the tier was detected on this CPU (Avx512 implies AVX2 + FMA).
        match simd_tier() {
            SimdTier::Avx512 => return unsafe { simd::sgemm_avx512(&g) },
            SimdTier::Avx2 => return unsafe { simd::sgemm_avx2(&g) },
            SimdTier::Plain => {}
        }
    }
    // SAFETY: the caller's contract.
    unsafe { matrixmultiply::sgemm(m, k, n, alpha, a, ars, acs, b, brs, bcs, beta, c, rsc, csc) }
}

/// Whether [`gemm_f32`] runs this crate's kernel on this CPU at the current
/// tier (else `matrixmultiply`, which allocates a packing buffer per call).
pub fn own_kernel() -> bool {
    crate::backend::cpu::math::simd_tier() > crate::backend::cpu::math::SimdTier::Plain
}

use matrixmultiply::dgemm;
gemm_fn!(gemm_f64, f64, dgemm);
gemm_fn!(gemm_f32, f32, sgemm);

/// `matrixmultiply`'s f32 GEMM under [`gemm_f32`]'s contract, whatever the CPU:
/// the baseline this crate's kernel is tested and benchmarked against.
pub fn gemm_f32_matrixmultiply(
    alpha: f32,
    a: View<'_, f32>,
    b: View<'_, f32>,
    beta: f32,
    c: &mut [f32],
    n_c: usize,
) {
    use matrixmultiply::sgemm as mm;
    gemm_fn!(inner, f32, mm);
    inner(alpha, a, b, beta, c, n_c)
}
