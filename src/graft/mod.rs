//! Hybrid vision + language checkpoints ("grafts"): the vision tower of one model family
//! (Qwen2.5-VL) feeding the language model of another (Qwen3) through a trained linear adapter.
//!
//! A hybrid directory (`graft init`) holds `graft.json` (both sources with their weights hashes,
//! the adapter's shapes, init and seed, the placeholder token ids, the training record),
//! `adapter.safetensors`, the LM's tokenizer and chat template, and the vision source's
//! `preprocessor_config.json`. The vision and LM weights stay in their own directories (they are
//! gigabytes) and are checked against the recorded hashes on every load.
//!
//! The language model sees a user turn `<|vision_start|><|image_pad|>…<|vision_end|>` + text with
//! the pad repeated once per merged vision token; the adapter's output replaces those
//! embeddings. Positions are the LM's plain 1-D ones (Qwen3 has no M-RoPE). docs/graft.md.
pub mod bench;
pub mod data;
pub mod engine;
pub mod eval;
pub mod init;
pub mod train;

use crate::models::decoder::{Decoder, State};
use crate::models::generate::{self, GenerateConfig, Generation};
use crate::models::hooks::{Captures, HookSpec, StepInfo};
use crate::models::load::{decoder_from_dir, ModelInfo};
use crate::models::qwen2_5_vl::Qwen25VisionTower;
use crate::models::qwen2_vl::model::expand_image_pads;
use crate::models::qwen2_vl::processor::{self, Processed, ProcessorConfig};
use crate::models::tokenizer::{ChatMessage, Tokenizer};
use crate::models::weights::{fingerprint, safetensor_files, WeightDType};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const GRAFT_FILE: &str = "graft.json";
pub const ADAPTER_FILE: &str = "adapter.safetensors";
/// The untrained adapter, kept beside the trained one by the first `graft train`.
pub const ADAPTER_INIT_FILE: &str = "adapter.init.safetensors";
pub const FORMAT: &str = "miniwob-steer-graft/1";
pub const IMAGE_PAD: &str = "<|image_pad|>";
pub const VISION_START: &str = "<|vision_start|>";
pub const VISION_END: &str = "<|vision_end|>";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SourceInfo {
    /// Absolute path of the checkpoint directory.
    pub dir: PathBuf,
    /// `models::weights::fingerprint` of its safetensors files.
    pub weights_hash: String,
    /// `model_type` of its config.json.
    pub model_type: String,
    /// Vision: the merger's output width; LM: its hidden size.
    pub width: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AdapterInfo {
    pub in_features: usize,
    pub out_features: usize,
    /// How the adapter was initialised (docs/graft.md).
    pub init: String,
    pub seed: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GraftConfig {
    pub format: String,
    pub vision: SourceInfo,
    pub lm: SourceInfo,
    pub adapter: AdapterInfo,
    pub image_token_id: u32,
    pub vision_start_token_id: u32,
    pub vision_end_token_id: u32,
    /// Written by `graft train`: settings, steps, final loss, the frozen-weights digests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<serde_json::Value>,
}

impl GraftConfig {
    pub fn read(dir: &Path) -> Result<Self> {
        let p = dir.join(GRAFT_FILE);
        let text = std::fs::read_to_string(&p).with_context(|| {
            format!("reading {} (is {} a hybrid made by `graft init`?)", p.display(), dir.display())
        })?;
        let c: Self = serde_json::from_str(&text).with_context(|| format!("{}: not a graft config", p.display()))?;
        if c.format != FORMAT {
            bail!("{}: format `{}`, expected `{FORMAT}`", p.display(), c.format);
        }
        Ok(c)
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        let p = dir.join(GRAFT_FILE);
        let tmp = tempfile::NamedTempFile::new_in(dir)?;
        std::fs::write(tmp.path(), serde_json::to_string_pretty(self)? + "\n")?;
        tmp.persist(&p).with_context(|| format!("writing {}", p.display()))?;
        Ok(())
    }
}

/// Is `dir` a hybrid made by `graft init`?
pub fn is_graft_dir(dir: &Path) -> bool {
    dir.join(GRAFT_FILE).is_file()
}

/// The trainable `Linear(in → out)` with bias: `y = x Wᵀ + b`.
#[derive(Debug, Clone)]
pub struct Adapter {
    /// `[out, in]`
    pub weight: Tensor,
    /// `[out]`
    pub bias: Tensor,
}

impl Adapter {
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(xs.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)?)
    }

    pub fn load(path: &Path, info: &AdapterInfo, device: &Device) -> Result<Self> {
        let t = candle_core::safetensors::load(path, device).with_context(|| format!("reading {}", path.display()))?;
        let get = |name: &str, shape: &[usize]| -> Result<Tensor> {
            let x = t.get(name).with_context(|| format!("{}: no tensor `{name}`", path.display()))?;
            if x.dims() != shape {
                bail!("{}: tensor `{name}` has shape {:?}, graft.json says {shape:?}", path.display(), x.dims());
            }
            Ok(x.to_dtype(DType::F32)?)
        };
        Ok(Self {
            weight: get("adapter.weight", &[info.out_features, info.in_features])?,
            bias: get("adapter.bias", &[info.out_features])?,
        })
    }

    pub fn save(&self, path: &Path, meta: &[(&str, String)]) -> Result<()> {
        let tensors =
            [("adapter.weight".to_string(), self.weight.clone()), ("adapter.bias".to_string(), self.bias.clone())]
                .into_iter()
                .collect();
        let meta = meta.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        crate::util::save_safetensors(&tensors, &meta, path)
    }
}

