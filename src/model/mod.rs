//! The LLaVA-style model (in progress).
