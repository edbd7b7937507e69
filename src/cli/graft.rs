//! `miniwob-steer graft …`: hybrid vision + language checkpoints (docs/graft.md).
use anyhow::Result;
use clap::{Args, Subcommand};
use miniwob_steer::graft::{self, init::InitOptions, train::RunControl, train::TrainOptions};
use miniwob_steer::models::WeightDType;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct GraftArgs {
    #[command(subcommand)]
    pub command: GraftCommand,
}

#[derive(Subcommand, Debug)]
pub enum GraftCommand {
    /// A hybrid directory: the vision tower of a Qwen2.5-VL checkpoint, a language model, a new adapter.
    Init(InitArgs),
    /// Train the hybrid's adapter on screenshot QA pairs (JSONL {image, prompt, response}); all else frozen.
    Train(TrainArgs),
    /// Screenshot QA pairs from MiniWoB (Set-of-Marks screenshots, answers from the DOM) as JSONL.
    Data(DataArgs),
    /// Exact-match accuracy on held-out screenshot QA (JSONL), thinking off and on, with samples.
    Eval(EvalArgs),
    /// Time one training step (forward, backward, AdamW) and measure peak memory with random weights.
    Bench(BenchArgs),
}

#[derive(Args, Debug)]
pub struct InitArgs {
    /// Qwen2.5-VL checkpoint directory (only its `visual.*` tensors are used).
    #[arg(long)]
    pub vision: PathBuf,
    /// Language model checkpoint directory (Qwen3, or any decoder family the harness loads).
    #[arg(long)]
    pub lm: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of the adapter's initial weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Overwrite an existing hybrid in --out.
    #[arg(long)]
    pub force: bool,
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// The hybrid directory (`graft init --out`).
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long, default_value_t = 1e-5)]
    pub lr: f64,
    /// Max total gradient norm (torch's clip_grad_norm_).
    #[arg(long, default_value_t = 1.0)]
    pub clip: f64,
    #[arg(long, conflicts_with = "clip")]
    pub no_clip: bool,
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    /// Remove <think>…</think> from responses and train on the no-thinking rendering.
    #[arg(long)]
    pub strip_think: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    /// Write a checkpoint every K steps (0: none until the end).
    #[arg(long, default_value_t = 100)]
    pub checkpoint_every: usize,
    /// Discard the checkpoints in <model>/train and start from the initial adapter.
    #[arg(long)]
    pub restart: bool,
    /// f32 (default), f16 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

#[derive(Args, Debug)]
pub struct DataArgs {
    /// Comma-separated task names (`miniwob-steer tasks` lists them).
    #[arg(long, value_delimiter = ',', required = true)]
    pub tasks: Vec<String>,
    /// Seeds: a range `A..B` (B excluded) or a comma list.
    #[arg(long, default_value = "0..8")]
    pub seeds: String,
    #[arg(long)]
    pub out: PathBuf,
    /// At most this many `label` and `locate` questions per episode (each).
    #[arg(long, default_value_t = 3)]
    pub per_kind: usize,
}

