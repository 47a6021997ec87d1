//! Optimizer configuration and per-parameter state.
use serde::{Deserialize, Serialize};

use crate::dp::prune::Optimizer;
use crate::error::Setting;
use crate::{Error, Result};

/// The optimizer family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OptKind {
    /// SGD with optional momentum.
    Sgd,
    /// AdamW.
    Adamw,
}

/// Optimizer hyper-parameters, fixed for a run.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct OptConfig {
    /// Family.
    pub kind: OptKind,
    /// Learning rate.
    pub lr: f32,
    /// SGD momentum (ignored by AdamW).
    pub momentum: f32,
    /// Weight decay (coupled for SGD, decoupled for AdamW).
    pub weight_decay: f32,
    /// AdamW β1.
    pub beta1: f32,
    /// AdamW β2.
    pub beta2: f32,
    /// AdamW ε.
    pub eps: f32,
}

impl OptConfig {
    /// AdamW with β = (0.9, 0.999), ε = 1e-8 and no weight decay.
    pub fn adamw(lr: f32) -> Self {
        Self {
            kind: OptKind::Adamw,
            lr,
            momentum: 0.0,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }

    /// Plain SGD (no momentum, no weight decay).
    pub fn sgd(lr: f32) -> Self {
        Self {
            kind: OptKind::Sgd,
            ..Self::adamw(lr)
        }
    }

    /// The optimizer for 1-based step `t` (AdamW's bias correction needs it).
    pub fn at_step(&self, t: u32) -> Result<Optimizer> {
        let o = match self.kind {
            OptKind::Sgd => Optimizer::Sgd {
                lr: self.lr,
                momentum: self.momentum,
                weight_decay: self.weight_decay,
            },
            OptKind::Adamw => Optimizer::AdamW {
                lr: self.lr,
                beta1: self.beta1,
                beta2: self.beta2,
                eps: self.eps,
                weight_decay: self.weight_decay,
                t: t.max(1),
            },
        };
        o.validate().map_err(|e| Error::Setting {
            setting: Setting::Optimizer,
            message: format!(
                "{} (check the learning rate, momentum and weight decay)",
                match e {
                    Error::Config(m) => m,
                    e => e.to_string(),
                }
            ),
        })?;
        Ok(o)
    }
}
