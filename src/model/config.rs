//! Model configurations, presets, what is trainable, and analytic parameter counts.
use crate::{Error, Result};

/// Which vision tokens reach the projector when token selection is **off**
/// (LLaVA's `mm_vision_select_feature`). With token selection on, the output is
/// always `[CLS, K dominant, M contextual]` as in VisionZip.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VisionFeature {
    /// Patches only, N − 1 tokens (LLaVA-1.5's default, used by every preset).
    Patch,
    /// CLS and patches, all N tokens. With this, token selection with K = all
    /// patches and M = 0 gives exactly the unpruned model.
    ClsPatch,
}

/// The CLIP-style vision tower.
#[derive(Clone, Debug, PartialEq)]
pub struct VisionConfig {
    /// Image side in pixels (square RGB images).
    pub image_size: usize,
    /// Patch side in pixels.
    pub patch_size: usize,
    /// Hidden size D_v.
    pub hidden: usize,
    /// Transformer layers of the full tower (features come from layer −2, so only
    /// `layers − 1` are allocated and run).
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// MLP inner size.
    pub mlp: usize,
    /// LayerNorm epsilon.
    pub ln_eps: f32,
    /// Tokens passed on when token selection is off.
    pub feature: VisionFeature,
    /// Whether the patch embedding has a bias (the crate's presets: yes; HF's CLIP
    /// `Conv2d(..., bias=False)`: no).
    pub patch_bias: bool,
}

impl VisionConfig {
    /// Patches per image, (S/p)².
    pub fn patches(&self) -> usize {
        let n = self.image_size / self.patch_size.max(1);
        n * n
    }
    /// Tokens per image, CLS included: 1 + patches.
    pub fn tokens(&self) -> usize {
        1 + self.patches()
    }
    /// Values in one flattened patch: 3·p·p.
    pub fn patch_dim(&self) -> usize {
        3 * self.patch_size * self.patch_size
    }
    /// Default (K, M) of token selection: VisionZip's (53, 10) for CLIP's 576
    /// patches, otherwise 3/8 of the patches kept and 1/8 merged into contextual
    /// tokens (the tiny preset's 16 patches: K = 6, M = 2, so 9 tokens instead of 16).
    pub fn default_token_select(&self) -> (usize, usize) {
        let p = self.patches();
        if p >= 576 {
            (53, 10)
        } else {
            ((3 * p / 8).max(1), p / 8)
        }
    }
    /// Layers actually run (and allocated): up to layer −2.
    pub fn layers_run(&self) -> usize {
        self.layers.saturating_sub(1)
    }
}

/// The Llama decoder.
#[derive(Clone, Debug, PartialEq)]
pub struct LlmConfig {
    /// Hidden size D.
    pub hidden: usize,
    /// Decoder layers.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (divides `heads`).
    pub kv_heads: usize,
    /// SwiGLU inner size.
    pub mlp: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// RoPE base θ.
    pub rope_theta: f32,
}

impl LlmConfig {
    /// Head dimension D / heads.
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads.max(1)
    }
    /// Width of the k and v projections: kv_heads · head_dim.
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim()
    }
    /// `(d_in, d_out)` of one LoRA-able linear of a layer.
    pub fn linear_dims(&self, t: LoraTarget) -> (usize, usize) {
        let (d, kv, m) = (self.hidden, self.kv_dim(), self.mlp);
        match t {
            LoraTarget::Q | LoraTarget::O => (d, d),
            LoraTarget::K | LoraTarget::V => (d, kv),
            LoraTarget::Gate | LoraTarget::Up => (d, m),
            LoraTarget::Down => (m, d),
        }
    }
}

/// The projector's activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProjectorAct {
    /// The exact GELU `x·Φ(x)`: transformers' `gelu`, LLaVA-1.5's projector.
    Gelu,
    /// The tanh approximation (`gelu_pytorch_tanh`): the crate's presets.
    GeluTanh,
}

/// LLaVA's `mlp2x_gelu` projector: `Linear(Dv→D) → act → Linear(D→D)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProjectorConfig {
    /// The activation between the two linears.
    pub act: ProjectorAct,
    /// Whether both linears have biases (`multimodal_projector_bias`).
    pub bias: bool,
}

impl ProjectorConfig {
    /// The presets' projector: tanh GELU, biases.
    pub const PRESET: Self = Self {
        act: ProjectorAct::GeluTanh,
        bias: true,
    };
}

