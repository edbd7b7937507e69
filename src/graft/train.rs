//! `graft train`: trains the adapter of a hybrid on screenshot QA pairs, everything else frozen.
//!
//! - Data: JSONL lines `{image, prompt, response}` (image paths relative to the data file); a
//!   response may carry `<think>…</think>`, which `strip_think` removes.
//! - A sample is the LM's chat rendering of one user turn (the image placeholder, then the
//!   prompt) with the generation prompt, followed by `response<|im_end|>`. With `strip_think` the
//!   prompt is rendered with `enable_thinking = false`, which closes an empty think block: the
//!   same text Qwen3's template renders for an assistant answer without reasoning. The loss is the
//!   mean cross-entropy over the response tokens only (the prompt and the image are masked).
//! - Optimiser: AdamW exactly as `torch.optim.AdamW` (decoupled weight decay, bias-corrected
//!   moments, eps outside the square root), with its moments in the checkpoints. candle-nn's
//!   `AdamW` keeps its moments private, so a resumed run could not restore them; this one is a
//!   few tensor ops over the two adapter tensors. Gradients come from candle's autograd through
//!   `Decoder::forward_train`; the vision tower runs without a graph (its features are cached per
//!   sample: the tower is frozen and deterministic).
//! - Clipping: `torch.nn.utils.clip_grad_norm_` (total L2 norm over weight and bias, factor
//!   `clip / (norm + 1e-6)` when below 1).
//! - Order: epoch e visits the samples in a permutation seeded by (seed, e); step k of an epoch
//!   takes positions `k·B .. (k+1)·B`. Checkpoints every K steps hold the adapter, the moments and
//!   the step; a resumed run continues at the next step of the same order (nothing repeated or
//!   skipped) and refuses a checkpoint made with other settings or data.
//! - A NaN or infinite loss or gradient stops training before the update, naming the step, the
//!   samples and the last finite checkpoint; the hybrid's adapter is then left as it was.
use super::{Adapter, GraftConfig, Hybrid, ADAPTER_FILE, ADAPTER_INIT_FILE};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, Var};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Sample {
    pub image: PathBuf,
    pub prompt: String,
    pub response: String,
}

/// Reads `{image, prompt, response}` lines; image paths are made relative to the file's directory.
pub fn read_samples(path: &Path) -> Result<Vec<Sample>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let mut s: Sample = serde_json::from_str(line).with_context(|| {
            format!("{}:{}: expected {{\"image\", \"prompt\", \"response\"}}", path.display(), i + 1)
        })?;
        if s.image.is_relative() {
            s.image = base.join(&s.image);
        }
        out.push(s);
    }
    if out.is_empty() {
        bail!("{}: no samples", path.display());
    }
    Ok(out)
}

