//! The commands of the `dualpriv` binary as library functions, one file per
//! command. Each takes typed settings in library terms, does the work and returns
//! what the command reports; the binary (`src/bin/dualpriv.rs`) only maps its
//! flags onto these settings and prints the results, so another front end (a C
//! ABI, a script) gets the same behaviour without the CLI.
//!
//! * [`train`]: one DP fine-tune, or the resume of one;
//! * [`eval`]: test accuracy of a checkpoint, or exact-match accuracy of greedy
//!   generation on LLaVA conversation data;
//! * [`generate`]: greedy decoding with a transformers LLaVA folder (and adapter);
//! * [`export`]: a run's LoRA adapter as a PEFT adapter folder;
//! * [`inspect`]: a model's host memory when loaded, and its device memory plan;
//! * [`account`]: ε for a noise multiplier, or the σ for a target ε;
//! * [`audit`](mod@audit): the one-run empirical privacy audit (ε lower bounds);
//! * [`demo`]: the README's main job, every method fine-tuned and evaluated;
//! * [`study`]: the utility study of every method and ablation, with tables and plots;
//! * [`pretrain`]: non-private pretraining of the public starting checkpoint;
//! * [`bench`](mod@bench): step time of each method, and micro-benchmarks of each kernel.
//!
//! `dualpriv selfcheck` is [`crate::selfcheck`].
pub mod account;
pub mod audit;
pub mod bench;
pub mod demo;
pub mod eval;
pub mod export;
pub mod generate;
pub mod inspect;
pub mod pretrain;
pub mod study;
pub mod train;