/// A LLaVA-style model: vision tower → projector (mlp2x_gelu) → Llama.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// Preset name (used in error messages and checkpoints).
    pub name: String,
    /// Vision tower.
    pub vision: VisionConfig,
    /// Projector.
    pub projector: ProjectorConfig,
    /// Decoder.
    pub llm: LlmConfig,
}

/// The valid preset names.
pub const PRESETS: [&str; 4] = ["tiny", "small", "tinyllava-1b", "llava-7b"];

fn clip_vit_l14_336() -> VisionConfig {
    VisionConfig {
        image_size: 336,
        patch_size: 14,
        hidden: 1024,
        layers: 24,
        heads: 16,
        mlp: 4096,
        ln_eps: 1e-5,
        feature: VisionFeature::Patch,
        patch_bias: true,
    }
}

impl ModelConfig {
    /// A named preset: `tiny` (trains in seconds on a CPU), `small` (a CPU size
    /// where GEMMs dominate the step: ViT 256 wide, 4 layers of which 3 run, 64×64
    /// images in 8-pixel patches, 64 patches; Llama 512 wide, 4 layers, 8 heads of
    /// 64, 4 kv heads, SwiGLU 1408, vocab 1024), `tinyllava-1b`
    /// (CLIP ViT-L/14-336 + TinyLlama-1.1B) or `llava-7b` (CLIP ViT-L/14-336 +
    /// Vicuna-7B), with the sizes of the `config.json` of
    /// `openai/clip-vit-large-patch14-336`, `TinyLlama/TinyLlama-1.1B-Chat-v1.0` and
    /// `lmsys/vicuna-7b-v1.5` on the Hugging Face Hub.
    pub fn preset(name: &str) -> Result<ModelConfig> {
        let cfg = match name {
            "tiny" => ModelConfig {
                name: name.into(),
                vision: VisionConfig {
                    image_size: 32,
                    patch_size: 8,
                    hidden: 64,
                    layers: 4,
                    heads: 4,
                    mlp: 256,
                    ln_eps: 1e-5,
                    feature: VisionFeature::Patch,
                    patch_bias: true,
                },
                projector: ProjectorConfig::PRESET,
                llm: LlmConfig {
                    hidden: 128,
                    layers: 2,
                    heads: 4,
                    kv_heads: 2,
                    mlp: 352,
                    vocab: 64,
                    rms_eps: 1e-5,
                    rope_theta: 10000.0,
                },
            },
            "small" => ModelConfig {
                name: name.into(),
                vision: VisionConfig {
                    image_size: 64,
                    patch_size: 8,
                    hidden: 256,
                    layers: 4,
                    heads: 4,
                    mlp: 1024,
                    ln_eps: 1e-5,
                    feature: VisionFeature::Patch,
                    patch_bias: true,
                },
                projector: ProjectorConfig::PRESET,
                // The tiny preset's ratios: MLP 2.75 × hidden, half as many kv heads.
                llm: LlmConfig {
                    hidden: 512,
                    layers: 4,
                    heads: 8,
                    kv_heads: 4,
                    mlp: 1408,
                    vocab: 1024,
                    rms_eps: 1e-5,
                    rope_theta: 10000.0,
                },
            },
            "tinyllava-1b" => ModelConfig {
                name: name.into(),
                vision: clip_vit_l14_336(),
                projector: ProjectorConfig::PRESET,
                llm: LlmConfig {
                    hidden: 2048,
                    layers: 22,
                    heads: 32,
                    kv_heads: 4,
                    mlp: 5632,
                    vocab: 32000,
                    rms_eps: 1e-5,
                    rope_theta: 10000.0,
                },
            },
            "llava-7b" => ModelConfig {
                name: name.into(),
                vision: clip_vit_l14_336(),
                projector: ProjectorConfig::PRESET,
                llm: LlmConfig {
                    hidden: 4096,
                    layers: 32,
                    heads: 32,
                    kv_heads: 32,
                    mlp: 11008,
                    vocab: 32000,
                    rms_eps: 1e-5,
                    rope_theta: 10000.0,
                },
            },
            _ => {
                return Err(Error::Config(format!(
                    "unknown model preset '{name}'; valid presets: {}",
                    PRESETS.join(", ")
                )))
            }
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks divisibility and non-zero sizes.
    pub fn validate(&self) -> Result<()> {
        let (v, l) = (&self.vision, &self.llm);
        let bad = |m: String| Err(Error::Config(format!("model '{}': {m}", self.name)));
        if v.patch_size == 0 || v.image_size == 0 || v.image_size % v.patch_size != 0 {
            return bad(format!(
                "patch size {} must divide image size {}",
                v.patch_size, v.image_size
            ));
        }
        if v.layers < 2 {
            return bad("the vision tower needs ≥ 2 layers (features from layer −2)".into());
        }
        if v.heads == 0 || v.hidden % v.heads != 0 {
            return bad(format!(
                "vision heads {} must divide hidden {}",
                v.heads, v.hidden
            ));
        }
        if l.heads == 0 || l.hidden % l.heads != 0 || l.head_dim() % 2 != 0 {
            return bad(format!(
                "LLM heads {} must divide hidden {} into an even head dimension",
                l.heads, l.hidden
            ));
        }
        if l.kv_heads == 0 || l.heads % l.kv_heads != 0 {
            return bad(format!(
                "LLM kv heads {} must divide heads {}",
                l.kv_heads, l.heads
            ));
        }
        if l.vocab == 0 || l.layers == 0 || l.mlp == 0 || v.mlp == 0 {
            return bad("vocab, layers and MLP sizes must be ≥ 1".into());
        }
        Ok(())
    }

    /// Parameters of the frozen-or-trainable base model (without LoRA), counting
    /// only what is allocated: the vision tower up to layer −2, projector, Llama
    /// with an untied lm_head.
    pub fn base_params(&self) -> u64 {
        let (v, l) = (&self.vision, &self.llm);
        let (dv, d) = (v.hidden as u64, l.hidden as u64);
        let vit_layer = 4 * (dv * dv + dv) + 2 * dv * v.mlp as u64 + v.mlp as u64 + dv + 4 * dv;
        let vit = v.patch_dim() as u64 * dv
            + if v.patch_bias { dv } else { 0 }
            + dv
            + v.tokens() as u64 * dv
            + 2 * dv
            + v.layers_run() as u64 * vit_layer;
        let pb = if self.projector.bias { 2 * d } else { 0 };
        let proj = dv * d + d * d + pb;
        let layer: u64 = LoraTarget::ALL
            .iter()
            .map(|&t| {
                let (i, o) = l.linear_dims(t);
                (i * o) as u64
            })
            .sum::<u64>()
            + 2 * d;
        let llm = 2 * l.vocab as u64 * d + l.layers as u64 * layer + d;
        vit + proj + llm
    }

    /// Parameters trained under `mode` (analytic; nothing is allocated).
    pub fn trainable_params(&self, mode: &TrainMode) -> u64 {
        let (v, l) = (&self.vision, &self.llm);
        let layers = l.layers as u64;
        match mode {
            TrainMode::Lora { rank, targets, .. } => {
                layers
                    * targets
                        .iter()
                        .map(|&t| {
                            let (i, o) = l.linear_dims(t);
                            (*rank * (i + o)) as u64
                        })
                        .sum::<u64>()
            }
            TrainMode::Full { groups } => {
                let sum_of = |ts: &[LoraTarget]| -> u64 {
                    ts.iter()
                        .map(|&t| {
                            let (i, o) = l.linear_dims(t);
                            (i * o) as u64
                        })
                        .sum()
                };
                let (dv, d) = (v.hidden as u64, l.hidden as u64);
                groups
                    .iter()
                    .map(|g| match g {
                        FullGroup::Projector => {
                            dv * d + d * d + if self.projector.bias { 2 * d } else { 0 }
                        }
                        FullGroup::Attention => layers * sum_of(&LoraTarget::ATTENTION),
                        FullGroup::Mlp => layers * sum_of(&LoraTarget::MLP),
                        FullGroup::LmHead | FullGroup::Embeddings => l.vocab as u64 * d,
                    })
                    .sum()
            }
        }
    }
}

/// An LLM linear that LoRA can adapt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LoraTarget {
    /// Query projection.
    Q,
    /// Key projection.
    K,
    /// Value projection.
    V,
    /// Attention output projection.
    O,
    /// MLP gate projection.
    Gate,
    /// MLP up projection.
    Up,
    /// MLP down projection.
    Down,
}

impl LoraTarget {
    /// "All LLM linears": q, k, v, o, gate, up, down of every layer (the lm_head is
    /// not included; with it llava-7b r=128 would be 324.4M, not the paper's 319.8M).
    pub const ALL: [LoraTarget; 7] = [
        LoraTarget::Q,
        LoraTarget::K,
        LoraTarget::V,
        LoraTarget::O,
        LoraTarget::Gate,
        LoraTarget::Up,
        LoraTarget::Down,
    ];
    /// The attention linears q, k, v, o.
    pub const ATTENTION: [LoraTarget; 4] =
        [LoraTarget::Q, LoraTarget::K, LoraTarget::V, LoraTarget::O];
    /// The MLP linears gate, up, down.
    pub const MLP: [LoraTarget; 3] = [LoraTarget::Gate, LoraTarget::Up, LoraTarget::Down];

