//! Decoder configuration: one struct of axes that covers the text families (Llama / SmolLM2,
//! Qwen2 / Qwen2.5, Qwen3, Gemma, Gemma2), parsed from a transformers `config.json` (flat, or nested
//! under `text_config` as multimodal checkpoints do) or from GGUF metadata.
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Llama,
    Qwen2,
    /// Qwen3: per-head RMSNorm on q and k before RoPE, no QKV bias, explicit `head_dim`.
    Qwen3,
    Gemma,
    Gemma2,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Gemma => "gemma",
            Family::Gemma2 => "gemma2",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    Silu,
    /// GELU with the tanh approximation (`gelu_pytorch_tanh`, Gemma).
    GeluTanh,
    /// Exact GELU (erf).
    Gelu,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Llama-3.x frequency-dependent scaling (`rope_type: llama3`).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// Plain position interpolation (`rope_type: linear`).
    Linear {
        factor: f64,
    },
    /// Per-frequency divisors, as llama.cpp stores Llama-3 scaling (`rope_freqs.weight`).
    FreqFactors(Vec<f64>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct DecoderConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub activation: Activation,
    /// RMSNorm multiplies by `(offset + w)`: 0 for Llama/Qwen2, 1 for Gemma.
    pub norm_offset: f64,
    pub qkv_bias: bool,
    /// Qwen3: RMSNorm over each head's `head_dim` values of q and k (weights `[head_dim]`,
    /// shared by the heads), after the projection and before RoPE.
    pub qk_norm: bool,
    /// Embeddings are multiplied by this (Gemma: sqrt(hidden_size)).
    pub embed_scale: Option<f64>,
    pub tie_word_embeddings: bool,
    pub attn_logit_softcap: Option<f64>,
    pub final_logit_softcap: Option<f64>,
    /// Attention scale is `query_pre_attn_scalar^-0.5` when set (Gemma2), else `head_dim^-0.5`.
    pub query_pre_attn_scalar: Option<f64>,
    pub sliding_window: Option<usize>,
    /// Per layer: does this layer use the sliding window?
    pub sliding_layers: Vec<bool>,
    /// Gemma2: norms after attention and MLP, plus a separate pre-MLP norm.
    pub post_norms: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

fn get<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.get(key).filter(|x| !x.is_null())
}

/// Refuses a zero count (heads, kv heads, layers, sizes) before anything divides by it.
pub(crate) fn nonzero(file: &str, fields: &[(&str, usize)]) -> Result<()> {
    if let Some((k, _)) = fields.iter().find(|(_, v)| *v == 0) {
        bail!("{file}: `{k}` is 0; it must be at least 1");
    }
    Ok(())
}

fn req_usize(v: &Value, key: &str, file: &str) -> Result<usize> {
    match get(v, key) {
        Some(x) => x
            .as_u64()
            .map(|n| n as usize)
            .with_context(|| format!("{file}: field `{key}` must be a non-negative integer, found {x}")),
        None => bail!("{file}: missing field `{key}`"),
    }
}

fn opt_usize(v: &Value, key: &str, file: &str) -> Result<Option<usize>> {
    match get(v, key) {
        Some(x) => Ok(Some(
            x.as_u64()
                .map(|n| n as usize)
                .with_context(|| format!("{file}: field `{key}` must be a non-negative integer, found {x}"))?,
        )),
        None => Ok(None),
    }
}

fn opt_f64(v: &Value, key: &str, file: &str) -> Result<Option<f64>> {
    match get(v, key) {
        Some(x) => Ok(Some(x.as_f64().with_context(|| format!("{file}: field `{key}` must be a number, found {x}"))?)),
        None => Ok(None),
    }
}

fn ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_u64().map(|x| x as u32)).collect(),
        _ => vec![],
    }
}

