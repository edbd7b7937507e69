//! Device-memory estimate for a batch, checked against free GPU memory before the batch runs, so
//! an over-large batch is refused with a message instead of a CUDA out-of-memory crash.
//!
//! The estimate is deliberately simple and pure (unit-tested on the CPU): the weights are already
//! resident (free memory excludes them), so a batch needs its KV cache for every position it will
//! hold plus the peak activations of one prefill forward.
use crate::models::config::DecoderConfig;
use anyhow::{bail, Result};
use candle_core::{DType, Device};

/// What a batch will hold on the device, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryNeed {
    /// `batch × (prompt + new) × layers × kv_heads × head_dim × 2 (K and V) × dtype bytes`.
    pub kv_cache: u64,
    /// Peak transient tensors of the prefill forward (attention scores in f32, MLP
    /// intermediates, hidden states, logits, kept captures).
    pub activations: u64,
}

impl MemoryNeed {
    pub fn total(&self) -> u64 {
        self.kv_cache + self.activations
    }
}

/// The work a batch asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchShape {
    pub batch: usize,
    /// Longest prompt of the batch (rows are left-padded to it).
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    /// Residual-stream captures kept for the whole prompt (all-layer extraction keeps every layer).
    pub captured_layers: usize,
}

/// Headroom kept free for the allocator, cuBLAS workspaces and fragmentation.
pub const RESERVE_BYTES: u64 = 512 << 20;

/// Pure estimate of what `shape` needs on top of the loaded weights, for a decoder with `cfg`
/// computing in `dtype`.
pub fn estimate(cfg: &DecoderConfig, dtype: DType, shape: BatchShape) -> MemoryNeed {
    let b = shape.batch as u64;
    let p = shape.prompt_tokens as u64;
    let positions = p + shape.new_tokens as u64;
    let el = dtype.size_in_bytes() as u64;
    let kv_cache = b * positions * cfg.num_layers as u64 * cfg.num_kv_heads as u64 * cfg.head_dim as u64 * 2 * el;
    // Prefill peak inside one layer: eager attention scores and their softmax in f32
    // (batch × heads × p × p, twice), the MLP's gate/up/activation (3 × batch × p × intermediate),
    // a handful of hidden-size tensors (residual, normed input, q/k/v/attention output: ~6),
    // plus last-position logits in f32 and any captures kept for the whole prompt.
    let scores = 2 * b * cfg.num_heads as u64 * p * p * 4;
    let mlp = 3 * b * p * cfg.intermediate_size as u64 * el;
    let hidden = 6 * b * p * (cfg.num_heads.max(cfg.num_kv_heads) * cfg.head_dim).max(cfg.hidden_size) as u64 * el;
    let logits = b * cfg.vocab_size as u64 * 4 * 2;
    let captures = shape.captured_layers as u64 * b * p * cfg.hidden_size as u64 * el;
    MemoryNeed { kv_cache, activations: scores + mlp + hidden + logits + captures }
}

/// `Ok` when `need` (plus [`RESERVE_BYTES`]) fits in `free`; else the message names the batch,
/// the need and the free memory.
pub fn check_fits(shape: BatchShape, need: MemoryNeed, free: u64, total: u64, device: &str) -> Result<()> {
    if need.total() + RESERVE_BYTES <= free {
        return Ok(());
    }
    bail!(
        "batch of {} rows × ({} prompt + {} new tokens) needs about {} on {device} (KV cache {}, activations {}, \
         plus {} headroom) but only {} of {} is free (the weights are already loaded): use a smaller batch \
         (fewer coefficients or --concurrency), shorter prompts, --max-new-tokens, or --dtype bf16",
        shape.batch,
        shape.prompt_tokens,
        shape.new_tokens,
        gib(need.total()),
        gib(need.kv_cache),
        gib(need.activations),
        gib(RESERVE_BYTES),
        gib(free),
        gib(total),
    )
}

/// Estimates and checks a batch against the device's free memory. A no-op on the CPU (the
/// operating system's memory is not the scarce resource there, and swapping is not a crash).
pub fn ensure_batch_fits(cfg: &DecoderConfig, dtype: DType, device: &Device, shape: BatchShape) -> Result<()> {
    let Some((free, total)) = crate::device::mem_info(device)? else {
        return Ok(());
    };
    let need = estimate(cfg, dtype, shape);
    tracing::debug!(?shape, ?need, free, "device memory check");
    check_fits(shape, need, free as u64, total as u64, &crate::device::device_name(device))
}

