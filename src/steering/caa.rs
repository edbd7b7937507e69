//! Contrastive Activation Addition: hidden-state differences between positive and negative
//! prompts, read at the output of layer L (`blocks.{L}.hook_resid_post`, where the vector is
//! added) or at its input (`resid_pre`, a protocol's `caa.read`), reduced by mean (CAA) or first
//! principal component.
use super::pairs::PromptPair;
use super::vector::{now, unit, SteeringVector, VectorMeta};
use crate::agent::PromptBuilder;
use crate::models::engine::Engine;
use crate::models::hooks::{HookPoint, HookSpec, Positions};
use crate::models::load::LoadedModel;
use crate::models::prefix_cache::{self, PrefixCache};
use crate::protocol::{Protocol, ReadPoint};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Last token of the chat-formatted prompt; mean difference.
    Prompt,
    /// Generate greedily, then the last token of prompt + response (in context); mean difference.
    Response,
    /// Generate greedily, then the response text alone (decoded without special tokens,
    /// stripped, re-encoded without any template): its last token; mean difference.
    ResponseText,
    /// Last prompt token; first principal component of the differences.
    Pca,
}

/// `FromStr` by the serde names (`--vector-method`, `--coeff-mode`).
fn parse_named<T: serde::de::DeserializeOwned>(s: &str, what: &str, choices: &str) -> Result<T> {
    serde_json::from_value(serde_json::Value::String(s.trim().to_string()))
        .map_err(|_| anyhow::anyhow!("{what} {s:?}: expected {choices}"))
}

impl std::str::FromStr for Method {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        parse_named(s, "vector method", "prompt, response, response-text or pca")
    }
}

impl std::str::FromStr for CoeffMode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        parse_named(s, "coefficient mode", "absolute or relative")
    }
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Prompt => "prompt",
            Method::Response => "response",
            Method::ResponseText => "response-text",
            Method::Pca => "pca",
        }
    }

    /// Whether the method generates a response first.
    pub fn needs_response(self) -> bool {
        matches!(self, Method::Response | Method::ResponseText)
    }
}

#[derive(Debug, Clone)]
pub struct CaaOptions {
    pub layers: Vec<usize>,
    pub method: Method,
    /// Where the states are read, relative to the layer the vector is added at.
    pub read: ReadPoint,
    /// Rows per generation batch for the response methods (activations are read pair by pair,
    /// each pair prefilling its shared prefix once).
    pub batch_size: usize,
    /// Response length for the response methods.
    pub response_tokens: usize,
    /// The repetition penalty of the response generation (1 = off).
    pub repetition_penalty: f32,
    /// `response-text`: whether re-encoding adds the tokenizer's special tokens.
    pub add_special_tokens: bool,
    /// The protocol (`name@hash`) recorded in the vector file.
    pub protocol: Option<String>,
}

impl CaaOptions {
    /// The options a protocol fixes, at `layers` with `method`, response settings from the
    /// protocol.
    pub fn of_protocol(p: &Protocol, layers: Vec<usize>, method: Method, repetition_penalty: f32) -> CaaOptions {
        CaaOptions {
            layers,
            method,
            read: p.file.caa.read,
            batch_size: 4,
            response_tokens: p.file.caa.response_tokens,
            repetition_penalty,
            add_special_tokens: p.file.prompt.add_special_tokens,
            protocol: Some(p.id()),
        }
    }
}

/// `base + caa.join + instruction` through the protocol's chat mode, for every base text: the
/// (positive, negative) token ids of `vector --texts`.
pub fn pair_prompts(
    model: &LoadedModel,
    prompts: &PromptBuilder,
    bases: &[String],
    pair: &PromptPair,
) -> Result<Vec<(Vec<u32>, Vec<u32>)>> {
    let (pos, neg) = match (&pair.positive, &pair.negative) {
        (Some(p), Some(n)) => (p, n),
        _ => bail!("pair `{}` is a composite; compute its members and combine them", pair.name),
    };
    let join = &prompts.protocol.file.caa.join;
    let enc = |base: &str, instr: &str| -> Result<Vec<u32>> {
        let text = prompts.model_text(&model.tokenizer, &format!("{base}{join}{instr}"))?;
        prompts.encode(&model.tokenizer, &text)
    };
    bases.iter().map(|b| Ok((enc(b, pos)?, enc(b, neg)?))).collect()
}

