//! `bench paired`: the GPU speed workload of docs/cuda.md, measured the same way by the
//! transformers peer (scripts/peer/hf_paired.py) on the same checkpoint and prompt ids:
//!
//! - one paired exp12 episode: the prompt (below), the steering hook at the auto layer
//!   (positions `last`: the last prompt token and every generated token), `--new-tokens` for the
//!   baseline row and as many for the steered row (no stop tokens), run sequentially at batch 1
//!   (baseline unhooked, then steered: the exp12 way) and batched (2 rows, α = 0 and α);
//! - decode tokens/s at batch 1 (steered) and prefill tokens/s (one forward of the prompt);
//! - all-layer extraction: one forward keeping every hidden state (`hook_embed` and every
//!   `blocks.{i}.hook_resid_post`, as transformers' `output_hidden_states`);
//! - peak device memory per workload (the memory pool's high-water mark, weights included).
//!
//! Two workloads, chosen by the model:
//!
//! - **text** (a text model): `--prompt-tokens` (default 400) fixed ids (`workload_ids`); the
//!   batched episode is one plain batch of 2 rows (`generate::generate`).
//! - **vlm** (a Qwen2-VL model: `qwen-vl-2b` or a Qwen2-VL directory): the screenshot
//!   episode, through the real VLM path (processor, vision tower, M-RoPE, steering on the LLM).
//!   The picture is `workload_image` (`--image-size`, default 320×420, the runner's enlarged
//!   Set-of-Marks screenshot: smart_resize 308×420, grid 1×30×22, **165 image tokens**); the
//!   prompt is the checkpoint's chat template for one user turn (that image, then text), with
//!   the text made of `VLM_FILLER`'s token ids cycled to reach `--prompt-tokens` in all (default
//!   **487**; `vlm_workload`). Every step runs the vision tower (the image's features are not
//!   kept between calls); the batched episode is what `run --vlm` does for a pair
//!   (`Qwen2Vl::generate_forked`: one prefill of the prompt but its last token, forked into the
//!   two rows). The peer builds the same ids and picture (its own processor) and reports the
//!   same `prompt_hash`.
//!
//! Prints a markdown table and, with `--json FILE`, the numbers that scripts/gpu-check.sh puts
//! beside the peer's.
use crate::cli::models::ModelArgs;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use miniwob_steer::agent::prompt::hash16;
use miniwob_steer::device::parse_device;
use miniwob_steer::device::{self, device_name};
use miniwob_steer::models::config::DecoderConfig;
use miniwob_steer::models::decoder::Decoder;
use miniwob_steer::models::generate::{self, GenerateConfig};
use miniwob_steer::models::load::LoadedModel;
use miniwob_steer::models::qwen2_vl::model::{Qwen2Vl, VlmInput};
use miniwob_steer::models::registry;
use miniwob_steer::models::workload::{vlm_workload, workload_ids, TEXT_PROMPT_TOKENS, VLM_PROMPT_TOKENS};
use miniwob_steer::models::{Captures, HookPoint, HookSpec, Positions, StepInfo};
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct BenchPairedArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt length in tokens: 400 text ids (`workload_ids`) for a text model; 487 in all for
    /// a Qwen2-VL model (template + image tokens + filler text, see `vlm_workload`).
    #[arg(long)]
    pub prompt_tokens: Option<usize>,
    /// The VLM workload's picture, WIDTHxHEIGHT pixels (`workload_image`).
    #[arg(long, default_value = "320x420")]
    pub image_size: String,
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

/// `WIDTHxHEIGHT`.
pub fn parse_image_size(s: &str) -> Result<(u32, u32)> {
    let (w, h) = s.split_once(['x', 'X', '×']).with_context(|| format!("--image-size {s}: expected WIDTHxHEIGHT"))?;
    let p = |v: &str| v.trim().parse::<u32>().ok().filter(|&v| v > 0);
    match (p(w), p(h)) {
        (Some(w), Some(h)) => Ok((w, h)),
        _ => bail!("--image-size {s}: expected two positive integers, WIDTHxHEIGHT"),
    }
}

