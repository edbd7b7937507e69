//! GGUF checkpoints: the decoder config from llama.cpp metadata keys.
use super::config::{Activation, DecoderConfig, Family, RopeScaling};
use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use std::path::Path;

pub fn read(path: &Path) -> Result<Content> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening GGUF file {}", path.display()))?;
    Content::read(&mut f).with_context(|| format!("{}: not a readable GGUF file", path.display()))
}

pub fn meta_str<'a>(c: &'a Content, key: &str) -> Option<&'a str> {
    c.metadata.get(key).and_then(|v| v.to_string().ok()).map(|s| s.as_str())
}

fn meta_u64(c: &Content, key: &str) -> Option<u64> {
    c.metadata.get(key).and_then(|v| match v {
        Value::U8(x) => Some(*x as u64),
        Value::U16(x) => Some(*x as u64),
        Value::U32(x) => Some(*x as u64),
        Value::U64(x) => Some(*x),
        Value::I8(x) => Some(*x as u64),
        Value::I16(x) => Some(*x as u64),
        Value::I32(x) => Some(*x as u64),
        Value::I64(x) => Some(*x as u64),
        _ => None,
    })
}

fn meta_f64(c: &Content, key: &str) -> Option<f64> {
    c.metadata.get(key).and_then(|v| match v {
        Value::F32(x) => Some(*x as f64),
        Value::F64(x) => Some(*x),
        _ => None,
    })
}

/// Whether some `blk.N.{suffix}` tensor is in the file.
fn any_layer_has(c: &Content, suffix: &str) -> bool {
    c.tensor_infos
        .keys()
        .any(|k| k.strip_prefix("blk.").and_then(|r| r.split_once('.')).is_some_and(|(_, s)| s == suffix))
}

