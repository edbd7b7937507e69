//! Probes and router heads on a frozen model's pooled hidden states (DESIGN.md §6b, issue 21).
//!
//! The pipeline, one module per step:
//! - [`data`]: datasets (JSONL `{"text", "label"}` or `{"image", "text", "label"}`), and datasets
//!   written from MiniWoB with no labelling by hand (`task`, `family`, `success`).
//! - [`features`]: the frozen model runs once over a dataset; each selected hook point is pooled
//!   (`first`, `last`, `mean`, `image-mean`) and streamed to safetensors shards (memory flat).
//! - [`head`]: linear and MLP heads in f32 (candle-nn `Var`s), saved with their standardisation,
//!   classes, hook point, pooling and the train/val/test split; a linear head's class direction is a
//!   steering vector.
//! - [`train`]: AdamW, optional balanced class weights, early stopping on validation loss (the
//!   best epoch is kept), bit-identical for the same seed.
//! - [`eval`]: accuracy, macro-F1, per-class precision/recall, confusion matrix (markdown + PNG),
//!   the majority-class baseline beside the accuracy, and a warning when one class takes ≥ 90% of
//!   the predictions; `sweep` trains and evaluates every layer.
//! - [`gate`]: steering gated by a probe: class probability at the head's hook point on a prompt.
//! - [`route`]: a router head picks a LoRA adapter per prompt; rows of different adapters generate
//!   in one batch.
//!
//! Layer numbering as everywhere: `blocks.{i}.hook_resid_post` is the output of decoder layer i,
//! transformers' `hidden_states[i + 1]`.
pub mod data;
pub mod eval;
pub mod features;
pub mod gate;
pub mod head;
pub mod route;
pub mod train;

pub use features::{FeatureSet, Pool};
pub use head::{Head, HeadKind};