/// Where a checkpoint keeps its hidden size: the top level, `text_config` (Qwen2-VL, Qwen3-VL),
/// or else the embedding's shape `[vocab, hidden]` in the safetensors headers beside `config`
/// (only the headers are read). Inserts the last as a top-level `hidden_size`; an error names
/// every place it looked.
pub fn hidden_size_from_weights(v: &mut Value, config: &Path) -> Result<()> {
    if get(v, "hidden_size").is_some() || v.get("text_config").and_then(|t| get(t, "hidden_size")).is_some() {
        return Ok(());
    }
    let dir = config.parent().unwrap_or(Path::new("."));
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    for f in &files {
        use std::io::Read;
        let mut fh = std::fs::File::open(f).with_context(|| format!("reading {}", f.display()))?;
        let mut n = [0u8; 8];
        fh.read_exact(&mut n).with_context(|| format!("{}: not a safetensors file", f.display()))?;
        let n = u64::from_le_bytes(n);
        if n > 100_000_000 {
            bail!("{}: safetensors header of {n} bytes; not a safetensors file", f.display());
        }
        let mut h = vec![0u8; n as usize];
        fh.read_exact(&mut h).with_context(|| format!("{}: truncated safetensors header", f.display()))?;
        let h: Value =
            serde_json::from_slice(&h).with_context(|| format!("{}: safetensors header is not JSON", f.display()))?;
        let found = h.as_object().and_then(|o| {
            o.iter()
                .find(|(k, _)| k.ends_with("embed_tokens.weight"))
                .and_then(|(_, t)| t.get("shape")?.get(1)?.as_u64())
        });
        if let (Some(hidden), Some(obj)) = (found, v.as_object_mut()) {
            tracing::debug!("{}: hidden_size {hidden} from the embedding shape in {}", config.display(), f.display());
            obj.insert("hidden_size".into(), Value::from(hidden));
            return Ok(());
        }
    }
    bail!(
        "{}: no `hidden_size` at the top level or in `text_config`, and no `*embed_tokens.weight` tensor in the {} safetensors file(s) of {} to read it from",
        config.display(),
        files.len(),
        dir.display()
    )
}

