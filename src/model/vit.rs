//! The CLIP-style vision tower, frozen and forward only.
//!
//! ```text
//! images [B,3,S,S] → patches [B,P,3·p·p] → patch linear (with bias) → [B,P,D]
//! x = [CLS, patches] + positions                            [B,N,D], N = 1 + P
//! x = pre_layrnorm(x)
//! for each layer up to layer −2 (the last layer is never run, so never allocated):
//!     x = x + out_proj(MHSA(LN1(x)))        (q, k, v, out_proj with bias, non-causal)
//!     x = x + fc2(quick_gelu(fc1(LN2(x))))
//! ```
//!
//! The output is HF's `hidden_states[-2]`, with that layer's CLS attention rows
//! `[B,H,N]` and keys `[B,N,H·hd]` for token selection.
use super::config::VisionConfig;
use super::lora::Linear;
use super::weights::{Builder, Init, Store};
use crate::backend::{AttnShape, Backend, Blocks, PatchShape, RowShape};
use crate::Result;

/// A LayerNorm's weight and bias (store indices).
#[derive(Clone, Copy, Debug)]
pub(crate) struct LayerNorm {
    pub w: usize,
    pub b: usize,
}

impl LayerNorm {
    fn build<B: Backend>(bd: &mut Builder<B>, prefix: &str, d: usize) -> Result<Self> {
        Ok(Self {
            w: bd.frozen(format!("{prefix}.weight"), vec![d], Init::Ones)?,
            b: bd.frozen(format!("{prefix}.bias"), vec![d], Init::Zeros)?,
        })
    }

    fn forward<B: Backend>(
        &self,
        be: &B,
        st: &Store<B>,
        x: &B::Buf,
        s: RowShape,
        eps: f32,
    ) -> Result<B::Buf> {
        let mut out = be.zeros(s.rows * s.dim)?;
        let (mut mean, mut rstd) = (be.zeros(s.rows)?, be.zeros(s.rows)?);
        be.layernorm_fwd(
            &mut out,
            &mut mean,
            &mut rstd,
            x,
            st.buf(self.w),
            st.buf(self.b),
            s,
            eps,
        )?;
        Ok(out)
    }
}

pub(crate) struct VitLayer {
    ln1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

pub(crate) struct VisionTower {
    cfg: VisionConfig,
    patch: Linear,
    cls: usize,
    pos: usize,
    pre_ln: LayerNorm,
    layers: Vec<VitLayer>,
}

/// What the tower hands to token selection and the projector.
pub(crate) struct VisionOut<B: Backend> {
    /// `[B, N, D]`, layer −2 output.
    pub hidden: B::Buf,
    /// `[B, H, N]`: the CLS query's attention row of layer −2, per head.
    pub attn_cls: B::Buf,
    /// `[B, N, D]`: layer −2's keys (H heads of hd).
    pub keys: B::Buf,
}

impl VisionTower {
    pub fn build<B: Backend>(bd: &mut Builder<B>, cfg: &VisionConfig) -> Result<Self> {
        let d = cfg.hidden;
        let patch = bd.linear(
            "vision.patch_embed",
            cfg.patch_dim(),
            d,
            cfg.patch_bias,
            false,
            None,
        )?;
        let cls = bd.frozen("vision.class_embedding".into(), vec![d], Init::Normal(0.02))?;
        let pos = bd.frozen(
            "vision.position_embedding".into(),
            vec![cfg.tokens(), d],
            Init::Normal(0.02),
        )?;
        let pre_ln = LayerNorm::build(bd, "vision.pre_layrnorm", d)?;
        let mut layers = Vec::new();
        for i in 0..cfg.layers_run() {
            let p = format!("vision.layers.{i}");
            layers.push(VitLayer {
                ln1: LayerNorm::build(bd, &format!("{p}.layer_norm1"), d)?,
                q: bd.linear(&format!("{p}.self_attn.q_proj"), d, d, true, false, None)?,
                k: bd.linear(&format!("{p}.self_attn.k_proj"), d, d, true, false, None)?,
                v: bd.linear(&format!("{p}.self_attn.v_proj"), d, d, true, false, None)?,
                o: bd.linear(&format!("{p}.self_attn.out_proj"), d, d, true, false, None)?,
                ln2: LayerNorm::build(bd, &format!("{p}.layer_norm2"), d)?,
                fc1: bd.linear(&format!("{p}.mlp.fc1"), d, cfg.mlp, true, false, None)?,
                fc2: bd.linear(&format!("{p}.mlp.fc2"), cfg.mlp, d, true, false, None)?,
            });
        }
        Ok(Self {
            cfg: cfg.clone(),
            patch,
            cls,
            pos,
            pre_ln,
            layers,
        })
    }

