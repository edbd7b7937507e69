//! Pipeline stages (docs/stages.md): one model split across processes or machines. `split`
//! writes one directory per stage holding exactly its tensors; `stage serve` runs one; a
//! driver (`--stages ADDR,…`, a `stages:ADDR,…` model spec) runs the same generation code as a
//! local model, with each layer's work, KV cache and hooks on the stage that owns it.
pub mod client;
pub mod gateway;
pub mod manifest;
pub mod server;
pub mod split;
pub mod wire;

use crate::models::config::DecoderConfig;
use crate::models::decoder::Decoder;
use crate::models::load::{LoadedModel, ModelInfo};
use crate::models::qwen2_vl::config::Qwen2VlConfig;
use crate::models::qwen2_vl::Qwen2Vl;
use crate::models::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use client::Pipeline;

fn info(p: &Pipeline, family: &str, cfg: &DecoderConfig) -> ModelInfo {
    let src = p.source();
    ModelInfo {
        name: src.name.clone(),
        checkpoint: src.checkpoint.clone(),
        weights_hash: src.weights_hash.clone(),
        dtype: p.weights_dtype().to_string(),
        family: family.to_string(),
        num_layers: cfg.num_layers,
        hidden_size: cfg.hidden_size,
        batch_invariant: p.batch_invariant(),
        dir: (src.format != "gguf").then(|| p.files_dir().to_path_buf()),
        adapter: None,
    }
}

/// A text model served by the stages at `addrs`: its decoder sends every forward to them.
pub fn connect_text(addrs: &[String]) -> Result<LoadedModel> {
    let p = Pipeline::connect(addrs)?;
    if p.source().family == "qwen2-vl" {
        bail!("--stages {}: a split of the Qwen2-VL {}; run it with --vlm", addrs.join(","), p.source().name);
    }
    let dir = p.files_dir().to_path_buf();
    let (cfg, tokenizer) = if p.source().format == "gguf" {
        let path = dir.join("metadata.gguf");
        let c = crate::models::gguf::read(&path)?;
        (crate::models::gguf::config(&c, &path)?, Tokenizer::from_gguf(&c).context("the stages' tokenizer")?)
    } else {
        (
            DecoderConfig::from_file(&dir.join("config.json"))?,
            Tokenizer::from_dir(&dir).context("the stages' tokenizer")?,
        )
    };
    let info = info(&p, cfg.family.name(), &cfg);
    let decoder = Decoder::remote(cfg, p)?;
    Ok(LoadedModel { decoder, tokenizer, info })
}

/// A Qwen2-VL served by the stages at `addrs` (its vision tower on the first).
pub fn connect_vlm(addrs: &[String]) -> Result<Qwen2Vl> {
    let p = Pipeline::connect(addrs)?;
    if p.source().family != "qwen2-vl" {
        bail!("--stages {}: a split of {} ({}), not a Qwen2-VL", addrs.join(","), p.source().name, p.source().family);
    }
    let dir = p.files_dir().to_path_buf();
    let cfg = Qwen2VlConfig::from_file(&dir.join("config.json"))?;
    let info = info(&p, "qwen2-vl", &cfg.text);
    let decoder = Decoder::remote(cfg.text.clone(), p)?;
    Qwen2Vl::assemble(&dir, cfg, None, decoder, info)
}

/// Whether the stages at `addrs` serve a Qwen2-VL (false when they cannot be reached: loading
/// then says why).
pub fn serves_vlm(addrs: &[String]) -> bool {
    Pipeline::family_of(addrs).is_ok_and(|f| f == "qwen2-vl")
}
