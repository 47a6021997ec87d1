//! The backend abstraction: the model and the training loop are written once
//! against [`Backend`] (model ops) and [`dp::DpBackend`] (DP mechanisms); the CPU
//! backend ([`cpu::Cpu`]) is the executable specification and the CUDA backend
//! must agree with it within the tolerances stated in the tests.
pub mod cpu;
pub mod dp;

use crate::Result;

/// Storage and compute for one device. Buffers are flat f32 arrays; shapes are
/// passed explicitly to every op, as in llm.c.
pub trait Backend: Sync {
    /// A flat f32 buffer on this device.
    type Buf: Send + Sync;

    /// Short name for logs and metrics ("cpu", "cuda").
    fn name(&self) -> &'static str;
    /// A zero-filled buffer of `n` values.
    fn zeros(&self, n: usize) -> Result<Self::Buf>;
    /// Copies host values into a new buffer.
    fn upload(&self, host: &[f32]) -> Result<Self::Buf>;
    /// Copies a buffer back to the host.
    fn download(&self, buf: &Self::Buf) -> Result<Vec<f32>>;
    /// Number of values in a buffer.
    fn len(&self, buf: &Self::Buf) -> usize;
}
