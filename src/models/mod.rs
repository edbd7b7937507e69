//! Candle models with hook points. Nothing here knows about browsers.
pub mod config;
pub mod decoder;
pub mod determinism;
pub mod engine;
pub mod generate;
pub mod gguf;
pub mod hooks;
pub mod kernels;
pub mod lora;
pub mod prefix_cache;
pub mod q8;
pub mod qwen2_5_vl;
pub mod qwen2_vl;
pub mod registry;
pub mod weights;

pub use config::DecoderConfig;
pub use decoder::{Decoder, State};
pub use hooks::{Captures, HookPoint, HookSpec, Positions, StepInfo};
pub use weights::WeightDType;
pub mod dtype;
pub mod goldens;
pub mod load;
pub mod memory;
pub mod tokenizer;
pub mod workload;
