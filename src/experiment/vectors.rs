//! The run's steering vector: a `--vector` file (checked before anything starts), or CAA from
//! MiniWoB training observations through the model's own turns (the prompts evaluation uses, with
//! the pair's instruction appended), cached under `<out dir>/vectors/` and published without
//! clobbering (when another shard wrote it first, that one is used, so every shard records the
//! same vector hash).

use super::results::ResultsFile;
use super::settings::Settings;
use crate::agent::turn::{AgentModel, View};
use crate::agent::PromptBuilder;
use crate::env::Pool;
use crate::models::load::ModelInfo;
use crate::protocol::Protocol;
use crate::steering::caa::{self, CaaOptions};
use crate::steering::pairs;
use crate::steering::vector::SteeringVector;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// A training observation and, for a VLM, its Set-of-Marks screenshot.
pub type TrainingView = crate::env::Observed;

/// Observations of the training episodes (reset only; screenshots when `screenshot`), in order.
pub async fn training_views(pool: &Pool, items: &[(String, u64)], screenshot: bool) -> Result<Vec<TrainingView>> {
    Ok(pool.observe_all(items, screenshot).await?)
}

/// [`training_views`] (text only) of training episodes on their own browser pool (`vector
/// --tasks`): `items`, from a plan or [`super::plan::training_items`].
pub fn training_views_blocking(
    items: &[(String, u64)],
    protocol: &Protocol,
    concurrency: usize,
) -> Result<Vec<TrainingView>> {
    if items.is_empty() {
        bail!("--train-steps 0: a steering vector needs training episodes");
    }
    let views = super::evaluate::runtime()?.block_on(async {
        let pool = Pool::new(concurrency.max(1), super::evaluate::env_config(protocol)).await?;
        let v = training_views(&pool, items, false).await;
        pool.shutdown().await;
        v
    })?;
    tracing::info!(episodes = views.len(), "training observations");
    Ok(views)
}

/// (positive, negative) inputs of `model` for every training view: the evaluation turn with the
/// pair's positive or negative instruction appended (after the protocol's `caa.join`).
pub fn pair_inputs<E: AgentModel>(
    model: &E,
    prompts: &PromptBuilder,
    views: &[TrainingView],
    pair: &pairs::PromptPair,
) -> Result<Vec<(E::Input, E::Input)>> {
    let (pos, neg) = match (&pair.positive, &pair.negative) {
        (Some(p), Some(n)) => (p.as_str(), n.as_str()),
        _ => bail!("pair `{}` is a composite; compute its members and combine them", pair.name),
    };
    views
        .iter()
        .map(|v| {
            let view = View { obs: &v.obs, screenshot: v.screenshot.as_ref(), history: &[], step: 1 };
            Ok((model.turn(prompts, &view, Some(pos))?.input, model.turn(prompts, &view, Some(neg))?.input))
        })
        .collect()
}

/// The members of `pair` (itself, or the pairs a composite combines).
fn members(all: &[pairs::PromptPair], pair: &pairs::PromptPair) -> Result<Vec<pairs::PromptPair>> {
    match &pair.combine {
        Some(names) => names.iter().map(|n| pairs::find(all, n).cloned()).collect(),
        None => Ok(vec![pair.clone()]),
    }
}

/// CAA at `layer` from training views: one vector per member of the pair, combined for a
/// composite.
pub fn compute<E: AgentModel>(
    model: &E,
    prompts: &PromptBuilder,
    views: &[TrainingView],
    all: &[pairs::PromptPair],
    pair_name: &str,
    opts: &CaaOptions,
) -> Result<SteeringVector> {
    let pair = pairs::find(all, pair_name)?;
    let mut vs = Vec::new();
    for p in members(all, pair)? {
        vs.push(caa::compute(model, &pair_inputs(model, prompts, views, &p)?, &p.name, opts)?);
    }
    if vs.len() == 1 {
        Ok(vs.pop().expect("one vector"))
    } else {
        SteeringVector::combine(&vs, &pair.name)
    }
}

/// Where a computed vector is cached: `--vector-cache`, else `<out dir>/vectors/…` named by
/// everything it depends on.
pub fn cache_path(s: &Settings, explicit: Option<&Path>, layer: usize, info: &ModelInfo, vlm: bool) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    let dir = s.out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).join("vectors");
    let model = match &info.adapter {
        Some(a) => format!("{}+{a}", info.name),
        None => info.name.clone(),
    };
    let safe: String =
        model.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '_' }).collect();
    let pairs = match pairs_hash(s)? {
        Some(h) => format!("_p{h}"),
        None => String::new(),
    };
    // The default protocol keeps the names of harnesses without protocols; a plan replaces the
    // training seeds.
    let protocol = if s.protocol.is_default() { String::new() } else { format!("_P{}", s.protocol.hash) };
    let train = match &s.plan {
        Some(p) => format!("plan{}", p.hash),
        None => format!("n{}_s{}", s.train_steps, s.seed),
    };
    Ok(dir.join(format!(
        "{safe}{}_{}_{}_L{layer}_{train}{pairs}{protocol}.safetensors",
        if vlm { "_vlm" } else { "" },
        s.pair,
        s.vector_method.name(),
    )))
}

/// Hash of the `--pairs` file, when one is given (it can redefine the pair's instructions).
pub fn pairs_hash(s: &Settings) -> Result<Option<String>> {
    match &s.pairs {
        Some(p) => {
            let bytes = std::fs::read(p).with_context(|| format!("reading --pairs {}", p.display()))?;
            Ok(Some(crate::agent::prompt::hash16(&String::from_utf8_lossy(&bytes))))
        }
        None => Ok(None),
    }
}

