//! The `run` subcommand: compute (or load) the steering vector from MiniWoB training episodes,
//! then evaluate paired baseline/steered episodes, resumably, one result line per episode.
use super::config::{ExperimentFile, LayerSpec};
use super::plan::{self, Item, Shard};
use super::results::{episode_key, EpisodeLine, ResultsFile, RunConfig};
use crate::agent::generator::GenStats;
use crate::agent::{Agent, Arm, EpisodeOutcome, Generator, GeneratorConfig, PromptBuilder, Steering};
use crate::env::{self, EnvConfig, EnvError, Observation, Pool};
use crate::gpu::device::DTypeChoice;
use crate::models::cli::parse_device;
use crate::models::hooks::HookPoint;
use crate::models::load::{LoadedModel, ModelInfo};
use crate::models::prefix_cache::CacheStats;
use crate::models::registry;
use crate::models::weights::WeightDType;
use crate::steering::caa::{self, CaaOptions, CoeffMode, Method};
use crate::steering::pairs;
use crate::steering::vector::SteeringVector;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug, Clone, Default)]
pub struct RunArgs {
    /// Experiment file (TOML) or a built-in name (exp12, quick): default settings; flags override.
    #[arg(long)]
    pub experiment: Option<String>,
    /// Registry alias, transformers directory or .gguf file [default: the experiment's first
    /// model, else qwen-coder-0.5b].
    #[arg(long)]
    pub model: Option<String>,
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
    #[arg(long, value_enum)]
    pub coeff_mode: Option<CoeffMode>,
    /// Contrastive prompt pair (exp12's --prompt-type): accuracy, terse, … (experiments/prompt_pairs.toml).
    #[arg(long)]
    pub prompt_type: Option<String>,
    /// Extra prompt-pair TOML.
    #[arg(long)]
    pub pairs: Option<PathBuf>,
    /// CAA method: prompt, response or pca.
    #[arg(long, value_enum)]
    pub vector_method: Option<Method>,
    /// MiniWoB training episodes for the vector (seeds drawn from --seed, disjoint from eval seeds).
    #[arg(long)]
    pub train_steps: Option<usize>,
    /// Evaluation episodes (seeds) per task.
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
    /// Browser sessions (concurrent episodes feeding one model).
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Bound (MiB) of the KV cache of prompt prefixes shared across episodes; 0 turns it off.
    /// Cached prefixes give bit-identical results (docs/determinism.md).
    #[arg(long, default_value_t = crate::models::prefix_cache::DEFAULT_MB)]
    pub prefix_cache_mb: usize,
    /// Run shard i of n of the plan (default: SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT if set).
    #[arg(long)]
    pub shard: Option<String>,
    /// Model turns per episode.
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Generated tokens per model turn.
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

/// Settings after merging flags, the experiment file and defaults.
#[derive(Debug, Clone)]
pub struct Settings {
    pub experiment: String,
    pub model: String,
    pub dtype: WeightDType,
    pub device: String,
    pub layer: String,
    pub coeffs: Vec<f32>,
    pub coeff_mode: CoeffMode,
    pub prompt_type: String,
    pub vector_method: Method,
    pub train_steps: usize,
    pub eval_steps: usize,
    pub seed: u64,
    pub base_only: bool,
    pub tasks: Vec<String>,
    pub vector: Option<PathBuf>,
    pub concurrency: usize,
    pub prefix_cache_mb: usize,
    pub shard: Shard,
    pub max_steps: usize,
    pub max_new_tokens: usize,
    pub out: PathBuf,
    pub keep_other_configs: bool,
    pub allow_foreign_vector: bool,
}

fn parse_method(s: &str) -> Result<Method> {
    Ok(match s {
        "prompt" => Method::Prompt,
        "response" => Method::Response,
        "pca" => Method::Pca,
        o => bail!("vector_method {o:?}: expected prompt, response or pca"),
    })
}

fn parse_mode(s: &str) -> Result<CoeffMode> {
    Ok(match s {
        "absolute" => CoeffMode::Absolute,
        "relative" => CoeffMode::Relative,
        o => bail!("coeff_mode {o:?}: expected absolute or relative"),
    })
}

/// `all` → the exp12 set; otherwise a comma-separated list (order kept, duplicates dropped).
pub fn parse_tasks(s: &str) -> Result<Vec<String>> {
    if s.trim() == "all" {
        return Ok(env::EXP12_TASKS.iter().map(|t| t.to_string()).collect());
    }
    let mut out: Vec<String> = Vec::new();
    for t in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        if !env::tasks::valid_name(t) {
            bail!("--tasks: `{t}` is not a task name");
        }
        if !out.iter().any(|o| o == t) {
            out.push(t.to_string());
        }
    }
    if out.is_empty() {
        bail!("--tasks: no task given");
    }
    Ok(out)
}