/// What one `bench paired` run measured (seconds, tokens/s, bytes).
#[derive(Debug, Clone, Serialize)]
pub struct PairedResult {
    pub implementation: String,
    pub model: String,
    pub checkpoint: String,
    pub device: String,
    pub dtype: String,
    /// `text` or `vlm`.
    pub workload: String,
    pub layers: usize,
    pub layer: usize,
    pub hook_point: String,
    pub coeff: f32,
    /// All prompt tokens, image tokens included.
    pub prompt_tokens: usize,
    /// `<|image_pad|>` tokens in the prompt (0 for text).
    pub image_tokens: usize,
    /// The picture before resizing, [width, height]; null for text.
    pub image_size: Option<[usize; 2]>,
    /// The processed image's patch grid [t, h, w]; null for text.
    pub image_grid_thw: Option<[usize; 3]>,
    /// sha256 (16 hex) of the prompt ids joined by ",": the peer's must be equal.
    pub prompt_hash: String,
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

/// The four measured operations of one workload; `measure` times them the same way for both.
trait Workload {
    /// Baseline row (no hook) then steered row (`steer1`), batch 1 each.
    fn sequential(&self, steer1: &HookSpec) -> Result<()>;
    /// Both rows together (`steer2`: coefficients [0, α]).
    fn batched(&self, steer2: &HookSpec) -> Result<()>;
    /// Prefill (reading the first id back), then `new_tokens` greedy decode steps, each reading
    /// its id back; batch 1 with `steer1`. Returns (prefill s, decode s).
    fn prefill_decode(&self, steer1: &HookSpec) -> Result<(f64, f64)>;
    /// One forward of the prompt capturing `all`; returns the last layer's capture.
    fn extract(&self, all: &HookSpec) -> Result<Captures>;
}

fn no_stop(new_tokens: usize) -> GenerateConfig {
    // No stop ids: every row generates exactly `new_tokens`.
    GenerateConfig { max_new_tokens: new_tokens, ..Default::default() }
}

struct TextWorkload<'a> {
    d: &'a Decoder,
    ids: Vec<u32>,
    new_tokens: usize,
}

impl TextWorkload<'_> {
    fn gen(&self, prompts: &[Vec<u32>], spec: &HookSpec) -> Result<()> {
        let g = generate::generate(self.d, prompts, &no_stop(self.new_tokens), spec, &mut Captures::default())?;
        debug_assert!(g.iter().all(|r| r.tokens.len() == self.new_tokens));
        Ok(())
    }
}

impl Workload for TextWorkload<'_> {
    fn sequential(&self, steer1: &HookSpec) -> Result<()> {
        let one = std::slice::from_ref(&self.ids);
        self.gen(one, &HookSpec::none())?;
        self.gen(one, steer1)
    }

    fn batched(&self, steer2: &HookSpec) -> Result<()> {
        self.gen(&[self.ids.clone(), self.ids.clone()], steer2)
    }

    fn prefill_decode(&self, steer1: &HookSpec) -> Result<(f64, f64)> {
        let (d, dev) = (self.d, self.d.device());
        let t = Tensor::from_vec(self.ids.clone(), (1, self.ids.len()), dev)?;
        let mut st = d.new_state(vec![0]);
        let mut caps = Captures::default();
        device::synchronize(dev)?;
        let t0 = Instant::now();
        let logits = d.forward(&t, &mut st, &StepInfo::prefill(vec![0]), steer1, &mut caps, false)?;
        let mut next = logits.squeeze(1)?.argmax(1)?.reshape((1, 1))?;
        next.to_vec2::<u32>()?;
        let t_pre = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        for _ in 0..self.new_tokens {
            let logits = d.forward(&next, &mut st, &StepInfo::decode(1), steer1, &mut caps, false)?;
            next = logits.squeeze(1)?.argmax(1)?.reshape((1, 1))?;
            next.to_vec2::<u32>()?;
        }
        Ok((t_pre, t1.elapsed().as_secs_f64()))
    }

    fn extract(&self, all: &HookSpec) -> Result<Captures> {
        Ok(generate::prefill(self.d, std::slice::from_ref(&self.ids), 0, all)?.1)
    }
}