/// Computes the run's vector at `layer` from MiniWoB training episodes and publishes it at
/// `path` without clobbering: when another process wrote the file first, that one is returned.
pub async fn compute_and_publish<E: AgentModel>(
    pool: &Pool,
    model: &E,
    s: &Settings,
    layer: usize,
    path: &Path,
) -> Result<SteeringVector> {
    let all = pairs::load(s.pairs.as_deref())?;
    pairs::find(&all, &s.pair)?;
    if s.train_steps == 0 && s.plan.is_none() {
        bail!("--train-steps 0: a steering vector needs training episodes (or pass --vector FILE, or --base-only)");
    }
    let items = s.train_items()?;
    let t0 = Instant::now();
    let views = training_views(pool, &items, E::SCREENSHOT).await?;
    tracing::info!(episodes = views.len(), "training observations in {:.1}s", t0.elapsed().as_secs_f64());
    let penalty = s.protocol.repetition_penalty(model.info())?;
    let opts = CaaOptions::of_protocol(&s.protocol, vec![layer], s.vector_method, penalty);
    let prompts = PromptBuilder::new(s.protocol.clone())?;
    let v = compute(model, &prompts, &views, &all, &s.pair, &opts)?;
    tracing::info!("vector computed in {:.1}s", t0.elapsed().as_secs_f64());
    publish(&v, path)
}

/// Writes `v` to `path` unless the file exists (then the existing vector is returned).
pub fn publish(v: &SteeringVector, path: &Path) -> Result<SteeringVector> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = tempfile::Builder::new().suffix(".safetensors").tempfile_in(dir)?;
    v.save(tmp.path())?;
    match tmp.persist_noclobber(path) {
        Ok(_) => Ok(v.clone()),
        Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => {
            tracing::info!("{} appeared meanwhile (another shard); using it", path.display());
            SteeringVector::load(path)
        }
        Err(e) => Err(e.error).with_context(|| format!("saving {}", path.display())),
    }
}

/// The run's vector at `layer`: the given one, else the cached one, else computed now. Returns
/// (vector, path, hash) after checking it against the model and the layer.
pub async fn resolve<E: AgentModel>(
    pool: &Pool,
    model: &E,
    s: &Settings,
    layer: usize,
    given: Option<(SteeringVector, PathBuf, String)>,
    explicit_cache: Option<&Path>,
) -> Result<(SteeringVector, PathBuf, String)> {
    let (v, path, hash) = match given {
        Some(g) => g,
        None => {
            let path = cache_path(s, explicit_cache, layer, model.info(), E::SCREENSHOT)?;
            let v = if path.is_file() {
                tracing::info!("using the cached vector {}", path.display());
                SteeringVector::load(&path)?
            } else {
                compute_and_publish(pool, model, s, layer, &path).await?
            };
            v.check_model(model.info(), false).with_context(|| format!("vector {}", path.display()))?;
            if let Some(other) = foreign_protocol(&v, &s.protocol) {
                bail!(
                    "vector {} was computed under protocol {other}, this run uses {}; delete it or pass it as --vector to use it anyway",
                    path.display(),
                    s.protocol.id()
                );
            }
            let hash = v.content_hash()?;
            (v, path, hash)
        }
    };
    v.layer(layer)?;
    Ok((v, path, hash))
}

/// A `--vector` file, read and checked before the model loads and browsers start (a bad file
/// fails in a second, not after minutes of setup): (vector, path, file hash).
pub fn given_vector(s: &Settings) -> Result<Option<(SteeringVector, PathBuf, String)>> {
    match (&s.vector, s.base_only) {
        (Some(p), false) => Ok(Some((SteeringVector::load(p)?, p.clone(), SteeringVector::file_hash(p)?))),
        _ => Ok(None),
    }
}

/// The protocol a vector was made under when it is not `protocol` (files without one were
/// made under the default).
pub fn foreign_protocol(v: &SteeringVector, protocol: &Protocol) -> Option<String> {
    match &v.meta.protocol {
        Some(id) if *id != protocol.id() => Some(id.clone()),
        None if !protocol.is_default() => Some("default (a file without a protocol)".into()),
        _ => None,
    }
}

/// Checks a given vector against the loaded model and the layer, with the file named; a vector
/// of another protocol is used as asked, with a warning.
pub fn check_given_vector(
    given: &Option<(SteeringVector, PathBuf, String)>,
    info: &ModelInfo,
    layer: Option<usize>,
    allow_foreign: bool,
    protocol: &Protocol,
) -> Result<()> {
    if let Some((v, p, _)) = given {
        let ctx = || format!("--vector {}", p.display());
        v.check_model(info, allow_foreign).with_context(ctx)?;
        if let Some(l) = layer {
            v.layer(l).with_context(ctx)?;
        }
        if let Some(other) = foreign_protocol(v, protocol) {
            tracing::warn!(
                "--vector {} was computed under protocol {other}; this run uses {} (used as given)",
                p.display(),
                protocol.id()
            );
        }
    }
    Ok(())
}

/// Lines of this configuration in the file with another vector hash than this run's vector:
/// the vector cache was replaced since they were written.
pub fn check_vector_hash(results: &ResultsFile, hash: Option<&str>, path: &Path) -> Result<()> {
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