impl DecoderConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading model config {}", path.display()))?;
        let mut v: Value =
            serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
        hidden_size_from_weights(&mut v, path)?;
        Self::from_json(&v, &path.display().to_string())
    }

    /// Parses a transformers config. Multimodal checkpoints keep the decoder's fields under
    /// `text_config`; top-level fields are used where `text_config` lacks them.
    pub fn from_json(root: &Value, file: &str) -> Result<Self> {
        let arch = get(root, "architectures").and_then(|a| a.get(0)).and_then(|a| a.as_str()).unwrap_or("");
        let model_type = get(root, "model_type").and_then(|m| m.as_str()).unwrap_or("");
        // Merge: text_config overrides the top level.
        let mut v = root.clone();
        if let (Some(Value::Object(tc)), Some(obj)) = (root.get("text_config"), v.as_object_mut()) {
            for (k, x) in tc {
                obj.insert(k.clone(), x.clone());
            }
        }
        let text_type = get(&v, "model_type").and_then(|m| m.as_str()).unwrap_or(model_type);
        let family = match (text_type, model_type, arch) {
            (t, _, _) if t.starts_with("gemma2") => Family::Gemma2,
            ("gemma", _, _) => Family::Gemma,
            (t, _, _) if t.starts_with("qwen2") => Family::Qwen2,
            ("qwen3", _, _) => Family::Qwen3,
            (t, _, _) if t == "llama" || t == "smollm" || t == "smollm2" => Family::Llama,
            (_, _, a) if a.starts_with("Gemma2") => Family::Gemma2,
            (_, _, a) if a.starts_with("Gemma") => Family::Gemma,
            (_, _, a) if a.starts_with("Qwen2") => Family::Qwen2,
            (_, _, a) if a.starts_with("Qwen3ForCausalLM") => Family::Qwen3,
            (_, _, a) if a.starts_with("Llama") => Family::Llama,
            _ => bail!(
                "{file}: unknown architecture (model_type `{text_type}`, architectures [{arch}]); \
                 supported: llama (Llama-3.x, SmolLM2), qwen2 (Qwen2, Qwen2.5, Qwen2-VL text), qwen3, gemma, gemma2"
            ),
        };
        let hidden_size = req_usize(&v, "hidden_size", file)?;
        let num_heads = req_usize(&v, "num_attention_heads", file)?;
        let num_kv_heads = opt_usize(&v, "num_key_value_heads", file)?.unwrap_or(num_heads);
        let num_layers = req_usize(&v, "num_hidden_layers", file)?;
        nonzero(
            file,
            &[
                ("hidden_size", hidden_size),
                ("num_attention_heads", num_heads),
                ("num_key_value_heads", num_kv_heads),
                ("num_hidden_layers", num_layers),
            ],
        )?;
        let head_dim = opt_usize(&v, "head_dim", file)?.unwrap_or(hidden_size / num_heads);
        nonzero(file, &[("head_dim", head_dim)])?;
        if num_heads % num_kv_heads != 0 {
            bail!(
                "{file}: num_attention_heads ({num_heads}) is not a multiple of num_key_value_heads ({num_kv_heads})"
            );
        }
        // transformers 5 moved rope settings into `rope_parameters`.
        let rope = get(&v, "rope_parameters").or_else(|| get(&v, "rope_scaling"));
        let rope_theta = opt_f64(&v, "rope_theta", file)?
            .or(match rope {
                Some(r) => opt_f64(r, "rope_theta", file)?,
                None => None,
            })
            .unwrap_or(10000.0);
        let rope_scaling = match rope {
            None => RopeScaling::None,
            Some(r) => {
                let kind = get(r, "rope_type").or_else(|| get(r, "type")).and_then(|t| t.as_str()).unwrap_or("default");
                match kind {
                    "default" | "mrope" => RopeScaling::None,
                    "llama3" => RopeScaling::Llama3 {
                        factor: opt_f64(r, "factor", file)?.context("rope llama3: missing `factor`")?,
                        low_freq_factor: opt_f64(r, "low_freq_factor", file)?.unwrap_or(1.0),
                        high_freq_factor: opt_f64(r, "high_freq_factor", file)?.unwrap_or(4.0),
                        original_max_position_embeddings: opt_f64(r, "original_max_position_embeddings", file)?
                            .unwrap_or(8192.0),
                    },
                    "linear" => RopeScaling::Linear {
                        factor: opt_f64(r, "factor", file)?.context("rope linear: missing `factor`")?,
                    },
                    other => bail!(
                        "{file}: rope scaling type `{other}` is not supported (supported: default, llama3, linear)"
                    ),
                }
            }
        };
        let act =
            get(&v, "hidden_activation").or_else(|| get(&v, "hidden_act")).and_then(|a| a.as_str()).unwrap_or("silu");
        let activation = match act {
            "silu" | "swish" => Activation::Silu,
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Activation::GeluTanh,
            "gelu" => Activation::Gelu,
            other => bail!("{file}: activation `{other}` is not supported (silu, gelu, gelu_pytorch_tanh)"),
        };
        let is_gemma = matches!(family, Family::Gemma | Family::Gemma2);
        let sliding_window = opt_usize(&v, "sliding_window", file)?;
        let use_sliding = match family {
            Family::Gemma2 => true,
            Family::Qwen2 | Family::Qwen3 => get(&v, "use_sliding_window").and_then(|b| b.as_bool()).unwrap_or(false),
            _ => false,
        };
        let sliding_layers: Vec<bool> = match get(&v, "layer_types").and_then(|l| l.as_array()) {
            Some(types) if use_sliding || family == Family::Gemma2 => {
                if types.len() != num_layers {
                    bail!(
                        "{file}: `layer_types` has {} entries, expected num_hidden_layers = {num_layers}",
                        types.len()
                    );
                }
                types.iter().map(|t| t.as_str() == Some("sliding_attention")).collect()
            }
            // Gemma2 before `layer_types`: even layers slide. Qwen2: layers from max_window_layers on.
            _ if family == Family::Gemma2 => (0..num_layers).map(|i| i % 2 == 0).collect(),
            _ if use_sliding => {
                let from = opt_usize(&v, "max_window_layers", file)?.unwrap_or(num_layers);
                (0..num_layers).map(|i| i >= from).collect()
            }
            _ => vec![false; num_layers],
        };
        let sliding_window = if sliding_layers.iter().any(|&s| s) { sliding_window } else { None };
        let sliding_layers = if sliding_window.is_some() { sliding_layers } else { vec![false; num_layers] };
        Ok(DecoderConfig {
            family,
            vocab_size: req_usize(&v, "vocab_size", file)?,
            hidden_size,
            intermediate_size: req_usize(&v, "intermediate_size", file)?,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: opt_f64(&v, "rms_norm_eps", file)?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: opt_usize(&v, "max_position_embeddings", file)?.unwrap_or(32768),
            activation,
            norm_offset: if is_gemma { 1.0 } else { 0.0 },
            qkv_bias: match family {
                Family::Qwen2 => true,
                _ => get(&v, "attention_bias").and_then(|b| b.as_bool()).unwrap_or(false),
            },
            qk_norm: family == Family::Qwen3,
            embed_scale: if is_gemma { Some((hidden_size as f64).sqrt()) } else { None },
            tie_word_embeddings: get(&v, "tie_word_embeddings").and_then(|b| b.as_bool()).unwrap_or(is_gemma),
            attn_logit_softcap: if family == Family::Gemma2 {
                opt_f64(&v, "attn_logit_softcapping", file)?
            } else {
                None
            },
            final_logit_softcap: if family == Family::Gemma2 {
                opt_f64(&v, "final_logit_softcapping", file)?
            } else {
                None
            },
            query_pre_attn_scalar: if family == Family::Gemma2 {
                opt_f64(&v, "query_pre_attn_scalar", file)?
            } else {
                None
            },
            sliding_window,
            sliding_layers,
            post_norms: family == Family::Gemma2,
            bos_token_id: get(&v, "bos_token_id").and_then(|x| x.as_u64()).map(|x| x as u32),
            eos_token_ids: ids(get(&v, "eos_token_id")),
        })
    }

    pub fn attn_scale(&self) -> f64 {
        match self.query_pre_attn_scalar {
            Some(s) => 1.0 / s.sqrt(),
            None => 1.0 / (self.head_dim as f64).sqrt(),
        }
    }

    /// The layer that `--layer auto` steers: 50% depth (L14 of 28, L12 of 24, L8 of 16).
    pub fn auto_layer(&self) -> usize {
        self.num_layers / 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn llama(heads: u64, kv: Option<u64>) -> Value {
        let mut v = json!({
            "model_type": "llama", "hidden_size": 64, "num_attention_heads": heads,
            "num_hidden_layers": 2, "vocab_size": 100, "intermediate_size": 128,
        });
        if let Some(kv) = kv {
            v["num_key_value_heads"] = json!(kv);
        }
        v
    }

    /// Issue 18.8: zero counts are a clear error naming the file and the field, never a
    /// division by zero.
    #[test]
    fn zero_heads_or_layers_are_errors_not_panics() {
        DecoderConfig::from_json(&llama(4, Some(2)), "ok.json").unwrap();
        for (v, field) in [
            (llama(0, None), "num_attention_heads"),
            (llama(4, Some(0)), "num_key_value_heads"),
            (
                json!({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 0,
                    "vocab_size": 100, "intermediate_size": 128}),
                "num_hidden_layers",
            ),
            (
                json!({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "head_dim": 0,
                    "num_hidden_layers": 2, "vocab_size": 100, "intermediate_size": 128}),
                "head_dim",
            ),
        ] {
            let r = std::panic::catch_unwind(|| DecoderConfig::from_json(&v, "/m/config.json"));
            let e = r.unwrap_or_else(|_| panic!("{field} = 0 panicked")).unwrap_err().to_string();
            assert!(e.contains("/m/config.json") && e.contains(&format!("`{field}` is 0")), "{e}");
        }
    }
}
