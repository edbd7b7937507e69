//! `run`: its flags, their resolution into [`Settings`], and the command.
use anyhow::{bail, Context, Result};
use miniwob_steer::device::parse_device;
use miniwob_steer::experiment::config::{ExperimentFile, LayerSpec};
use miniwob_steer::experiment::plan::{SeedPlan, Shard};
use miniwob_steer::experiment::run::run_settings;
use miniwob_steer::experiment::settings::{parse_tasks, GateSettings, Settings};
use miniwob_steer::experiment::summary::{print_summary, print_table};
use miniwob_steer::models::dtype::DTypeChoice;
use miniwob_steer::models::registry;
use miniwob_steer::protocol::Protocol;
use miniwob_steer::steering::caa::{CoeffMode, Method};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(clap::Args, Debug, Clone, Default)]
pub struct RunArgs {
    /// Experiment file (TOML) or a built-in name (exp12, quick): default settings; flags override.
    #[arg(long)]
    pub experiment: Option<String>,
    /// Protocol file (TOML) or a built-in name (default, legacy): everything between the
    /// observation and the reward (prompt, DOM lines, parser, CAA read point and method,
    /// generation, success rule, page clock, select execution; docs/protocols.md).
    #[arg(long)]
    pub protocol: Option<String>,
    /// Seed plan (JSONL of `{"task", "seed", "split": "train"|"eval"}`): replaces the built-in
    /// seed ranges of the evaluation and of the vector's training episodes, in file order
    /// (replaces --tasks, --eval-steps and --train-steps).
    #[arg(long)]
    pub plan: Option<PathBuf>,
    /// Registry alias, transformers directory or .gguf file [default: the experiment's first
    /// model, else qwen-coder-0.5b].
    #[arg(long)]
    pub model: Option<String>,
    /// Pipeline stages (`stage serve` addresses, in order) instead of a local model
    /// (docs/stages.md).
    #[arg(long, conflicts_with = "model")]
    pub stages: Option<String>,
    /// Weight dtype: auto, f32, f16, bf16 or gguf [default: auto = bf16 on a GPU; on the CPU gguf for a GGUF checkpoint, else f32].
    #[arg(long)]
    pub dtype: Option<DTypeChoice>,
    /// cpu, cuda, cuda:N or auto (the GPU when this binary has CUDA and one is visible).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Layer to steer: auto (50% depth) or an index (blocks.{L}.hook_resid_post).
    #[arg(long)]
    pub layer: Option<String>,
    /// Steering coefficient(s), comma-separated: every one is a steered row beside the baseline.
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    pub coeff: Vec<f32>,
    /// absolute, or relative (a fraction of the mean residual norm at the layer).
    #[arg(long)]
    pub coeff_mode: Option<CoeffMode>,
    /// Contrastive prompt pair of the CAA vector: accuracy, terse, … (experiments/prompt_pairs.toml
    /// and --pairs); `--prompt-type` is exp12's name for it.
    #[arg(long, alias = "prompt-type")]
    pub pair: Option<String>,
    /// Extra prompt-pair TOML (its pairs beside the built-in ones; a name it defines replaces the built-in one).
    #[arg(long)]
    pub pairs: Option<PathBuf>,
    /// CAA method: prompt, response, response-text or pca [default: the protocol's caa.method].
    #[arg(long)]
    pub vector_method: Option<Method>,
    /// MiniWoB training episodes (observations, one per seed) the vector is computed from; seeds
    /// drawn from --seed, disjoint from the evaluation seeds.
    #[arg(long)]
    pub train_steps: Option<usize>,
    /// Evaluation seeds per task (each runs the baseline and every coefficient: one episode each).
    #[arg(long)]
    pub eval_steps: Option<usize>,
    /// Base seed: eval seeds are seed..seed+eval_steps; training seeds come from an RNG seeded with it.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Baseline episodes only (no vector).
    #[arg(long)]
    pub base_only: bool,
    /// Screenshot + Set-of-Marks observations for a VLM (Qwen2-VL: `--model qwen-vl-2b` or a
    /// checkpoint directory; a VLM model implies it). Steering acts on the LLM backbone only.
    #[arg(long)]
    pub vlm: bool,
    /// With --vlm: a contextual index (`lens index`); each step's result carries the top-3
    /// contextual neighbours of the vision tokens under the element acted on (docs/lens.md).
    #[arg(long)]
    pub lens: Option<PathBuf>,
    /// The LLM layer read by --lens (blocks.{L}.hook_resid_post) [default: the steering layer].
    #[arg(long)]
    pub lens_layer: Option<usize>,
    /// Comma-separated task names, or `all` (the 25-task exp12 set).
    #[arg(long)]
    pub tasks: Option<String>,
    /// Use this vector file instead of computing one.
    #[arg(long)]
    pub vector: Option<PathBuf>,
    /// Gated steering (conditional activation steering): a probe head (`probe train`); a steered
    /// row is steered on a step only when the head, read on that step's unsteered prompt, gives
    /// --gate-class a probability ≥ --gate-threshold. Each step's decision is in the result line.
    #[arg(long, requires = "gate_class")]
    pub gate: Option<PathBuf>,
    /// The head's class that turns steering on.
    #[arg(long, requires = "gate")]
    pub gate_class: Option<String>,
    /// Probability of --gate-class at or above which a row is steered.
    #[arg(long, default_value_t = 0.5)]
    pub gate_threshold: f32,
    /// A peft LoRA adapter directory (`adapter_config.json` + `adapter_model.safetensors`),
    /// `[NAME=]DIR`: every row runs the adapted model, unmerged; its `name@hash` is in every line
    /// and in the resume key.
    #[arg(long)]
    pub adapter: Option<String>,
    /// Browser sessions (concurrent episodes feeding one model).
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Bound (MiB) of the KV cache of prompt prefixes shared across episodes; 0 turns it off.
    /// Cached prefixes give bit-identical results (docs/determinism.md).
    #[arg(long, default_value_t = miniwob_steer::models::prefix_cache::DEFAULT_MB)]
    pub prefix_cache_mb: usize,
    /// Run shard i of n of the plan (default: SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT if set).
    #[arg(long)]
    pub shard: Option<String>,
    /// Model turns per episode.
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Generated tokens per model turn [default: the protocol's generation.max_new_tokens].
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// Experiment name in result lines [default: the experiment file's name, else `exp12`].
    #[arg(long)]
    pub name: Option<String>,
    /// Results file (JSONL, appended; a rerun resumes; locked while a run uses it).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Keep the lines of other configurations (another model, dtype, vector, …) that --out
    /// holds, and run this configuration's episodes beside them, instead of refusing the file.
    #[arg(long)]
    pub keep_other_configs: bool,
    /// Use a --vector computed on other weights of the same shape (e.g. the same model at
    /// another quantization).
    #[arg(long)]
    pub allow_foreign_vector: bool,
    /// Also write the summary as JSON here.
    #[arg(long)]
    pub summary_json: Option<PathBuf>,
    /// Where a computed vector is cached [default: <out dir>/vectors/…].
    #[arg(long)]
    pub vector_cache: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
    /// Print the experiment's sweep (`model<TAB>layer<TAB>modality` lines) and exit (run_exp12.sh).
    #[arg(long, hide = true)]
    pub print_sweep: bool,
    /// Print a paired table (baseline vs steered per model × layer × coefficient) of these
    /// result files and exit.
    #[arg(long, num_args = 1.., value_name = "FILE.jsonl")]
    pub print_table: Vec<PathBuf>,
}

/// Flags over the experiment file over the defaults.
fn settings(a: &RunArgs) -> Result<Settings> {
    {
        let f = match &a.experiment {
            Some(e) => ExperimentFile::load(e)?,
            None => ExperimentFile::default(),
        };
        let coeffs = if !a.coeff.is_empty() {
            a.coeff.clone()
        } else if !f.coeffs.is_empty() {
            f.coeffs.clone()
        } else {
            vec![3.0]
        };
        // The experiment file's coefficients were checked when it was parsed (naming the file).
        if let Some(c) = a.coeff.iter().find(|c| !c.is_finite() || **c == 0.0) {
            bail!("--coeff {c}: every coefficient must be finite and non-zero (α = 0 is the baseline, always run)");
        }
        let protocol = Arc::new(Protocol::load(a.protocol.as_deref().or(f.protocol.as_deref()).unwrap_or("default"))?);
        let plan = match &a.plan {
            Some(p) => {
                if a.tasks.is_some() || a.eval_steps.is_some() || a.train_steps.is_some() {
                    bail!(
                        "--plan {} fixes the tasks and seeds: drop --tasks, --eval-steps and --train-steps",
                        p.display()
                    );
                }
                let root = miniwob_steer::env::html_root()?;
                let known = |t: &str| {
                    miniwob_steer::env::tasks::valid_name(t) && miniwob_steer::env::tasks::task_exists(&root, t)
                };
                Some(Arc::new(SeedPlan::read(p, known)?))
            }
            None => None,
        };
        let tasks = match &plan {
            Some(p) => p.tasks(),
            None => parse_tasks(&a.tasks.clone().or(f.task_string()).unwrap_or_else(|| "all".into()))?,
        };
        let out = a.out.clone().context("--out FILE.jsonl is required")?;
        if out.extension().is_some_and(|e| e == "json") {
            bail!("--out {}: use a .jsonl file (one line per episode)", out.display());
        }
        let stages = a.stages.as_ref().map(|s| format!("{}{s}", miniwob_steer::stage::client::SCHEME));
        let model =
            stages.or(a.model.clone()).or(f.models.first().cloned()).unwrap_or_else(|| registry::DEFAULT_MODEL.into());
        Ok(Settings {
            experiment: a.name.clone().or(f.name.clone()).unwrap_or_else(|| "exp12".into()),
            model: model.clone(),
            dtype: a.dtype.or(f.dtype).unwrap_or_default().resolve_for(&parse_device(&a.device)?, &model),
            device: a.device.clone(),
            layer: a.layer.clone().or(f.layers.first().map(|l| l.to_string())).unwrap_or_else(|| "auto".into()),
            coeffs,
            coeff_mode: a.coeff_mode.or(f.coeff_mode).unwrap_or(CoeffMode::Absolute),
            pair: a.pair.clone().or(f.pair.clone()).unwrap_or_else(|| "accuracy".into()),
            pairs: a.pairs.clone(),
            vector_method: a.vector_method.or(f.vector_method).unwrap_or(protocol.file.caa.method),
            train_steps: match &plan {
                Some(p) => p.train.len(),
                None => a.train_steps.or(f.train_steps).unwrap_or(50),
            },
            eval_steps: match &plan {
                Some(p) => p.eval.len(),
                None => a.eval_steps.or(f.eval_steps).unwrap_or(10),
            },
            seed: a.seed.or(f.seed).unwrap_or(0),
            base_only: a.base_only,
            tasks,
            vector: a.vector.clone(),
            concurrency: a.concurrency.or(f.concurrency).unwrap_or(2).max(1),
            prefix_cache_mb: a.prefix_cache_mb,
            shard: Shard::resolve(a.shard.as_deref())?,
            max_steps: a.max_steps.or(f.max_steps).unwrap_or(1).max(1),
            max_new_tokens: a
                .max_new_tokens
                .or(f.max_new_tokens)
                .unwrap_or(protocol.file.generation.max_new_tokens)
                .max(1),
            out,
            keep_other_configs: a.keep_other_configs,
            allow_foreign_vector: a.allow_foreign_vector,
            protocol,
            plan,
            gate: match (&a.gate, &a.gate_class) {
                (Some(p), Some(c)) if !a.base_only => Some(GateSettings::load(p, c, a.gate_threshold)?),
                (Some(_), _) if a.base_only => bail!("--gate with --base-only: there is no steering to gate"),
                _ => None,
            },
            adapter: a.adapter.clone(),
        })
    }
}

/// The `run` subcommand.
pub fn run(a: RunArgs) -> Result<()> {
    if a.print_sweep {
        return sweep(&a);
    }
    if !a.print_table.is_empty() {
        return print_table(&a.print_table);
    }
    let s = settings(&a)?;
    let lens = a.lens.as_deref().map(|p| (p, a.lens_layer));
    let summary = run_settings(&s, a.vlm, a.vector_cache.as_deref(), !a.no_progress, lens)?;
    print_summary(&summary);
    if let Some(p) = &a.summary_json {
        std::fs::write(p, serde_json::to_string_pretty(&summary)? + "\n")
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if summary.failed_pairs > 0 {
        bail!("{} (task, seed) pairs failed (see the log); rerun the same command to retry them", summary.failed_pairs);
    }
    Ok(())
}

fn sweep(a: &RunArgs) -> Result<()> {
    let f = ExperimentFile::load(a.experiment.as_deref().context("--print-sweep needs --experiment")?)?;
    let layers: Vec<LayerSpec> =
        if f.layers.is_empty() { vec![LayerSpec::Name("auto".into())] } else { f.layers.clone() };
    for (models, modality) in [(&f.models, "text"), (&f.vlm_models, "vlm")] {
        for m in models {
            for l in &layers {
                println!("{m}\t{l}\t{modality}");
            }
        }
    }
    Ok(())
}
