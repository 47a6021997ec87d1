//! `cmd::inspect::plan` (the meter backend's device memory plan) against counts
//! made by hand from the shapes, for llava-1.5-7b's config.json (vocab 32064).
use dualpriv::cmd::inspect::plan;
use dualpriv::train::checkpoint::{ModelSpec, HF_PRESET};
use dualpriv::train::method::Method;

fn spec() -> ModelSpec {
    ModelSpec {
        preset: format!("{HF_PRESET}tests/data/hf/llava-1.5-7b-hf"),
        lora_rank: Some(128),
        lora_alpha: 256.0,
        full_groups: vec![],
    }
}

#[test]
fn llava_7b_weights_are_its_parameters_times_four_bytes() {
    let p = plan(&spec(), 4, &[Method::Dpzo]).unwrap();
    // Independent count of llava-1.5-7b as the crate allocates it: CLIP ViT-L/14-336
    // up to layer −2 (23 layers; no patch bias, no post_layernorm), the projector,
    // Vicuna-7B with vocab 32064 and an untied head; LoRA r = 128 on q..down.
    let (dv, mlp_v, patches) = (1024u64, 4096u64, 576u64);
    let vit_layer = 4 * (dv * dv + dv) + 2 * dv * mlp_v + mlp_v + dv + 4 * dv;
    let vit = 3 * 14 * 14 * dv + dv + (patches + 1) * dv + 2 * dv + 23 * vit_layer;
    let (d, f, v) = (4096u64, 11008u64, 32064u64);
    let proj = dv * d + d + d * d + d;
    let llm = 2 * v * d + 32 * (4 * d * d + 3 * d * f + 2 * d) + d;
    assert_eq!(p.base_params, vit + proj + llm);
    let lora = 32 * 128 * (4 * 2 * d + 3 * (d + f));
    assert_eq!(p.trainable_params, lora);
    assert_eq!(p.trainable_params, 319_815_680);
    let requested = 4 * (p.base_params + p.trainable_params);
    // Pool size classes add at most 1/8 per buffer.
    assert!(p.weight_bytes >= requested && p.weight_bytes <= requested + requested / 8);
    // dpzo holds the weights and only forward activations of one layer at a time.
    let r = &p.rows[0];
    assert!(r.requested_peak_bytes >= requested);
}

#[test]
fn llava_7b_step_frees_each_layer_as_its_backward_ends() {
    let p = plan(&spec(), 4, &[Method::Ghost]).unwrap();
    let r = &p.rows[0];
    let (b, d, f, hq, rank) = (4u64, 4096u64, 11008u64, 32u64, 128u64);
    // Sequence: 576 visual tokens + the text, one placeholder replaced (or none).
    let l = 576 + p.text_len as u64 - 1;
    let rows = b * l;
    // Llama::layer_forward's LayerCache: x_in, ln1, q, k, v, att, x_mid, ln2 (D
    // each; MHA so k, v are D), gate, up (F each; the backward recomputes
    // silu(gate)·up), 7 LoRA u (r each) and two rstd. Not the attention
    // probabilities: the backward recomputes them, one layer's b·H·l² at a time
    // (and, on the default path the CUDA backend takes, a scratch output of D per
    // row).
    let cache = rows * (8 * d + 2 * f + 7 * rank + 2);
    let recompute = b * hq * l * l + rows * d;
    let weights = 4 * (p.base_params + p.trainable_params);
    // At the end of the forward every layer's cache is alive.
    let lower = weights + 4 * 32 * cache;
    // Captures are reduced as they arrive and each layer's cache is freed after its
    // backward, so at most: every cache, the per-example gradients of every LoRA
    // factor (b × the trainable count; the ghost method instantiates them), and one
    // layer's captures in flight (X rows×d_in per linear, G rows×d_out, u and
    // s·G·B rows×r), plus 10% for backward temporaries. Holding every capture to
    // the end, as before, would exceed this by ~30 GiB.
    let caps = rows * (3 * d + d + 2 * d + f) + rows * (4 * d + 2 * f + d) + rows * 7 * 2 * rank;
    let upper = lower + 4 * b * p.trainable_params + 4 * (cache + caps + recompute);
    let got = r.requested_peak_bytes;
    assert!(got >= lower, "peak {got} below the cache count {lower}");
    assert!(
        got <= upper + upper / 10,
        "peak {got} above caches + per-example LoRA gradients + one layer {upper}"
    );
    eprintln!(
        "ghost peak {:.2} GiB, caches-only bound {:.2} GiB, upper bound {:.2} GiB",
        got as f64 / 2f64.powi(30),
        lower as f64 / 2f64.powi(30),
        upper as f64 / 2f64.powi(30)
    );
}