/// Builds the decoder config from GGUF metadata (`general.architecture` and `{arch}.*` keys).
pub fn config(c: &Content, path: &Path) -> Result<DecoderConfig> {
    let file = path.display().to_string();
    let arch = meta_str(c, "general.architecture")
        .with_context(|| format!("{file}: missing metadata `general.architecture`"))?;
    let family = match arch {
        "llama" => Family::Llama,
        "qwen2" => Family::Qwen2,
        "qwen3" => Family::Qwen3,
        "gemma" => Family::Gemma,
        "gemma2" => Family::Gemma2,
        other => bail!("{file}: GGUF architecture `{other}` is not supported (llama, qwen2, qwen3, gemma, gemma2)"),
    };
    let req = |k: &str| -> Result<usize> {
        meta_u64(c, &format!("{arch}.{k}"))
            .map(|x| x as usize)
            .with_context(|| format!("{file}: missing integer metadata `{arch}.{k}`"))
    };
    let hidden_size = req("embedding_length")?;
    let num_heads = req("attention.head_count")?;
    let num_kv_heads = meta_u64(c, &format!("{arch}.attention.head_count_kv")).map(|x| x as usize).unwrap_or(num_heads);
    let num_layers = req("block_count")?;
    let key = |k: &str| format!("{arch}.{k}");
    super::config::nonzero(
        &file,
        &[
            (&key("embedding_length"), hidden_size),
            (&key("attention.head_count"), num_heads),
            (&key("attention.head_count_kv"), num_kv_heads),
            (&key("block_count"), num_layers),
        ],
    )?;
    if num_heads % num_kv_heads != 0 {
        bail!("{file}: {arch}.attention.head_count ({num_heads}) is not a multiple of head_count_kv ({num_kv_heads})");
    }
    let head_dim =
        meta_u64(c, &format!("{arch}.attention.key_length")).map(|x| x as usize).unwrap_or(hidden_size / num_heads);
    super::config::nonzero(&file, &[(&key("attention.key_length"), head_dim)])?;
    // The embedding's rows; a pipeline stage without it has the LM head's, and a driver's
    // tensor-less metadata file the `{arch}.vocab_size` its stage wrote. (The tokenizer's token
    // count is no substitute: Qwen's embedding has padding rows.) A middle stage uses neither.
    let vocab_size = match ["token_embd.weight", "output.weight"].iter().find_map(|n| c.tensor_infos.get(*n)) {
        Some(info) => info.shape.dims()[0],
        None => match (meta_u64(c, &format!("{arch}.vocab_size")), c.metadata.get("tokenizer.ggml.tokens")) {
            (Some(v), _) => v as usize,
            (None, Some(candle_core::quantized::gguf_file::Value::Array(tokens))) => tokens.len(),
            (None, _) => bail!("{file}: missing tensor `token_embd.weight`"),
        },
    };
    let is_gemma = matches!(family, Family::Gemma | Family::Gemma2);
    // Llama-3 GGUFs carry RoPE scaling as a `rope_freqs.weight` tensor instead of metadata.
    let rope_scaling = if c.tensor_infos.contains_key("rope_freqs.weight") {
        let mut f = std::fs::File::open(path)?;
        let t = c
            .tensor(&mut f, "rope_freqs.weight", &candle_core::Device::Cpu)
            .with_context(|| format!("{file}: reading tensor `rope_freqs.weight`"))?
            .dequantize(&candle_core::Device::Cpu)?;
        RopeScaling::FreqFactors(t.to_vec1::<f32>()?.into_iter().map(|x| x as f64).collect())
    } else {
        RopeScaling::None
    };
    let sliding_window = meta_u64(c, &format!("{arch}.attention.sliding_window")).map(|x| x as usize);
    let sliding_layers: Vec<bool> = if family == Family::Gemma2 && sliding_window.is_some() {
        (0..num_layers).map(|i| i % 2 == 0).collect()
    } else {
        vec![false; num_layers]
    };
    let eos = meta_u64(c, "tokenizer.ggml.eos_token_id").map(|x| vec![x as u32]).unwrap_or_default();
    Ok(DecoderConfig {
        family,
        vocab_size,
        hidden_size,
        intermediate_size: req("feed_forward_length")?,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        rms_norm_eps: meta_f64(c, &format!("{arch}.attention.layer_norm_rms_epsilon")).unwrap_or(1e-6),
        rope_theta: meta_f64(c, &format!("{arch}.rope.freq_base")).unwrap_or(10000.0),
        rope_scaling,
        max_position_embeddings: meta_u64(c, &format!("{arch}.context_length")).map(|x| x as usize).unwrap_or(32768),
        activation: if is_gemma { Activation::GeluTanh } else { Activation::Silu },
        // llama.cpp's converter stores Gemma norms as (1 + w) already.
        norm_offset: 0.0,
        // Any layer's tensors tell: a pipeline stage's file starts at a later layer.
        qkv_bias: any_layer_has(c, "attn_q.bias"),
        qk_norm: any_layer_has(c, "attn_q_norm.weight"),
        embed_scale: if is_gemma { Some((hidden_size as f64).sqrt()) } else { None },
        tie_word_embeddings: !c.tensor_infos.contains_key("output.weight"),
        attn_logit_softcap: meta_f64(c, &format!("{arch}.attn_logit_softcapping")),
        final_logit_softcap: meta_f64(c, &format!("{arch}.final_logit_softcapping")),
        query_pre_attn_scalar: if family == Family::Gemma2 { Some(head_dim as f64) } else { None },
        sliding_window: if sliding_layers.iter().any(|&s| s) { sliding_window } else { None },
        sliding_layers,
        post_norms: family == Family::Gemma2,
        bos_token_id: meta_u64(c, "tokenizer.ggml.bos_token_id").map(|x| x as u32),
        eos_token_ids: eos,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file::{TensorInfo, VersionedMagic};
    use candle_core::quantized::GgmlDType;

    fn content(heads: u32, kv: u32, layers: u32) -> Content {
        let m = |x: u32| Value::U32(x);
        let metadata = [
            ("general.architecture", Value::String("llama".into())),
            ("llama.embedding_length", m(64)),
            ("llama.attention.head_count", m(heads)),
            ("llama.attention.head_count_kv", m(kv)),
            ("llama.block_count", m(layers)),
            ("llama.feed_forward_length", m(128)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let emb = TensorInfo { ggml_dtype: GgmlDType::F32, shape: (100, 64).into(), offset: 0 };
        Content {
            magic: VersionedMagic::GgufV3,
            metadata,
            tensor_infos: [("token_embd.weight".to_string(), emb)].into_iter().collect(),
            tensor_data_offset: 0,
        }
    }

    /// Issue 18.8: zero heads, kv heads or layers in GGUF metadata are errors naming the key.
    #[test]
    fn zero_counts_in_metadata_are_errors_not_panics() {
        config(&content(4, 2, 2), Path::new("ok.gguf")).unwrap();
        for (c, key) in [
            (content(0, 2, 2), "llama.attention.head_count"),
            (content(4, 0, 2), "llama.attention.head_count_kv"),
            (content(4, 2, 0), "llama.block_count"),
        ] {
            let r = std::panic::catch_unwind(|| config(&c, Path::new("/m/x.gguf")));
            let e = r.unwrap_or_else(|_| panic!("{key} = 0 panicked")).unwrap_err().to_string();
            assert!(e.contains("/m/x.gguf") && e.contains(&format!("`{key}` is 0")), "{e}");
        }
    }
}