fn progress(n: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(n);
    pb.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta}")
            .unwrap()
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// Last-position hidden states `[hidden]` per layer for a list of (positive, negative) prompt
/// rows, in order. Consecutive rows `2k`, `2k + 1` are one pair: they share the task prompt, so
/// each pair's common prefix is prefilled once and forked (DESIGN.md §3), which roughly halves
/// the prefill work. Rows without a partner run alone.
fn last_states<E: Engine>(
    model: &E,
    prompts: &[E::Input],
    layers: &[usize],
    read: ReadPoint,
    pb: &ProgressBar,
) -> Result<BTreeMap<usize, Vec<Tensor>>> {
    let mut spec = HookSpec::none();
    for &l in layers {
        spec = spec.capture(read.hook(l));
    }
    let mut out: BTreeMap<usize, Vec<Tensor>> = layers.iter().map(|&l| (l, Vec::new())).collect();
    // Every training prompt starts with the same header and instructions.
    let mut cache = PrefixCache::new(prefix_cache::DEFAULT_MB);
    for chunk in prompts.chunks(2) {
        let states = model.last_states(chunk, &spec, &mut cache)?;
        for &l in layers {
            let last = states[&read.hook(l)].to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
            for r in 0..chunk.len() {
                out.get_mut(&l).unwrap().push(last.get(r)?);
            }
        }
        pb.inc(chunk.len() as u64);
    }
    Ok(out)
}

/// First principal component of the rows of `d` (`[n, h]`), uncentered (about the origin, so a
/// consistent shift dominates it), sign-aligned with the mean row. Power iteration on the
/// `n × n` Gram matrix, in f64.
pub fn first_pc(diffs: &[Vec<f32>]) -> Result<Vec<f32>> {
    let n = diffs.len();
    if n == 0 {
        bail!("no differences");
    }
    let h = diffs[0].len();
    let mut g = vec![0f64; n * n];
    for i in 0..n {
        for j in i..n {
            let s: f64 = diffs[i].iter().zip(&diffs[j]).map(|(&a, &b)| a as f64 * b as f64).sum();
            g[i * n + j] = s;
            g[j * n + i] = s;
        }
    }
    let mut u = vec![1.0 / (n as f64).sqrt(); n];
    for _ in 0..500 {
        let mut next = vec![0f64; n];
        for i in 0..n {
            next[i] = (0..n).map(|j| g[i * n + j] * u[j]).sum();
        }
        let norm = next.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm == 0.0 {
            bail!("the differences are all zero");
        }
        next.iter_mut().for_each(|x| *x /= norm);
        let delta: f64 = next.iter().zip(&u).map(|(a, b)| (a - b).abs()).sum();
        u = next;
        if delta < 1e-12 {
            break;
        }
    }
    let mut v = vec![0f64; h];
    for (i, d) in diffs.iter().enumerate() {
        for k in 0..h {
            v[k] += u[i] * d[k] as f64;
        }
    }
    let mean: Vec<f64> = (0..h).map(|k| diffs.iter().map(|d| d[k] as f64).sum::<f64>() / n as f64).collect();
    let dot: f64 = v.iter().zip(&mean).map(|(a, b)| a * b).sum();
    let sign = if dot < 0.0 { -1.0 } else { 1.0 };
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    Ok(v.into_iter().map(|x| (sign * x / norm) as f32).collect())
}

