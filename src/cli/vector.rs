//! `vector` subcommand: compute, inspect, combine, import/export llama.cpp control vectors.
use crate::cli::models::ModelArgs;
use anyhow::{bail, Context, Result};
use miniwob_steer::agent::PromptBuilder;
use miniwob_steer::experiment::plan::SeedPlan;
use miniwob_steer::protocol::Protocol;
use miniwob_steer::steering::caa::{self, CaaOptions, Method};
use miniwob_steer::steering::pairs;
use miniwob_steer::steering::vector::SteeringVector;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct VectorArgs {
    #[command(subcommand)]
    pub action: Option<VectorAction>,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

#[derive(clap::Subcommand, Debug)]
pub enum VectorAction {
    /// Print a vector file's metadata and norms; compare with another vector.
    Inspect {
        file: PathBuf,
        /// Cosine similarity to this vector, per shared layer.
        #[arg(long)]
        compare: Option<PathBuf>,
    },
    /// Normalise each vector, sum, normalise.
    Combine {
        files: Vec<PathBuf>,
        #[arg(long)]
        name: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Read a llama.cpp control vector (GGUF) into a vector file for a model.
    Import {
        gguf: PathBuf,
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        out: PathBuf,
    },
    /// A linear probe head's class direction (unit norm, at the head's layer) as a vector file.
    FromProbe {
        head: PathBuf,
        #[arg(long)]
        class: String,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
pub struct ComputeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt pair name (experiments/prompt_pairs.toml or --pairs).
    #[arg(long, default_value = "accuracy")]
    pub pair: String,
    /// Extra prompt-pair TOML.
    #[arg(long)]
    pub pairs: Option<PathBuf>,
    /// CAA method: prompt, response, response-text or pca [default: the protocol's caa.method].
    #[arg(long)]
    pub method: Option<Method>,
    /// Protocol file or built-in name (default, legacy): the prompt shape, the CAA join, read
    /// point and response settings (docs/protocols.md).
    #[arg(long, default_value = "default")]
    pub protocol: String,
    /// With --tasks: a seed plan (JSONL `{task, seed, split}`) whose `train` lines are the
    /// training episodes, in order, instead of --train-steps draws from --seed.
    #[arg(long, requires = "tasks")]
    pub plan: Option<PathBuf>,
    /// Layer(s): auto, N, or a comma-separated list.
    #[arg(long, default_value = "auto")]
    pub layer: String,
    /// Training prompts: JSONL with a `text` field per line (default: experiments/caa_texts.jsonl).
    #[arg(long)]
    pub texts: Option<PathBuf>,
    /// Use at most this many training prompts; with --tasks, the number of MiniWoB training
    /// episodes spread over the tasks (default 50).
    #[arg(long)]
    pub train_steps: Option<usize>,
    /// Build the training prompts from MiniWoB episodes of these tasks (`all` = the exp12 set),
    /// with the runner's prompt builder, instead of --texts.
    #[arg(long, conflicts_with = "texts")]
    pub tasks: Option<String>,
    /// Seed of the training episodes' seeds (as `run --seed`).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Response length of the response methods [default: the protocol's caa.response_tokens].
    #[arg(long)]
    pub response_tokens: Option<usize>,
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Also write a llama.cpp control vector.
    #[arg(long)]
    pub export_gguf: Option<PathBuf>,
}

pub const DEFAULT_TEXTS: &str = include_str!("../../experiments/caa_texts.jsonl");

pub fn parse_texts(text: &str, origin: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{origin}:{}: invalid JSON", i + 1))?;
        let t = v
            .get("text")
            .and_then(|t| t.as_str())
            .with_context(|| format!("{origin}:{}: expected an object with a string field `text`", i + 1))?;
        out.push(t.to_string());
    }
    if out.is_empty() {
        bail!("{origin}: no training texts");
    }
    Ok(out)
}

pub fn run(a: VectorArgs) -> Result<()> {
    match a.action {
        Some(VectorAction::Inspect { file, compare }) => inspect(&file, compare.as_deref()),
        Some(VectorAction::Combine { files, name, out }) => {
            let vs = files.iter().map(|f| SteeringVector::load(f)).collect::<Result<Vec<_>>>()?;
            SteeringVector::combine(&vs, &name)?.save(&out)?;
            eprintln!("wrote {}", out.display());
            Ok(())
        }
        Some(VectorAction::Import { gguf, model, out }) => {
            let m = model.load()?;
            SteeringVector::import_gguf(&gguf, &m.info)?.save(&out)?;
            eprintln!("wrote {}", out.display());
            Ok(())
        }
        Some(VectorAction::FromProbe { head, class, out }) => {
            miniwob_steer::probe::Head::load(&head)?.to_vector(&class)?.save(&out)?;
            eprintln!("wrote {}", out.display());
            Ok(())
        }
        None => compute(a.compute),
    }
}

fn compute(a: ComputeArgs) -> Result<()> {
    let out = a.out.clone().context("--out FILE.safetensors is required")?;
    let all = pairs::load(a.pairs.as_deref())?;
    let pair = pairs::find(&all, &a.pair)?.clone();
    let mut texts = match &a.texts {
        Some(p) => parse_texts(
            &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
            &p.display().to_string(),
        )?,
        None => parse_texts(DEFAULT_TEXTS, "experiments/caa_texts.jsonl")?,
    };
    if let Some(n) = a.train_steps {
        texts.truncate(n);
    }
    let protocol = std::sync::Arc::new(Protocol::load(&a.protocol)?);
    let builder = PromptBuilder::new(protocol.clone())?;
    let m = a.model.load()?;
    let layers = crate::cli::models::parse_layers(&a.layer, m.decoder.cfg.num_layers)?;
    let penalty = protocol.repetition_penalty(&m.info)?;
    let mut opts = CaaOptions::of_protocol(&protocol, layers, a.method.unwrap_or(protocol.file.caa.method), penalty);
    opts.batch_size = a.batch_size;
    if let Some(n) = a.response_tokens {
        opts.response_tokens = n;
    }
    let members: Vec<pairs::PromptPair> = match &pair.combine {
        Some(names) => names.iter().map(|n| pairs::find(&all, n).cloned()).collect::<Result<_>>()?,
        None => vec![pair.clone()],
    };
    let tasks = a.tasks.as_deref().map(miniwob_steer::experiment::settings::parse_tasks).transpose()?;
    let v = match &tasks {
        // The runner's own vector computation, on its training observations.
        Some(tasks) => {
            let items = match &a.plan {
                Some(p) => {
                    let plan = SeedPlan::read(p, miniwob_steer::env::tasks::valid_name)?;
                    if plan.train.is_empty() {
                        bail!("--plan {}: no \"train\" line", p.display());
                    }
                    plan.train
                }
                None => miniwob_steer::experiment::plan::training_items(tasks, a.train_steps.unwrap_or(50), a.seed),
            };
            let views = miniwob_steer::experiment::vectors::training_views_blocking(&items, &protocol, 2)?;
            miniwob_steer::experiment::vectors::compute(&m, &builder, &views, &all, &pair.name, &opts)?
        }
        None => {
            let mut vs = Vec::new();
            for p in &members {
                let prompts = caa::pair_prompts(&m, &builder, &texts, p)?;
                tracing::info!(pair = %p.name, samples = prompts.len(), method = opts.method.name(), "computing vector");
                vs.push(caa::compute(&m, &prompts, &p.name, &opts)?);
            }
            if vs.len() == 1 {
                vs.pop().unwrap()
            } else {
                SteeringVector::combine(&vs, &pair.name)?
            }
        }
    };
    v.save(&out)?;
    eprintln!(
        "wrote {} (protocol {}, pair {}, method {}, layers {:?}, {} samples)",
        out.display(),
        protocol.id(),
        pair.name,
        v.meta.method,
        v.layers.keys().collect::<Vec<_>>(),
        v.meta.samples
    );
    if let Some(g) = &a.export_gguf {
        v.export_gguf(g, m.decoder.cfg.family.name())?;
        eprintln!("wrote {}", g.display());
    }
    Ok(())
}

fn inspect(file: &Path, compare: Option<&Path>) -> Result<()> {
    let v = SteeringVector::load(file)?;
    println!("file: {}", file.display());
    println!("hash: {}", SteeringVector::file_hash(file)?);
    println!("{}", serde_json::to_string_pretty(&v.meta)?);
    for (l, t) in &v.layers {
        let n = t.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
        println!("layer {l} ({}): norm {n:.6}", SteeringVector::hook_point(*l));
    }
    if let Some(other) = compare {
        let w = SteeringVector::load(other)?;
        for (l, t) in &v.layers {
            if let Some(u) = w.layers.get(l) {
                println!(
                    "cosine with {} at layer {l}: {:.6}",
                    other.display(),
                    miniwob_steer::models::generate::cosine(t, u)?
                );
            }
        }
    }
    Ok(())
}