impl Settings {
    pub fn resolve(a: &RunArgs) -> Result<Settings> {
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
        let tasks = parse_tasks(&a.tasks.clone().or(f.task_string()).unwrap_or_else(|| "all".into()))?;
        let out = a.out.clone().context("--out FILE.jsonl is required")?;
        if out.extension().is_some_and(|e| e == "json") {
            bail!("--out {}: use a .jsonl file (one line per episode)", out.display());
        }
        let model = a.model.clone().or(f.models.first().cloned()).unwrap_or_else(|| registry::DEFAULT_MODEL.into());
        Ok(Settings {
            experiment: a.name.clone().or(f.name.clone()).unwrap_or_else(|| "exp12".into()),
            model: model.clone(),
            dtype: match (a.dtype, &f.dtype) {
                (Some(d), _) => d,
                (None, Some(s)) => s.parse::<DTypeChoice>().map_err(|e| anyhow::anyhow!("dtype {s:?}: {e}"))?,
                (None, None) => DTypeChoice::Auto,
            }
            .resolve_for(&parse_device(&a.device)?, &model),
            device: a.device.clone(),
            layer: a.layer.clone().or(f.layers.first().map(|l| l.to_string())).unwrap_or_else(|| "auto".into()),
            coeffs,
            coeff_mode: match (a.coeff_mode, &f.coeff_mode) {
                (Some(m), _) => m,
                (None, Some(s)) => parse_mode(s)?,
                (None, None) => CoeffMode::Absolute,
            },
            prompt_type: a.prompt_type.clone().or(f.prompt_type.clone()).unwrap_or_else(|| "accuracy".into()),
            vector_method: match (a.vector_method, &f.vector_method) {
                (Some(m), _) => m,
                (None, Some(s)) => parse_method(s)?,
                (None, None) => Method::Prompt,
            },
            train_steps: a.train_steps.or(f.train_steps).unwrap_or(50),
            eval_steps: a.eval_steps.or(f.eval_steps).unwrap_or(10),
            seed: a.seed.or(f.seed).unwrap_or(0),
            base_only: a.base_only,
            tasks,
            vector: a.vector.clone(),
            concurrency: a.concurrency.or(f.concurrency).unwrap_or(2).max(1),
            prefix_cache_mb: a.prefix_cache_mb,
            shard: Shard::resolve(a.shard.as_deref())?,
            max_steps: a.max_steps.or(f.max_steps).unwrap_or(1).max(1),
            max_new_tokens: a.max_new_tokens.or(f.max_new_tokens).unwrap_or(40).max(1),
            out,
            keep_other_configs: a.keep_other_configs,
            allow_foreign_vector: a.allow_foreign_vector,
        })
    }
}

/// `git describe` of the harness source tree, else the crate version.
/// α as the user wrote it: the shortest decimal that round-trips the f32 (`0.1`, not the
/// `0.10000000149011612` that a widening cast writes into JSON and resume keys).
pub fn coeff_f64(c: f32) -> f64 {
    c.to_string().parse().unwrap_or(c as f64)
}

pub fn harness_version() -> String {
    static V: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    V.get_or_init(|| {
        std::process::Command::new("git")
            .args(["describe", "--always", "--dirty", "--tags"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stderr(std::process::Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .filter(|s| !s.is_empty())
            .map(|s| format!("{} ({s})", env!("CARGO_PKG_VERSION")))
            .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_string())
    })
    .clone()
}

/// What the run records in every line besides the episode itself.
#[derive(Debug, Clone)]
pub struct RunMeta {
    pub experiment: String,
    pub info: ModelInfo,
    pub layer: Option<usize>,
    pub coeff_mode: CoeffMode,
    pub vector_hash: Option<String>,
    pub prompt_pair: Option<String>,
    pub vector_method: Option<String>,
    pub harness: String,
    /// What else decides the outcome (model, dtype, vector source, …): part of every key.
    pub config: RunConfig,
    pub config_id: String,
}

impl RunMeta {
    /// The run's metadata; `vector_file_hash` is the hash of `--vector` when one is given.
    pub fn new(
        s: &Settings,
        info: &ModelInfo,
        layer: Option<usize>,
        vlm: bool,
        vector_file_hash: Option<&str>,
    ) -> RunMeta {
        let vector_source = match (s.base_only, vector_file_hash) {
            (true, _) => None,
            (false, Some(h)) => Some(format!("file:{h}")),
            // The vector cache is keyed by model, pair, method, layer, train steps and seed; the
            // first three are in every key already.
            (false, None) => Some(format!("caa:n={},seed={}", s.train_steps, s.seed)),
        };
        let config = RunConfig {
            experiment: s.experiment.clone(),
            model: info.name.clone(),
            weights_hash: info.weights_hash.clone(),
            dtype: info.dtype.clone(),
            vlm,
            coeff_mode: coeff_mode_name(s.coeff_mode).into(),
            vector_source,
            max_steps: Some(s.max_steps),
            max_new_tokens: Some(s.max_new_tokens),
        };
        RunMeta {
            experiment: s.experiment.clone(),
            info: info.clone(),
            layer: if s.base_only { None } else { layer },
            coeff_mode: s.coeff_mode,
            vector_hash: None,
            prompt_pair: (!s.base_only).then(|| s.prompt_type.clone()),
            vector_method: (!s.base_only).then(|| s.vector_method.name().to_string()),
            harness: harness_version(),
            config_id: config.id(),
            config,
        }
    }

    pub fn key(&self, task: &str, seed: u64, condition: &str, coeff: f32) -> String {
        episode_key(
            task,
            seed,
            condition,
            coeff_f64(coeff),
            self.layer,
            self.prompt_pair.as_deref(),
            self.vector_method.as_deref(),
            &self.config_id,
        )
    }

    pub fn line(&self, task: &str, seed: u64, ep: &EpisodeOutcome) -> EpisodeLine {
        EpisodeLine {
            experiment: self.experiment.clone(),
            model: self.info.name.clone(),
            checkpoint: self.info.checkpoint.clone(),
            weights_hash: self.info.weights_hash.clone(),
            dtype: self.info.dtype.clone(),
            batch_invariant: self.info.batch_invariant,
            layer: self.layer,
            hook_point: self.layer.map(|l| HookPoint::ResidPost(l).to_string()),
            coeff: coeff_f64(ep.coeff),
            coeff_mode: coeff_mode_name(self.coeff_mode).into(),
            vector_hash: self.vector_hash.clone(),
            prompt_pair: self.prompt_pair.clone(),
            vector_method: self.vector_method.clone(),
            task: task.to_string(),
            seed,
            condition: ep.condition.to_string(),
            vlm: self.config.vlm,
            prompt_hash: ep.prompt_hash.clone(),
            output: ep.output.clone(),
            actions: ep.actions.clone(),
            parse_failure: ep.parse_failure,
            raw_reward: ep.raw_reward,
            reward: ep.reward,
            success: ep.success,
            steps: ep.steps,
            wall_s: ep.wall_s,
            tokens_in: ep.tokens_in,
            tokens_out: ep.tokens_out,
            vector_source: self.config.vector_source.clone(),
            max_steps: self.config.max_steps,
            max_new_tokens: self.config.max_new_tokens,
            harness_version: self.harness.clone(),
            key: self.key(task, seed, ep.condition, ep.coeff),
            lens: None,
        }
    }
}

fn coeff_mode_name(m: CoeffMode) -> &'static str {
    match m {
        CoeffMode::Absolute => "absolute",
        CoeffMode::Relative => "relative",
    }
}

/// Success and parse-failure counts of one condition (one coefficient).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Tally {
    pub episodes: usize,
    pub successes: usize,
    pub parse_failures: usize,
}

