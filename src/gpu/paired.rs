//! `bench paired`: the GPU speed workload of docs/cuda.md, measured the same way by the
//! transformers peer (scripts/peer/hf_paired.py) on the same checkpoint and prompt ids:
//!
//! - one paired exp12 episode: a prompt of `--prompt-tokens` text tokens, the steering hook at
//!   the auto layer (positions `last`: the last prompt token and every generated token),
//!   `--new-tokens` for the baseline row and as many for the steered row (no stop tokens), run
//!   sequentially at batch 1 (baseline unhooked, then steered: the exp12 way) and batched (one
//!   batch of 2 rows, α = 0 and α);
//! - decode tokens/s at batch 1 (steered) and prefill tokens/s (one forward of the prompt);
//! - all-layer extraction: one forward keeping every hidden state (`hook_embed` and every
//!   `blocks.{i}.hook_resid_post`, as transformers' `output_hidden_states`);
//! - peak device memory per workload (the memory pool's high-water mark, weights included).
//!
//! Prints a markdown table and, with `--json FILE`, the numbers that scripts/gpu-check.sh puts
//! beside the peer's.
use super::device::{self, device_name};
use crate::models::cli::{parse_device, ModelArgs};
use crate::models::decoder::Decoder;
use crate::models::generate::{self, GenerateConfig};
use crate::models::load::LoadedModel;
use crate::models::registry;
use crate::models::{Captures, HookPoint, HookSpec, Positions, StepInfo};
use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct BenchPairedArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt length in tokens (ids from `workload_ids`, the same in the peer).
    #[arg(long, default_value_t = 400)]
    pub prompt_tokens: usize,
    /// New tokens per row.
    #[arg(long, default_value_t = 64)]
    pub new_tokens: usize,
    /// Layer of the steering hook: auto (50% depth) or an index.
    #[arg(long, default_value = "auto")]
    pub layer: String,
    #[arg(long, default_value_t = 4.0)]
    pub coeff: f32,
    /// Timed repetitions after one untimed warm-up (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// CPU threads (RAYON_NUM_THREADS) when running on the CPU.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Write the result as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// The prompt of the workload: `n` ordinary (non-special) token ids, identical in the peer
/// (scripts/peer/hf_paired.py `workload_ids`).
pub fn workload_ids(n: usize) -> Vec<u32> {
    (0..n).map(|i| 1000 + ((i as u64 * 7919) % 20000) as u32).collect()
}

