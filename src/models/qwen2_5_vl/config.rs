//! The `vision_config` of a Qwen2.5-VL `config.json` (Hub layout with `in_chans`, or
//! transformers 5 with `in_channels` and `rope_parameters`).
use crate::models::qwen2_vl::config::VisionAct;
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;

#[derive(Debug, Clone, PartialEq)]
pub struct Qwen25VisionConfig {
    pub depth: usize,
    /// Width of the tower's residual stream (1280 for every Qwen2.5-VL size).
    pub hidden_size: usize,
    /// SwiGLU MLP width (3420).
    pub intermediate_size: usize,
    pub num_heads: usize,
    pub in_channels: usize,
    pub patch_size: usize,
    pub spatial_merge_size: usize,
    pub temporal_patch_size: usize,
    /// Window side in pixels (112: 4×4 merged tokens, 8×8 patches).
    pub window_size: usize,
    /// Blocks with full attention over each image; the others attend inside windows.
    pub fullatt_block_indexes: Vec<usize>,
    /// Merger output width: the language model's hidden size in Qwen2.5-VL (3584 for the 7B).
    pub out_hidden_size: usize,
    pub hidden_act: VisionAct,
    pub rope_theta: f64,
}

fn get<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.get(key).filter(|x| !x.is_null())
}

impl Qwen25VisionConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }
    /// Values per patch row of `pixel_values`: C·T·P·P.
    pub fn patch_dim(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }
    /// Window side in merged tokens (`window_size / merge / patch`: 4 for the real tower).
    pub fn window_tokens(&self) -> usize {
        self.window_size / self.spatial_merge_size / self.patch_size
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading model config {}", path.display()))?;
        let v: Value = serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
        Self::from_json(&v, &path.display().to_string())
    }

    /// From the root of a Qwen2.5-VL config (its `vision_config`).
    pub fn from_json(root: &Value, file: &str) -> Result<Self> {
        let mt = get(root, "model_type").and_then(|m| m.as_str()).unwrap_or("");
        let vc = get(root, "vision_config").with_context(|| {
            format!("{file}: missing object `vision_config` (model_type `{mt}`; a Qwen2.5-VL checkpoint has one)")
        })?;
        if get(vc, "window_size").is_none() || get(vc, "out_hidden_size").is_none() {
            bail!(
                "{file}: vision_config has no `window_size` / `out_hidden_size`: not a Qwen2.5-VL vision tower \
                 (model_type `{mt}`; a Qwen2-VL checkpoint loads through models::qwen2_vl)"
            );
        }
        let n = |keys: &[&str], default: Option<usize>| -> Result<usize> {
            for k in keys {
                if let Some(x) = get(vc, k) {
                    return x.as_u64().map(|n| n as usize).with_context(|| {
                        format!("{file}: `vision_config.{k}` must be a non-negative integer, found {x}")
                    });
                }
            }
            default.with_context(|| format!("{file}: missing field `vision_config.{}`", keys.join("` / `")))
        };
        let act = get(vc, "hidden_act").and_then(|a| a.as_str()).unwrap_or("silu");
        let fullatt = match get(vc, "fullatt_block_indexes") {
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| x.as_u64().map(|n| n as usize))
                .collect::<Option<Vec<_>>>()
                .with_context(|| format!("{file}: `vision_config.fullatt_block_indexes` must be integers"))?,
            Some(o) => bail!("{file}: `vision_config.fullatt_block_indexes` must be a list, found {o}"),
            None => vec![7, 15, 23, 31],
        };
        let c = Self {
            depth: n(&["depth"], None)?,
            hidden_size: n(&["hidden_size", "embed_dim"], None)?,
            intermediate_size: n(&["intermediate_size"], None)?,
            num_heads: n(&["num_heads", "num_attention_heads"], None)?,
            in_channels: n(&["in_channels", "in_chans"], Some(3))?,
            patch_size: n(&["patch_size", "spatial_patch_size"], Some(14))?,
            spatial_merge_size: n(&["spatial_merge_size"], Some(2))?,
            temporal_patch_size: n(&["temporal_patch_size"], Some(2))?,
            window_size: n(&["window_size"], None)?,
            fullatt_block_indexes: fullatt,
            out_hidden_size: n(&["out_hidden_size"], None)?,
            hidden_act: match act {
                "silu" => VisionAct::Silu,
                "gelu" => VisionAct::Gelu,
                "quick_gelu" => VisionAct::QuickGelu,
                o => bail!("{file}: vision_config.hidden_act `{o}` is not supported (silu, gelu, quick_gelu)"),
            },
            rope_theta: get(vc, "rope_parameters")
                .and_then(|r| get(r, "rope_theta"))
                .and_then(|x| x.as_f64())
                .or_else(|| get(vc, "rope_theta").and_then(|x| x.as_f64()))
                .unwrap_or(10000.0),
        };
        crate::models::config::nonzero(
            file,
            &[
                ("vision_config.depth", c.depth),
                ("vision_config.hidden_size", c.hidden_size),
                ("vision_config.num_heads", c.num_heads),
                ("vision_config.patch_size", c.patch_size),
                ("vision_config.spatial_merge_size", c.spatial_merge_size),
                ("vision_config.out_hidden_size", c.out_hidden_size),
            ],
        )?;
        if !c.hidden_size.is_multiple_of(c.num_heads) || !c.head_dim().is_multiple_of(4) {
            bail!(
                "{file}: vision_config.hidden_size ({}) / num_heads ({}) must be a multiple of 4 (2-D rotary halves)",
                c.hidden_size,
                c.num_heads
            );
        }
        if c.window_tokens() == 0 || !c.window_size.is_multiple_of(c.patch_size * c.spatial_merge_size) {
            bail!(
                "{file}: vision_config.window_size ({}) must be a positive multiple of patch_size × spatial_merge_size ({})",
                c.window_size,
                c.patch_size * c.spatial_merge_size
            );
        }
        if let Some(&b) = c.fullatt_block_indexes.iter().find(|&&b| b >= c.depth) {
            bail!("{file}: vision_config.fullatt_block_indexes has block {b}, but depth is {}", c.depth);
        }
        Ok(c)
    }
}