impl Tally {
    pub fn add(&mut self, success: bool, parse_failure: bool) {
        self.episodes += 1;
        self.successes += usize::from(success);
        self.parse_failures += usize::from(parse_failure);
    }
    pub fn rate(&self) -> f64 {
        if self.episodes == 0 {
            0.0
        } else {
            self.successes as f64 / self.episodes as f64
        }
    }
    pub fn pf_rate(&self) -> f64 {
        if self.episodes == 0 {
            0.0
        } else {
            self.parse_failures as f64 / self.episodes as f64
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SteeredSummary {
    pub coeff: f32,
    pub success_rate: f64,
    pub delta: f64,
    pub parse_failure_rate: f64,
    #[serde(flatten)]
    pub tally: Tally,
}

/// The end-of-run summary (printed, and written by `--summary-json`).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub experiment: String,
    pub model: String,
    pub layer: Option<usize>,
    pub prompt_pair: Option<String>,
    pub vector_method: Option<String>,
    pub shard: String,
    pub out: String,
    pub baseline_success_rate: f64,
    pub baseline_parse_failure_rate: f64,
    pub baseline: Tally,
    pub steered: Vec<SteeredSummary>,
    /// Episodes of this run (shard) in the results file.
    pub episodes: usize,
    /// Episodes run by this invocation (the rest were already there).
    pub new_episodes: usize,
    pub planned_episodes: usize,
    pub failed_pairs: usize,
    pub wall_s: f64,
    /// Seconds of the evaluation phase alone (browsers up and vector ready → last episode).
    pub eval_s: f64,
    /// Rows per generation batch over this invocation (0 when nothing ran).
    pub rows_per_batch: f64,
    /// What the prefix cache served over this invocation's episodes.
    pub prefix_cache: CacheStats,
}

/// Live counts for the progress bar and the summary.
#[derive(Debug, Default, Clone)]
pub struct Counts {
    pub baseline: Tally,
    pub steered: BTreeMap<String, (f32, Tally)>,
}

impl Counts {
    pub fn add(&mut self, condition: &str, coeff: f32, success: bool, parse_failure: bool) {
        if condition == "baseline" {
            self.baseline.add(success, parse_failure);
        } else {
            self.steered.entry(format!("{coeff:?}")).or_insert((coeff, Tally::default())).1.add(success, parse_failure);
        }
    }

    pub fn message(&self) -> String {
        let b = &self.baseline;
        let mut s = format!("base {}/{} ({:.0}%)", b.successes, b.episodes, 100.0 * b.rate());
        for (c, t) in self.steered.values() {
            s.push_str(&format!(
                " | α={c} {}/{} ({:.0}%) Δ {:+.1}pp",
                t.successes,
                t.episodes,
                100.0 * t.rate(),
                100.0 * (t.rate() - b.rate())
            ));
        }
        s
    }
}

fn arms(s: &Settings) -> Vec<Arm> {
    let mut v = vec![Arm { condition: "baseline", coeff: 0.0 }];
    if !s.base_only {
        v.extend(s.coeffs.iter().map(|&c| Arm { condition: "steered", coeff: c }));
    }
    v
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

fn vector_cache_path(s: &Settings, explicit: Option<&Path>, layer: usize, model: &str) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    let dir = s.out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).join("vectors");
    let safe: String =
        model.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '_' }).collect();
    dir.join(format!(
        "{safe}_{}_{}_L{layer}_n{}_s{}.safetensors",
        s.prompt_type,
        s.vector_method.name(),
        s.train_steps,
        s.seed
    ))
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

