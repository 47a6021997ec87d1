//! The differential-privacy mechanisms: per-example clipping with ghost norms and
//! book-keeping ([`clip`]), regenerable Philox Gaussian noise ([`noise`]), and the
//! noisy-gradient top-k update pruning with masked optimizers ([`prune`]).
pub mod accountant;
pub mod clip;
pub mod noise;
pub mod prune;
