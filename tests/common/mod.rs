//! Helpers shared by the integration tests.
#![allow(dead_code)]
use dualpriv::train::checkpoint::ModelSpec;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The tiny preset with LoRA r = 4 on every linear.
pub fn tiny_lora() -> ModelSpec {
    tiny_lora_rank(4)
}

/// The tiny preset with LoRA rank `r` (alpha 2r) on every linear.
pub fn tiny_lora_rank(r: usize) -> ModelSpec {
    ModelSpec {
        preset: "tiny".into(),
        lora_rank: Some(r),
        lora_alpha: 2.0 * r as f32,
        full_groups: vec![],
    }
}

/// The tiny preset with full fine-tuning of projector, attention, MLP and LM head.
pub fn tiny_full() -> ModelSpec {
    ModelSpec {
        preset: "tiny".into(),
        lora_rank: None,
        lora_alpha: 0.0,
        full_groups: ["projector", "attention", "mlp", "lm_head"]
            .map(String::from)
            .to_vec(),
    }
}

/// Deterministic RNG for a test.
pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// `n` uniform values in [-1, 1).
pub fn uniform(r: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| r.random_range(-1.0f32..1.0)).collect()
}

/// Largest |a-b| / max(|b|, floor) over two slices.
pub fn max_rel_err(a: &[f32], b: &[f32], floor: f32) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(floor))
        .fold(0.0, f32::max)
}

/// Relative difference of two f64 values.
pub fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-300)
}
