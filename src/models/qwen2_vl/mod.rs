//! Qwen2-VL (vision-language) on the shared decoder: `config` (both config.json layouts),
//! `processor` (image → patches), `vision` (ViT with 2-D RoPE and the 2×2 merger), `rope`
//! (M-RoPE position ids and tables), `model` (embedding scatter, prefill, decoding, chat).
//! docs/qwen2-vl.md has the details and the tolerances.
pub mod config;
pub mod model;
pub mod processor;
pub mod rope;
pub mod vision;

pub use config::Qwen2VlConfig;
pub use model::{Prefilled, Qwen2Vl, VlmInput};
pub use processor::{process, smart_resize, ProcessorConfig};

use super::registry::{self, Location, Modality};

/// Does a `--model` spec name a vision-language model (registry modality, or a Qwen2-VL
/// directory)?
pub fn is_vlm_model(spec: &str) -> bool {
    if let Some(addrs) = crate::stage::client::addrs_of(spec) {
        return crate::stage::serves_vlm(&addrs);
    }
    if let Some(e) = registry::lookup(spec) {
        return e.modality == Modality::Vision;
    }
    match registry::resolve(spec) {
        Ok(r) => match r.location {
            Location::Dir(d) => config::is_qwen_vl_dir(&d),
            Location::Gguf(_) => false,
        },
        Err(_) => false,
    }
}
