//! dualpriv: hand-written CUDA kernels, their CPU references and a thin training
//! driver for differentially private fine-tuning of LLaVA-style multimodal LLMs
//! with Dual-Priv Pruning (arXiv 2506.07077).
//!
//! * [`audit`]: the one-run empirical privacy audit (an ε lower bound from canaries);
//! * [`dp`]: the DP mechanisms (per-example clipping with ghost norms and
//!   book-keeping, the run key, regenerable Gaussian noise, noisy top-k update
//!   pruning) and the privacy [`dp::accountant`]s with the ledger;
//! * [`vision`]: visual token selection (CLS + K dominant + M contextual tokens);
//! * [`model`]: the frozen ViT, projector and Llama decoder with LoRA, written once
//!   against [`backend::Backend`], and the FLOP model of a step;
//! * [`backend`]: the model and DP ops of the CPU reference (f32, and f64 for
//!   finite-difference tests) and, with the `cuda` feature, of one GPU;
//! * [`train`]: the driver (methods, Poisson sampling, optimizers, checkpoints,
//!   resume, metrics);
//! * [`data`]: the batch layout and the built-in synthetic task;
//! * [`cmd`]: the commands of the `dualpriv` binary as library functions, and
//!   [`selfcheck`];
//! * [`study`]: the utility study grid of `dualpriv study`, its tables and plots;
//! * [`error`], [`linalg`] (the CPU GEMM wrappers), [`mem`] (the counting allocator).
//!
//! The CPU code reads like the math and is the executable specification: every
//! CUDA kernel in `kernels/` is tested against it. The GPU runtime (`gpu`) is
//! compiled with the `cuda` feature only.
#![warn(missing_docs)]

pub mod audit;
pub mod backend;
pub mod cmd;
pub mod data;
pub mod dp;
pub mod error;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod hf;
pub mod linalg;
pub mod mem;
pub mod model;
pub mod selfcheck;
pub mod study;
pub mod train;
pub mod vision;

pub use error::{Error, Result};
