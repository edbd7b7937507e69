//! What every result line records besides its episode: the model, the vector, the settings that
//! decide the outcome (the configuration hash in every resume key) and the harness version.
use super::results::{episode_key, EpisodeLine, RunConfig};
use super::settings::Settings;
use crate::agent::EpisodeOutcome;
use crate::models::hooks::HookPoint;
use crate::models::load::ModelInfo;
use crate::steering::caa::CoeffMode;

/// α as the user wrote it: the shortest decimal that round-trips the f32 (`0.1`, not the
/// `0.10000000149011612` that a widening cast writes into JSON and resume keys).
pub fn coeff_f64(c: f32) -> f64 {
    c.to_string().parse().unwrap_or(c as f64)
}

/// The harness version, fixed when the binary was built (`git describe` of the source tree
/// then, by build.rs), so a binary copied to another machine still records its own.
pub fn harness_version() -> String {
    match option_env!("MINIWOB_STEER_GIT_DESCRIBE") {
        Some(g) if !g.is_empty() => format!("{} ({g})", env!("CARGO_PKG_VERSION")),
        _ => env!("CARGO_PKG_VERSION").to_string(),
    }
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
    /// The protocol (`name@hash`), in every line.
    pub protocol: String,
    /// What else decides the outcome (model, dtype, vector source, …): part of every key.
    pub config: RunConfig,
    pub config_id: String,
}

impl RunMeta {
    /// The run's metadata; `vector_file_hash` is the hash of `--vector` when one is given,
    /// `pairs_hash` the hash of `--pairs` (it can redefine the pair the vector comes from).
    pub fn new(
        s: &Settings,
        info: &ModelInfo,
        layer: Option<usize>,
        vlm: bool,
        vector_file_hash: Option<&str>,
        pairs_hash: Option<&str>,
    ) -> RunMeta {
        let vector_source = match (s.base_only, vector_file_hash) {
            (true, _) => None,
            (false, Some(h)) => Some(format!("file:{h}")),
            // The vector cache is keyed by model, pair, method, layer, training episodes (train
            // steps and seed, or a plan) and protocol; the first three and the protocol are in
            // every key already.
            (false, None) => {
                let train = match &s.plan {
                    Some(p) => format!("caa:plan={}", p.hash),
                    None => format!("caa:n={},seed={}", s.train_steps, s.seed),
                };
                Some(match pairs_hash {
                    Some(p) => format!("{train},pairs={p}"),
                    None => train,
                })
            }
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
            protocol: (!s.protocol.is_default()).then(|| s.protocol.id()),
            gate: if s.base_only { None } else { s.gate.as_ref().map(|g| g.id.clone()) },
            adapter: info.adapter.clone(),
        };
        RunMeta {
            experiment: s.experiment.clone(),
            info: info.clone(),
            layer: if s.base_only { None } else { layer },
            coeff_mode: s.coeff_mode,
            vector_hash: None,
            prompt_pair: (!s.base_only).then(|| s.pair.clone()),
            vector_method: (!s.base_only).then(|| s.vector_method.name().to_string()),
            harness: harness_version(),
            protocol: s.protocol.id(),
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
            condition: ep.condition,
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
            protocol: Some(self.protocol.clone()),
            harness_version: self.harness.clone(),
            key: self.key(task, seed, ep.condition.name(), ep.coeff),
            lens: None,
            gate: self.config.gate.as_ref().filter(|_| !ep.gate.is_empty()).map(|_| {
                ep.gate.iter().map(|d| serde_json::json!({"probability": d.probability, "on": d.on})).collect()
            }),
            gate_config: self.config.gate.clone(),
            adapter: self.config.adapter.clone(),
        }
    }
}

fn coeff_mode_name(m: CoeffMode) -> &'static str {
    match m {
        CoeffMode::Absolute => "absolute",
        CoeffMode::Relative => "relative",
    }
}