/// sha256 (16 hex digits) over the bytes of tensors, in order: the frozen-weights check.
pub fn tensors_digest(ts: &[&Tensor]) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for t in ts {
        let mut b = Vec::new();
        t.to_device(&Device::Cpu)?.contiguous()?.write_bytes(&mut b)?;
        h.update((b.len() as u64).to_le_bytes());
        h.update(&b);
    }
    Ok(hex::encode(&h.finalize()[..8]))
}

/// Input embeddings `[1, seq, hidden]` of token ids with `image_embeds` (`[tokens, hidden]`) in
/// the positions of `image_token_id`, in order. Differentiable in `image_embeds` (a gather over
/// `[text embeddings; image embeddings]`).
pub fn splice_embeds(
    decoder: &Decoder,
    image_token_id: u32,
    ids: &[u32],
    image_embeds: Option<&Tensor>,
) -> Result<Tensor> {
    decoder.check_ids(ids)?;
    let seq = ids.len();
    let h = decoder.cfg.hidden_size;
    let dev = decoder.device();
    let t = Tensor::from_vec(ids.to_vec(), (1, seq), dev)?;
    let xs = decoder.embed(&t)?;
    let n_img = ids.iter().filter(|&&i| i == image_token_id).count();
    let Some(img) = image_embeds else {
        if n_img > 0 {
            bail!("the prompt has {n_img} image tokens but no image embeddings were given");
        }
        return Ok(xs);
    };
    if img.dims() != [n_img, h] {
        bail!("image embeddings have shape {:?}, expected [{n_img}, {h}] (one row per image token)", img.dims());
    }
    let mut k = 0u32;
    let gather: Vec<u32> = ids
        .iter()
        .enumerate()
        .map(|(i, &id)| {
            if id == image_token_id {
                k += 1;
                (seq as u32) + k - 1
            } else {
                i as u32
            }
        })
        .collect();
    let all = Tensor::cat(&[&xs.reshape((seq, h))?, &img.to_dtype(xs.dtype())?], 0)?;
    let idx = Tensor::from_vec(gather, seq, dev)?;
    Ok(all.index_select(&idx, 0)?.reshape((1, seq, h))?)
}

/// One prompt row of the hybrid: token ids (the image pad expanded) and its image, if any.
#[derive(Debug, Clone, PartialEq)]
pub struct HybridInput {
    pub ids: Vec<u32>,
    pub image: Option<Processed>,
}

pub struct Hybrid {
    pub dir: PathBuf,
    pub cfg: GraftConfig,
    pub vision: Qwen25VisionTower,
    /// The language model: hooks, steering vectors and `--layer` refer to its layers.
    pub decoder: Decoder,
    pub tokenizer: Tokenizer,
    pub processor: ProcessorConfig,
    pub adapter: Adapter,
    pub info: ModelInfo,
    /// Qwen3's `enable_thinking` for agent turns (`None`: the chat template's default).
    pub thinking: Option<bool>,
}

