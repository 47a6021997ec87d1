//! Visual token selection (VisionZip-style), the first Dual-Priv mechanism.
pub mod tokens;
