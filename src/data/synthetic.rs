//! The built-in synthetic multimodal task (in progress).
/// Padding token id.
pub const PAD: u32 = 0;
