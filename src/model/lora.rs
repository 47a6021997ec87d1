//! A linear layer `y = x Wᵀ (+ b)` with an optional LoRA adapter
//! `y += u Bᵀ`, u = s · x Aᵀ, s = alpha / rank, and its backward, which records a
//! [`Capture`] for every trainable weight instead of forming weight gradients.
//!
//! Backward, with G = ∂(Σ_i ℓ_i)/∂y (rows × p):
//!
//! * base W (trainable in full fine-tuning): capture (X, G); bias via `bias_id`;
//! * LoRA B (p×r), whose input is u (the scale folded in, so its output gradient
//!   is G itself): capture (u, G);
//! * LoRA A (r×d), whose output gradient is s·G·B: capture (X, s·G·B);
//! * dx = G·W + (s·G·B)·A, only when the caller needs it.
//!
//! Captures share X and G with the forward's saved activations and the incoming
//! gradient ([`Shared`]) instead of copying them: q, k and v read one X, and LoRA B
//! and a trained W read one G.
#![allow(clippy::too_many_arguments)] // llm.c-style explicit activations

use crate::mem::Shared;

use super::weights::Store;
use super::Capture;
use crate::backend::{Backend, MatmulSpec, RowShape};
use crate::dp::clip::LinearShape;
use crate::Result;

/// A LoRA adapter: tensors A (r×d) and B (p×r) and their trainable ids.
/// Where a backward hands each [`Capture`] as soon as it is formed.
pub(crate) type CaptureSink<'a, B> = dyn FnMut(Capture<B>) -> Result<()> + 'a;

/// A device buffer shared between saved activations and captures.
pub(crate) type SharedBuf<B> = Shared<<B as Backend>::Buf>;

#[derive(Clone, Debug)]
pub(crate) struct LoraAdapter {
    pub a: usize,
    pub b: usize,
    pub a_id: u32,
    pub b_id: u32,
    pub rank: usize,
    pub scale: f32,
}

/// A linear layer in a [`Store`]: weight p×d (PyTorch layout), optional bias.
#[derive(Clone, Debug)]
pub(crate) struct Linear {
    pub w: usize,
    pub bias: Option<usize>,
    pub d: usize,
    pub p: usize,
    /// Trainable id of W (full fine-tuning).
    pub w_id: Option<u32>,
    /// Trainable id of the bias (full fine-tuning).
    pub bias_id: Option<u32>,
    pub lora: Option<LoraAdapter>,
}

impl Linear {
    /// Whether the backward records any capture.
    pub fn trainable(&self) -> bool {
        self.w_id.is_some() || self.lora.is_some()
    }

    /// `y = x Wᵀ + b (+ s (x Aᵀ) Bᵀ)` for `rows` rows; also returns u = x Aᵀ with LoRA.
    pub fn forward<B: Backend>(
        &self,
        be: &B,
        st: &Store<B>,
        x: &B::Buf,
        rows: usize,
    ) -> Result<(B::Buf, Option<SharedBuf<B>>)> {
        let mut y = be.output(rows * self.p)?;
        be.matmul(
            &mut y,
            x,
            st.buf(self.w),
            MatmulSpec::nt(rows, self.p, self.d),
        )?;
        if let Some(b) = self.bias {
            be.add_bias(&mut y, st.buf(b), RowShape { rows, dim: self.p })?;
        }
        let u = match &self.lora {
            None => None,
            Some(l) => {
                let mut u = be.output(rows * l.rank)?;
                be.matmul(
                    &mut u,
                    x,
                    st.buf(l.a),
                    MatmulSpec::nt(rows, l.rank, self.d).scaled(l.scale, 0.0),
                )?;
                be.matmul(
                    &mut y,
                    &u,
                    st.buf(l.b),
                    MatmulSpec::nt(rows, self.p, l.rank).scaled(1.0, 1.0),
                )?;
                Some(Shared::new(u))
            }
        };
        Ok((y, u))
    }

