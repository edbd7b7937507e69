//! The Qwen2.5-VL vision tower (the graft's vision source): `config` (the `vision_config` of a
//! Qwen2.5-VL `config.json`) and `vision` (patch embedding, RMSNorm blocks with a SwiGLU MLP,
//! window attention with full-attention blocks at `fullatt_block_indexes`, the merger to
//! `out_hidden_size`). The image processor and the 2-D rotary tables are Qwen2-VL's
//! (`models::qwen2_vl::{processor, rope}`): transformers uses the same code for both.
//! docs/graft.md has the details.
pub mod config;
pub mod vision;

pub use config::Qwen25VisionConfig;
pub use vision::{window_index, Qwen25VisionTower};
