//! Loading a model (decoder + tokenizer) from an alias, a transformers directory or a GGUF file.
use super::config::{DecoderConfig, Family};
use super::decoder::{Decoder, Part};
use super::gguf;
use super::registry::{self, Location, Resolved};
use super::tokenizer::Tokenizer;
use super::weights::{fingerprint, WeightDType, Weights};
use anyhow::{Context, Result};
use candle_core::Device;
use std::path::Path;

/// What a result line records about the model it came from.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelInfo {
    pub name: String,
    pub checkpoint: String,
    pub weights_hash: String,
    pub dtype: String,
    pub family: String,
    pub num_layers: usize,
    pub hidden_size: usize,
    /// Whether a row's outputs are bit-identical whatever its batch (docs/determinism.md):
    /// true for every CPU f32/gguf path; not promised on a GPU or in f16/bf16.
    pub batch_invariant: bool,
    /// The checkpoint directory when the weights came from one (`generation_config.json` lives
    /// there); `None` for a GGUF file.
    #[serde(skip)]
    pub dir: Option<std::path::PathBuf>,
    /// `--adapter`: the LoRA adapter every row applies (`name@hash`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapter: Option<String>,
}

impl ModelInfo {
    /// Says once, at load, when results of this model may depend on batch composition.
    pub(crate) fn warn_if_not_invariant(&self, device: &Device) {
        if !self.batch_invariant {
            tracing::warn!(
                model = %self.name, dtype = %self.dtype,
                "{} with {} is not batch invariant: a row's tokens can depend on what it is batched with \
                 (result lines record batch_invariant = false; docs/determinism.md)",
                crate::device::device_name(device), self.dtype
            );
        }
    }
}

pub struct LoadedModel {
    pub decoder: Decoder,
    pub tokenizer: Tokenizer,
    pub info: ModelInfo,
}

/// A text prompt as the model reads it: with `chat`, one user message in the model's chat
/// template (ending with the assistant's turn), else the text unchanged. Encode it with
/// `tokenizer.encode(&text, !chat)` (the template already holds the special tokens).
pub fn render_prompt(m: &LoadedModel, prompt: &str, chat: bool) -> Result<String> {
    if chat {
        m.tokenizer
            .apply_chat_template(&[super::tokenizer::ChatMessage { role: "user".into(), content: prompt.into() }], true)
    } else {
        Ok(prompt.to_string())
    }
}

/// `--adapter [NAME=]DIR`: attaches a peft LoRA adapter to `decoder` as every row's default, so
/// the whole model is the adapted one (unmerged: docs/probes.md), and records it in `info`.
pub fn apply_adapter(decoder: &mut Decoder, info: &mut ModelInfo, spec: &str) -> Result<()> {
    let (name, dir) = super::lora::parse_named(spec);
    let a = super::lora::LoraAdapter::load(&name, &dir, &decoder.cfg, decoder.device(), decoder.dtype())
        .with_context(|| format!("--adapter {spec}"))?;
    info.adapter = Some(a.id());
    let id = decoder.attach_adapter(a)?;
    decoder.set_default_adapter(Some(id))
}

/// Loads a decoder (no tokenizer) from a transformers directory.
pub fn decoder_from_dir(dir: &Path, device: &Device, dtype: WeightDType) -> Result<(Decoder, Weights)> {
    decoder_part_from_dir(dir, device, dtype, None)
}

/// [`decoder_from_dir`] for `part` of the model only (a pipeline stage; `None` = all of it).
pub fn decoder_part_from_dir(
    dir: &Path,
    device: &Device,
    dtype: WeightDType,
    part: Option<Part>,
) -> Result<(Decoder, Weights)> {
    let cfg = DecoderConfig::from_file(&dir.join("config.json"))?;
    let mut w = Weights::from_safetensors_dir(dir, device, dtype)?;
    w.hint = format!(
        " ({}: {} layers, hidden {}, {} heads / {} kv heads, head_dim {})",
        dir.join("config.json").display(),
        cfg.num_layers,
        cfg.hidden_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim
    );
    let part = part.unwrap_or_else(|| Part::whole(cfg.num_layers));
    let d = Decoder::load_part(cfg, &w, part)?;
    Ok((d, w))
}

/// Loads a decoder from a GGUF file; returns the GGUF content for the tokenizer.
pub fn decoder_from_gguf(path: &Path, device: &Device, dtype: WeightDType) -> Result<(Decoder, Weights)> {
    decoder_part_from_gguf(path, device, dtype, None)
}

