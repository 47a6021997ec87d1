//! DP mechanisms behind the backend (in progress).
