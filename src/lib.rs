//! dualpriv: hand-written CUDA kernels and their CPU references for differentially
//! private fine-tuning of multimodal LLMs with Dual-Priv Pruning (arXiv 2506.07077).
//!
//! The CPU code in [`dp`] and [`vision`] is the executable specification: it reads
//! like the math and every CUDA kernel in `kernels/` is tested against it.
//! The GPU runtime lives in `gpu` behind the `cuda` feature.
#![warn(missing_docs)]

pub mod backend;
pub mod bench;
pub mod data;
pub mod dp;
pub mod error;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod hf;
pub mod linalg;
pub mod mem;
pub mod model;
pub mod run;
pub mod selfcheck;
pub mod train;
pub mod vision;

pub use error::{Error, Result};
