//! `dualpriv account`: privacy accounting of the Poisson-subsampled Gaussian
//! mechanism, ε for a noise multiplier or the smallest noise multiplier for a
//! target ε.
use crate::dp::accountant::{calibrate_sigma, epsilon, AccountantKind};
use crate::error::Setting;
use crate::{Error, Result};

/// Settings of `dualpriv account`: one phase of `steps` steps at (q, σ).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AccountArgs {
    /// The accountant.
    pub accountant: AccountantKind,
    /// Poisson sampling rate q = B_expected / N, in (0, 1].
    pub sample_rate: f64,
    /// Noise multiplier σ; `None` to calibrate it for `target_epsilon`.
    pub noise_multiplier: Option<f64>,
    /// Target ε, used when `noise_multiplier` is `None`.
    pub target_epsilon: Option<f64>,
    /// Number of steps T.
    pub steps: u64,
    /// δ of the (ε, δ) guarantee, in (0, 1).
    pub delta: f64,
}

/// The answer of [`account`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum AccountAnswer {
    /// ε after `steps` steps at the given σ.
    Epsilon(f64),
    /// The smallest σ that meets the target ε.
    NoiseMultiplier(f64),
}

impl AccountArgs {
    /// Checks what the accountant itself does not: at least one step, and exactly
    /// one of σ and a target ε.
    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 {
            return Err(Error::Setting {
                setting: Setting::Steps,
                message: "the number of steps must be at least 1".into(),
            });
        }
        match (self.noise_multiplier, self.target_epsilon) {
            (Some(_), None) | (None, Some(_)) => Ok(()),
            _ => Err(Error::Config(
                "give either a noise multiplier or a target ε, not both or neither".into(),
            )),
        }
    }
}

/// ε for the given σ, or the smallest σ for the target ε.
pub fn account(a: &AccountArgs) -> Result<AccountAnswer> {
    a.validate()?;
    let (q, steps, delta) = (a.sample_rate, a.steps, a.delta);
    match (a.noise_multiplier, a.target_epsilon) {
        (Some(s), _) => epsilon(a.accountant, &[(q, s, steps)], delta).map(AccountAnswer::Epsilon),
        (None, Some(e)) => {
            calibrate_sigma(a.accountant, q, steps, e, delta).map(AccountAnswer::NoiseMultiplier)
        }
        (None, None) => Err(Error::Internal("validated above".into())),
    }
}