fn parse_seeds(s: &str) -> Result<Vec<u64>> {
    if let Some((a, b)) = s.split_once("..") {
        let (a, b): (u64, u64) = (a.trim().parse()?, b.trim().parse()?);
        return Ok((a..b).collect());
    }
    s.split(',').map(|x| Ok(x.trim().parse::<u64>()?)).collect()
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub data: PathBuf,
    /// off, on, default (the template's), or a comma list; default: off,on.
    #[arg(long, default_value = "off,on")]
    pub thinking: String,
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Generation samples kept per mode.
    #[arg(long, default_value_t = 5)]
    pub samples: usize,
    /// Write the report (JSON) here as well as to stdout.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Vision tower blocks to build (the real tower has 32; times are per block, extrapolated).
    #[arg(long, default_value_t = 4)]
    pub vision_layers: usize,
    /// LM layers to build (Qwen3-4B has 36).
    #[arg(long, default_value_t = 2)]
    pub lm_layers: usize,
    /// Screenshot side in pixels (square); 308x420 is the agent's Set-of-Marks screenshot.
    #[arg(long, default_value = "420x308")]
    pub image: String,
    /// Text tokens after the image.
    #[arg(long, default_value_t = 64)]
    pub text_tokens: usize,
    #[arg(long, default_value_t = 2)]
    pub steps: usize,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

fn device(name: &str) -> Result<candle_core::Device> {
    miniwob_steer::device::parse_device(name)
}

pub fn run(a: GraftArgs) -> Result<()> {
    match a.command {
        GraftCommand::Init(a) => {
            let cfg = graft::init::init(&InitOptions {
                vision: a.vision,
                lm: a.lm,
                out: a.out.clone(),
                seed: a.seed,
                force: a.force,
            })?;
            println!("{}", serde_json::to_string_pretty(&cfg)?);
            Ok(())
        }
        GraftCommand::Train(a) => {
            let dtype: WeightDType = a.dtype.parse()?;
            let mut h = graft::Hybrid::load(&a.model, &device(&a.device)?, dtype)?;
            let o = TrainOptions {
                data: a.data,
                lr: a.lr,
                clip: if a.no_clip { None } else { Some(a.clip) },
                batch_size: a.batch_size,
                epochs: a.epochs,
                strip_think: a.strip_think,
                seed: a.seed,
                weight_decay: a.weight_decay,
                checkpoint_every: a.checkpoint_every,
                ..Default::default()
            };
            let ctl = RunControl {
                restart: a.restart,
                progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
                ..Default::default()
            };
            let out = graft::train::train(&mut h, &o, &ctl)?;
            let first = out.losses.first().map(|l| l.loss).unwrap_or(f64::NAN);
            let last = out.losses.last().map(|l| l.loss).unwrap_or(f64::NAN);
            println!(
                "{} steps, loss {first:.4} -> {last:.4}; adapter {}; curve {}",
                out.steps,
                a.model.join(graft::ADAPTER_FILE).display(),
                out.run_dir.join("loss.png").display()
            );
            Ok(())
        }
        GraftCommand::Data(a) => {
            let o = graft::data::DataOptions {
                tasks: a.tasks,
                seeds: parse_seeds(&a.seeds)?,
                out: a.out.clone(),
                per_kind: a.per_kind,
            };
            let n = tokio::runtime::Runtime::new()?.block_on(graft::data::collect(&o))?;
            println!("{n} QA pairs in {}", a.out.display());
            Ok(())
        }
        GraftCommand::Eval(a) => {
            let modes = a
                .thinking
                .split(',')
                .map(|m| match m.trim() {
                    "off" => Ok(Some(false)),
                    "on" => Ok(Some(true)),
                    "default" => Ok(None),
                    o => anyhow::bail!("--thinking: `{o}` is not off, on or default"),
                })
                .collect::<Result<Vec<_>>>()?;
            let dtype: WeightDType = a.dtype.parse()?;
            let h = graft::Hybrid::load(&a.model, &device(&a.device)?, dtype)?;
            let o =
                graft::eval::EvalOptions { data: a.data, modes, max_new_tokens: a.max_new_tokens, samples: a.samples };
            let report = serde_json::to_string_pretty(&graft::eval::evaluate(&h, &o)?)?;
            if let Some(p) = &a.out {
                std::fs::write(p, &report)?;
            }
            println!("{report}");
            Ok(())
        }
        GraftCommand::Bench(a) => {
            let (w, h) = a
                .image
                .split_once('x')
                .and_then(|(w, h)| Some((w.parse().ok()?, h.parse().ok()?)))
                .ok_or_else(|| anyhow::anyhow!("--image must be WIDTHxHEIGHT, found `{}`", a.image))?;
            let r = graft::bench::bench(&graft::bench::BenchShape {
                vision_layers: a.vision_layers,
                lm_layers: a.lm_layers,
                image: (w, h),
                text_tokens: a.text_tokens,
                steps: a.steps,
                device: device(&a.device)?,
            })?;
            println!("{}", serde_json::to_string_pretty(&r)?);
            Ok(())
        }
    }
}
