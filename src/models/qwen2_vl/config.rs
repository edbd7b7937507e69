//! Qwen2-VL `config.json`, in both layouts: the flat one of the Hub checkpoints (text fields at
//! the top, `rope_scaling: {type: mrope, mrope_section}`, `vision_config.in_chans`) and the nested
//! transformers-5 one (`text_config`, `rope_parameters`, `vision_config.in_channels`). Special
//! token ids come from the config, never from constants.
use crate::models::config::DecoderConfig;
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VisionAct {
    QuickGelu,
    Gelu,
    Silu,
}

#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub depth: usize,
    pub embed_dim: usize,
    /// Output width of the merger: the LLM hidden size.
    pub hidden_size: usize,
    pub num_heads: usize,
    pub mlp_ratio: f64,
    pub in_channels: usize,
    pub patch_size: usize,
    pub spatial_merge_size: usize,
    pub temporal_patch_size: usize,
    pub hidden_act: VisionAct,
    pub rope_theta: f64,
}

impl VisionConfig {
    pub fn head_dim(&self) -> usize {
        self.embed_dim / self.num_heads
    }
    pub fn mlp_dim(&self) -> usize {
        (self.embed_dim as f64 * self.mlp_ratio) as usize
    }
    /// Values per patch row of `pixel_values`: C·T·P·P.
    pub fn patch_dim(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Qwen2VlConfig {
    pub text: DecoderConfig,
    pub vision: VisionConfig,
    /// Frequencies of each head given to the temporal, height and width positions (sums to
    /// head_dim / 2).
    pub mrope_section: [usize; 3],
    pub image_token_id: u32,
    pub video_token_id: Option<u32>,
    pub vision_start_token_id: u32,
    pub vision_end_token_id: u32,
}

fn get<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.get(key).filter(|x| !x.is_null())
}

fn usize_of(v: &Value, keys: &[&str], file: &str, section: &str) -> Result<usize> {
    for k in keys {
        if let Some(x) = get(v, k) {
            return x
                .as_u64()
                .map(|n| n as usize)
                .with_context(|| format!("{file}: `{section}{k}` must be a non-negative integer, found {x}"));
        }
    }
    bail!("{file}: missing field `{section}{}`", keys.join("` / `"))
}

fn id_of(root: &Value, key: &str, file: &str) -> Result<Option<u32>> {
    let text = get(root, "text_config");
    match get(root, key).or_else(|| text.and_then(|t| get(t, key))) {
        Some(x) => {
            Ok(Some(x.as_u64().with_context(|| format!("{file}: `{key}` must be a token id, found {x}"))? as u32))
        }
        None => Ok(None),
    }
}

/// Says what a Qwen2.5-VL (or later) config looks like, if this is one.
fn newer_vl(root: &Value) -> Option<String> {
    let mt = get(root, "model_type").and_then(|m| m.as_str()).unwrap_or("");
    let arch = get(root, "architectures").and_then(|a| a.get(0)).and_then(|a| a.as_str()).unwrap_or("");
    if mt != "qwen2_vl" && (mt.starts_with("qwen2_5_vl") || mt.starts_with("qwen3_vl")) {
        return Some(format!("model_type `{mt}`"));
    }
    if arch.starts_with("Qwen2_5_VL") || arch.starts_with("Qwen3VL") {
        return Some(format!("architecture `{arch}`"));
    }
    let vc = get(root, "vision_config")?;
    for k in ["window_size", "fullatt_block_indexes", "out_hidden_size"] {
        if get(vc, k).is_some() {
            return Some(format!("vision_config.{k}"));
        }
    }
    None
}

/// The message for a Qwen2.5-VL checkpoint handed to this Qwen2-VL implementation.
pub fn qwen25_message(file: &str, evidence: &str) -> String {
    format!(
        "{file}: this is a Qwen2.5-VL checkpoint ({evidence}), not Qwen2-VL. Qwen2.5-VL's vision tower uses \
         window attention, RMSNorm blocks and a SwiGLU MLP, so its weights do not fit Qwen2-VL's \
         (LayerNorm blocks, quick_gelu MLP, full attention); loading it as Qwen2-VL would fail with \
         size mismatches. Use a Qwen2-VL checkpoint (e.g. Qwen/Qwen2-VL-2B-Instruct)"
    )
}

impl Qwen2VlConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading model config {}", path.display()))?;
        let mut v: Value =
            serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
        crate::models::config::hidden_size_from_weights(&mut v, path)?;
        Self::from_json(&v, &path.display().to_string())
    }

    pub fn from_json(root: &Value, file: &str) -> Result<Self> {
        if let Some(ev) = newer_vl(root) {
            bail!(qwen25_message(file, &ev));
        }
        let mt = get(root, "model_type").and_then(|m| m.as_str()).unwrap_or("");
        if mt != "qwen2_vl" {
            bail!("{file}: model_type `{mt}` is not a Qwen2-VL config (expected `qwen2_vl`)");
        }
        let text = DecoderConfig::from_json(root, file)?;
        // mrope_section: text_config.rope_parameters (transformers 5) or top-level rope_scaling (Hub).
        let tc = get(root, "text_config");
        let rope = [
            tc.and_then(|t| get(t, "rope_parameters")),
            tc.and_then(|t| get(t, "rope_scaling")),
            get(root, "rope_parameters"),
            get(root, "rope_scaling"),
        ]
        .into_iter()
        .flatten()
        .find(|r| get(r, "mrope_section").is_some());
        let mrope_section = match rope.and_then(|r| get(r, "mrope_section")) {
            Some(Value::Array(a)) if a.len() == 3 && a.iter().all(|x| x.as_u64().is_some()) => {
                [a[0].as_u64().unwrap() as usize, a[1].as_u64().unwrap() as usize, a[2].as_u64().unwrap() as usize]
            }
            Some(other) => bail!("{file}: `mrope_section` must be three integers, found {other}"),
            // transformers' default when the config has none.
            None => [16, 24, 24],
        };
        if mrope_section.iter().sum::<usize>() * 2 != text.head_dim {
            bail!(
                "{file}: mrope_section {mrope_section:?} sums to {}, expected head_dim / 2 = {}",
                mrope_section.iter().sum::<usize>(),
                text.head_dim / 2
            );
        }
        let vc = get(root, "vision_config").with_context(|| format!("{file}: missing object `vision_config`"))?;
        let s = "vision_config.";
        let act = get(vc, "hidden_act").and_then(|a| a.as_str()).unwrap_or("quick_gelu");
        let vision = VisionConfig {
            depth: usize_of(vc, &["depth"], file, s)?,
            embed_dim: usize_of(vc, &["embed_dim"], file, s)?,
            hidden_size: usize_of(vc, &["hidden_size"], file, s)?,
            num_heads: usize_of(vc, &["num_heads", "num_attention_heads"], file, s)?,
            mlp_ratio: get(vc, "mlp_ratio").and_then(|x| x.as_f64()).unwrap_or(4.0),
            in_channels: usize_of(vc, &["in_channels", "in_chans"], file, s).unwrap_or(3),
            patch_size: usize_of(vc, &["patch_size"], file, s).unwrap_or(14),
            spatial_merge_size: usize_of(vc, &["spatial_merge_size"], file, s).unwrap_or(2),
            temporal_patch_size: usize_of(vc, &["temporal_patch_size"], file, s).unwrap_or(2),
            hidden_act: match act {
                "quick_gelu" => VisionAct::QuickGelu,
                "gelu" => VisionAct::Gelu,
                "silu" => VisionAct::Silu,
                o => bail!("{file}: vision_config.hidden_act `{o}` is not supported (quick_gelu, gelu, silu)"),
            },
            rope_theta: get(vc, "rope_parameters")
                .and_then(|r| get(r, "rope_theta"))
                .and_then(|x| x.as_f64())
                .or_else(|| get(vc, "rope_theta").and_then(|x| x.as_f64()))
                .unwrap_or(10000.0),
        };
        if vision.hidden_size != text.hidden_size {
            bail!(
                "{file}: vision_config.hidden_size ({}) must equal the language model's hidden_size ({}): \
                 the merger projects image features into the LLM's residual stream",
                vision.hidden_size,
                text.hidden_size
            );
        }
        crate::models::config::nonzero(
            file,
            &[
                ("vision_config.depth", vision.depth),
                ("vision_config.embed_dim", vision.embed_dim),
                ("vision_config.num_heads", vision.num_heads),
                ("vision_config.patch_size", vision.patch_size),
                ("vision_config.spatial_merge_size", vision.spatial_merge_size),
            ],
        )?;
        if !vision.embed_dim.is_multiple_of(vision.num_heads) || !vision.head_dim().is_multiple_of(4) {
            bail!(
                "{file}: vision_config.embed_dim ({}) / num_heads ({}) must be a multiple of 4 (2-D rotary halves)",
                vision.embed_dim,
                vision.num_heads
            );
        }
        let need = |k: &str| -> Result<u32> {
            id_of(root, k, file)?.with_context(|| format!("{file}: missing field `{k}` (a Qwen2-VL special token id)"))
        };
        Ok(Self {
            text,
            vision,
            mrope_section,
            image_token_id: need("image_token_id")?,
            video_token_id: id_of(root, "video_token_id", file)?,
            vision_start_token_id: need("vision_start_token_id")?,
            vision_end_token_id: need("vision_end_token_id")?,
        })
    }
}

/// Is this directory's config a Qwen2-VL (or a newer Qwen VL that should be refused)?
pub fn is_qwen_vl_dir(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .is_some_and(|v| {
            let mt = get(&v, "model_type").and_then(|m| m.as_str()).unwrap_or("");
            mt == "qwen2_vl" || newer_vl(&v).is_some()
        })
}