    /// The module name, as in HF Llama (`q_proj`, …, `down_proj`).
    pub fn module(self) -> &'static str {
        match self {
            LoraTarget::Q => "self_attn.q_proj",
            LoraTarget::K => "self_attn.k_proj",
            LoraTarget::V => "self_attn.v_proj",
            LoraTarget::O => "self_attn.o_proj",
            LoraTarget::Gate => "mlp.gate_proj",
            LoraTarget::Up => "mlp.up_proj",
            LoraTarget::Down => "mlp.down_proj",
        }
    }
}

/// A group of base weights trained in full fine-tuning.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FullGroup {
    /// Both projector linears and their biases.
    Projector,
    /// q, k, v, o of every decoder layer.
    Attention,
    /// gate, up, down of every decoder layer.
    Mlp,
    /// The output head.
    LmHead,
    /// The token embedding table. **Only for non-private pretraining:** its
    /// gradient is returned as a plain batch-summed gradient in
    /// [`super::ForwardBackward::dense_grads`], with no per-example form, so DP
    /// training must reject it.
    Embeddings,
}

/// What the training loop updates. Norms, the vision tower and (outside
/// pretraining) the embeddings are always frozen.
#[derive(Clone, Debug, PartialEq)]
pub enum TrainMode {
    /// LoRA on chosen decoder linears: `h = W x + (alpha/rank) · B (A x)`, A r×d
    /// (Kaiming-uniform, bound 1/√d, as PEFT), B p×r (zeros).
    Lora {
        /// Rank r.
        rank: usize,
        /// Scale numerator: the update is scaled by alpha / rank.
        alpha: f32,
        /// Which linears of every layer get adapters.
        targets: Vec<LoraTarget>,
    },
    /// Train base weights of the chosen groups (empty: everything frozen).
    Full {
        /// Which groups.
        groups: Vec<FullGroup>,
    },
}

