//! `run`'s settings, resolved (the command line's flags over the experiment file over the
//! defaults: src/cli/run.rs), and the task list syntax.
use super::plan::{self, Item, SeedPlan, Shard};
use crate::env;
use crate::models::weights::WeightDType;
use crate::protocol::Protocol;
use crate::steering::caa::{CoeffMode, Method};
use anyhow::{bail, Result};
use std::path::PathBuf;
use std::sync::Arc;

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
    /// The prompt pair's name.
    pub pair: String,
    /// `--pairs FILE`: extra prompt pairs.
    pub pairs: Option<PathBuf>,
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
    /// Everything between observation and reward (`--protocol`; docs/protocols.md).
    pub protocol: Arc<Protocol>,
    /// `--plan FILE`: the (task, seed) lists that replace the built-in seed ranges.
    pub plan: Option<Arc<SeedPlan>>,
    /// `--gate FILE --gate-class C --gate-threshold P`: conditional steering.
    pub gate: Option<GateSettings>,
    /// `--adapter [NAME=]DIR`: a peft LoRA adapter every row applies.
    pub adapter: Option<String>,
}

/// A loaded gate and its identity in the run configuration.
#[derive(Debug, Clone)]
pub struct GateSettings {
    pub gate: Arc<crate::probe::gate::Gate>,
    /// `<head file hash>:<class>@<threshold>`.
    pub id: String,
}

impl GateSettings {
    /// Loads `--gate` (naming the file on a bad head or class).
    pub fn load(path: &std::path::Path, class: &str, threshold: f32) -> Result<GateSettings> {
        let gate = crate::probe::gate::Gate::load(path, class, threshold)?;
        let bytes = std::fs::read(path).map_err(|e| anyhow::anyhow!("reading --gate {}: {e}", path.display()))?;
        let hash = hex::encode(&<sha2::Sha256 as sha2::Digest>::digest(&bytes)[..8]);
        Ok(GateSettings { gate: Arc::new(gate), id: format!("{hash}:{class}@{threshold}") })
    }
}

impl Settings {
    /// The evaluation items: the plan's, else `tasks` × `eval_steps` seeds from `seed`.
    pub fn eval_items(&self) -> Result<Vec<Item>> {
        match &self.plan {
            Some(p) => Ok(p.eval_items()),
            None => plan::expand(&self.tasks, self.eval_steps, self.seed),
        }
    }

    /// The vector's training episodes: the plan's, else `train_steps` draws from `seed`.
    pub fn train_items(&self) -> Result<Vec<(String, u64)>> {
        match &self.plan {
            Some(p) if p.train.is_empty() => {
                bail!("the --plan file has no \"train\" line: a steering vector needs training episodes (or pass --vector FILE, or --base-only)")
            }
            Some(p) => Ok(p.train.clone()),
            None => Ok(plan::training_items(&self.tasks, self.train_steps, self.seed)),
        }
    }
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