struct VlmWorkload<'a> {
    m: &'a Qwen2Vl,
    input: VlmInput,
    new_tokens: usize,
}

impl Workload for VlmWorkload<'_> {
    fn sequential(&self, steer1: &HookSpec) -> Result<()> {
        let one = std::slice::from_ref(&self.input);
        let cfg = no_stop(self.new_tokens);
        self.m.generate(one, &cfg, &HookSpec::none())?;
        self.m.generate(one, &cfg, steer1)?;
        Ok(())
    }

    fn batched(&self, steer2: &HookSpec) -> Result<()> {
        let g = self.m.generate_forked(&self.input, 2, &no_stop(self.new_tokens), steer2)?;
        debug_assert!(g.iter().all(|r| r.tokens.len() == self.new_tokens));
        Ok(())
    }

    fn prefill_decode(&self, steer1: &HookSpec) -> Result<(f64, f64)> {
        let dev = self.m.device();
        let mut caps = Captures::default();
        device::synchronize(dev)?;
        let t0 = Instant::now();
        let mut pre = self.m.prefill(std::slice::from_ref(&self.input), steer1, &mut caps, false)?;
        let mut next = generate::argmax_last(&pre.logits)?;
        let t_pre = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        for _ in 0..self.new_tokens {
            let logits = self.m.decode_step(&next, &mut pre.state, &pre.deltas, steer1, &mut caps)?;
            next = generate::argmax_last(&logits)?;
        }
        Ok((t_pre, t1.elapsed().as_secs_f64()))
    }

    fn extract(&self, all: &HookSpec) -> Result<Captures> {
        let mut caps = Captures::default();
        self.m.prefill(std::slice::from_ref(&self.input), all, &mut caps, false)?;
        Ok(caps)
    }
}

/// The model a `bench paired` run measures.
pub enum BenchModel {
    Text(Box<LoadedModel>),
    Vlm(Box<Qwen2Vl>),
}

impl BenchModel {
    /// A Qwen2-VL model (registry modality or directory) loads with its vision tower.
    pub fn load(spec: &str, dev: &Device, dtype: miniwob_steer::models::weights::WeightDType) -> Result<Self> {
        if miniwob_steer::models::qwen2_vl::is_vlm_model(spec) {
            Ok(Self::Vlm(Box::new(Qwen2Vl::load(spec, dev, dtype)?)))
        } else {
            Ok(Self::Text(Box::new(LoadedModel::load(spec, dev, dtype)?)))
        }
    }
}

/// What `measure` needs beyond the workload.
struct Shape<'a> {
    cfg: &'a DecoderConfig,
    dtype: DType,
    prompt_tokens: usize,
}

fn ensure_fits(s: &Shape, dev: &Device, batch: usize, new_tokens: usize, captured_layers: usize) -> Result<()> {
    let shape = miniwob_steer::models::memory::BatchShape {
        batch,
        prompt_tokens: s.prompt_tokens,
        new_tokens,
        captured_layers,
    };
    miniwob_steer::models::memory::ensure_batch_fits(s.cfg, s.dtype, dev, shape)
}

