//! Row-major GEMMs on cuBLAS, kept in one place so no caller has to think about
//! cuBLAS's column-major convention.
//!
//! A row-major matrix is the column-major view of its transpose, so row-major
//! C = op(A)·op(B) is computed as column-major Cᵀ = op(B)ᵀ·op(A)ᵀ: swap the
//! operands and exchange m and n.
use cudarc::cublas::{sys::cublasOperation_t as Op, Gemm, GemmConfig, StridedBatchedConfig};
use cudarc::driver::{DevicePtr, DevicePtrMut};

use super::{cuda_err, Gpu};
use crate::Result;

/// Shape and layout of one row-major GEMM: C[m×n] = alpha·op(A)·op(B) + beta·C,
/// where op(A) is m×k and op(B) is k×n; `lda`, `ldb`, `ldc` are row strides.
#[derive(Clone, Copy, Debug)]
pub struct RowMajor {
    /// Whether A is stored transposed (k×m).
    pub ta: bool,
    /// Whether B is stored transposed (n×k).
    pub tb: bool,
    /// Rows of C.
    pub m: usize,
    /// Columns of C.
    pub n: usize,
    /// Inner dimension.
    pub k: usize,
    /// Scale of the product.
    pub alpha: f32,
    /// Scale of the old C.
    pub beta: f32,
}

impl RowMajor {
    fn config(&self) -> Result<GemmConfig<f32>> {
        let dim = |v: usize, what: &str| {
            i32::try_from(v)
                .map_err(|_| crate::Error::Shape(format!("GEMM {what}={v} exceeds i32")))
        };
        let (m, n, k) = (dim(self.m, "m")?, dim(self.n, "n")?, dim(self.k, "k")?);
        // Row strides of the stored (not op'd) matrices.
        let lda = if self.ta { m } else { k };
        let ldb = if self.tb { k } else { n };
        let op = |t: bool| if t { Op::CUBLAS_OP_T } else { Op::CUBLAS_OP_N };
        Ok(GemmConfig {
            transa: op(self.tb),
            transb: op(self.ta),
            m: n,
            n: m,
            k,
            alpha: self.alpha,
            lda: ldb,
            ldb: lda,
            beta: self.beta,
            ldc: n,
        })
    }

    /// Runs the GEMM on densely packed row-major buffers.
    pub fn run<A: DevicePtr<f32>, B: DevicePtr<f32>, C: DevicePtrMut<f32>>(
        &self,
        gpu: &Gpu,
        a: &A,
        b: &B,
        c: &mut C,
    ) -> Result<()> {
        let cfg = self.config()?;
        // SAFETY: the config describes densely packed buffers of the stated shapes;
        // callers pass buffers at least that large (checked by their shape checks).
        unsafe { gpu.blas().gemm(cfg, b, a, c) }.map_err(cuda_err("cublasSgemm"))
    }

    /// Runs `batch` independent GEMMs on matrices laid out back to back.
    pub fn run_batched<A: DevicePtr<f32>, B: DevicePtr<f32>, C: DevicePtrMut<f32>>(
        &self,
        gpu: &Gpu,
        batch: usize,
        a: &A,
        b: &B,
        c: &mut C,
    ) -> Result<()> {
        let cfg = StridedBatchedConfig {
            gemm: self.config()?,
            batch_size: i32::try_from(batch)
                .map_err(|_| crate::Error::Shape(format!("GEMM batch={batch} exceeds i32")))?,
            stride_a: (self.k * self.n) as i64,
            stride_b: (self.m * self.k) as i64,
            stride_c: (self.m * self.n) as i64,
        };
        // SAFETY: as in `run`, for `batch` packed matrices each.
        unsafe { gpu.blas().gemm_strided_batched(cfg, b, a, c) }
            .map_err(cuda_err("cublasSgemmStridedBatched"))
    }
}