/// What one `bench paired` run measured (seconds, tokens/s, bytes).
#[derive(Debug, Clone, Serialize)]
pub struct PairedResult {
    pub implementation: String,
    pub model: String,
    pub checkpoint: String,
    pub device: String,
    pub dtype: String,
    pub layers: usize,
    pub layer: usize,
    pub hook_point: String,
    pub coeff: f32,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub reps: usize,
    /// Baseline row then steered row, batch 1 each.
    pub sequential_s: f64,
    /// Both rows in one batch of 2.
    pub batched_s: f64,
    pub decode_tok_s_b1: f64,
    pub prefill_tok_s: f64,
    /// One forward keeping every hidden state.
    pub extract_s: f64,
    /// Pool in use after loading (≈ the weights), bytes; null on the CPU.
    pub weights_bytes: Option<u64>,
    /// High-water marks per workload, bytes; null on the CPU.
    pub peak_bytes_b1: Option<u64>,
    pub peak_bytes_b2: Option<u64>,
    pub peak_bytes_extract: Option<u64>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Runs `f` once untimed, then `reps` times; the median wall time (device synchronised), and the
/// pool's high-water mark over all runs.
fn timed(dev: &Device, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<(f64, Option<u64>)> {
    f()?;
    device::reset_peak(dev)?;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        device::synchronize(dev)?;
        let t0 = Instant::now();
        f()?;
        device::synchronize(dev)?;
        times.push(t0.elapsed().as_secs_f64());
    }
    Ok((median(times), device::pool_usage(dev)?.map(|(_, high)| high)))
}

fn gen(d: &Decoder, prompts: &[Vec<u32>], new_tokens: usize, spec: &HookSpec) -> Result<()> {
    // No stop ids: every row generates exactly `new_tokens`.
    let cfg = GenerateConfig { max_new_tokens: new_tokens, ..Default::default() };
    let g = generate::generate(d, prompts, &cfg, spec, &mut Captures::default())?;
    debug_assert!(g.iter().all(|r| r.tokens.len() == new_tokens));
    Ok(())
}

pub fn measure(m: &LoadedModel, dev: &Device, a: &BenchPairedArgs) -> Result<PairedResult> {
    let d = &m.decoder;
    let n = d.cfg.num_layers;
    let layer = registry::parse_layer(&a.layer, n)?;
    let ids = workload_ids(a.prompt_tokens);
    d.check_ids(&ids).context("the workload's prompt ids do not fit this model's vocabulary")?;
    let v = Tensor::randn(0f32, 1f32, d.cfg.hidden_size, &Device::Cpu)?;
    let v = (&v / v.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()? as f64)?;
    let point = HookPoint::ResidPost(layer);
    let weights_bytes = device::pool_usage(dev)?.map(|(cur, _)| cur);
    let one = std::slice::from_ref(&ids);
    let steer1 = HookSpec::none().add(point, v.clone(), vec![a.coeff], Positions::Last);
    let steer2 = HookSpec::none().add(point, v.clone(), vec![0.0, a.coeff], Positions::Last);
    let pair = [ids.clone(), ids.clone()];
    for (batch, prompt) in [(1, a.prompt_tokens), (2, a.prompt_tokens)] {
        let shape =
            super::memory::BatchShape { batch, prompt_tokens: prompt, new_tokens: a.new_tokens, captured_layers: 0 };
        super::memory::ensure_batch_fits(&d.cfg, d.dtype(), dev, shape)?;
    }
    let (sequential_s, peak_b1) = timed(dev, a.reps, || {
        gen(d, one, a.new_tokens, &HookSpec::none())?;
        gen(d, one, a.new_tokens, &steer1)
    })?;
    let (batched_s, peak_b2) = timed(dev, a.reps, || gen(d, &pair, a.new_tokens, &steer2))?;
    // Prefill alone, then decode steps alone (batch 1, steered), each step reading its id back.
    let mut pre = Vec::new();
    let mut dec = Vec::new();
    for rep in 0..=a.reps.max(1) {
        let t = Tensor::from_vec(ids.clone(), (1, ids.len()), dev)?;
        let mut st = d.new_state(vec![0]);
        let mut caps = Captures::default();
        device::synchronize(dev)?;
        let t0 = Instant::now();
        let logits = d.forward(&t, &mut st, &StepInfo::prefill(vec![0]), &steer1, &mut caps, false)?;
        let mut next = logits.squeeze(1)?.argmax(1)?.reshape((1, 1))?;
        next.to_vec2::<u32>()?;
        let t_pre = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        for _ in 0..a.new_tokens {
            let logits = d.forward(&next, &mut st, &StepInfo::decode(1), &steer1, &mut caps, false)?;
            next = logits.squeeze(1)?.argmax(1)?.reshape((1, 1))?;
            next.to_vec2::<u32>()?;
        }
        if rep > 0 {
            pre.push(ids.len() as f64 / t_pre);
            dec.push(a.new_tokens as f64 / t1.elapsed().as_secs_f64());
        }
    }
    let mut all = HookSpec::none().capture(HookPoint::Embed);
    for i in 0..n {
        all = all.capture(HookPoint::ResidPost(i));
    }
    let shape =
        super::memory::BatchShape { batch: 1, prompt_tokens: a.prompt_tokens, new_tokens: 0, captured_layers: n + 1 };
    super::memory::ensure_batch_fits(&d.cfg, d.dtype(), dev, shape)?;
    let (extract_s, peak_extract) = timed(dev, a.reps, || {
        let (_, caps, _) = generate::prefill(d, one, 0, &all)?;
        let h = caps.get(HookPoint::ResidPost(n - 1))?;
        anyhow::ensure!(h.dims() == [1, ids.len(), d.cfg.hidden_size], "extraction shape {:?}", h.dims());
        Ok(())
    })?;
    Ok(PairedResult {
        implementation: "miniwob-steer".into(),
        model: m.info.name.clone(),
        checkpoint: m.info.checkpoint.clone(),
        device: device_name(dev),
        dtype: m.info.dtype.clone(),
        layers: n,
        layer,
        hook_point: point.to_string(),
        coeff: a.coeff,
        prompt_tokens: a.prompt_tokens,
        new_tokens: a.new_tokens,
        reps: a.reps.max(1),
        sequential_s,
        batched_s,
        decode_tok_s_b1: median(dec),
        prefill_tok_s: median(pre),
        extract_s,
        weights_bytes,
        peak_bytes_b1: peak_b1,
        peak_bytes_b2: peak_b2,
        peak_bytes_extract: peak_extract,
    })
}

fn mib(b: Option<u64>) -> String {
    b.map_or("-".into(), |b| format!("{:.0}", b as f64 / (1u64 << 20) as f64))
}

pub fn run(a: BenchPairedArgs) -> Result<()> {
    std::env::set_var("RAYON_NUM_THREADS", a.threads.to_string());
    let dev = parse_device(&a.model.device)?;
    let dtype = a.model.dtype.resolve(&dev);
    let m = LoadedModel::load(&a.model.model, &dev, dtype)?;
    let r = measure(&m, &dev, &a)?;
    println!(
        "bench paired: {} ({}) on {} {}, prompt {} tokens, {} new tokens per row, hook {} α={}, median of {}",
        r.model, r.checkpoint, r.device, r.dtype, r.prompt_tokens, r.new_tokens, r.hook_point, r.coeff, r.reps
    );
    println!("| sequential paired episode s | batched paired episode s | decode tok/s (b1) | prefill tok/s | all-layer extraction ms | weights MiB | peak MiB b1 | peak MiB b2 | peak MiB extract |");
    println!("|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {:.3} | {:.3} | {:.1} | {:.0} | {:.1} | {} | {} | {} | {} |",
        r.sequential_s,
        r.batched_s,
        r.decode_tok_s_b1,
        r.prefill_tok_s,
        r.extract_s * 1e3,
        mib(r.weights_bytes),
        mib(r.peak_bytes_b1),
        mib(r.peak_bytes_b2),
        mib(r.peak_bytes_extract)
    );
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&r)?).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}