    /// Runs the tower on `b` images `[b, 3, S, S]` (already on the device).
    pub fn forward<B: Backend>(
        &self,
        be: &B,
        st: &Store<B>,
        images: &B::Buf,
        b: usize,
    ) -> Result<VisionOut<B>> {
        let c = &self.cfg;
        let (d, np, n, heads) = (c.hidden, c.patches(), c.tokens(), c.heads);
        let hd = d / heads;
        let mut patches = be.zeros(b * np * c.patch_dim())?;
        let ps = PatchShape {
            b,
            channels: 3,
            size: c.image_size,
            patch: c.patch_size,
        };
        be.patchify(&mut patches, images, ps)?;
        let (pe, _) = self.patch.forward(be, st, &patches, b * np)?;
        // x = [CLS, patch embeddings] + positions
        let mut x = be.zeros(b * n * d)?;
        let cls = Blocks {
            count: b,
            len: d,
            src_off: 0,
            src_stride: 0,
            dst_off: 0,
            dst_stride: n * d,
        };
        be.copy_blocks(&mut x, st.buf(self.cls), cls)?;
        let body = Blocks {
            count: b,
            len: np * d,
            src_off: 0,
            src_stride: np * d,
            dst_off: d,
            dst_stride: n * d,
        };
        be.copy_blocks(&mut x, &pe, body)?;
        be.add_bias(
            &mut x,
            st.buf(self.pos),
            RowShape {
                rows: b,
                dim: n * d,
            },
        )?;
        let rs = RowShape {
            rows: b * n,
            dim: d,
        };
        let mut x = self.pre_ln.forward(be, st, &x, rs, c.ln_eps)?;
        let shape = AttnShape {
            b,
            t: n,
            hq: heads,
            hkv: heads,
            hd,
            causal: false,
        };
        let mut last = None;
        for (i, l) in self.layers.iter().enumerate() {
            let h = l.ln1.forward(be, st, &x, rs, c.ln_eps)?;
            let (q, _) = l.q.forward(be, st, &h, b * n)?;
            let (k, _) = l.k.forward(be, st, &h, b * n)?;
            let (v, _) = l.v.forward(be, st, &h, b * n)?;
            let mut att = be.zeros(b * n * d)?;
            let mut probs = be.zeros(shape.probs_len())?;
            be.attention_fwd(&mut att, &mut probs, &q, &k, &v, shape)?;
            let (o, _) = l.o.forward(be, st, &att, b * n)?;
            be.axpy(&mut x, 1.0, &o)?;
            let h2 = l.ln2.forward(be, st, &x, rs, c.ln_eps)?;
            let (f1, _) = l.fc1.forward(be, st, &h2, b * n)?;
            let mut a = be.zeros(b * n * c.mlp)?;
            be.quick_gelu_fwd(&mut a, &f1)?;
            let (f2, _) = l.fc2.forward(be, st, &a, b * n)?;
            be.axpy(&mut x, 1.0, &f2)?;
            if i + 1 == self.layers.len() {
                let mut cls_rows = be.zeros(b * heads * n)?;
                let rows = Blocks {
                    count: b * heads,
                    len: n,
                    src_off: 0,
                    src_stride: n * n,
                    dst_off: 0,
                    dst_stride: n,
                };
                be.copy_blocks(&mut cls_rows, &probs, rows)?;
                last = Some((cls_rows, k));
            }
        }
        let (attn_cls, keys) = match last {
            Some(v) => v,
            None => (be.zeros(b * heads * n)?, be.zeros(b * n * d)?),
        };
        Ok(VisionOut {
            hidden: x,
            attn_cls,
            keys,
        })
    }
}
