//! The crate's error type. Every failure a user can cause (bad shapes, configs,
//! a missing GPU, unreadable files) lands here with a message that names the
//! problem and the fix in library terms; front ends add their own option names
//! ([`Error::Setting`]).
use thiserror::Error;

/// Errors returned by dualpriv.
#[derive(Debug, Error)]
pub enum Error {
    /// No CUDA driver library could be loaded on this machine.
    #[error(
        "no CUDA driver: libcuda could not be loaded. Run on a machine with an NVIDIA GPU and \
         driver, or use the CPU backend"
    )]
    NoCudaDriver,
    /// The CUDA driver is present but cuBLAS is not.
    #[error(
        "cuBLAS not found: libcublas.so.13 could not be loaded. Put the folder that holds it on \
         LD_LIBRARY_PATH (scripts/gpu-test.sh shows how to find it)"
    )]
    NoCublas,
    /// A CUDA driver or cuBLAS call failed.
    #[error("CUDA error in {context}: {source}")]
    Cuda {
        /// What dualpriv was doing.
        context: String,
        /// The library's own error, with its type: a `cudarc::driver::DriverError` or a
        /// `cudarc::cublas::result::CublasError` (downcast it to match on the code).
        /// Boxed, so that the variant exists without the `cuda` feature.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Two inputs disagree in shape, or a shape is out of range.
    #[error("shape error: {0}")]
    Shape(String),
    /// A configuration value is out of its valid range.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A choice of the caller's is invalid or conflicts with what is on disk, and
    /// the fix is another choice of `setting`. The message says so in library
    /// terms; a front end names its own option for `setting` (the CLI, its flag).
    #[error("invalid configuration: {message}")]
    Setting {
        /// The setting to change.
        setting: Setting,
        /// What is wrong, and the fix.
        message: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {message}")]
    Io {
        /// The file or folder.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// A file's contents could not be parsed or serialised.
    #[error("format error: {0}")]
    Format(String),
    /// The device ran out of memory; the message names the request and the fix.
    #[error("out of device memory: {0}")]
    OutOfMemory(String),
    /// A broken internal invariant: a bug in dualpriv, not in the caller's input.
    #[error("internal error (a bug in dualpriv; please report it): {0}")]
    Internal(String),
    /// A NaN or Inf reached a place where it would silently corrupt a DP release.
    #[error("non-finite values: {0}")]
    NonFinite(String),
}

/// The settings an [`Error::Setting`] names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Setting {
    /// The output folder of a new run ([`crate::train::Trainer::out_dir`]).
    OutDir,
    /// A run folder to read: the run to resume or the checkpoint to evaluate.
    RunDir,
    /// The number of steps.
    Steps,
    /// The optimizer's learning rate, momentum and weight decay.
    Optimizer,
    /// K, the dominant patches token selection keeps.
    KeepTokens,
    /// M, the contextual tokens token selection fuses the rest into.
    ContextTokens,
    /// The fraction of coordinates gradient-update pruning keeps.
    KeepFrac,
}

impl Error {
    /// An [`Error::Io`] naming `path`.
    pub(crate) fn io(path: &std::path::Path, e: impl std::fmt::Display) -> Self {
        Self::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        }
    }

    /// An [`Error::Io`] for a failure of the operating system's random source.
    pub(crate) fn entropy(e: impl std::fmt::Display) -> Self {
        Self::Io {
            path: "getrandom".into(),
            message: format!("the operating system's random source failed: {e}"),
        }
    }
}

/// Result alias for dualpriv.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Returns a [`Error::Shape`] unless `cond` holds.
pub(crate) fn ensure_shape(cond: bool, msg: impl FnOnce() -> String) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(Error::Shape(msg()))
    }
}