/// Removes every `<think>…</think>` block (an unclosed one runs to the end) and the whitespace
/// after it.
pub fn strip_think(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("<think>") {
        out.push_str(&rest[..i]);
        match rest[i..].find("</think>") {
            Some(j) => rest = rest[i + j + "</think>".len()..].trim_start(),
            None => {
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out.trim_start().to_string()
}

/// One tokenized training sample.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub ids: Vec<u32>,
    /// Tokens of the prompt (image included); the loss covers `ids[prompt_len..]`.
    pub prompt_len: usize,
    pub image: crate::models::qwen2_vl::processor::Processed,
}

impl Encoded {
    /// Per token: is it a loss target?
    pub fn loss_mask(&self) -> Vec<bool> {
        (0..self.ids.len()).map(|i| i >= self.prompt_len).collect()
    }
}

pub fn encode_sample(h: &Hybrid, s: &Sample, strip: bool) -> Result<Encoded> {
    let img = image::open(&s.image).with_context(|| format!("reading image {}", s.image.display()))?.to_rgb8();
    let processed = crate::models::qwen2_vl::processor::process(&img, &h.processor)?;
    let rendered = h.render_prompt(true, &s.prompt, Some(!strip))?;
    let prompt = h.encode(&rendered, Some(processed))?;
    let response = if strip { strip_think(&s.response) } else { s.response.clone() };
    let target = h.tokenizer.encode(&format!("{response}<|im_end|>"), false)?;
    let prompt_len = prompt.ids.len();
    let mut ids = prompt.ids;
    ids.extend(target);
    Ok(Encoded { ids, prompt_len, image: prompt.image.expect("given") })
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainOptions {
    pub data: PathBuf,
    pub lr: f64,
    /// Max total gradient norm; `None` disables clipping.
    pub clip: Option<f64>,
    pub batch_size: usize,
    pub epochs: usize,
    pub strip_think: bool,
    pub seed: u64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Checkpoint every this many steps (0: only at the end).
    pub checkpoint_every: usize,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            data: PathBuf::new(),
            lr: 1e-5,
            clip: Some(1.0),
            batch_size: 1,
            epochs: 1,
            strip_think: false,
            seed: 0,
            weight_decay: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            checkpoint_every: 100,
        }
    }
}

/// How a run behaves (not part of what a checkpoint must agree with).
#[derive(Debug, Clone, Default)]
pub struct RunControl {
    /// Stop after this many completed steps in this process (a simulated kill).
    pub stop_after: Option<usize>,
    /// Ignore existing checkpoints and start from the hybrid's initial adapter.
    pub restart: bool,
    pub progress: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepLog {
    pub step: usize,
    pub epoch: usize,
    pub samples: Vec<usize>,
    pub loss: f64,
    pub grad_norm: f64,
}

#[derive(Debug, Clone)]
pub struct TrainOutcome {
    pub steps: usize,
    pub total_steps: usize,
    pub finished: bool,
    pub losses: Vec<StepLog>,
    pub adapter: Adapter,
    pub run_dir: PathBuf,
}

/// `torch.optim.AdamW`'s state for the adapter's two tensors.
pub struct AdamW {
    pub step: usize,
    m: [Tensor; 2],
    v: [Tensor; 2],
}

impl AdamW {
    pub fn new(a: &Adapter) -> Result<Self> {
        Ok(Self {
            step: 0,
            m: [a.weight.zeros_like()?, a.bias.zeros_like()?],
            v: [a.weight.zeros_like()?, a.bias.zeros_like()?],
        })
    }

    /// One update of `params` in place with gradients `grads` (already clipped).
    pub fn update(&mut self, params: [&mut Tensor; 2], grads: [&Tensor; 2], o: &TrainOptions) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - o.beta1.powi(t);
        let bc2 = 1.0 - o.beta2.powi(t);
        for (i, (p, g)) in params.into_iter().zip(grads).enumerate() {
            let decayed = (&*p * (1.0 - o.lr * o.weight_decay))?;
            self.m[i] = ((&self.m[i] * o.beta1)? + (g * (1.0 - o.beta1))?)?;
            self.v[i] = ((&self.v[i] * o.beta2)? + (g.sqr()? * (1.0 - o.beta2))?)?;
            let denom = ((self.v[i].sqrt()? / bc2.sqrt())? + o.eps)?;
            *p = (decayed - ((&self.m[i] / denom)? * (o.lr / bc1))?)?;
        }
        Ok(())
    }
}

/// `clip_grad_norm_`: returns the total norm before clipping and the (possibly scaled) gradients.
pub fn clip_grads(grads: [&Tensor; 2], max_norm: Option<f64>) -> Result<(f64, [Tensor; 2])> {
    let sq: f64 = grads
        .iter()
        .map(|g| g.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>())
        .sum::<candle_core::Result<f64>>()?;
    let norm = sq.sqrt();
    let scale = match max_norm {
        Some(c) => (c / (norm + 1e-6)).min(1.0),
        None => 1.0,
    };
    let out =
        if scale < 1.0 { [(grads[0] * scale)?, (grads[1] * scale)?] } else { [grads[0].clone(), grads[1].clone()] };
    Ok((norm, out))
}

/// Loss of one sample: mean cross-entropy over its response tokens, differentiable in the adapter.
pub fn sample_loss(h: &Hybrid, e: &Encoded, feats: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    response_loss(&h.decoder, h.cfg.image_token_id, &e.ids, e.prompt_len, feats, w, b)
}

/// [`sample_loss`] from its parts: `feats` `[tokens, vision width]` through the adapter `(w, b)`
/// into the image positions of `ids`, the decoder's training forward, cross-entropy over
/// `ids[prompt_len..]`.
pub fn response_loss(
    decoder: &crate::models::decoder::Decoder,
    image_token_id: u32,
    ids: &[u32],
    prompt_len: usize,
    feats: &Tensor,
    w: &Tensor,
    b: &Tensor,
) -> Result<Tensor> {
    let img = feats.matmul(&w.t()?)?.broadcast_add(b)?;
    let xs = super::splice_embeds(decoder, image_token_id, ids, Some(&img))?;
    let n = ids.len();
    if prompt_len == 0 || prompt_len >= n {
        bail!("sample has {prompt_len} prompt tokens of {n}: nothing to predict");
    }
    // Position i predicts token i + 1: the rows from the last prompt token to the one before the end.
    let rows = decoder.forward_train(&xs, prompt_len - 1)?.squeeze(0)?.narrow(0, 0, n - prompt_len)?;
    let targets = Tensor::from_vec(ids[prompt_len..].to_vec(), n - prompt_len, decoder.device())?;
    Ok(candle_nn::loss::cross_entropy(&rows, &targets)?)
}

fn sha256_file(p: &Path) -> Result<String> {
    Ok(crate::util::sha256_file(p)?[..16].to_string())
}

/// The order of samples in epoch `epoch`.
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    v.shuffle(&mut rng);
    v
}

