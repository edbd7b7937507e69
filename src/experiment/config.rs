//! Experiment files (`experiments/exp12.toml`, `experiments/quick.toml`): the settings of `run`,
//! plus the sweep axes (models × layers) that `run_exp12.sh` expands. Command-line flags override
//! the file; the file overrides the built-in defaults.
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::Path;

pub const EXP12: &str = include_str!("../../experiments/exp12.toml");
pub const QUICK: &str = include_str!("../../experiments/quick.toml");

/// A layer in an experiment file: `"auto"` or an index.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum LayerSpec {
    Index(usize),
    Name(String),
}

impl std::fmt::Display for LayerSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LayerSpec::Index(i) => write!(f, "{i}"),
            LayerSpec::Name(s) => f.write_str(s),
        }
    }
}

/// Tasks: `"all"` (the exp12 set) or a list.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum TaskSpec {
    List(Vec<String>),
    Name(String),
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExperimentFile {
    /// Experiment name (the `experiment` field of result lines; results/<name>/...).
    pub name: Option<String>,
    #[serde(default)]
    pub description: String,
    /// Text models, swept in order by run_exp12.sh; `run` takes the first unless `--model`.
    #[serde(default)]
    pub models: Vec<String>,
    /// Vision-language models, swept after the text models (need `--vlm`).
    #[serde(default)]
    pub vlm_models: Vec<String>,
    /// Layers (`"auto"` or indices); `run` takes the first unless `--layer`.
    #[serde(default)]
    pub layers: Vec<LayerSpec>,
    /// Steering coefficients; one run evaluates all of them beside one baseline.
    #[serde(default)]
    pub coeffs: Vec<f32>,
    pub coeff_mode: Option<crate::steering::caa::CoeffMode>,
    /// The CAA prompt pair (`prompt_type` is exp12's name for it).
    #[serde(alias = "prompt_type")]
    pub pair: Option<String>,
    pub vector_method: Option<crate::steering::caa::Method>,
    pub train_steps: Option<usize>,
    pub eval_steps: Option<usize>,
    pub seed: Option<u64>,
    pub tasks: Option<TaskSpec>,
    pub max_steps: Option<usize>,
    pub max_new_tokens: Option<usize>,
    pub concurrency: Option<usize>,
    pub dtype: Option<crate::models::dtype::DTypeChoice>,
    /// The protocol (a file or a built-in name; docs/protocols.md) [default: `default`].
    pub protocol: Option<String>,
}

impl ExperimentFile {
    pub fn parse(text: &str, origin: &str) -> Result<ExperimentFile> {
        let f: ExperimentFile = toml::from_str(text).with_context(|| format!("{origin}: invalid experiment TOML"))?;
        if let Some(TaskSpec::Name(n)) = &f.tasks {
            if n != "all" {
                bail!("{origin}: tasks = {n:?}: expected \"all\" or a list of task names");
            }
        }
        if let Some((i, c)) = f.coeffs.iter().enumerate().find(|(_, c)| !c.is_finite() || **c == 0.0) {
            bail!(
                "{origin}: coeffs[{i}] = {c}: every coefficient must be finite and non-zero (α = 0 is the baseline, always run)"
            );
        }
        for l in &f.layers {
            if let LayerSpec::Name(n) = l {
                if n != "auto" {
                    bail!("{origin}: layer {n:?}: expected \"auto\" or an index");
                }
            }
        }
        Ok(f)
    }

    /// A file path, or the built-in `exp12` / `quick` by name.
    pub fn load(spec: &str) -> Result<ExperimentFile> {
        let p = Path::new(spec);
        if p.is_file() {
            let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            let mut f = Self::parse(&text, spec)?;
            if f.name.is_none() {
                f.name = p.file_stem().map(|s| s.to_string_lossy().into_owned());
            }
            return Ok(f);
        }
        match spec {
            "exp12" => Self::parse(EXP12, "experiments/exp12.toml"),
            "quick" => Self::parse(QUICK, "experiments/quick.toml"),
            _ => bail!("--experiment {spec}: no such file (built in: exp12, quick)"),
        }
    }

    pub fn task_string(&self) -> Option<String> {
        self.tasks.as_ref().map(|t| match t {
            TaskSpec::Name(n) => n.clone(),
            TaskSpec::List(v) => v.join(","),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_files_parse() {
        let e = ExperimentFile::load("exp12").unwrap();
        assert_eq!(e.name.as_deref(), Some("exp12"));
        assert!(!e.models.is_empty() && !e.coeffs.is_empty() && !e.layers.is_empty());
        assert_eq!(e.task_string().as_deref(), Some("all"));
        let q = ExperimentFile::load("quick").unwrap();
        assert_eq!(q.name.as_deref(), Some("quick"));
        assert!(ExperimentFile::parse("bogus = 1", "x").is_err());
        assert!(ExperimentFile::parse("layers = [\"mid\"]", "x").is_err());
    }

    /// Issue 18.11: a bad coefficient in a file names the file (not `--coeff`).
    #[test]
    fn bad_coefficients_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        for (text, shown) in [
            ("coeffs = [3.0, nan]", "coeffs[1] = NaN"),
            ("coeffs = [inf]", "coeffs[0] = inf"),
            ("coeffs = [0.0]", "coeffs[0] = 0"),
        ] {
            let p = dir.path().join("bad.toml");
            std::fs::write(&p, text).unwrap();
            let e = ExperimentFile::load(p.to_str().unwrap()).unwrap_err().to_string();
            assert!(e.contains(p.to_str().unwrap()) && e.contains(shown) && !e.contains("--coeff"), "{e}");
        }
    }
}
