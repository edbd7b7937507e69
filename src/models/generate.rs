//! Batched KV-cache generation with left padding, greedy or seeded sampling, stop tokens.
use super::decoder::{Decoder, State};
use super::hooks::{Captures, HookPoint, HookSpec, Positions, StepInfo};
use super::prefix_cache::{prefill_prefix, PrefixCache};
use anyhow::{bail, Result};
use candle_core::{Tensor, D};
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;

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
    /// transformers' repetition penalty (1 = off): before each pick, the logit of every token
    /// already in the row (prompt and generated) is divided by it when positive, multiplied
    /// when negative. Applies to greedy decoding too.
    pub repetition_penalty: f32,
}

impl Default for GenerateConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            sampling: Sampling::Greedy,
            seed: 0,
            stop_ids: vec![],
            pad_id: 0,
            repetition_penalty: 1.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// New tokens, without the stop token.
    pub tokens: Vec<u32>,
    /// The stop token that ended the row, if one did.
    pub stop: Option<u32>,
    pub prompt_tokens: usize,
    /// FNV-1a over the bits of every logit this row was given at every step: equal
    /// fingerprints mean bit-identical logits (the batch-invariance check compares them).
    pub logits_hash: u64,
}

const FNV_OFFSET: u64 = 0xcbf29ce484222325;

fn fnv(mut h: u64, xs: &[f32]) -> u64 {
    for x in xs {
        h = (h ^ x.to_bits() as u64).wrapping_mul(0x100000001b3);
    }
    h
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
    generate_routed(model, prompts, None, cfg, spec, caps)
}

/// [`generate`] with each row's LoRA adapter given (`adapters[r]`: an index into
/// [`Decoder::adapters`], `None` = the base model) instead of the decoder's default: rows routed
/// to different adapters in one batch, each computing what it would alone.
pub fn generate_routed(
    model: &Decoder,
    prompts: &[Vec<u32>],
    adapters: Option<&[Option<u16>]>,
    cfg: &GenerateConfig,
    spec: &HookSpec,
    caps: &mut Captures,
) -> Result<Vec<Generation>> {
    for p in prompts {
        model.check_ids(p)?;
    }
    crate::models::memory::guard(model, prompts, cfg.max_new_tokens, spec)?;
    let (ids, pads) = left_pad(prompts, cfg.pad_id, model.device())?;
    let mut state = model.new_state(pads.clone());
    if let Some(a) = adapters {
        if a.len() != prompts.len() {
            bail!("{} adapter choices for {} prompts", a.len(), prompts.len());
        }
        if let Some(bad) = a.iter().flatten().find(|&&i| i as usize >= model.adapters().len()) {
            bail!("adapter {bad}: the model has {} attached", model.adapters().len());
        }
        state.adapters = a.to_vec();
    }
    let logits = model.forward(&ids, &mut state, &StepInfo::prefill(pads), spec, caps, false)?;
    let rows: Vec<&[u32]> = prompts.iter().map(|p| p.as_slice()).collect();
    continue_generation(model, &mut state, logits, &rows, cfg, spec, caps)
}

/// Decodes from a state whose last forward returned `logits` (`[batch, 1, vocab]`) after each
/// row's `prompts` ids.
pub fn continue_generation(
    model: &Decoder,
    state: &mut State,
    logits: Tensor,
    prompts: &[&[u32]],
    cfg: &GenerateConfig,
    spec: &HookSpec,
    caps: &mut Captures,
) -> Result<Vec<Generation>> {
    let b = state.batch();
    decode_loop(logits, prompts, cfg, |next| {
        let ids = Tensor::from_vec(next, (b, 1), model.device())?;
        model.forward(&ids, state, &StepInfo::decode(b), spec, caps, false)
    })
}