pub(crate) fn env_config() -> EnvConfig {
    // Generation time counts against the page's clock; keep the limit far away.
    EnvConfig { episode_max_time_ms: 600_000, ..EnvConfig::default() }
}

/// Observations of the training episodes (reset only), in order.
pub(crate) async fn training_observations(pool: &Pool, items: &[(String, u64)]) -> Result<Vec<Observation>> {
    let mut set = tokio::task::JoinSet::new();
    for (i, (task, seed)) in items.iter().cloned().enumerate() {
        let pool = pool.clone();
        set.spawn(async move {
            let mut tries = 0;
            loop {
                let mut s = pool.acquire().await?;
                match s.reset(&task, seed).await {
                    Ok(o) => return Ok::<_, EnvError>((i, o)),
                    Err(e) if e.is_retryable() && tries < 3 => tries += 1,
                    Err(e) => return Err(e),
                }
            }
        });
    }
    let mut out: Vec<Option<Observation>> = vec![None; items.len()];
    while let Some(r) = set.join_next().await {
        let (i, o) = r.context("training episode task")??;
        out[i] = Some(o);
    }
    Ok(out.into_iter().flatten().collect())
}

/// Computes the CAA vector at `layer` from MiniWoB training observations with the evaluation
/// prompt builder, and saves it to `path` (no clobbering: when another process wrote the file
/// first, that one is used so every shard records the same vector hash).
async fn compute_vector(
    pool: &Pool,
    model: &LoadedModel,
    s: &Settings,
    layer: usize,
    path: &Path,
) -> Result<SteeringVector> {
    let all = pairs::load(None)?;
    let pair = pairs::find(&all, &s.prompt_type)?.clone();
    if s.train_steps == 0 {
        bail!("--train-steps 0: a steering vector needs training episodes (or pass --vector FILE, or --base-only)");
    }
    let items = plan::training_items(&s.tasks, s.train_steps, s.seed);
    let t0 = Instant::now();
    let obs = training_observations(pool, &items).await?;
    tracing::info!(episodes = obs.len(), "training observations in {:.1}s", t0.elapsed().as_secs_f64());
    let members: Vec<pairs::PromptPair> = match &pair.combine {
        Some(names) => names.iter().map(|n| pairs::find(&all, n).cloned()).collect::<Result<_>>()?,
        None => vec![pair.clone()],
    };
    let builder = PromptBuilder::default();
    let opts = CaaOptions { layers: vec![layer], method: s.vector_method, batch_size: 4, response_tokens: 32 };
    let mut vs = Vec::new();
    for p in &members {
        let prompts = builder.caa_pairs(&model.tokenizer, &obs, p)?;
        vs.push(caa::compute(model, &prompts, &p.name, &opts)?);
    }
    let v = if vs.len() == 1 { vs.pop().unwrap() } else { SteeringVector::combine(&vs, &pair.name)? };
    tracing::info!("vector computed in {:.1}s", t0.elapsed().as_secs_f64());
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp{}.safetensors", std::process::id()));
    v.save(&tmp)?;
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(v),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            tracing::info!("{} appeared meanwhile (another shard); using it", path.display());
            SteeringVector::load(path)
        }
        Err(e) => Err(e).with_context(|| format!("saving {}", path.display())),
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
    let s = Settings::resolve(&a)?;
    let summary = if a.vlm || super::vlm::is_vlm_model(&s.model) {
        if !super::vlm::is_vlm_model(&s.model) {
            bail!(
                "--vlm needs a vision-language model (--model qwen-vl-2b or a Qwen2-VL directory); `{}` is not one",
                s.model
            );
        }
        super::vlm::execute(
            &s,
            a.vector_cache.as_deref(),
            !a.no_progress,
            a.lens.as_deref().map(|p| (p, a.lens_layer)),
        )?
    } else {
        if a.lens.is_some() {
            bail!("--lens reads vision tokens: it needs --vlm and a Qwen2-VL model");
        }
        execute(&s, a.vector_cache.as_deref(), !a.no_progress)?
    };
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

