//! The model FLOP count of a training step, for `dualpriv bench`'s TFLOP/step and
//! fraction-of-peak columns: 2 FLOPs per multiply-add, the usual MFU convention
//! (Kaplan et al. 2020, arXiv 2001.08361, §2.1; PaLM, arXiv 2204.02311, App. B).
use crate::model::config::{LoraTarget, ModelConfig};
use crate::train::method::Method;

/// Estimated model FLOPs of one training step: the frozen vision tower and
/// projector forward once; the decoder forward plus a backward of twice its cost
/// for gradient methods, or two forward passes (all three parts) for `dpzo`.
/// Attention counts the full T×T products.
pub fn step_flops(
    cfg: &ModelConfig,
    method: Method,
    batch: usize,
    visual: usize,
    text: usize,
) -> f64 {
    let (v, l) = (&cfg.vision, &cfg.llm);
    let (b, n, dv, d) = (
        batch as f64,
        v.tokens() as f64,
        v.hidden as f64,
        l.hidden as f64,
    );
    let vit_layer = 4.0 * dv * dv + 2.0 * dv * v.mlp as f64;
    let vit = 2.0 * b * v.patches() as f64 * v.patch_dim() as f64 * dv
        + v.layers_run() as f64 * (2.0 * b * n * vit_layer + 4.0 * b * n * n * dv);
    let proj = 2.0 * b * visual as f64 * (dv * d + d * d);
    let llm = llm_forward_flops(cfg, batch, visual, text);
    if method == Method::Dpzo {
        2.0 * (vit + proj + llm)
    } else {
        vit + proj + 3.0 * llm
    }
}

/// Model FLOPs of the decoder's forward pass over `visual + text` tokens per example:
/// every linear (2 per multiply-add), the full T×T attention products, and the LM head
/// on the text positions.
pub fn llm_forward_flops(cfg: &ModelConfig, batch: usize, visual: usize, text: usize) -> f64 {
    let l = &cfg.llm;
    let (b, d, seq) = (batch as f64, l.hidden as f64, (visual + text) as f64);
    let layer: f64 = LoraTarget::ALL
        .iter()
        .map(|&t| {
            let (i, o) = l.linear_dims(t);
            (i * o) as f64
        })
        .sum();
    l.layers as f64 * (2.0 * b * seq * layer + 4.0 * b * seq * seq * d)
        + 2.0 * b * text as f64 * d * l.vocab as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llm_flops_match_the_reference_figures() {
        // An independent estimate for llava-7b with 64 text + ~35 prompt tokens:
        // Kaplan et al.'s forward cost per token, 2N + 2·n_layer·n_ctx·d_model, with
        // Vicuna-7B's N = 6.48e9 non-embedding weights (32 layers, d = 4096, MLP
        // 11008), plus the LM head on the 99 text positions: 8.88 TFLOP with 576
        // visual tokens, 2.13 TFLOP with 64 (to ~1 %).
        let cfg = ModelConfig::preset("llava-7b").unwrap();
        for (visual, want) in [(576, 8.88e12), (64, 2.13e12)] {
            let got = llm_forward_flops(&cfg, 1, visual, 99);
            assert!(
                (got / want - 1.0).abs() < 0.03,
                "{visual}: {got:e} vs {want:e}"
            );
        }
    }
}
