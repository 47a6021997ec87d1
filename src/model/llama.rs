//! The Llama decoder over `[visual tokens, text tokens]`, forward and backward.
//!
//! ```text
//! per layer:  x = x + o_proj(attn(rope(q_proj(n)), rope(k_proj(n)), v_proj(n)))  n = RMSNorm₁(x)
//!             x = x + down_proj(silu(gate_proj(m)) · up_proj(m))                 m = RMSNorm₂(x)
//! then RMSNorm and lm_head (no biases anywhere; causal GQA attention, RoPE rotate-half)
//! ```
//!
//! The backward mirrors the forward line by line; it never forms a weight
//! gradient, each trainable linear records a [`Capture`](crate::model::Capture) instead.
#![allow(clippy::too_many_arguments)] // llm.c-style explicit activations

use super::config::{FullGroup, LlmConfig, LoraTarget, TrainMode};
use super::lora::{CaptureSink, Linear};
use super::weights::{Builder, Init, Store};
use crate::backend::{AttnShape, Backend, RopeShape, RowShape};
use crate::mem::Shared;
use crate::Result;

pub(crate) struct LlamaLayer {
    ln1: usize,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ln2: usize,
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl LlamaLayer {
    fn trainable(&self) -> bool {
        [
            &self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down,
        ]
        .iter()
        .any(|l| l.trainable())
    }
}

pub(crate) struct Llama {
    pub cfg: LlmConfig,
    pub embed: usize,
    pub embed_id: Option<u32>,
    pub layers: Vec<LlamaLayer>,
    pub norm: usize,
    pub lm_head: Linear,
}

/// Everything one layer's backward reads.
pub(crate) struct LayerCache<B: Backend> {
    x_in: B::Buf,
    ln1: Shared<B::Buf>,
    rstd1: B::Buf,
    q: B::Buf,
    k: B::Buf,
    v: B::Buf,
    u: [Option<Shared<B::Buf>>; 7],
    att: Shared<B::Buf>,
    x_mid: B::Buf,
    ln2: Shared<B::Buf>,
    rstd2: B::Buf,
    gate: B::Buf,
    up: B::Buf,
    // Not `act = silu(gate)·up`: the backward recomputes it (one elementwise pass)
    // instead of holding F values per row for the whole step.
}

impl Llama {
    pub fn build<B: Backend>(
        bd: &mut Builder<B>,
        cfg: &LlmConfig,
        mode: &TrainMode,
    ) -> Result<Self> {
        let d = cfg.hidden;
        let (embed, embed_id) = bd.tensor(
            "llm.embed_tokens.weight".into(),
            vec![cfg.vocab, d],
            Init::Normal(0.02),
            mode.has_group(FullGroup::Embeddings),
        )?;
        let mut layers = Vec::new();
        for i in 0..cfg.layers {
            let p = format!("llm.layers.{i}");
            let lin = |t: LoraTarget, bd: &mut Builder<B>| {
                let (din, dout) = cfg.linear_dims(t);
                let (train, lora) = match mode {
                    TrainMode::Full { groups } => {
                        let g = if LoraTarget::ATTENTION.contains(&t) {
                            FullGroup::Attention
                        } else {
                            FullGroup::Mlp
                        };
                        (groups.contains(&g), None)
                    }
                    TrainMode::Lora {
                        rank,
                        alpha,
                        targets,
                    } => (false, targets.contains(&t).then_some((*rank, *alpha))),
                };
                bd.linear(
                    &format!("{p}.{}", t.module()),
                    din,
                    dout,
                    false,
                    train,
                    lora,
                )
            };
            let ln1 = bd.frozen(format!("{p}.input_layernorm.weight"), vec![d], Init::Ones)?;
            let q = lin(LoraTarget::Q, bd)?;
            let k = lin(LoraTarget::K, bd)?;
            let v = lin(LoraTarget::V, bd)?;
            let o = lin(LoraTarget::O, bd)?;
            let ln2 = bd.frozen(
                format!("{p}.post_attention_layernorm.weight"),
                vec![d],
                Init::Ones,
            )?;
            let gate = lin(LoraTarget::Gate, bd)?;
            let up = lin(LoraTarget::Up, bd)?;
            let down = lin(LoraTarget::Down, bd)?;
            layers.push(LlamaLayer {
                ln1,
                q,
                k,
                v,
                o,
                ln2,
                gate,
                up,
                down,
            });
        }
        let norm = bd.frozen("llm.norm.weight".into(), vec![d], Init::Ones)?;
        let lm_head = bd.linear(
            "llm.lm_head",
            d,
            cfg.vocab,
            false,
            mode.has_group(FullGroup::LmHead),
            None,
        )?;
        Ok(Self {
            cfg: cfg.clone(),
            embed,
            embed_id,
            layers,
            norm,
            lm_head,
        })
    }

    fn attn_shape(&self, b: usize, t: usize) -> AttnShape {
        AttnShape {
            b,
            t,
            hq: self.cfg.heads,
            hkv: self.cfg.kv_heads,
            hd: self.cfg.head_dim(),
            causal: true,
        }
    }