/// A markdown table of result files: per (experiment, model, layer, prompt pair, coefficient), the
/// baseline and steered success and parse-failure rates and Δ (no confidence intervals: `analyze`
/// has them).
pub fn print_table(files: &[PathBuf]) -> Result<()> {
    type Group = (String, String, String, String);
    /// (task, seed, success) of each steered episode.
    type Outcomes = Vec<(String, u64, bool)>;
    let mut base: BTreeMap<Group, Tally> = BTreeMap::new();
    let mut steer: BTreeMap<(Group, String), Tally> = BTreeMap::new();
    // Success per (task, seed), for the paired differences behind the Δ interval.
    let mut base_by_ep: BTreeMap<(Group, String, u64), bool> = BTreeMap::new();
    let mut steer_by_ep: BTreeMap<(Group, String), Outcomes> = BTreeMap::new();
    for f in files {
        let text = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        let mut skipped: Vec<(usize, String)> = Vec::new();
        let parsed = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()).filter_map(|(i, l)| {
            serde_json::from_str::<EpisodeLine>(l).map_err(|e| skipped.push((i + 1, e.to_string()))).ok()
        });
        let parsed: Vec<EpisodeLine> = parsed.collect();
        if !skipped.is_empty() {
            // Never silently: a table of fewer lines than the file holds says so, and why.
            let shown: Vec<String> = skipped.iter().take(5).map(|(n, e)| format!("line {n}: {e}")).collect();
            tracing::warn!(
                "{}: {} lines skipped (not episode results): {}{}",
                f.display(),
                skipped.len(),
                shown.join("; "),
                if skipped.len() > 5 { "; …" } else { "" }
            );
        }
        for l in parsed {
            let g = (
                l.experiment.clone(),
                l.model.clone(),
                l.layer.map_or("-".into(), |x| x.to_string()),
                l.prompt_pair.clone().unwrap_or_else(|| "-".into()),
            );
            if l.condition == "baseline" {
                base_by_ep.insert((g.clone(), l.task.clone(), l.seed), l.success);
                base.entry(g).or_default().add(l.success, l.parse_failure);
            } else {
                let key = (g, format!("{}", l.coeff));
                steer_by_ep.entry(key.clone()).or_default().push((l.task.clone(), l.seed, l.success));
                steer.entry(key).or_default().add(l.success, l.parse_failure);
            }
        }
    }
    println!("| experiment | model | layer | pair | α | n | baseline success | steered success | Δ (pp) | Δ 95% CI (pp, paired) | baseline parse fail | steered parse fail |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let pct = |x: f64| format!("{:.1}%", 100.0 * x);
    for (g, b) in &base {
        let rows: Vec<_> = steer.iter().filter(|((sg, _), _)| sg == g).collect();
        if rows.is_empty() {
            println!(
                "| {} | {} | {} | {} | - | {} | {} | - | - | - | {} | - |",
                g.0,
                g.1,
                g.2,
                g.3,
                b.episodes,
                pct(b.rate()),
                pct(b.pf_rate())
            );
        }
        for (key @ (_, c), t) in rows {
            let diffs: Vec<f64> = steer_by_ep
                .get(key)
                .into_iter()
                .flatten()
                .filter_map(|(task, seed, ok)| {
                    base_by_ep
                        .get(&(g.clone(), task.clone(), *seed))
                        .map(|&b| f64::from(u8::from(*ok)) - f64::from(u8::from(b)))
                })
                .collect();
            let ci =
                paired_ci95(&diffs).map_or("-".into(), |(lo, hi)| format!("[{:+.1}, {:+.1}]", 100.0 * lo, 100.0 * hi));
            println!(
                "| {} | {} | {} | {} | {c} | {} | {} | {} | {:+.1} | {ci} | {} | {} |",
                g.0,
                g.1,
                g.2,
                g.3,
                t.episodes,
                pct(b.rate()),
                pct(t.rate()),
                100.0 * (t.rate() - b.rate()),
                pct(b.pf_rate()),
                pct(t.pf_rate())
            );
        }
    }
    Ok(())
}

/// Normal-approximation 95% interval of the mean paired difference (steered − baseline success
/// on the same task and seed). The `analyze` binary gives bootstrap intervals and McNemar; this
/// is the dependency-free fallback the quick job prints when analyze is not built.
pub fn paired_ci95(diffs: &[f64]) -> Option<(f64, f64)> {
    let n = diffs.len();
    if n < 2 {
        return None;
    }
    let mean = diffs.iter().sum::<f64>() / n as f64;
    let var = diffs.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let half = 1.96 * (var / n as f64).sqrt();
    Some((mean - half, mean + half))
}

pub fn print_summary(s: &Summary) {
    let mut line = format!(
        "summary: {} {} L{} | baseline {}/{} = {:.1}% (parse failures {:.1}%)",
        s.experiment,
        s.model,
        s.layer.map_or("-".into(), |l| l.to_string()),
        s.baseline.successes,
        s.baseline.episodes,
        100.0 * s.baseline_success_rate,
        100.0 * s.baseline_parse_failure_rate
    );
    for st in &s.steered {
        line.push_str(&format!(
            " | steered α={} {}/{} = {:.1}% (parse failures {:.1}%) Δ {:+.1}pp",
            st.coeff,
            st.tally.successes,
            st.tally.episodes,
            100.0 * st.success_rate,
            100.0 * st.parse_failure_rate,
            100.0 * st.delta
        ));
    }
    line.push_str(&format!(" | {} episodes ({} new) in {:.1}s → {}", s.episodes, s.new_episodes, s.wall_s, s.out));
    println!("{line}");
}

/// A `--vector` file, read and checked before the model loads and browsers start (a bad file
/// fails in a second, not after minutes of setup): (vector, path, file hash).
pub(crate) fn given_vector(s: &Settings) -> Result<Option<(SteeringVector, PathBuf, String)>> {
    match (&s.vector, s.base_only) {
        (Some(p), false) => Ok(Some((SteeringVector::load(p)?, p.clone(), SteeringVector::file_hash(p)?))),
        _ => Ok(None),
    }
}