/// [`decoder_from_gguf`] for `part` of the model only (a pipeline stage; `None` = all of it).
pub fn decoder_part_from_gguf(
    path: &Path,
    device: &Device,
    dtype: WeightDType,
    part: Option<Part>,
) -> Result<(Decoder, Weights)> {
    let content = gguf::read(path)?;
    let cfg = gguf::config(&content, path)?;
    let mut w = Weights::from_gguf(path, content, device, dtype)?;
    w.hint = format!(
        " ({} metadata: {} layers, hidden {}, {} heads / {} kv heads)",
        cfg.family.name(),
        cfg.num_layers,
        cfg.hidden_size,
        cfg.num_heads,
        cfg.num_kv_heads
    );
    if cfg.family == Family::Llama {
        w.set_unpermute(cfg.num_heads, cfg.num_kv_heads);
    }
    w.set_post_norms(cfg.post_norms);
    let part = part.unwrap_or_else(|| Part::whole(cfg.num_layers));
    let d = Decoder::load_part(cfg, &w, part)?;
    Ok((d, w))
}

impl LoadedModel {
    /// [`apply_adapter`] on this model.
    pub fn with_adapter(mut self, spec: Option<&str>) -> Result<Self> {
        if let Some(s) = spec {
            apply_adapter(&mut self.decoder, &mut self.info, s)?;
        }
        Ok(self)
    }

    /// `spec`: a registry alias, a transformers directory or a `.gguf` file.
    pub fn load(spec: &str, device: &Device, dtype: WeightDType) -> Result<Self> {
        if let Some(addrs) = crate::stage::client::addrs_of(spec) {
            // The stages chose their device and dtype when they started.
            return crate::stage::connect_text(&addrs);
        }
        let resolved = registry::resolve(spec)?;
        Self::load_resolved(&resolved, device, dtype)
    }

    pub fn load_resolved(r: &Resolved, device: &Device, dtype: WeightDType) -> Result<Self> {
        let t0 = std::time::Instant::now();
        let (decoder, weights, tokenizer) = match &r.location {
            Location::Dir(dir) => {
                let (d, w) = decoder_from_dir(dir, device, dtype)?;
                let t =
                    Tokenizer::from_dir(dir).with_context(|| format!("loading the tokenizer of {}", dir.display()))?;
                (d, w, t)
            }
            Location::Gguf(path) => {
                let (d, w) = decoder_from_gguf(path, device, dtype)?;
                let t = match &w.source {
                    super::weights::Source::Gguf { content, .. } => Tokenizer::from_gguf(content)
                        .with_context(|| format!("building the tokenizer from {}", path.display()))?,
                    _ => unreachable!(),
                };
                (d, w, t)
            }
        };
        let info = ModelInfo {
            adapter: None,
            name: r.name.clone(),
            checkpoint: r.checkpoint.clone(),
            dir: match &r.location {
                Location::Dir(d) => Some(d.clone()),
                Location::Gguf(_) => None,
            },
            weights_hash: fingerprint(&weights.files())?,
            dtype: dtype.name().to_string(),
            family: decoder.cfg.family.name().to_string(),
            num_layers: decoder.cfg.num_layers,
            hidden_size: decoder.cfg.hidden_size,
            batch_invariant: decoder.batch_invariant(),
        };
        info.warn_if_not_invariant(device);
        tracing::info!(
            model = %info.name, dtype = %info.dtype, layers = info.num_layers, hidden = info.hidden_size,
            "loaded in {:.2}s", t0.elapsed().as_secs_f64()
        );
        Ok(Self { decoder, tokenizer, info })
    }
}

/// A text model or a Qwen2-VL: the lenses need only the LLM backbone and its tokenizer.
pub enum Loaded {
    Text(Box<LoadedModel>),
    Vlm(Box<super::qwen2_vl::Qwen2Vl>),
}

impl Loaded {
    /// A Qwen2-VL model (registry modality or directory) loads with its vision tower.
    pub fn load(spec: &str, device: &Device, dtype: super::dtype::DTypeChoice) -> Result<Self> {
        let dtype = dtype.resolve_for(device, spec);
        if super::qwen2_vl::is_vlm_model(spec) {
            Ok(Loaded::Vlm(Box::new(super::qwen2_vl::Qwen2Vl::load(spec, device, dtype)?)))
        } else {
            Ok(Loaded::Text(Box::new(LoadedModel::load(spec, device, dtype)?)))
        }
    }
    pub fn decoder(&self) -> &Decoder {
        match self {
            Loaded::Text(m) => &m.decoder,
            Loaded::Vlm(m) => &m.decoder,
        }
    }
    pub fn tokenizer(&self) -> &Tokenizer {
        match self {
            Loaded::Text(m) => &m.tokenizer,
            Loaded::Vlm(m) => &m.tokenizer,
        }
    }
    pub fn info(&self) -> &ModelInfo {
        match self {
            Loaded::Text(m) => &m.info,
            Loaded::Vlm(m) => &m.info,
        }
    }
}