/// What a checkpoint must agree with to be resumed from.
fn settings_key(o: &TrainOptions, data_hash: &str, adapter_init: &str) -> Result<String> {
    let mut v = serde_json::to_value(o)?;
    v["data"] = serde_json::Value::String(data_hash.to_string());
    v["checkpoint_every"] = serde_json::Value::Null;
    v["adapter_init"] = serde_json::Value::String(adapter_init.to_string());
    Ok(v.to_string())
}

fn ckpt_path(run: &Path, step: usize) -> PathBuf {
    run.join(format!("step-{step:06}.safetensors"))
}

fn latest_checkpoint(run: &Path) -> Option<(usize, PathBuf)> {
    let rd = std::fs::read_dir(run).ok()?;
    rd.filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| {
            let n =
                p.file_name()?.to_str()?.strip_prefix("step-")?.strip_suffix(".safetensors")?.parse::<usize>().ok()?;
            Some((n, p))
        })
        .max_by_key(|(n, _)| *n)
}

fn save_checkpoint(run: &Path, a: &Adapter, opt: &AdamW, key: &str) -> Result<PathBuf> {
    let p = ckpt_path(run, opt.step);
    let t: HashMap<String, Tensor> = [
        ("adapter.weight", a.weight.clone()),
        ("adapter.bias", a.bias.clone()),
        ("adamw.m.weight", opt.m[0].clone()),
        ("adamw.m.bias", opt.m[1].clone()),
        ("adamw.v.weight", opt.v[0].clone()),
        ("adamw.v.bias", opt.v[1].clone()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let meta =
        [("step".to_string(), opt.step.to_string()), ("settings".to_string(), key.to_string())].into_iter().collect();
    crate::util::save_safetensors(&t, &meta, &p)?;
    Ok(p)
}

fn load_checkpoint(p: &Path, key: &str, dev: &candle_core::Device) -> Result<(Adapter, AdamW)> {
    let meta = crate::util::read_safetensors_metadata(p)?;
    if meta.get("settings").map(String::as_str) != Some(key) {
        bail!(
            "{}: made with other settings or data ({}), not resumable with these ({key}); pass --restart to start over",
            p.display(),
            meta.get("settings").cloned().unwrap_or_default()
        );
    }
    let step: usize =
        meta.get("step").and_then(|s| s.parse().ok()).with_context(|| format!("{}: no step", p.display()))?;
    let t = candle_core::safetensors::load(p, dev)?;
    let g = |k: &str| t.get(k).cloned().with_context(|| format!("{}: no tensor `{k}`", p.display()));
    let a = Adapter { weight: g("adapter.weight")?, bias: g("adapter.bias")? };
    let opt =
        AdamW { step, m: [g("adamw.m.weight")?, g("adamw.m.bias")?], v: [g("adamw.v.weight")?, g("adamw.v.bias")?] };
    Ok((a, opt))
}

fn finite(t: &Tensor) -> Result<bool> {
    Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?.iter().all(|x| x.is_finite()))
}

fn frozen_digest(h: &Hybrid) -> Result<String> {
    let mut ts = h.vision.tensors();
    ts.extend(h.decoder.dense_tensors());
    super::tensors_digest(&ts)
}

/// Trains the adapter of the hybrid in `h.dir`; the run directory is `<hybrid>/train`.
pub fn train(h: &mut Hybrid, o: &TrainOptions, ctl: &RunControl) -> Result<TrainOutcome> {
    if o.batch_size == 0 || o.epochs == 0 {
        bail!("--batch-size and --epochs must be at least 1");
    }
    if !(o.lr.is_finite() && o.lr > 0.0) {
        bail!("--lr must be a positive number, found {}", o.lr);
    }
    let samples = read_samples(&o.data)?;
    let data_hash = sha256_file(&o.data)?;
    let dir = h.dir.clone();
    let run = dir.join("train");
    std::fs::create_dir_all(&run)?;
    let init_path =
        if dir.join(ADAPTER_INIT_FILE).exists() { dir.join(ADAPTER_INIT_FILE) } else { dir.join(ADAPTER_FILE) };
    let init_hash = sha256_file(&init_path)?;
    let key = settings_key(o, &data_hash, &init_hash)?;
    let dev = h.device().clone();
    if ctl.restart {
        for e in std::fs::read_dir(&run)?.flatten() {
            std::fs::remove_file(e.path()).ok();
        }
    }
    let init = Adapter::load(&init_path, &h.cfg.adapter, &dev)?;
    let (mut adapter, mut opt, mut last_ckpt) = match latest_checkpoint(&run) {
        Some((step, p)) => {
            let (a, opt) = load_checkpoint(&p, &key, &dev)?;
            tracing::info!(checkpoint = %p.display(), step, "resuming");
            (a, opt, Some(p))
        }
        None => {
            let opt = AdamW::new(&init)?;
            (init.clone(), opt, None)
        }
    };
    // Loss log: keep the lines of the steps the checkpoint covers.
    let log_path = run.join("losses.jsonl");
    let mut losses: Vec<StepLog> = std::fs::read_to_string(&log_path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<StepLog>(l).ok())
        .filter(|l| l.step <= opt.step)
        .collect();
    {
        let mut f = std::fs::File::create(&log_path)?;
        for l in &losses {
            writeln!(f, "{}", serde_json::to_string(l)?)?;
        }
    }
    let n = samples.len();
    let per_epoch = n.div_ceil(o.batch_size);
    let total = per_epoch * o.epochs;
    let before = frozen_digest(h)?;
    let encoded: Vec<Encoded> = samples.iter().map(|s| encode_sample(h, s, o.strip_think)).collect::<Result<_>>()?;
    let mut feats: HashMap<usize, Tensor> = HashMap::new();
    let bar = if ctl.progress { indicatif::ProgressBar::new(total as u64) } else { indicatif::ProgressBar::hidden() };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} steps  loss {msg}  [{elapsed_precise} < {eta_precise}]",
        )
        .expect("valid template"),
    );
    bar.set_position(opt.step as u64);
    let mut log = std::fs::OpenOptions::new().append(true).open(&log_path)?;
    let mut done_here = 0;
    while opt.step < total {
        if ctl.stop_after.is_some_and(|s| done_here >= s) {
            break;
        }
        let step = opt.step; // 0-based index of this step
        let epoch = step / per_epoch;
        let order = epoch_order(n, o.seed, epoch);
        let j = step % per_epoch;
        let batch: Vec<usize> = order[j * o.batch_size..((j + 1) * o.batch_size).min(n)].to_vec();
        let w = Var::from_tensor(&adapter.weight)?;
        let b = Var::from_tensor(&adapter.bias)?;
        let mut total_loss: Option<Tensor> = None;
        for &i in &batch {
            let f = match feats.entry(i) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => e.insert(h.vision_features(&encoded[i].image)?),
            };
            let l = sample_loss(h, &encoded[i], f, w.as_tensor(), b.as_tensor())?;
            total_loss = Some(match total_loss {
                Some(t) => (t + l)?,
                None => l,
            });
        }
        let loss = (total_loss.expect("non-empty batch") / batch.len() as f64)?;
        let loss_val = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let stop = |what: &str| -> anyhow::Error {
            let which: Vec<String> = batch.iter().map(|&i| format!("#{i} ({})", samples[i].image.display())).collect();
            let ck = match &last_ckpt {
                Some(p) => format!("the last finite checkpoint is {}", p.display()),
                None => format!(
                    "there is no checkpoint yet; {} still holds the adapter training started from",
                    dir.join(ADAPTER_FILE).display()
                ),
            };
            anyhow::anyhow!(
                "training stopped at step {} (epoch {epoch}): {what} on sample(s) {}; {ck}",
                step + 1,
                which.join(", ")
            )
        };
        if !loss_val.is_finite() {
            bar.abandon();
            return Err(stop(&format!("the loss is {loss_val}")));
        }
        let grads = loss.backward()?;
        let gw = grads.get(w.as_tensor()).context("no gradient for the adapter weight")?;
        let gb = grads.get(b.as_tensor()).context("no gradient for the adapter bias")?;
        if !finite(gw)? || !finite(gb)? {
            bar.abandon();
            return Err(stop("the gradient is not finite"));
        }
        let (norm, [gw, gb]) = clip_grads([gw, gb], o.clip)?;
        let (mut wt, mut bt) = (adapter.weight.clone(), adapter.bias.clone());
        opt.update([&mut wt, &mut bt], [&gw, &gb], o)?;
        if !finite(&wt)? || !finite(&bt)? {
            bar.abandon();
            return Err(stop("the updated adapter is not finite"));
        }
        adapter = Adapter { weight: wt, bias: bt };
        let entry = StepLog { step: opt.step, epoch, samples: batch, loss: loss_val, grad_norm: norm };
        writeln!(log, "{}", serde_json::to_string(&entry)?)?;
        losses.push(entry);
        done_here += 1;
        bar.set_message(format!("{loss_val:.4}"));
        bar.set_position(opt.step as u64);
        if o.checkpoint_every > 0 && opt.step % o.checkpoint_every == 0 {
            last_ckpt = Some(save_checkpoint(&run, &adapter, &opt, &key)?);
        }
    }
    bar.finish();
    // Stopped by `stop_after`: like a kill, the run directory keeps only the periodic checkpoints.
    let finished = opt.step >= total;
    let after = frozen_digest(h)?;
    if before != after {
        bail!("the frozen vision tower or language model changed during training (digest {before} -> {after})");
    }
    if let Err(e) = write_loss_curve(&losses, &run.join("loss.png")) {
        tracing::warn!("no loss curve: {e:#}");
    }
    if finished {
        if !dir.join(ADAPTER_INIT_FILE).exists() {
            std::fs::copy(dir.join(ADAPTER_FILE), dir.join(ADAPTER_INIT_FILE))?;
        }
        adapter.save(&dir.join(ADAPTER_FILE), &[("step", opt.step.to_string()), ("settings", key.clone())])?;
        let mut cfg: GraftConfig = GraftConfig::read(&dir)?;
        cfg.training = Some(serde_json::json!({
            "options": o,
            "data_sha256": data_hash,
            "samples": n,
            "steps": opt.step,
            "first_loss": losses.first().map(|l| l.loss),
            "final_loss": losses.last().map(|l| l.loss),
            "frozen_digest_before": before,
            "frozen_digest_after": after,
        }));
        cfg.write(&dir)?;
        h.cfg = cfg;
        h.adapter = adapter.clone();
    }
    Ok(TrainOutcome { steps: opt.step, total_steps: total, finished, losses, adapter, run_dir: run })
}