/// Checks a given vector against the loaded model and the layer, with the file named.
pub(crate) fn check_given_vector(
    given: &Option<(SteeringVector, PathBuf, String)>,
    info: &ModelInfo,
    layer: Option<usize>,
    allow_foreign: bool,
) -> Result<()> {
    if let Some((v, p, _)) = given {
        let ctx = || format!("--vector {}", p.display());
        v.check_model(info, allow_foreign).with_context(ctx)?;
        if let Some(l) = layer {
            v.layer(l).with_context(ctx)?;
        }
    }
    Ok(())
}

/// The error a task returns when the results file could not be written: the run stops.
#[derive(Debug)]
pub(crate) struct WriteFailed;

impl std::fmt::Display for WriteFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the results file could not be written; the run stopped")
    }
}

/// Lines of this configuration in the file with another vector hash than this run's vector:
/// the vector cache was replaced since they were written.
pub(crate) fn check_vector_hash(results: &ResultsFile, hash: Option<&str>, path: &Path) -> Result<()> {
    let Some(h) = hash else { return Ok(()) };
    if let Some(l) = results.lines.iter().find(|l| l.vector_hash.as_deref().is_some_and(|x| x != h)) {
        bail!(
            "{}: its lines of this configuration were made with vector {}, but this run's vector ({}) is {h}; \
             use another --out (or bring back the vector they used)",
            results.path().display(),
            l.vector_hash.as_deref().unwrap_or("-"),
            path.display()
        );
    }
    Ok(())
}

/// Runs the plan of `s` and returns its summary.
pub fn execute(s: &Settings, vector_cache: Option<&Path>, progress: bool) -> Result<Summary> {
    let t_run = Instant::now();
    let root = env::html_root()?;
    for t in &s.tasks {
        if !env::tasks::task_exists(&root, t) {
            bail!("unknown task `{t}` (not in {}; see `miniwob-steer tasks`)", root.display());
        }
    }
    let given = given_vector(s)?;
    let model = Arc::new(LoadedModel::load(&s.model, &parse_device(&s.device)?, s.dtype)?);
    let layer = if s.base_only && s.vector.is_none() {
        None
    } else {
        Some(registry::parse_layer(&s.layer, model.info.num_layers)?)
    };
    check_given_vector(&given, &model.info, layer, s.allow_foreign_vector)?;
    let arms = arms(s);
    let items = plan::shard(&plan::expand(&s.tasks, s.eval_steps, s.seed)?, s.shard);
    let mut meta = RunMeta::new(s, &model.info, layer, false, given.as_ref().map(|g| g.2.as_str()));
    let results = ResultsFile::open(&s.out, &meta.config, s.keep_other_configs)?;
    let pending = pending(&items, &arms, &results, &meta);
    let planned = items.len() * arms.len();
    tracing::info!(
        shard = %s.shard, planned, done = planned - pending.iter().map(|p| p.1.len()).sum::<usize>(),
        "plan: {} tasks × {} seeds × {} conditions", s.tasks.len(), s.eval_steps, arms.len()
    );
    let results = Arc::new(Mutex::new(results));
    let counts = Arc::new(Mutex::new(Counts::default()));
    let mut failed = 0usize;
    let mut eval_s = 0.0;
    let mut gen = GenStats::default();
    if !pending.is_empty() {
        let rt = runtime()?;
        let r = rt.block_on(evaluate(
            s,
            vector_cache,
            model.clone(),
            layer,
            given,
            &meta,
            pending,
            results.clone(),
            counts.clone(),
            progress,
        ));
        rt.shutdown_timeout(Duration::from_secs(5));
        let (f, vh, e, g) = r?;
        failed = f;
        meta.vector_hash = vh;
        eval_s = e;
        gen = g;
    }
    let results = results.lock().unwrap_or_else(|p| p.into_inner());
    let mut summary = summarize(s, &meta, &items, &arms, layer, &results, (failed, eval_s), t_run)?;
    summary.rows_per_batch = gen.rows as f64 / gen.batches.max(1) as f64;
    summary.prefix_cache = gen.cache;
    Ok(summary)
}

/// The plan's (item, arms) pairs that have no line in `results` yet.
pub(crate) fn pending(items: &[Item], arms: &[Arm], results: &ResultsFile, meta: &RunMeta) -> Vec<(Item, Vec<Arm>)> {
    items
        .iter()
        .filter_map(|it| {
            let todo: Vec<Arm> = arms
                .iter()
                .filter(|a| !results.contains(&meta.key(&it.task, it.seed, a.condition, a.coeff)))
                .cloned()
                .collect();
            (!todo.is_empty()).then(|| (it.clone(), todo))
        })
        .collect()
}