pub fn measure(m: &BenchModel, dev: &Device, a: &BenchPairedArgs) -> Result<PairedResult> {
    let (info, d) = match m {
        BenchModel::Text(t) => (&t.info, &t.decoder),
        BenchModel::Vlm(v) => (&v.info, &v.decoder),
    };
    let n = d.cfg.num_layers;
    let layer = registry::parse_layer(&a.layer, n)?;
    let (work, workload, ids, image_tokens, image_size, grid): (Box<dyn Workload>, _, _, _, _, _) = match m {
        BenchModel::Text(_) => {
            let ids = workload_ids(a.prompt_tokens.unwrap_or(TEXT_PROMPT_TOKENS));
            d.check_ids(&ids).context("the workload's prompt ids do not fit this model's vocabulary")?;
            let w = TextWorkload { d, ids: ids.clone(), new_tokens: a.new_tokens };
            (Box::new(w), "text", ids, 0, None, None)
        }
        BenchModel::Vlm(v) => {
            let (iw, ih) = parse_image_size(&a.image_size)?;
            let input = vlm_workload(v, a.prompt_tokens.unwrap_or(VLM_PROMPT_TOKENS), (iw, ih))?;
            let ids = input.ids.clone();
            let image_tokens = ids.iter().filter(|&&t| t == v.cfg.image_token_id).count();
            let grid = input.images[0].grid_thw;
            let w = VlmWorkload { m: v, input, new_tokens: a.new_tokens };
            (Box::new(w), "vlm", ids, image_tokens, Some([iw as usize, ih as usize]), Some(grid))
        }
    };
    let shape = Shape { cfg: &d.cfg, dtype: d.dtype(), prompt_tokens: ids.len() };
    let v = Tensor::randn(0f32, 1f32, d.cfg.hidden_size, &Device::Cpu)?;
    let v = (&v / v.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()? as f64)?;
    let point = HookPoint::ResidPost(layer);
    let weights_bytes = device::pool_usage(dev)?.map(|(cur, _)| cur);
    let steer1 = HookSpec::none().add(point, v.clone(), vec![a.coeff], Positions::Last);
    let steer2 = HookSpec::none().add(point, v.clone(), vec![0.0, a.coeff], Positions::Last);
    for batch in [1, 2] {
        ensure_fits(&shape, dev, batch, a.new_tokens, 0)?;
    }
    let (sequential_s, peak_b1) = timed(dev, a.reps, || work.sequential(&steer1))?;
    let (batched_s, peak_b2) = timed(dev, a.reps, || work.batched(&steer2))?;
    // Prefill alone, then decode steps alone (batch 1, steered); the first run is the warm-up.
    let mut pre = Vec::new();
    let mut dec = Vec::new();
    for rep in 0..=a.reps.max(1) {
        let (t_pre, t_dec) = work.prefill_decode(&steer1)?;
        if rep > 0 {
            pre.push(ids.len() as f64 / t_pre);
            dec.push(a.new_tokens as f64 / t_dec);
        }
    }
    let mut all = HookSpec::none().capture(HookPoint::Embed);
    for i in 0..n {
        all = all.capture(HookPoint::ResidPost(i));
    }
    ensure_fits(&shape, dev, 1, 0, n + 1)?;
    let (extract_s, peak_extract) = timed(dev, a.reps, || {
        let h = work.extract(&all)?.get(HookPoint::ResidPost(n - 1))?;
        anyhow::ensure!(h.dims() == [1, ids.len(), d.cfg.hidden_size], "extraction shape {:?}", h.dims());
        Ok(())
    })?;
    let joined = ids.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(",");
    Ok(PairedResult {
        implementation: "miniwob-steer".into(),
        model: info.name.clone(),
        checkpoint: info.checkpoint.clone(),
        device: device_name(dev),
        dtype: info.dtype.clone(),
        workload: workload.into(),
        layers: n,
        layer,
        hook_point: point.to_string(),
        coeff: a.coeff,
        prompt_tokens: ids.len(),
        image_tokens,
        image_size,
        image_grid_thw: grid,
        prompt_hash: hash16(&joined),
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
    let m = BenchModel::load(&a.model.model, &dev, dtype)?;
    let r = measure(&m, &dev, &a)?;
    let image = match (r.image_size, r.image_grid_thw) {
        (Some([w, h]), Some([gt, gh, gw])) => {
            format!(" ({} image tokens: a {w}x{h} picture, grid {gt}x{gh}x{gw})", r.image_tokens)
        }
        _ => String::new(),
    };
    println!(
        "bench paired: {} ({}) on {} {}, {} workload, prompt {} tokens{image}, {} new tokens per row, hook {} α={}, median of {}",
        r.model, r.checkpoint, r.device, r.dtype, r.workload, r.prompt_tokens, r.new_tokens, r.hook_point, r.coeff, r.reps
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