impl Hybrid {
    pub fn load(dir: &Path, device: &Device, dtype: WeightDType) -> Result<Self> {
        let cfg = GraftConfig::read(dir)?;
        for (what, s) in [("vision", &cfg.vision), ("lm", &cfg.lm)] {
            let now = fingerprint(&safetensor_files(&s.dir)?)?;
            if now != s.weights_hash {
                bail!(
                    "{}: the {what} source {} has weights hash {now}, graft.json recorded {} (the checkpoint changed \
                     since `graft init`; re-run it)",
                    dir.join(GRAFT_FILE).display(),
                    s.dir.display(),
                    s.weights_hash
                );
            }
        }
        let vision = Qwen25VisionTower::from_dir(&cfg.vision.dir, device, dtype)?;
        let (decoder, _) = decoder_from_dir(&cfg.lm.dir, device, dtype)?;
        let tokenizer =
            Tokenizer::from_dir(dir).with_context(|| format!("loading the tokenizer of {}", dir.display()))?;
        let processor = ProcessorConfig::from_dir(dir)?;
        if processor.patch_size != vision.cfg.patch_size || processor.merge_size != vision.cfg.spatial_merge_size {
            bail!(
                "{}: preprocessor patch_size {} / merge_size {} disagree with the vision tower's {} / {}",
                dir.display(),
                processor.patch_size,
                processor.merge_size,
                vision.cfg.patch_size,
                vision.cfg.spatial_merge_size
            );
        }
        let adapter = Adapter::load(&dir.join(ADAPTER_FILE), &cfg.adapter, device)?;
        let info = ModelInfo {
            adapter: None,
            name: dir.display().to_string(),
            checkpoint: format!("graft {} + {}", cfg.vision.dir.display(), cfg.lm.dir.display()),
            dir: Some(cfg.lm.dir.clone()),
            weights_hash: format!(
                "{}+{}+{}",
                cfg.vision.weights_hash,
                cfg.lm.weights_hash,
                fingerprint(&[dir.join(ADAPTER_FILE)])?
            ),
            dtype: dtype.name().to_string(),
            family: "graft".to_string(),
            num_layers: decoder.cfg.num_layers,
            hidden_size: decoder.cfg.hidden_size,
            batch_invariant: decoder.batch_invariant(),
        };
        Ok(Self { dir: dir.to_path_buf(), cfg, vision, decoder, tokenizer, processor, adapter, info, thinking: None })
    }

    pub fn device(&self) -> &Device {
        self.decoder.device()
    }

    /// The rendered chat prompt of one user turn (the image placeholder first, then `text`),
    /// before pad expansion. `enable_thinking` is the chat template's switch (`None`: default).
    pub fn render_prompt(&self, with_image: bool, text: &str, enable_thinking: Option<bool>) -> Result<String> {
        self.render_prompt_with(with_image, text, None, enable_thinking)
    }

    /// [`render_prompt`](Self::render_prompt) after an optional system turn.
    pub fn render_prompt_with(
        &self,
        with_image: bool,
        text: &str,
        system: Option<&str>,
        enable_thinking: Option<bool>,
    ) -> Result<String> {
        let content =
            if with_image { format!("{VISION_START}{IMAGE_PAD}{VISION_END}{text}") } else { text.to_string() };
        let mut messages: Vec<ChatMessage> = system.map(|s| ChatMessage::new("system", s)).into_iter().collect();
        messages.push(ChatMessage::new("user", &content));
        self.tokenizer.apply_chat_template_thinking(&messages, true, enable_thinking)
    }

    /// Tokenizes a rendered prompt, the image pad repeated once per merged vision token.
    pub fn encode(&self, rendered: &str, image: Option<Processed>) -> Result<HybridInput> {
        let m = self.vision.cfg.spatial_merge_size;
        let counts: Vec<usize> = image.iter().map(|p| p.llm_tokens(m)).collect();
        let s = expand_image_pads(rendered, IMAGE_PAD, &counts)?;
        let ids = self.tokenizer.encode(&s, false)?;
        let got = ids.iter().filter(|&&t| t == self.cfg.image_token_id).count();
        let want: usize = counts.iter().sum();
        if got != want {
            bail!("tokenized prompt has {got} image tokens, expected {want} (a pad token was merged or split)");
        }
        Ok(HybridInput { ids, image })
    }

