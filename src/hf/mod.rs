//! Hugging Face LLaVA-1.5 interop: the files a `llava-hf/llava-1.5-*-hf` folder holds
//! and the data a LLaVA practitioner brings.
//!
//! * [`config`]: `config.json` with transformers' defaults filled in;
//! * [`checkpoint`]: memory-mapped safetensors (single file or shards) in any of the
//!   key layouts transformers writes, converted per tensor to f32;
//! * [`tokenizer`]: `tokenizer.json` through the `tokenizers` crate;
//! * [`image`]: `CLIPImageProcessor` preprocessing with Pillow's bicubic resampler;
//! * [`conversation`]: LLaVA's conversation JSON, prompt templates and answer masks;
//! * [`dataset`]: conversation data as the training loop's [`crate::data::DataSource`];
//! * [`load`]: a LLaVA folder (and a PEFT adapter) into the crate's model;
//! * [`merge`]: a LLaVA folder with a run's LoRA merged in (`export --merged`);
//! * [`names`]: the crate's tensor names against transformers' and PEFT's;
//! * [`peft`]: PEFT LoRA adapters in and out.
pub mod checkpoint;
pub mod config;
pub mod conversation;
pub mod dataset;
pub mod image;
pub mod load;
pub mod merge;
pub mod names;
pub mod peft;
pub mod tokenizer;
pub mod write;