/// The training loss against the step, as a PNG.
pub fn write_loss_curve(losses: &[StepLog], path: &Path) -> Result<()> {
    use plotters::prelude::*;
    if losses.is_empty() {
        bail!("no steps");
    }
    register_font()?;
    let max = losses.iter().map(|l| l.loss).fold(0.0f64, f64::max).max(1e-9);
    let last = losses.last().map(|l| l.step).unwrap_or(1).max(1) as f64;
    let root = BitMapBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("graft train: loss on response tokens", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..last, 0f64..max * 1.05)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart.configure_mesh().x_desc("step").y_desc("loss").draw().map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .draw_series(LineSeries::new(losses.iter().map(|l| (l.step as f64, l.loss)), &BLUE))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

fn register_font() -> Result<()> {
    static DONE: std::sync::OnceLock<std::result::Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let mut paths: Vec<String> = std::env::var("MINIWOB_STEER_FONT").into_iter().collect();
        paths.extend(crate::env::som::FONT_PATHS.iter().map(|s| s.to_string()));
        for p in &paths {
            if let Ok(bytes) = std::fs::read(p) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", plotters::style::FontStyle::Normal, bytes).is_ok() {
                    return Ok(());
                }
            }
        }
        Err(format!("no TrueType font (tried {})", paths.join(", ")))
    })
    .clone()
    .map_err(|e| anyhow::anyhow!(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strip_think_removes_blocks_and_leading_whitespace() {
        assert_eq!(strip_think("<think>\nhmm\n</think>\n\nRed."), "Red.");
        assert_eq!(strip_think("Red."), "Red.");
        assert_eq!(strip_think("a <think>x</think> b"), "a b");
        assert_eq!(strip_think("<think>never closed"), "");
    }

    #[test]
    fn epochs_are_permutations_and_differ() {
        let a = epoch_order(16, 3, 0);
        let b = epoch_order(16, 3, 1);
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..16).collect::<Vec<_>>());
        assert_ne!(a, b);
        assert_eq!(a, epoch_order(16, 3, 0));
    }
}