/// Computes a steering vector from (positive, negative) model inputs: token ids for a text
/// model, screenshot + text for a VLM (the residual stream is the LLM's either way).
pub fn compute<E: Engine>(
    model: &E,
    pairs: &[(E::Input, E::Input)],
    pair_name: &str,
    opts: &CaaOptions,
) -> Result<SteeringVector> {
    if pairs.is_empty() {
        bail!("no training prompts");
    }
    let mut prompts: Vec<E::Input> = pairs.iter().flat_map(|(p, n)| [p.clone(), n.clone()]).collect();
    if opts.method.needs_response() {
        let pb = progress(prompts.len() as u64, "responses");
        let mut cfg = model.generate_config(opts.response_tokens);
        cfg.repetition_penalty = opts.repetition_penalty;
        let mut cache = PrefixCache::new(prefix_cache::DEFAULT_MB);
        let mut with_resp = Vec::with_capacity(prompts.len());
        for chunk in prompts.chunks(opts.batch_size.max(1)) {
            let rows: Vec<&E::Input> = chunk.iter().collect();
            let gens = model.generate(&rows, &cfg, &HookSpec::none(), &mut cache, None)?;
            for (p, g) in chunk.iter().zip(gens) {
                with_resp.push(match opts.method {
                    Method::ResponseText => {
                        let n = with_resp.len();
                        let text = model.tokenizer().decode(&g.generation.tokens, true)?;
                        let ids = model.tokenizer().encode(text.trim(), opts.add_special_tokens)?;
                        if ids.is_empty() {
                            bail!(
                                "response-text: the response to training prompt {} ({}) is empty once special tokens \
                                 and whitespace are dropped; there is no token to read",
                                n / 2,
                                if n % 2 == 0 { "positive" } else { "negative" }
                            );
                        }
                        E::text_input(ids)
                    }
                    _ => E::append(p, &g.generation.tokens),
                });
            }
            pb.inc(chunk.len() as u64);
        }
        pb.finish_and_clear();
        if opts.method == Method::ResponseText {
            let same = with_resp.chunks(2).filter(|p| p.len() == 2 && p[0] == p[1]).count();
            if same == pairs.len() {
                bail!(
                    "response-text: the model gave the same response to the positive and the negative instruction \
                     in all {same} training pairs, so every difference is zero and there is no direction; \
                     use more training episodes, a pair the model responds to, or another caa.method"
                );
            }
            if same > 0 {
                tracing::warn!("response-text: {same} of {} training pairs got the same response to both instructions (they add nothing)", pairs.len());
            }
        }
        prompts = with_resp;
    }
    let pb = progress(prompts.len() as u64, "activations");
    let states = last_states(model, &prompts, &opts.layers, opts.read, &pb)?;
    pb.finish_and_clear();
    let h = model.decoder().cfg.hidden_size;
    let mut layers = BTreeMap::new();
    let mut pre_norm = BTreeMap::new();
    let mut mean_resid_norm = BTreeMap::new();
    for (&l, rows) in &states {
        let mut diffs: Vec<Vec<f32>> = Vec::with_capacity(pairs.len());
        let mut norm_sum = 0f64;
        for k in 0..pairs.len() {
            let (p, n) = (&rows[2 * k], &rows[2 * k + 1]);
            norm_sum += p.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()? as f64;
            norm_sum += n.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()? as f64;
            diffs.push((p - n)?.to_vec1::<f32>()?);
        }
        mean_resid_norm.insert(l, (norm_sum / (2 * pairs.len()) as f64) as f32);
        let mean: Vec<f32> =
            (0..h).map(|k| diffs.iter().map(|d| d[k] as f64).sum::<f64>() as f32 / pairs.len() as f32).collect();
        let mean_t = Tensor::from_vec(mean, h, &Device::Cpu)?;
        let (dir, n) = match opts.method {
            Method::Pca => {
                let (_, n) = unit(&mean_t)?;
                (Tensor::from_vec(first_pc(&diffs)?, h, &Device::Cpu)?, n)
            }
            _ => unit(&mean_t)?,
        };
        pre_norm.insert(l, n);
        layers.insert(l, dir);
    }
    let info = model.info();
    Ok(SteeringVector {
        layers,
        meta: VectorMeta {
            model: info.name.clone(),
            checkpoint: info.checkpoint.clone(),
            weights_hash: info.weights_hash.clone(),
            hidden_size: info.hidden_size,
            num_layers: info.num_layers,
            method: opts.method.name().into(),
            pair: pair_name.into(),
            samples: pairs.len(),
            pre_norm,
            mean_resid_norm,
            created: now(),
            read: (opts.read != ReadPoint::ResidPost).then(|| opts.read.name().to_string()),
            protocol: opts.protocol.clone(),
            adapter: info.adapter.clone(),
        },
    })
}

/// How `--coeff` is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CoeffMode {
    /// α multiplies the unit vector directly.
    Absolute,
    /// α is a fraction of the mean residual norm at the layer (recorded in the vector file).
    Relative,
}

/// A hook spec adding `vector`'s direction at `layer` with one coefficient per batch row.
pub fn steering_spec(
    v: &SteeringVector,
    layer: usize,
    coeffs: &[f32],
    mode: CoeffMode,
    positions: Positions,
) -> Result<HookSpec> {
    let dir = v.layer(layer)?.clone();
    let scale = match mode {
        CoeffMode::Absolute => 1.0,
        CoeffMode::Relative => *v.meta.mean_resid_norm.get(&layer).ok_or_else(|| {
            anyhow::anyhow!(
                "--coeff-mode relative needs the mean residual norm at layer {layer}, which this vector file lacks"
            )
        })?,
    };
    let coeffs = coeffs.iter().map(|c| c * scale).collect();
    Ok(HookSpec::none().add(HookPoint::ResidPost(layer), dir, coeffs, positions))
}
