//! Safe wrappers over `matrixmultiply`'s packed GEMM for the CPU reference code.
//!
//! A [`View`] is a slice plus (rows, cols, row stride, col stride), so transposes
//! are free: swap the strides. Bounds are checked once per call.

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
            // SAFETY: every index touched is within the checked bounds above.
            unsafe {
                matrixmultiply::$kernel(
                    m,
                    k,
                    n,
                    alpha,
                    a.data.as_ptr(),
                    a.rs as isize,
                    a.cs as isize,
                    b.data.as_ptr(),
                    b.rs as isize,
                    b.cs as isize,
                    beta,
                    c.as_mut_ptr(),
                    n as isize,
                    1,
                );
            }
        }
    };
}

gemm_fn!(gemm_f64, f64, dgemm);
gemm_fn!(gemm_f32, f32, sgemm);
