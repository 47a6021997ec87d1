//! The differential-privacy mechanisms: per-example clipping with ghost norms and
//! book-keeping ([`clip`]), regenerable Gaussian noise from ChaCha20 (or Philox)
//! ([`noise`]), and the noisy-gradient top-k update pruning with masked optimizers
//! ([`prune`]).
pub mod accountant;
pub mod clip;
pub mod noise;
pub mod prune;