    fn rope_shape(&self, b: usize, t: usize, heads: usize) -> RopeShape {
        RopeShape {
            b,
            t,
            heads,
            hd: self.cfg.head_dim(),
            theta: self.cfg.rope_theta,
        }
    }

    /// The lowest layer whose backward must run (None: no decoder backward at all),
    /// given whether the gradient must reach the decoder's input.
    pub fn lowest_backward_layer(&self, need_input_grad: bool) -> Option<usize> {
        if need_input_grad {
            return (!self.layers.is_empty()).then_some(0);
        }
        self.layers.iter().position(|l| l.trainable())
    }

    /// One layer forward on `[b, t, D]`; returns the output and, when `keep`, the
    /// cache its backward reads. Without `keep` (DPZO, evaluation) each
    /// intermediate is freed at its last use and the residual adds run in place,
    /// so a forward-only pass holds about one projection's activations at a time.
    pub fn layer_forward<B: Backend>(
        &self,
        be: &B,
        st: &Store<B>,
        i: usize,
        x_in: B::Buf,
        (b, t): (usize, usize),
        keep: bool,
    ) -> Result<(B::Buf, Option<LayerCache<B>>)> {
        let l = &self.layers[i];
        let c = &self.cfg;
        let rows = b * t;
        let rs = RowShape {
            rows,
            dim: c.hidden,
        };
        // Kept for a backward: the factored LoRA form (its u = x·Aᵀ is a capture);
        // forward only: whichever form is cheaper.
        let fwd = |lin: &Linear, x: &B::Buf| {
            if keep {
                lin.forward(be, st, x, rows)
            } else {
                lin.forward_only(be, st, x, rows).map(|y| (y, None))
            }
        };
        let mut ln1 = be.output(rows * c.hidden)?;
        let mut rstd1 = be.output(rows)?;
        be.rmsnorm_fwd(&mut ln1, &mut rstd1, &x_in, st.buf(l.ln1), rs, c.rms_eps)?;
        let ln1 = Shared::new(ln1);
        let (mut q, uq) = fwd(&l.q, &ln1)?;
        let (mut k, uk) = fwd(&l.k, &ln1)?;
        let (v, uv) = fwd(&l.v, &ln1)?;
        let ln1 = keep.then_some((ln1, rstd1));
        be.rope_fwd(&mut q, self.rope_shape(b, t, c.heads))?;
        be.rope_fwd(&mut k, self.rope_shape(b, t, c.kv_heads))?;
        let shape = self.attn_shape(b, t);
        let mut att = be.output(shape.q_len())?;
        let mut probs = be.output(shape.probs_len())?;
        be.attention_fwd(&mut att, &mut probs, &q, &k, &v, shape)?;
        // The probabilities are not kept: the backward recomputes them, so one
        // layer's [b, hq, t, t] is live at a time instead of every layer's.
        drop(probs);
        let qkvp = keep.then_some((q, k, v));
        let att = Shared::new(att);
        let (o, uo) = fwd(&l.o, &att)?;
        let att = keep.then_some(att);
        // x_mid = x_in + o; in place when x_in need not be kept.
        let (x_in, mut x_mid) = if keep {
            let m = be.duplicate(&x_in)?;
            (Some(x_in), m)
        } else {
            (None, x_in)
        };
        be.axpy(&mut x_mid, 1.0, &o)?;
        drop(o);
        let mut ln2 = be.output(rows * c.hidden)?;
        let mut rstd2 = be.output(rows)?;
        be.rmsnorm_fwd(&mut ln2, &mut rstd2, &x_mid, st.buf(l.ln2), rs, c.rms_eps)?;
        let ln2 = Shared::new(ln2);
        let (gate, ug) = fwd(&l.gate, &ln2)?;
        let (up, uu) = fwd(&l.up, &ln2)?;
        let ln2 = keep.then_some((ln2, rstd2));
        let mut act = be.output(rows * c.mlp)?;
        be.swiglu_fwd(&mut act, &gate, &up)?;
        let gate_up = keep.then_some((gate, up));
        let (down, ud) = fwd(&l.down, &act)?;
        drop(act);
        let (x_mid, mut x_out) = if keep {
            let out = be.duplicate(&x_mid)?;
            (Some(x_mid), out)
        } else {
            (None, x_mid)
        };
        be.axpy(&mut x_out, 1.0, &down)?;
        let cache = match (x_in, ln1, qkvp, att, x_mid, ln2, gate_up) {
            (
                Some(x_in),
                Some((ln1, rstd1)),
                Some((q, k, v)),
                Some(att),
                Some(x_mid),
                Some((ln2, rstd2)),
                Some((gate, up)),
            ) => Some(LayerCache {
                x_in,
                ln1,
                rstd1,
                q,
                k,
                v,
                u: [uq, uk, uv, uo, ug, uu, ud],
                att,
                x_mid,
                ln2,
                rstd2,
                gate,
                up,
            }),
            _ => None,
        };
        Ok((x_out, cache))
    }

