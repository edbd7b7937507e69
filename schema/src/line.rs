//! The result line (docs/results-format.md), its condition, the run configuration every key
//! ends with, and the resume key: the format `run` writes and `analyze` reads.
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The condition of one episode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Condition {
    /// α = 0: no steering.
    Baseline,
    Steered,
}

impl Condition {
    /// The name result lines and resume keys use.
    pub fn name(self) -> &'static str {
        match self {
            Condition::Baseline => "baseline",
            Condition::Steered => "steered",
        }
    }

    pub fn parse(s: &str) -> Option<Condition> {
        match s {
            "baseline" => Some(Condition::Baseline),
            "steered" => Some(Condition::Steered),
            _ => None,
        }
    }
}

impl std::fmt::Display for Condition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// sha256 prefix (16 hex) of a string: prompt hashes and configuration ids.
pub fn hash16(s: &str) -> String {
    hex::encode(&Sha256::digest(s.as_bytes())[..8])
}

/// One episode, one JSON line. Field order and names follow docs/results-format.md.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EpisodeLine {
    pub experiment: String,
    pub model: String,
    pub checkpoint: String,
    pub weights_hash: String,
    pub dtype: String,
    /// Whether the model path guarantees row outputs independent of batch composition
    /// (docs/determinism.md); absent in lines written before it was recorded.
    #[serde(default)]
    pub batch_invariant: bool,
    pub layer: Option<usize>,
    pub hook_point: Option<String>,
    pub coeff: f64,
    pub coeff_mode: String,
    pub vector_hash: Option<String>,
    pub prompt_pair: Option<String>,
    pub vector_method: Option<String>,
    pub task: String,
    pub seed: u64,
    pub condition: Condition,
    pub vlm: bool,
    pub prompt_hash: String,
    pub output: String,
    pub actions: Vec<String>,
    pub parse_failure: bool,
    pub raw_reward: f64,
    pub reward: f64,
    pub success: bool,
    pub steps: usize,
    pub wall_s: f64,
    pub tokens_in: usize,
    pub tokens_out: usize,
    /// Where the steering vector came from (`file:<sha>` or `caa:n=<train_steps>,seed=<seed>`);
    /// null without steering. Absent in lines of older harnesses.
    #[serde(default)]
    pub vector_source: Option<String>,
    #[serde(default)]
    pub max_steps: Option<usize>,
    #[serde(default)]
    pub max_new_tokens: Option<usize>,
    /// The protocol (`name@hash`, docs/protocols.md); absent in lines of harnesses without
    /// protocols (they ran today's `default`).
    #[serde(default)]
    pub protocol: Option<String>,
    pub harness_version: String,
    pub key: String,
    /// `run --vlm --lens`: per step, the top contextual neighbours of the vision tokens under the
    /// element acted on (docs/lens.md); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lens: Option<Vec<serde_json::Value>>,
    /// `run --gate`: per step of a steered episode, `{probability, on}`: the gate probe's
    /// probability of its class on the step's unsteered prompt and whether the row was steered;
    /// absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<Vec<serde_json::Value>>,
    /// `run --gate`: the gate of the run (`<head file hash>:<class>@<threshold>`); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate_config: Option<String>,
    /// `run --adapter`: the LoRA adapter every row applied (`name@hash`); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<String>,
}

/// A coefficient as JSON writes it (`3.0`, `0.0`, `-1.5`).
pub fn fmt_coeff(c: f64) -> String {
    serde_json::Number::from_f64(c).map(|n| n.to_string()).unwrap_or_else(|| format!("{c}"))
}

/// Everything of a run, besides the episode's own key fields, that changes an episode's outcome.
/// Lines of one results file that differ here come from different experiments: resuming one
/// with the other would skip episodes that were never run under it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunConfig {
    pub experiment: String,
    pub model: String,
    pub weights_hash: String,
    pub dtype: String,
    pub vlm: bool,
    pub coeff_mode: String,
    pub vector_source: Option<String>,
    pub max_steps: Option<usize>,
    pub max_new_tokens: Option<usize>,
    /// A protocol other than the built-in default (`name@hash`); `None` for the default, so its
    /// runs keep the keys of harnesses without protocols and resume their files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// `run --gate`: `<head file hash>:<class>@<threshold>`; `None` without a gate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<String>,
    /// `run --adapter`: `name@hash` of the LoRA adapter; `None` for the plain model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<String>,
}

impl RunConfig {
    pub fn of_line(l: &EpisodeLine) -> RunConfig {
        RunConfig {
            experiment: l.experiment.clone(),
            model: l.model.clone(),
            weights_hash: l.weights_hash.clone(),
            dtype: l.dtype.clone(),
            vlm: l.vlm,
            coeff_mode: l.coeff_mode.clone(),
            vector_source: l.vector_source.clone(),
            max_steps: l.max_steps,
            max_new_tokens: l.max_new_tokens,
            protocol: l.protocol.clone().filter(|p| !is_default_protocol(p)),
            gate: l.gate_config.clone(),
            adapter: l.adapter.clone(),
        }
    }

    /// sha256 prefix (16 hex) of the canonical JSON: the last component of every resume key.
    pub fn id(&self) -> String {
        hash16(&serde_json::to_string(self).expect("RunConfig serializes"))
    }

    /// `field: A in the file, B in this run` for every field that differs from `this`.
    pub fn differences(&self, this: &RunConfig) -> Vec<String> {
        let show = |v: serde_json::Value| match v {
            serde_json::Value::Null => "not recorded (an older harness)".to_string(),
            v => v.to_string(),
        };
        let (a, b) = (serde_json::to_value(self).unwrap(), serde_json::to_value(this).unwrap());
        let (a, b) = (a.as_object().unwrap(), b.as_object().unwrap());
        // Fields left out when unset (the protocol) may be in one side only.
        let mut keys: Vec<&String> = a.keys().chain(b.keys().filter(|k| !a.contains_key(*k))).collect();
        keys.dedup();
        let get = |m: &serde_json::Map<String, serde_json::Value>, k: &str| {
            m.get(k).cloned().unwrap_or(serde_json::Value::Null)
        };
        keys.into_iter()
            .filter(|k| get(a, k) != get(b, k))
            .map(|k| {
                let (x, y) = (get(a, k), get(b, k));
                let show_protocol = |v: serde_json::Value| match (v.is_null(), k.as_str()) {
                    (true, "protocol") => "the default".into(),
                    (true, "adapter" | "gate") => "none".into(),
                    _ => show(v),
                };
                format!("{k}: {} in the file, {} in this run", show_protocol(x), show_protocol(y))
            })
            .collect()
    }
}

/// Whether a line's `protocol` is the built-in default (`default@…`): the default's runs keep
/// the keys of earlier harnesses whatever the default file's hash in a given version.
pub fn is_default_protocol(id: &str) -> bool {
    id.split_once('@').map_or(id, |(n, _)| n) == "default"
}

/// The resume key: `task/seed/condition/coeff/layer/prompt_pair/vector_method/config` (`null`
/// for a missing value; `config` is [`RunConfig::id`]).
#[allow(clippy::too_many_arguments)]
pub fn episode_key(
    task: &str,
    seed: u64,
    condition: &str,
    coeff: f64,
    layer: Option<usize>,
    pair: Option<&str>,
    method: Option<&str>,
    config_id: &str,
) -> String {
    format!(
        "{task}/{seed}/{condition}/{}/{}/{}/{}/{config_id}",
        fmt_coeff(coeff),
        layer.map_or("null".to_string(), |l| l.to_string()),
        pair.unwrap_or("null"),
        method.unwrap_or("null")
    )
}