/// [`ensure_batch_fits`] for a batch of `prompts` about to run through `model` (the check
/// `generate::generate` and `generate::prefill` make before a batch).
pub fn guard(
    model: &crate::models::Decoder,
    prompts: &[Vec<u32>],
    new_tokens: usize,
    spec: &crate::models::HookSpec,
) -> Result<()> {
    if model.device().is_cpu() {
        return Ok(());
    }
    let shape = BatchShape {
        batch: prompts.len(),
        prompt_tokens: prompts.iter().map(|p| p.len()).max().unwrap_or(0),
        new_tokens,
        captured_layers: spec.captures.len(),
    };
    ensure_batch_fits(&model.cfg, model.dtype(), model.device(), shape)
}

pub fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qwen_1_5b() -> DecoderConfig {
        let cfg = serde_json::json!({
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 1536,
            "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
            "num_key_value_heads": 2, "vocab_size": 151936, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
            "max_position_embeddings": 32768, "tie_word_embeddings": true, "hidden_act": "silu"
        });
        DecoderConfig::from_json(&cfg, "qwen-1.5b config.json").unwrap()
    }

    #[test]
    fn kv_cache_is_batch_positions_layers_kv_heads_head_dim_two_bytes() {
        let cfg = qwen_1_5b();
        assert_eq!(cfg.head_dim, 128);
        let shape = BatchShape { batch: 2, prompt_tokens: 400, new_tokens: 64, captured_layers: 0 };
        let need = estimate(&cfg, DType::BF16, shape);
        // 2 rows × 464 positions × 28 layers × 2 kv heads × 128 × (K, V) × 2 bytes.
        assert_eq!(need.kv_cache, 2 * 464 * 28 * 2 * 128 * 2 * 2);
        // f32 doubles the cache, one row halves it.
        assert_eq!(estimate(&cfg, DType::F32, shape).kv_cache, 2 * need.kv_cache);
        assert_eq!(estimate(&cfg, DType::BF16, BatchShape { batch: 1, ..shape }).kv_cache, need.kv_cache / 2);
        // A paired exp12 episode is far below an H100's 80 GB.
        assert!(need.total() < 1 << 30, "{need:?}");
        // Captures of every layer add layers × batch × prompt × hidden × bytes.
        let cap = estimate(&cfg, DType::BF16, BatchShape { captured_layers: 28, ..shape });
        assert_eq!(cap.activations - need.activations, 28 * 2 * 400 * 1536 * 2);
    }

    #[test]
    fn activations_grow_quadratically_with_the_prompt() {
        let cfg = qwen_1_5b();
        let a = estimate(
            &cfg,
            DType::BF16,
            BatchShape { batch: 1, prompt_tokens: 1000, new_tokens: 0, captured_layers: 0 },
        );
        let b = estimate(
            &cfg,
            DType::BF16,
            BatchShape { batch: 1, prompt_tokens: 4000, new_tokens: 0, captured_layers: 0 },
        );
        assert!(b.activations > 10 * a.activations, "{a:?} {b:?}");
    }

    #[test]
    fn refusal_names_batch_need_and_free() {
        let cfg = qwen_1_5b();
        let shape = BatchShape { batch: 64, prompt_tokens: 8000, new_tokens: 512, captured_layers: 0 };
        let need = estimate(&cfg, DType::BF16, shape);
        let err = check_fits(shape, need, 2 << 30, 80 << 30, "cuda:0").unwrap_err().to_string();
        assert!(err.contains("batch of 64 rows"), "{err}");
        assert!(err.contains("8000 prompt + 512 new tokens"), "{err}");
        assert!(err.contains(&gib(need.total())), "{err}");
        assert!(err.contains("only 2.00 GiB of 80.00 GiB is free"), "{err}");
        assert!(err.contains("cuda:0"), "{err}");
        // The same batch fits when the memory is there; a small one fits in little.
        check_fits(shape, need, need.total() + RESERVE_BYTES, 80 << 30, "cuda:0").unwrap();
        assert!(check_fits(shape, need, need.total() + RESERVE_BYTES - 1, 80 << 30, "cuda:0").is_err());
    }

    #[test]
    fn cpu_is_never_refused() {
        let cfg = qwen_1_5b();
        let shape = BatchShape { batch: 1 << 16, prompt_tokens: 1 << 16, new_tokens: 1 << 16, captured_layers: 0 };
        ensure_batch_fits(&cfg, DType::F32, &Device::Cpu, shape).unwrap();
    }
}