/// The run's summary, counted from the results file: every line of this run's (shard's) plan
/// and configuration, old and new. `outcome` is (failed pairs, evaluation seconds).
#[allow(clippy::too_many_arguments)]
pub(crate) fn summarize(
    s: &Settings,
    meta: &RunMeta,
    items: &[Item],
    arms: &[Arm],
    layer: Option<usize>,
    results: &ResultsFile,
    (failed, eval_s): (usize, f64),
    t_run: Instant,
) -> Result<Summary> {
    let keys: std::collections::HashSet<String> = items
        .iter()
        .flat_map(|it| arms.iter().map(|a| meta.key(&it.task, it.seed, a.condition, a.coeff)).collect::<Vec<_>>())
        .collect();
    let mut c = Counts::default();
    let mut episodes = 0;
    for l in &results.lines {
        if keys.contains(&l.key) {
            episodes += 1;
            c.add(&l.condition, l.coeff as f32, l.success, l.parse_failure);
        }
    }
    let base_rate = c.baseline.rate();
    Ok(Summary {
        experiment: s.experiment.clone(),
        model: meta.info.name.clone(),
        layer,
        prompt_pair: meta.prompt_pair.clone(),
        vector_method: meta.vector_method.clone(),
        shard: s.shard.to_string(),
        out: s.out.display().to_string(),
        baseline_success_rate: base_rate,
        baseline_parse_failure_rate: c.baseline.pf_rate(),
        baseline: c.baseline.clone(),
        steered: c
            .steered
            .values()
            .map(|(coeff, t)| SteeredSummary {
                coeff: *coeff,
                success_rate: t.rate(),
                delta: t.rate() - base_rate,
                parse_failure_rate: t.pf_rate(),
                tally: t.clone(),
            })
            .collect(),
        episodes,
        new_episodes: results.appended,
        planned_episodes: items.len() * arms.len(),
        failed_pairs: failed,
        wall_s: t_run.elapsed().as_secs_f64(),
        eval_s,
        rows_per_batch: 0.0,
        prefix_cache: CacheStats::default(),
    })
}

/// Waits for the episode tasks. A task that could not write its lines ([`WriteFailed`]) stops
/// the run: the others are abandoned (nothing half-written: every append is whole or rolled
/// back) and its error is returned. Otherwise returns the number of failed pairs.
pub(crate) async fn join_episodes(set: &mut tokio::task::JoinSet<Result<()>>) -> Result<usize> {
    let mut failed = 0;
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) if e.downcast_ref::<WriteFailed>().is_some() => {
                set.abort_all();
                while set.join_next().await.is_some() {}
                return Err(e);
            }
            Ok(Err(e)) => {
                failed += 1;
                tracing::error!("{e:#}");
            }
            Err(e) if e.is_cancelled() => {}
            Err(e) => {
                failed += 1;
                tracing::error!("episode task panicked: {e}");
            }
        }
    }
    Ok(failed)
}

#[allow(clippy::too_many_arguments)]
async fn evaluate(
    s: &Settings,
    vector_cache: Option<&Path>,
    model: Arc<LoadedModel>,
    layer: Option<usize>,
    given: Option<(SteeringVector, PathBuf, String)>,
    meta: &RunMeta,
    pending: Vec<(Item, Vec<Arm>)>,
    results: Arc<Mutex<ResultsFile>>,
    counts: Arc<Mutex<Counts>>,
    progress: bool,
) -> Result<(usize, Option<String>, f64, GenStats)> {
    env::browser::install_signal_cleanup();
    let t0 = Instant::now();
    let pool = Pool::new(s.concurrency, env_config()).await?;
    tracing::info!(sessions = s.concurrency, "browsers up in {:.1}s", t0.elapsed().as_secs_f64());
    let steering = match (s.base_only, layer) {
        (false, Some(l)) => {
            let (v, path, hash) = match given {
                Some(g) => g,
                None => {
                    let path = vector_cache_path(s, vector_cache, l, &model.info.name);
                    let v = if path.is_file() {
                        tracing::info!("using the cached vector {}", path.display());
                        SteeringVector::load(&path)?
                    } else {
                        compute_vector(&pool, &model, s, l, &path).await?
                    };
                    v.check_model(&model.info, false).with_context(|| format!("vector {}", path.display()))?;
                    let hash = SteeringVector::file_hash(&path)?;
                    (v, path, hash)
                }
            };
            v.layer(l)?;
            check_vector_hash(&results.lock().unwrap_or_else(|p| p.into_inner()), Some(&hash), &path)?;
            Some((Steering { vector: v, layer: l, mode: s.coeff_mode }, hash))
        }
        _ => None,
    };
    let mut meta = meta.clone();
    let vector_hash = steering.as_ref().map(|(_, h)| h.clone());
    meta.vector_hash = vector_hash.clone();
    let (generator, handle) = Generator::spawn(
        model.clone(),
        steering.map(|(st, _)| st),
        GeneratorConfig {
            max_new_tokens: s.max_new_tokens,
            max_batch_rows: (s.concurrency * (1 + s.coeffs.len())).max(2),
            linger: Duration::from_millis(250),
            prefix_cache_mb: s.prefix_cache_mb,
        },
    );
    let t_eval = Instant::now();
    let total: usize = pending.iter().map(|p| p.1.len()).sum();
    let pb = if progress {
        let pb = ProgressBar::new(total as u64);
        pb.set_style(
            ProgressStyle::with_template("{spinner} [{bar:25}] {pos}/{len} {elapsed_precise} eta {eta} {msg}")
                .unwrap()
                .progress_chars("=> "),
        );
        pb.enable_steady_tick(Duration::from_millis(500));
        pb
    } else {
        ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::hidden())
    };
    let meta = Arc::new(meta);
    let builder = Arc::new(PromptBuilder::default());
    let mut set = tokio::task::JoinSet::new();
    for (item, todo) in pending {
        let (pool, generator, model, meta, builder, results, counts, pb) = (
            pool.clone(),
            generator.clone(),
            model.clone(),
            meta.clone(),
            builder.clone(),
            results.clone(),
            counts.clone(),
            pb.clone(),
        );
        let max_steps = s.max_steps;
        set.spawn(async move {
            let agent = Agent { generator: &generator, tokenizer: &model.tokenizer, prompts: &builder, max_steps };
            let mut tries = 0;
            let outcomes = loop {
                let mut sess = pool.acquire().await?;
                match agent.run_pair(&mut sess, &item.task, item.seed, &todo).await {
                    Ok(o) => break o,
                    Err(e) if tries < 3 && e.downcast_ref::<EnvError>().is_some_and(|e| e.is_retryable()) => {
                        tries += 1;
                        tracing::warn!(task = %item.task, seed = item.seed, "retrying the episode: {e:#}");
                    }
                    Err(e) => return Err(e.context(format!("{} seed {}", item.task, item.seed))),
                }
            };
            for ep in &outcomes {
                let line = meta.line(&item.task, item.seed, ep);
                results.lock().unwrap_or_else(|p| p.into_inner()).append(&line).context(WriteFailed)?;
                let mut c = counts.lock().unwrap_or_else(|p| p.into_inner());
                c.add(ep.condition, ep.coeff, ep.success, ep.parse_failure);
                pb.set_message(c.message());
                pb.inc(1);
            }
            Ok(())
        });
    }
    let joined = join_episodes(&mut set).await;
    pb.finish_and_clear();
    let eval_s = t_eval.elapsed().as_secs_f64();
    drop(generator);
    let stats = handle.join().unwrap_or_default();
    tracing::info!(
        batches = stats.batches,
        rows = stats.rows,
        "generation: {:.1} rows/batch, model busy {:.1}s of {:.1}s; prefix cache served {} of {} prefix tokens",
        stats.rows as f64 / stats.batches.max(1) as f64,
        stats.busy_s,
        t0.elapsed().as_secs_f64(),
        stats.cache.hit_tokens,
        stats.cache.hit_tokens + stats.cache.computed_tokens
    );
    pool.shutdown().await;
    Ok((joined?, vector_hash, eval_s, stats))
}