    /// One layer backward: `dx` is the gradient of the layer output; returns the
    /// gradient of its input when `need_dx`. It consumes the layer's cache and
    /// frees each saved activation after its last use, so the layer in flight
    /// gives memory back as its backward proceeds.
    pub fn layer_backward<B: Backend>(
        &self,
        be: &B,
        st: &Store<B>,
        i: usize,
        c: LayerCache<B>,
        dx: B::Buf,
        (b, t): (usize, usize),
        need_dx: bool,
        sink: &mut CaptureSink<'_, B>,
    ) -> Result<Option<B::Buf>> {
        let l = &self.layers[i];
        let cfg = &self.cfg;
        let rows = b * t;
        let rs = RowShape {
            rows,
            dim: cfg.hidden,
        };
        let bt = (b, t);
        let LayerCache {
            x_in,
            ln1,
            rstd1,
            q,
            k,
            v,
            u,
            att,
            x_mid,
            ln2,
            rstd2,
            gate,
            up,
        } = c;
        let u = |j: usize| u[j].as_ref();
        let dx = Shared::new(dx);
        // MLP branch: x_out = x_mid + down(swiglu(gate(m), up(m))), m = RMSNorm₂(x_mid)
        let mut act = be.output(rows * cfg.mlp)?;
        be.swiglu_fwd(&mut act, &gate, &up)?;
        let act = Shared::new(act);
        let dact = l
            .down
            .backward(be, st, &act, u(6), Shared::clone(&dx), bt, true, sink)?;
        drop(act);
        let dact =
            dact.ok_or_else(|| crate::Error::Shape("missing down_proj input gradient".into()))?;
        let mut dgate = be.output(rows * cfg.mlp)?;
        let mut dup = be.output(rows * cfg.mlp)?;
        be.swiglu_bwd(&mut dgate, &mut dup, &dact, &gate, &up)?;
        drop((dact, gate, up));
        let mut dln2 = be.zeros(rows * cfg.hidden)?;
        if let Some(d) = l
            .gate
            .backward(be, st, &ln2, u(4), Shared::new(dgate), bt, true, sink)?
        {
            be.axpy(&mut dln2, 1.0, &d)?;
        }
        if let Some(d) =
            l.up.backward(be, st, &ln2, u(5), Shared::new(dup), bt, true, sink)?
        {
            be.axpy(&mut dln2, 1.0, &d)?;
        }
        drop(ln2);
        let mut dmid = be.zeros(rows * cfg.hidden)?;
        let mut dw = be.zeros(cfg.hidden)?;
        be.rmsnorm_bwd(&mut dmid, &mut dw, &dln2, &x_mid, st.buf(l.ln2), &rstd2, rs)?;
        drop((dln2, x_mid, rstd2));
        be.axpy(&mut dmid, 1.0, &dx)?;
        drop(dx);
        let dmid = Shared::new(dmid);
        // Attention branch: x_mid = x_in + o(attn(rope(q(n)), rope(k(n)), v(n))), n = RMSNorm₁(x_in)
        let datt =
            l.o.backward(be, st, &att, u(3), Shared::clone(&dmid), bt, true, sink)?;
        drop(att);
        let datt =
            datt.ok_or_else(|| crate::Error::Shape("missing o_proj input gradient".into()))?;
        let shape = self.attn_shape(b, t);
        let mut probs = be.output(shape.probs_len())?;
        be.attention_probs(&mut probs, &q, &k, &v, shape)?;
        let mut dq = be.zeros(shape.q_len())?;
        let mut dk = be.zeros(shape.kv_len())?;
        let mut dv = be.zeros(shape.kv_len())?;
        be.attention_bwd(&mut dq, &mut dk, &mut dv, &datt, &q, &k, &v, &probs, shape)?;
        drop((datt, q, k, v, probs));
        be.rope_bwd(&mut dq, self.rope_shape(b, t, cfg.heads))?;
        be.rope_bwd(&mut dk, self.rope_shape(b, t, cfg.kv_heads))?;
        let mut dln1 = be.zeros(rows * cfg.hidden)?;
        for (lin, j, g) in [(&l.q, 0, dq), (&l.k, 1, dk), (&l.v, 2, dv)] {
            if let Some(d) = lin.backward(be, st, &ln1, u(j), Shared::new(g), bt, need_dx, sink)? {
                be.axpy(&mut dln1, 1.0, &d)?;
            }
        }
        drop(ln1);
        if !need_dx {
            return Ok(None);
        }
        let mut din = be.zeros(rows * cfg.hidden)?;
        be.rmsnorm_bwd(&mut din, &mut dw, &dln1, &x_in, st.buf(l.ln1), &rstd1, rs)?;
        drop((dln1, x_in, rstd1));
        be.axpy(&mut din, 1.0, &dmid)?;
        Ok(Some(din))
    }
}
