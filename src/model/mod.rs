//! The LLaVA-style multimodal model, written once against [`crate::backend::Backend`]:
//! a frozen CLIP-style vision tower ([`vit`]), optional VisionZip token selection,
//! the mlp2x_gelu projector ([`projector`]) and a Llama decoder ([`llama`]) with
//! LoRA adapters ([`lora`]) or full fine-tuning of chosen groups.
//!
//! The backward never forms weight gradients: every trainable linear hands back a
//! [`Capture`] (its input X and output gradient G), from which the training loop
//! computes per-example norms (ghost or instantiated; Li et al. 2022, arXiv
//! 2110.05679) and clipped sums (book-keeping; Bu et al. 2023, arXiv 2210.00038).
pub mod config;
pub mod flops;
pub mod llama;
pub mod lora;
pub mod mllm;
pub mod projector;
pub mod vit;
pub mod weights;

pub use config::{
    FullGroup, LlmConfig, LoraTarget, ModelConfig, ProjectorAct, ProjectorConfig, TrainMode,
    VisionConfig, VisionFeature, PRESETS,
};
pub use mllm::Mllm;

use crate::backend::Backend;
use crate::dp::clip::LinearShape;
use crate::mem::Shared;

/// One trainable tensor. Ids are assigned 0, 1, 2, … in a fixed order (vision
/// tower, projector, embedding, decoder layers in order with q, k, v, o, gate, up,
/// down and each linear's weight, bias, LoRA A, LoRA B, then lm_head), so they are
/// stable across runs and key the DP noise streams.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrainableParam {
    /// Stable id.
    pub id: u32,
    /// Checkpoint name, e.g. `llm.layers.0.self_attn.q_proj.lora_A.weight`.
    pub name: String,
    /// Number of values.
    pub len: usize,
    /// Row-major shape (`[p, d]` for a weight).
    pub shape: Vec<usize>,
}

/// What one trainable linear saw in the backward: enough for ghost norms and
/// book-keeping. Example i's weight gradient is `G_iᵀ X_i` (p×d) and its bias
/// gradient `Σ_t G_i,t`.
pub struct Capture<B: Backend> {
    /// [`TrainableParam`] id of W (p×d, row-major, PyTorch layout).
    pub weight_id: u32,
    /// Id of its bias (length p) if the layer has a trainable bias.
    pub bias_id: Option<u32>,
    /// b examples, t tokens each, d in, p out.
    pub shape: LinearShape,
    /// The layer input X, b×t×d (shared with the forward's saved activation and
    /// the other linears reading it).
    pub x: Shared<B::Buf>,
    /// The gradient of Σ_i ℓ_i w.r.t. the layer output, b×t×p (shared where two
    /// weights of one linear see the same gradient).
    pub g: Shared<B::Buf>,
}

/// The result of [`Mllm::forward_backward`].
pub struct ForwardBackward<B: Backend> {
    /// ℓ_i: mean cross-entropy over example i's masked positions (0 if none).
    pub per_example_loss: crate::mem::Recycled<f32>,
    /// One per trainable linear (LoRA A and B are two linears), in backward order.
    pub captures: Vec<Capture<B>>,
    /// Plain (batch-summed) gradients of trainable non-linear params: only the
    /// embedding table in pretraining ([`FullGroup::Embeddings`]); empty otherwise.
    pub dense_grads: Vec<(u32, B::Buf)>,
    /// Visual tokens fed to the LLM per example (after pruning).
    pub visual_tokens: usize,
}