#[cfg(test)]
mod coeff_tests {
    #[test]
    fn coefficients_are_written_as_typed() {
        assert_eq!(super::coeff_f64(0.1), 0.1);
        assert_eq!(super::coeff_f64(-1.5), -1.5);
        assert_eq!(super::coeff_f64(3.0), 3.0);
        assert_eq!(crate::experiment::results::fmt_coeff(super::coeff_f64(0.1)), "0.1");
    }
}

#[cfg(test)]
mod tests {
    use super::{join_episodes, paired_ci95, WriteFailed};
    use anyhow::Context;

    /// Issue 18.3: a task that could not write its lines stops the run at once (the others are
    /// abandoned); an episode error is only counted.
    #[test]
    fn a_write_failure_stops_the_run() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let mut set = tokio::task::JoinSet::new();
            set.spawn(async { Err(anyhow::anyhow!("a page error")) });
            for _ in 0..3 {
                set.spawn(async {
                    tokio::time::sleep(std::time::Duration::from_secs(600)).await;
                    Ok(())
                });
            }
            set.spawn(async {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                Err(std::io::Error::from_raw_os_error(libc::ENOSPC))
                    .context("appending to r.jsonl")
                    .context(WriteFailed)
            });
            let t0 = std::time::Instant::now();
            let e = join_episodes(&mut set).await.unwrap_err();
            assert!(t0.elapsed() < std::time::Duration::from_secs(5), "the run went on after the write error");
            assert!(format!("{e:#}").contains("run stopped") && format!("{e:#}").contains("r.jsonl"), "{e:#}");
            assert!(set.is_empty());
            let mut ok = tokio::task::JoinSet::new();
            ok.spawn(async { Err(anyhow::anyhow!("a page error")) });
            ok.spawn(async { Ok(()) });
            assert_eq!(join_episodes(&mut ok).await.unwrap(), 1);
        });
    }

    #[test]
    fn paired_interval_is_the_normal_approximation_of_the_mean_difference() {
        // mean 1/6, sample variance 17/30, n 6: half width 1.96 * sqrt(17/180) = 0.60234.
        let (lo, hi) = paired_ci95(&[1.0, 0.0, 0.0, 1.0, -1.0, 0.0]).unwrap();
        assert!((lo - (1.0 / 6.0 - 0.60234)).abs() < 1e-4, "{lo}");
        assert!((hi - (1.0 / 6.0 + 0.60234)).abs() < 1e-4, "{hi}");
        assert_eq!(paired_ci95(&[0.0, 0.0, 0.0]), Some((0.0, 0.0)));
        assert_eq!(paired_ci95(&[1.0]), None);
    }
}
