//! The projector (LLaVA's `mlp2x_gelu`): `Linear(Dv→D) → GELU → Linear(D→D)`, with
//! the exact GELU for HF checkpoints and the tanh approximation for the presets
//! ([`super::config::ProjectorConfig`]). Trainable in full fine-tuning
//! ([`super::FullGroup::Projector`]); its input gradient is never needed (the vision
//! tower is frozen), so its backward only records captures.
use super::config::{ProjectorAct, ProjectorConfig};
use super::lora::{CaptureSink, Linear};
use super::weights::{Builder, Store};
use crate::mem::Shared;

use crate::backend::Backend;
use crate::Result;

pub(crate) struct Projector {
    pub fc1: Linear,
    pub fc2: Linear,
    act: ProjectorAct,
}

/// Activations kept for the backward.
pub(crate) struct ProjCache<B: Backend> {
    x: Shared<B::Buf>,
    h: B::Buf,
    a: Shared<B::Buf>,
}

impl Projector {
    pub fn build<B: Backend>(
        bd: &mut Builder<B>,
        dv: usize,
        d: usize,
        cfg: ProjectorConfig,
        train: bool,
    ) -> Result<Self> {
        Ok(Self {
            fc1: bd.linear("projector.linear_1", dv, d, cfg.bias, train, None)?,
            fc2: bd.linear("projector.linear_2", d, d, cfg.bias, train, None)?,
            act: cfg.act,
        })
    }

    pub fn trainable(&self) -> bool {
        self.fc1.trainable()
    }

    /// `rows` tokens `[rows, Dv]` → `[rows, D]`.
    pub fn forward<B: Backend>(
        &self,
        be: &B,
        st: &Store<B>,
        x: B::Buf,
        rows: usize,
    ) -> Result<(B::Buf, ProjCache<B>)> {
        let x = Shared::new(x);
        let (h, _) = self.fc1.forward(be, st, &x, rows)?;
        let mut a = be.zeros(rows * self.fc1.p)?;
        match self.act {
            ProjectorAct::Gelu => be.gelu_erf_fwd(&mut a, &h)?,
            ProjectorAct::GeluTanh => be.gelu_fwd(&mut a, &h)?,
        }
        let a = Shared::new(a);
        let (y, _) = self.fc2.forward(be, st, &a, rows)?;
        Ok((y, ProjCache { x, h, a }))
    }

    /// Records the captures of both linears for `b` examples of `t` visual tokens.
    pub fn backward<B: Backend>(
        &self,
        be: &B,
        st: &Store<B>,
        cache: &ProjCache<B>,
        dy: B::Buf,
        bt: (usize, usize),
        sink: &mut CaptureSink<'_, B>,
    ) -> Result<()> {
        let da = self
            .fc2
            .backward(be, st, &cache.a, None, Shared::new(dy), bt, true, sink)?;
        if let Some(da) = da {
            let mut dh = be.zeros(be.len(&da))?;
            match self.act {
                ProjectorAct::Gelu => be.gelu_erf_bwd(&mut dh, &da, &cache.h)?,
                ProjectorAct::GeluTanh => be.gelu_bwd(&mut dh, &da, &cache.h)?,
            }
            self.fc1
                .backward(be, st, &cache.x, None, Shared::new(dh), bt, false, sink)?;
        }
        Ok(())
    }
}