    /// One user turn with an optional screenshot.
    pub fn user_prompt(
        &self,
        image: Option<&RgbImage>,
        text: &str,
        enable_thinking: Option<bool>,
    ) -> Result<HybridInput> {
        self.user_prompt_with(image, text, None, enable_thinking)
    }

    /// [`user_prompt`](Self::user_prompt) after an optional system turn.
    pub fn user_prompt_with(
        &self,
        image: Option<&RgbImage>,
        text: &str,
        system: Option<&str>,
        enable_thinking: Option<bool>,
    ) -> Result<HybridInput> {
        let rendered = self.render_prompt_with(image.is_some(), text, system, enable_thinking)?;
        let processed = image.map(|i| processor::process(i, &self.processor)).transpose()?;
        self.encode(&rendered, processed)
    }

    /// The frozen vision tower's features of one image: `[tokens, vision width]`.
    pub fn vision_features(&self, p: &Processed) -> Result<Tensor> {
        let pd = self.vision.cfg.patch_dim();
        if p.patch_dim != pd {
            bail!("processed image has {} values per patch, the vision tower expects {pd}", p.patch_dim);
        }
        let px = Tensor::from_vec(p.pixel_values.clone(), (p.rows(), pd), self.device())?;
        self.vision.forward(&px, &[p.grid_thw])
    }

    /// Input embeddings `[1, seq, hidden]` of one row with `image_embeds` (`[tokens, hidden]`,
    /// the adapter's output) in the image-pad positions. Differentiable in `image_embeds`.
    pub fn embeds(&self, ids: &[u32], image_embeds: Option<&Tensor>) -> Result<Tensor> {
        splice_embeds(&self.decoder, self.cfg.image_token_id, ids, image_embeds)
    }

    /// Embeddings of a row with its image through the vision tower and the adapter.
    pub fn input_embeds(&self, input: &HybridInput) -> Result<Tensor> {
        let img = match &input.image {
            Some(p) => Some(self.adapter.forward(&self.vision_features(p)?)?),
            None => None,
        };
        self.embeds(&input.ids, img.as_ref())
    }

    /// Prefill of one row: logits of the last position `[1, 1, vocab]` and the KV state; hooks on
    /// the LM see which columns are image tokens (`image` / `text` selectors).
    pub fn prefill(&self, input: &HybridInput, spec: &HookSpec, caps: &mut Captures) -> Result<(Tensor, State)> {
        let img = match &input.image {
            Some(p) => Some(self.adapter.forward(&self.vision_features(p)?)?),
            None => None,
        };
        self.prefill_embedded(&input.ids, img.as_ref(), spec, caps)
    }

    /// [`prefill`](Self::prefill) with the image's adapted features given (`[tokens, hidden]`),
    /// so rows that share a screenshot run the tower once.
    pub fn prefill_embedded(
        &self,
        ids: &[u32],
        image_embeds: Option<&Tensor>,
        spec: &HookSpec,
        caps: &mut Captures,
    ) -> Result<(Tensor, State)> {
        let xs = self.embeds(ids, image_embeds)?;
        let mut state = self.decoder.new_state(vec![0]);
        let image: Vec<bool> = ids.iter().map(|&t| t == self.cfg.image_token_id).collect();
        let step = StepInfo::prefill(vec![0]).with_modality(vec![image]);
        let logits = self.decoder.forward_embeds(xs, &mut state, &step, spec, caps, false)?;
        Ok((logits, state))
    }

    /// Generation for one row (greedy or sampled per `cfg`); `spec` hooks the LM layers.
    pub fn generate(&self, input: &HybridInput, cfg: &GenerateConfig, spec: &HookSpec) -> Result<Generation> {
        let mut caps = Captures::default();
        let (logits, mut state) = self.prefill(input, spec, &mut caps)?;
        let gens = generate::decode_loop(logits, &[&input.ids[..]], cfg, |next| {
            let ids = Tensor::from_vec(next, (1, 1), self.device())?;
            self.decoder.forward(&ids, &mut state, &StepInfo::decode(1), spec, &mut caps, false)
        })?;
        gens.into_iter().next().context("no generation")
    }

    /// Stop tokens of the LM's chat format.
    pub fn stop_ids(&self) -> Vec<u32> {
        self.tokenizer.stop_token_ids()
    }
}