    /// `y = x Wᵀ + b (+ s (x Aᵀ) Bᵀ)` with nothing kept for a backward (evaluation,
    /// DPZO's two forwards). With LoRA on many rows, the adapter is merged first,
    /// W' = W + s·B·A, and one product replaces the three: the merge costs p·d·r
    /// multiply-adds against rows·r·(d + p) for the two rank-r products, which are
    /// thin and run at a fraction of a square GEMM's rate. With few rows (a 7B
    /// layer, where p·d is large) the factored form stays.
    pub fn forward_only<B: Backend>(
        &self,
        be: &B,
        st: &Store<B>,
        x: &B::Buf,
        rows: usize,
    ) -> Result<B::Buf> {
        let Some(l) = &self.lora else {
            return Ok(self.forward(be, st, x, rows)?.0);
        };
        if rows * (self.d + self.p) < 4 * self.p * self.d {
            return Ok(self.forward(be, st, x, rows)?.0);
        }
        let mut w = be.duplicate(st.buf(self.w))?;
        be.matmul(
            &mut w,
            st.buf(l.b),
            st.buf(l.a),
            MatmulSpec::nn(self.p, self.d, l.rank).scaled(l.scale, 1.0),
        )?;
        let mut y = be.output(rows * self.p)?;
        be.matmul(&mut y, x, &w, MatmulSpec::nt(rows, self.p, self.d))?;
        if let Some(b) = self.bias {
            be.add_bias(&mut y, st.buf(b), RowShape { rows, dim: self.p })?;
        }
        Ok(y)
    }

    /// Backward for `b` examples of `t` rows each. Hands each capture to `sink` as
    /// it is formed; returns dx when `need_dx`.
    pub fn backward<B: Backend>(
        &self,
        be: &B,
        st: &Store<B>,
        x: &Shared<B::Buf>,
        u: Option<&Shared<B::Buf>>,
        dy: Shared<B::Buf>,
        (b, t): (usize, usize),
        need_dx: bool,
        sink: &mut CaptureSink<'_, B>,
    ) -> Result<Option<B::Buf>> {
        let rows = b * t;
        let mut dx = if need_dx {
            let mut dx = be.output(rows * self.d)?;
            be.matmul(
                &mut dx,
                &dy,
                st.buf(self.w),
                MatmulSpec::nn(rows, self.d, self.p),
            )?;
            Some(dx)
        } else {
            None
        };
        if let (Some(l), Some(u)) = (&self.lora, u) {
            // gu = s · G · B  (rows × r): the output gradient of A.
            let mut gu = be.output(rows * l.rank)?;
            be.matmul(
                &mut gu,
                &dy,
                st.buf(l.b),
                MatmulSpec::nn(rows, l.rank, self.p).scaled(l.scale, 0.0),
            )?;
            if let Some(dx) = dx.as_mut() {
                be.matmul(
                    dx,
                    &gu,
                    st.buf(l.a),
                    MatmulSpec::nn(rows, self.d, l.rank).scaled(1.0, 1.0),
                )?;
            }
            sink(Capture {
                weight_id: l.b_id,
                bias_id: None,
                shape: LinearShape {
                    b,
                    t,
                    d: l.rank,
                    p: self.p,
                },
                x: Shared::clone(u),
                g: Shared::clone(&dy),
            })?;
            sink(Capture {
                weight_id: l.a_id,
                bias_id: None,
                shape: LinearShape {
                    b,
                    t,
                    d: self.d,
                    p: l.rank,
                },
                x: Shared::clone(x),
                g: Shared::new(gu),
            })?;
        }
        if let Some(w_id) = self.w_id {
            sink(Capture {
                weight_id: w_id,
                bias_id: self.bias_id,
                shape: LinearShape {
                    b,
                    t,
                    d: self.d,
                    p: self.p,
                },
                x: Shared::clone(x),
                g: dy,
            })?;
        }
        Ok(dx)
    }
}
