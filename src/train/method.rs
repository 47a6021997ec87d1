//! The five training methods, which share the model, the data and the optimizer.
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// How a step turns a batch into a parameter update.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// The plain mean gradient; no clipping, no noise.
    Nonprivate,
    /// Classic DP-SGD with materialised per-example gradients (Opacus' default).
    Dpsgd,
    /// DP-SGD with ghost norms and book-keeping: one backward, no per-example gradients.
    Ghost,
    /// `ghost` plus visual token pruning and noisy-gradient update pruning.
    Dualpriv,
    /// DPZero: zeroth-order DP with a regenerated random direction.
    Dpzo,
}

impl Method {
    /// All methods, in the order the demo reports them.
    pub const ALL: [Method; 5] = [
        Method::Nonprivate,
        Method::Dpsgd,
        Method::Ghost,
        Method::Dualpriv,
        Method::Dpzo,
    ];

    /// Whether the method adds noise and is accounted.
    pub fn is_private(self) -> bool {
        self != Method::Nonprivate
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Method::Nonprivate => "nonprivate",
            Method::Dpsgd => "dpsgd",
            Method::Ghost => "ghost",
            Method::Dualpriv => "dualpriv",
            Method::Dpzo => "dpzo",
        })
    }
}

impl FromStr for Method {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Method::ALL
            .into_iter()
            .find(|m| m.to_string() == s.trim().to_ascii_lowercase())
            .ok_or_else(|| {
                Error::Config(format!(
                    "unknown method {s:?}: expected nonprivate, dpsgd, ghost, dualpriv or dpzo"
                ))
            })
    }
}
