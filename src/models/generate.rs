//! Batched KV-cache generation with left padding, greedy or seeded sampling, stop tokens.
use super::decoder::{Decoder, State};
use super::hooks::{Captures, HookSpec, StepInfo};
use anyhow::{bail, Result};
use candle_core::{Tensor, D};
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    Greedy,
    /// Temperature sampling with optional nucleus (top-p) truncation.
    Sample {
        temperature: f64,
        top_p: f64,
    },
}

#[derive(Debug, Clone)]
pub struct GenerateConfig {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Every row samples from its own RNG seeded with this value, so a baseline row and a
    /// steered row of the same episode draw the same random stream.
    pub seed: u64,
    pub stop_ids: Vec<u32>,
    pub pad_id: u32,
}

impl Default for GenerateConfig {
    fn default() -> Self {
        Self { max_new_tokens: 64, sampling: Sampling::Greedy, seed: 0, stop_ids: vec![], pad_id: 0 }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// New tokens, without the stop token.
    pub tokens: Vec<u32>,
    /// The stop token that ended the row, if one did.
    pub stop: Option<u32>,
    pub prompt_tokens: usize,
}

/// Left-pads prompts to a common length; returns `[batch, seq]` ids and per-row padding.
pub fn left_pad(prompts: &[Vec<u32>], pad_id: u32, dev: &candle_core::Device) -> Result<(Tensor, Vec<usize>)> {
    let seq = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    if seq == 0 || prompts.iter().any(|p| p.is_empty()) {
        bail!("every prompt needs at least one token");
    }
    let mut ids = Vec::with_capacity(prompts.len() * seq);
    let mut pads = Vec::with_capacity(prompts.len());
    for p in prompts {
        let pad = seq - p.len();
        pads.push(pad);
        ids.extend(std::iter::repeat_n(pad_id, pad));
        ids.extend_from_slice(p);
    }
    Ok((Tensor::from_vec(ids, (prompts.len(), seq), dev)?, pads))
}

fn pick(logits: &[f32], sampling: Sampling, rng: &mut rand::rngs::StdRng) -> u32 {
    // NaN-safe argmax: total_cmp orders NaN above everything, so skip NaNs explicitly.
    let argmax = || {
        let mut best = 0usize;
        for (i, &x) in logits.iter().enumerate() {
            if !x.is_nan() && (logits[best].is_nan() || x > logits[best]) {
                best = i;
            }
        }
        best as u32
    };
    match sampling {
        Sampling::Greedy => argmax(),
        Sampling::Sample { temperature, .. } if temperature <= 0.0 => argmax(),
        Sampling::Sample { temperature, top_p } => {
            let max = logits.iter().copied().filter(|x| !x.is_nan()).fold(f32::NEG_INFINITY, f32::max);
            let mut probs: Vec<(usize, f64)> = logits
                .iter()
                .enumerate()
                .map(|(i, &x)| (i, if x.is_nan() { 0.0 } else { (((x - max) as f64) / temperature).exp() }))
                .collect();
            let total: f64 = probs.iter().map(|p| p.1).sum();
            probs.iter_mut().for_each(|p| p.1 /= total);
            if top_p < 1.0 {
                probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                let mut acc = 0.0;
                let mut keep = 0;
                for p in &probs {
                    acc += p.1;
                    keep += 1;
                    if acc >= top_p {
                        break;
                    }
                }
                probs.truncate(keep);
                let t: f64 = probs.iter().map(|p| p.1).sum();
                probs.iter_mut().for_each(|p| p.1 /= t);
            }
            let mut u: f64 = rng.random();
            for &(i, p) in &probs {
                if u < p {
                    return i as u32;
                }
                u -= p;
            }
            probs.last().map(|p| p.0 as u32).unwrap_or(0)
        }
    }
}

/// Generates for a batch of prompts. `spec` applies to every forward call (prefill and each
/// decode step); its per-row coefficients index the prompts.
pub fn generate(
    model: &Decoder,
    prompts: &[Vec<u32>],
    cfg: &GenerateConfig,
    spec: &HookSpec,
    caps: &mut Captures,
) -> Result<Vec<Generation>> {
    for p in prompts {
        model.check_ids(p)?;
    }
    crate::gpu::memory::guard(model, prompts, cfg.max_new_tokens, spec)?;
    let (ids, pads) = left_pad(prompts, cfg.pad_id, model.device())?;
    let mut state = model.new_state(pads.clone());
    let logits = model.forward(&ids, &mut state, &StepInfo::prefill(pads), spec, caps, false)?;
    continue_generation(model, &mut state, logits, prompts.iter().map(|p| p.len()).collect(), cfg, spec, caps)
}

/// Decodes from a state whose last forward returned `logits` (`[batch, 1, vocab]`).
pub fn continue_generation(
    model: &Decoder,
    state: &mut State,
    mut logits: Tensor,
    prompt_tokens: Vec<usize>,
    cfg: &GenerateConfig,
    spec: &HookSpec,
    caps: &mut Captures,
) -> Result<Vec<Generation>> {
    let b = state.batch();
    let mut rngs: Vec<rand::rngs::StdRng> = (0..b).map(|_| rand::rngs::StdRng::seed_from_u64(cfg.seed)).collect();
    let mut out: Vec<Generation> =
        prompt_tokens.into_iter().map(|n| Generation { tokens: vec![], stop: None, prompt_tokens: n }).collect();
    let mut done = vec![false; b];
    for step in 0..cfg.max_new_tokens {
        let rows: Vec<Vec<f32>> = logits.squeeze(1)?.to_vec2()?;
        let mut next = Vec::with_capacity(b);
        for r in 0..b {
            if done[r] {
                next.push(cfg.pad_id);
                continue;
            }
            let t = pick(&rows[r], cfg.sampling, &mut rngs[r]);
            if cfg.stop_ids.contains(&t) {
                out[r].stop = Some(t);
                done[r] = true;
            } else {
                out[r].tokens.push(t);
            }
            next.push(t);
        }
        if done.iter().all(|&d| d) || step + 1 == cfg.max_new_tokens {
            break;
        }
        let ids = Tensor::from_vec(next, (b, 1), model.device())?;
        logits = model.forward(&ids, state, &StepInfo::decode(b), spec, caps, false)?;
    }
    Ok(out)
}

/// One prefill over a batch, returning the last-position logits `[batch, vocab]` and what the
/// spec captured. Used for activation extraction and prompt-based vectors.
pub fn prefill(
    model: &Decoder,
    prompts: &[Vec<u32>],
    pad_id: u32,
    spec: &HookSpec,
) -> Result<(Tensor, Captures, Vec<usize>)> {
    for p in prompts {
        model.check_ids(p)?;
    }
    crate::gpu::memory::guard(model, prompts, 0, spec)?;
    let (ids, pads) = left_pad(prompts, pad_id, model.device())?;
    let mut state = model.new_state(pads.clone());
    let mut caps = Captures::default();
    let logits = model.forward(&ids, &mut state, &StepInfo::prefill(pads.clone()), spec, &mut caps, false)?;
    Ok((logits.squeeze(1)?, caps, pads))
}

/// Top-k (id, logit) pairs of a `[vocab]` logits tensor, highest first.
pub fn top_k(logits: &Tensor, k: usize) -> Result<Vec<(u32, f32)>> {
    let v: Vec<f32> = logits.flatten_all()?.to_vec1()?;
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
    Ok(idx.into_iter().take(k).map(|i| (i as u32, v[i])).collect())
}

/// Cosine similarity of two tensors of the same shape (flattened).
pub fn cosine(a: &Tensor, b: &Tensor) -> Result<f32> {
    let a = a.flatten_all()?.to_dtype(candle_core::DType::F32)?;
    let b = b.flatten_all()?.to_dtype(candle_core::DType::F32)?;
    let dot = (&a * &b)?.sum_all()?.to_scalar::<f32>()?;
    let na = a.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
    let nb = b.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
    Ok(dot / (na * nb).max(f32::MIN_POSITIVE))
}

/// Argmax along the last axis.
pub fn argmax_last(logits: &Tensor) -> Result<Vec<u32>> {
    Ok(logits.argmax(D::Minus1)?.flatten_all()?.to_vec1()?)
}