impl TrainMode {
    /// LoRA on all LLM linears (q, k, v, o, gate, up, down).
    pub fn lora(rank: usize, alpha: f32) -> Self {
        TrainMode::Lora {
            rank,
            alpha,
            targets: LoraTarget::ALL.to_vec(),
        }
    }

    /// Nothing trainable (evaluation, or the frozen base of a LoRA model).
    pub fn frozen() -> Self {
        TrainMode::Full { groups: vec![] }
    }

    /// Checks rank, alpha and duplicates.
    pub fn validate(&self) -> Result<()> {
        match self {
            TrainMode::Lora {
                rank,
                alpha,
                targets,
            } => {
                if *rank == 0 || !alpha.is_finite() {
                    return Err(Error::Config(format!(
                        "LoRA needs rank ≥ 1 and a finite alpha, got rank {rank}, alpha {alpha}"
                    )));
                }
                let mut t = targets.clone();
                t.sort();
                t.dedup();
                if t.len() != targets.len() || t.is_empty() {
                    return Err(Error::Config(format!(
                        "LoRA targets must be non-empty and distinct, got {targets:?}"
                    )));
                }
            }
            TrainMode::Full { groups } => {
                let mut g = groups.clone();
                g.sort();
                g.dedup();
                if g.len() != groups.len() {
                    return Err(Error::Config(format!(
                        "full fine-tuning groups must be distinct, got {groups:?}"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Whether full training includes `g`.
    pub fn has_group(&self, g: FullGroup) -> bool {
        matches!(self, TrainMode::Full { groups } if groups.contains(&g))
    }
}
