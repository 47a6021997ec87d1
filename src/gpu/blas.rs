//! Row-major GEMMs on cuBLAS, kept in one place so no caller has to think about
//! cuBLAS's column-major convention.
//!
//! A row-major matrix is the column-major view of its transpose, so row-major
//! C = op(A)·op(B) is computed as column-major Cᵀ = op(B)ᵀ·op(A)ᵀ: swap the
//! operands and exchange m and n.
//!
//! # Precision
//!
//! Every GEMM names its [`Precision`]. The rule: a GEMM whose result forms a
//! per-example norm or a clipped sum of a DP method (the book-keeping clipped sum,
//! DP-SGD's per-example gradients and their weighted sum) is [`Precision::Strict`];
//! the network's own forward and backward GEMMs are [`Precision::Model`] and use
//! TF32 when it is on. The reason is sensitivity: TF32 rounds inputs to 10 mantissa
//! bits, and for an example whose G_iᵀX_i nearly cancels the residual survives
//! clipping, releasing ≈ C·(1 + 2⁻¹⁰·M/‖∇W_i‖) (M: the size of the cancelling
//! terms) where the accountant assumes C.
//!
//! The strict handle is in `CUBLAS_PEDANTIC_MATH`, not `CUBLAS_DEFAULT_MATH`.
//! DEFAULT is strict FP32 for SGEMM today, but it only promises "at least the
//! requested precision" and it is the mode NVIDIA's `NVIDIA_TF32_OVERRIDE` variable
//! acts on: `=0` forces TF32 off in NVIDIA libraries whatever the program set, and
//! some projects set `=1` to turn TF32 on for default-mode FP32 work
//! (microsoft/onnxruntime#6427, PaddlePaddle/Paddle#75476,
//! lightseekorg/tokenspeed#35; tensorflow/tensorflow#53742 reports the variable
//! not honoured on one path). PEDANTIC prescribes the requested precision for every
//! phase, so it is the mode an environment variable is not meant to weaken; it may
//! pick slower kernels, which only the DP GEMMs pay. NVIDIA's own cuBLAS pages were
//! not at hand when this was written: the guarantee rests on PEDANTIC's documented
//! meaning, and the GPU test `adversarial_example_contributes_at_most_c` checks it.
use cudarc::cublas::{sys::cublasOperation_t as Op, Gemm, GemmConfig, StridedBatchedConfig};
use cudarc::driver::{DevicePtr, DevicePtrMut};

use super::{cuda_err, Gpu};
use crate::Result;

/// Which cuBLAS handle a GEMM runs on (the rule is in the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// The model handle: TF32 tensor cores when [`Gpu::set_tf32`] turned them on.
    Model,
    /// The DP handle: strict FP32 whatever the model handle's mode.
    Strict,
}

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

    /// Runs the GEMM on densely packed row-major buffers, on `precision`'s handle.
    pub fn run<A: DevicePtr<f32>, B: DevicePtr<f32>, C: DevicePtrMut<f32>>(
        &self,
        gpu: &Gpu,
        precision: Precision,
        a: &A,
        b: &B,
        c: &mut C,
    ) -> Result<()> {
        let cfg = self.config()?;
        // SAFETY: the config describes densely packed buffers of the stated shapes;
        // callers pass buffers at least that large (checked by their shape checks).
        unsafe { gpu.blas_for(precision).gemm(cfg, b, a, c) }.map_err(cuda_err("cublasSgemm"))
    }

    /// Runs `batch` independent GEMMs on matrices laid out back to back.
    pub fn run_batched<A: DevicePtr<f32>, B: DevicePtr<f32>, C: DevicePtrMut<f32>>(
        &self,
        gpu: &Gpu,
        precision: Precision,
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
        unsafe { gpu.blas_for(precision).gemm_strided_batched(cfg, b, a, c) }
            .map_err(cuda_err("cublasSgemmStridedBatched"))
    }
}