/// The token loop shared by every model: picks each row's next token from `logits`
/// (`[batch, 1, vocab]`; row `r` continues `prompts[r]`), stops rows at a stop id (padding them
/// afterwards), and calls `step` with the batch's next ids for the following logits.
pub fn decode_loop(
    mut logits: Tensor,
    prompts: &[&[u32]],
    cfg: &GenerateConfig,
    mut step: impl FnMut(Vec<u32>) -> Result<Tensor>,
) -> Result<Vec<Generation>> {
    let b = prompts.len();
    let mut rngs: Vec<rand::rngs::StdRng> = (0..b).map(|_| rand::rngs::StdRng::seed_from_u64(cfg.seed)).collect();
    let mut out: Vec<Generation> = prompts
        .iter()
        .map(|p| Generation { tokens: vec![], stop: None, prompt_tokens: p.len(), logits_hash: FNV_OFFSET })
        .collect();
    let penalty = cfg.repetition_penalty;
    if !(penalty.is_finite() && penalty > 0.0) {
        bail!("repetition penalty {penalty}: expected a positive number (1 = off)");
    }
    // The tokens each row has seen, for the penalty (a set, as transformers' gather/scatter).
    let mut seen: Vec<std::collections::BTreeSet<u32>> =
        if penalty != 1.0 { prompts.iter().map(|p| p.iter().copied().collect()).collect() } else { vec![] };
    let mut done = vec![false; b];
    for i in 0..cfg.max_new_tokens {
        let mut rows: Vec<Vec<f32>> = logits.squeeze(1)?.to_vec2()?;
        let mut next = Vec::with_capacity(b);
        for r in 0..b {
            if done[r] {
                next.push(cfg.pad_id);
                continue;
            }
            out[r].logits_hash = fnv(out[r].logits_hash, &rows[r]);
            if penalty != 1.0 {
                let row = &mut rows[r];
                for &t in &seen[r] {
                    if let Some(x) = row.get_mut(t as usize) {
                        *x = if *x < 0.0 { *x * penalty } else { *x / penalty };
                    }
                }
            }
            // Each row's generator is seeded from the config alone, never from its place in the
            // batch, so sampling is as batch invariant as the logits.
            let t = pick(&rows[r], cfg.sampling, &mut rngs[r]);
            if penalty != 1.0 {
                seen[r].insert(t);
            }
            if cfg.stop_ids.contains(&t) {
                out[r].stop = Some(t);
                done[r] = true;
            } else {
                out[r].tokens.push(t);
            }
            next.push(t);
        }
        if done.iter().all(|&d| d) || i + 1 == cfg.max_new_tokens {
            break;
        }
        logits = step(next)?;
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
    crate::models::memory::guard(model, prompts, 0, spec)?;
    let (ids, pads) = left_pad(prompts, pad_id, model.device())?;
    let mut state = model.new_state(pads.clone());
    let mut caps = Captures::default();
    let logits = model.forward(&ids, &mut state, &StepInfo::prefill(pads.clone()), spec, &mut caps, false)?;
    Ok((logits.squeeze(1)?, caps, pads))
}

/// Each prompt's states at `point` over its real tokens (`[tokens, hidden]`, padding removed),
/// from one unsteered, left-padded prefill of the batch.
pub fn prompt_states(model: &Decoder, prompts: &[Vec<u32>], pad_id: u32, point: HookPoint) -> Result<Vec<Tensor>> {
    let (_, caps, pads) = prefill(model, prompts, pad_id, &HookSpec::none().capture(point))?;
    let s = caps.get(point)?;
    (0..prompts.len()).map(|r| Ok(s.get(r)?.narrow(0, pads[r], prompts[r].len())?)).collect()
}

/// Generation with prefix sharing (DESIGN.md §3): with the `last` position selector, rows with
/// the same prompt (the baseline and steered rows of one episode) have identical keys and values
/// for every prompt position but the last. Each distinct prompt's prefix is prefilled once
/// without hooks (its longest cached part taken from `cache`, which keeps prefixes across calls:
/// every episode prompt starts with the same header and instructions), the KV cache is forked
/// into the rows, then the last prompt token of every row runs with the per-row steering and
/// decoding continues as usual. Specs whose interventions select other positions than `last`
/// fall back to [`generate`]. Every path gives the same bits (docs/determinism.md).
pub fn generate_shared(
    model: &Decoder,
    prompts: &[Vec<u32>],
    cfg: &GenerateConfig,
    spec: &HookSpec,
    cache: Option<&mut PrefixCache>,
) -> Result<Vec<Generation>> {
    let mut unique: Vec<&Vec<u32>> = Vec::new();
    let mut row_of: Vec<usize> = Vec::with_capacity(prompts.len());
    for p in prompts {
        match unique.iter().position(|u| *u == p) {
            Some(i) => row_of.push(i),
            None => {
                row_of.push(unique.len());
                unique.push(p);
            }
        }
    }
    let only_last = spec.interventions.iter().all(|iv| iv.positions == Positions::Last) && spec.captures.is_empty();
    let cached = cache.as_ref().is_some_and(|c| c.enabled());
    if (unique.len() == prompts.len() && !cached) || prompts.iter().any(|p| p.len() < 2) || !only_last {
        return generate(model, prompts, cfg, spec, &mut Default::default());
    }
    crate::models::memory::guard(model, prompts, cfg.max_new_tokens, spec)?;
    let (mut state, logits) = prefill_forked(model, &unique, &row_of, spec, cache)?;
    let rows: Vec<&[u32]> = prompts.iter().map(|p| p.as_slice()).collect();
    continue_generation(model, &mut state, logits, &rows, cfg, spec, &mut Captures::default())
}

/// The prefill half of [`generate_shared`]: prefills every distinct prompt without its last
/// token (through `cache` when given), forks the cache so that row `r` continues
/// `unique[row_of[r]]`, then runs each row's last token with `spec` (whose interventions must
/// select `last`). Returns the forked state and the last-position logits `[rows, 1, vocab]`.
pub fn prefill_forked(
    model: &Decoder,
    unique: &[&Vec<u32>],
    row_of: &[usize],
    spec: &HookSpec,
    cache: Option<&mut PrefixCache>,
) -> Result<(State, Tensor)> {
    prefill_forked_captured(model, unique, row_of, spec, cache, &mut Captures::default())
}

/// [`prefill_forked`], keeping what `spec` captures on the last-token step (`[rows, 1, hidden]`
/// per point): each row's states at its last prompt token, the prefix served by `cache`.
pub fn prefill_forked_captured(
    model: &Decoder,
    unique: &[&Vec<u32>],
    row_of: &[usize],
    spec: &HookSpec,
    mut cache: Option<&mut PrefixCache>,
    caps: &mut Captures,
) -> Result<(State, Tensor)> {
    if let Some(iv) = spec.interventions.iter().find(|iv| iv.positions != Positions::Last) {
        bail!("prefix sharing needs the `last` position selector, found {:?} at `{}`", iv.positions, iv.point);
    }
    let mut prefixes = Vec::with_capacity(unique.len());
    for p in unique {
        model.check_ids(p)?;
        if p.len() < 2 {
            bail!("prefix sharing needs prompts of at least 2 tokens, found {}", p.len());
        }
        prefixes.push(prefill_prefix(model, &p[..p.len() - 1], cache.as_deref_mut())?);
    }
    let mut state = State::merge(&prefixes)?.select_rows(row_of)?;
    let last: Vec<u32> = row_of.iter().map(|&u| unique[u][unique[u].len() - 1]).collect();
    let last = Tensor::from_vec(last, (row_of.len(), 1), model.device())?;
    // One new column per row: with `last`, exactly the position the steering applies to.
    let logits = model.forward(&last, &mut state, &StepInfo::decode(row_of.len()), spec, caps, false)?;
    Ok((state, logits))
}

/// Last-position logits (`[n, vocab]`) and captured states (`[n, hidden]` per captured point)
/// of prompts that share a prefix, such as the positive and negative prompts of one CAA pair
/// (the same task prompt, then different instructions). The longest common prefix is
/// prefilled once (through `cache` when given), forked, and each distinct suffix length runs as one batch on the fork, so
/// no row needs padding. `spec` may only capture: interventions would need position handling
/// across the fork that no caller needs.
pub fn last_states_shared(
    model: &Decoder,
    prompts: &[Vec<u32>],
    pad_id: u32,
    spec: &HookSpec,
    cache: Option<&mut PrefixCache>,
) -> Result<(Tensor, BTreeMap<HookPoint, Tensor>)> {
    if !spec.interventions.is_empty() {
        bail!("last_states_shared takes captures only, found {} interventions", spec.interventions.len());
    }
    for p in prompts {
        model.check_ids(p)?;
    }
    let lcp = match prompts.split_first() {
        Some((first, rest)) => {
            rest.iter().fold(first.len(), |n, p| n.min(first.iter().zip(p).take_while(|(a, b)| a == b).count()))
        }
        None => bail!("no prompts"),
    };
    // Every row needs at least one token of its own after the prefix (its last position).
    let lcp = lcp.min(prompts.iter().map(|p| p.len()).min().unwrap_or(0).saturating_sub(1));
    let last_of = |h: Tensor| -> Result<Tensor> {
        let seq = h.dim(1)?;
        Ok(h.narrow(1, seq - 1, 1)?.squeeze(1)?)
    };
    if lcp < 2 {
        let (logits, caps, _) = prefill(model, prompts, pad_id, spec)?;
        let states = spec.captures.iter().map(|&p| Ok((p, last_of(caps.get(p)?)?))).collect::<Result<_>>()?;
        return Ok((logits, states));
    }
    crate::models::memory::guard(model, &prompts[..1], 0, spec)?;
    let shared = prefill_prefix(model, &prompts[0][..lcp], cache)?;
    let mut lengths: Vec<usize> = prompts.iter().map(|p| p.len()).collect();
    lengths.sort_unstable();
    lengths.dedup();
    let mut rows_logits: Vec<Option<Tensor>> = vec![None; prompts.len()];
    let mut rows_states: BTreeMap<HookPoint, Vec<Option<Tensor>>> =
        spec.captures.iter().map(|&p| (p, vec![None; prompts.len()])).collect();
    for len in lengths {
        let rows: Vec<usize> = (0..prompts.len()).filter(|&r| prompts[r].len() == len).collect();
        let ids: Vec<u32> = rows.iter().flat_map(|&r| prompts[r][lcp..].iter().copied()).collect();
        let ids = Tensor::from_vec(ids, (rows.len(), len - lcp), model.device())?;
        let mut state = shared.select_rows(&vec![0; rows.len()])?;
        let mut caps = Captures::default();
        // A continuation of real tokens: `decode` marks every column real (no padding).
        let logits = model.forward(&ids, &mut state, &StepInfo::decode(rows.len()), spec, &mut caps, false)?;
        let logits = logits.squeeze(1)?;
        for (i, &r) in rows.iter().enumerate() {
            rows_logits[r] = Some(logits.get(i)?);
        }
        for (&p, out) in rows_states.iter_mut() {
            let last = last_of(caps.get(p)?)?;
            for (i, &r) in rows.iter().enumerate() {
                out[r] = Some(last.get(i)?);
            }
        }
    }
    let stack = |v: Vec<Option<Tensor>>| -> Result<Tensor> {
        Ok(Tensor::stack(&v.into_iter().map(|t| t.expect("every row is in one length group")).collect::<Vec<_>>(), 0)?)
    };
    let states = rows_states.into_iter().map(|(p, v)| Ok((p, stack(v)?))).collect::<Result<_>>()?;
    Ok((stack(rows_logits)?, states))
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
