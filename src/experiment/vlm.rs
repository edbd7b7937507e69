//! `run --vlm` (and `--model qwen-vl-2b` or any Qwen2-VL directory): the paired experiment with
//! Set-of-Marks screenshot observations and a Qwen2-VL model. The plan, resume keys, result lines
//! (with `vlm: true`) and summary are the text runner's; the CAA vector is computed from the same
//! VLM prompts (screenshot + utterance + the pair's instruction) at the LLM layer, last prompt
//! token, and applied to the LLM backbone only.
use super::plan::{self, Item};
use super::results::ResultsFile;
use super::run::{
    check_given_vector, check_vector_hash, env_config, given_vector, join_episodes, pending, runtime, summarize,
    Counts, RunMeta, Settings, Summary, WriteFailed,
};
use crate::agent::vlm::{turn_from_png, VlmEngine};
use crate::agent::{Arm, Steering};
use crate::env::{self, EnvError, Observation, Pool};
use crate::models::cli::parse_device;
use crate::models::hooks::{Captures, HookPoint, HookSpec};
use crate::models::qwen2_vl::Qwen2Vl;
use crate::models::registry::{self, Location, Modality};
use crate::steering::caa::{first_pc, Method};
use crate::steering::pairs;
use crate::steering::vector::{now, unit, SteeringVector, VectorMeta};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Does `--model` name a vision-language model (registry modality, or a Qwen2-VL directory)?
pub fn is_vlm_model(spec: &str) -> bool {
    if let Some(e) = registry::lookup(spec) {
        return e.modality == Modality::Vision;
    }
    match registry::resolve(spec) {
        Ok(r) => match r.location {
            Location::Dir(d) => crate::models::qwen2_vl::config::is_qwen_vl_dir(&d),
            Location::Gguf(_) => false,
        },
        Err(_) => false,
    }
}

fn arms(s: &Settings) -> Vec<Arm> {
    let mut v = vec![Arm { condition: "baseline", coeff: 0.0 }];
    if !s.base_only {
        v.extend(s.coeffs.iter().map(|&c| Arm { condition: "steered", coeff: c }));
    }
    v
}

fn vector_path(s: &Settings, explicit: Option<&Path>, layer: usize, model: &str) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    let dir = s.out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).join("vectors");
    let safe: String =
        model.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '_' }).collect();
    dir.join(format!(
        "{safe}_vlm_{}_{}_L{layer}_n{}_s{}.safetensors",
        s.prompt_type,
        s.vector_method.name(),
        s.train_steps,
        s.seed
    ))
}

/// Runs the plan of `s` with the VLM agent and returns its summary.
/// `lens`: `--lens IDX` and `--lens-layer` (default: the steering layer, else 50% depth).
pub fn execute(
    s: &Settings,
    vector_cache: Option<&Path>,
    progress: bool,
    lens: Option<(&Path, Option<usize>)>,
) -> Result<Summary> {
    let t_run = Instant::now();
    let root = env::html_root()?;
    for t in &s.tasks {
        if !env::tasks::task_exists(&root, t) {
            bail!("unknown task `{t}` (not in {}; see `miniwob-steer tasks`)", root.display());
        }
    }
    let given = given_vector(s)?;
    let model = Arc::new(Qwen2Vl::load(&s.model, &parse_device(&s.device)?, s.dtype)?);
    let layer = if s.base_only && s.vector.is_none() {
        None
    } else {
        Some(registry::parse_layer(&s.layer, model.info.num_layers)?)
    };
    check_given_vector(&given, &model.info, layer, s.allow_foreign_vector)?;
    let probe = match lens {
        Some((dir, l)) => {
            let n = model.info.num_layers;
            let l = l.or(layer).unwrap_or(n / 2);
            if l >= n {
                bail!("--lens-layer {l}: the model has {n} layers (0..{})", n - 1);
            }
            let index = crate::interp::index::Index::open(dir)?;
            if index.meta.hidden != model.info.hidden_size {
                bail!(
                    "--lens {}: the index has {} features, {} has {} (an index of another model)",
                    dir.display(),
                    index.meta.hidden,
                    model.info.name,
                    model.info.hidden_size
                );
            }
            tracing::info!("lens read-out at {} against {}", HookPoint::ResidPost(l), dir.display());
            Some(Arc::new(crate::agent::vlm::LensProbe { index: Mutex::new(index), layer: l, k: 3 }))
        }
        None => None,
    };
    let arms = arms(s);
    let items = plan::shard(&plan::expand(&s.tasks, s.eval_steps, s.seed)?, s.shard);
    let mut meta = RunMeta::new(s, &model.info, layer, true, given.as_ref().map(|g| g.2.as_str()));
    let results = ResultsFile::open(&s.out, &meta.config, s.keep_other_configs)?;
    let pending = pending(&items, &arms, &results, &meta);
    let planned = items.len() * arms.len();
    tracing::info!(shard = %s.shard, planned, vlm = true, "plan: {} tasks × {} seeds × {} conditions", s.tasks.len(), s.eval_steps, arms.len());
    let results = Arc::new(Mutex::new(results));
    let (mut failed, mut eval_s) = (0, 0.0);
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
            progress,
            probe,
        ));
        rt.shutdown_timeout(Duration::from_secs(5));
        let (f, vh, e) = r?;
        (failed, eval_s) = (f, e);
        meta.vector_hash = vh;
    }
    let results = results.lock().unwrap_or_else(|p| p.into_inner());
    summarize(s, &meta, &items, &arms, layer, &results, (failed, eval_s), t_run)
}

/// Training observations with their Set-of-Marks screenshots.
async fn training_screens(pool: &Pool, items: &[(String, u64)]) -> Result<Vec<(Observation, Vec<u8>)>> {
    let mut out = Vec::with_capacity(items.len());
    for (task, seed) in items {
        let mut tries = 0;
        loop {
            let mut sess = pool.acquire().await?;
            let r: Result<(Observation, Vec<u8>), EnvError> = async {
                let o = sess.reset(task, *seed).await?;
                let png = sess.som_screenshot(&o).await?;
                Ok((o, png))
            }
            .await;
            match r {
                Ok(x) => {
                    out.push(x);
                    break;
                }
                Err(e) if e.is_retryable() && tries < 3 => tries += 1,
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(out)
}

/// CAA on the VLM: for every training screen, the residual at `blocks.{layer}.hook_resid_post`
/// of the last prompt token with the positive and with the negative instruction appended to the
/// text; mean difference (or its first principal component), unit length.
pub fn compute_vlm_vector(
    model: &Qwen2Vl,
    screens: &[(Observation, Vec<u8>)],
    pair: &pairs::PromptPair,
    method: Method,
    layer: usize,
) -> Result<SteeringVector> {
    let (pos, neg) = match (&pair.positive, &pair.negative) {
        (Some(p), Some(n)) => (p.as_str(), n.as_str()),
        _ => bail!("pair `{}` is a composite; compute its members and combine them", pair.name),
    };
    if method == Method::Response {
        bail!("--vector-method response is not implemented for VLMs; use prompt or pca");
    }
    if screens.is_empty() {
        bail!("no training screens");
    }
    let point = HookPoint::ResidPost(layer);
    let mut diffs = Vec::with_capacity(screens.len());
    let mut norm_sum = 0f64;
    for (obs, png) in screens {
        let p = turn_from_png(model, png, obs, &[], Some(pos))?.input;
        let n = turn_from_png(model, png, obs, &[], Some(neg))?.input;
        let mut caps = Captures::default();
        model.prefill(&[p, n], &HookSpec::none().capture(point), &mut caps, false)?;
        let h = caps.get(point)?;
        let seq = h.dim(1)?;
        // Left padding: the last column is every row's last prompt token.
        let last = h.narrow(1, seq - 1, 1)?.squeeze(1)?.to_device(&Device::Cpu)?;
        let (a, b) = (last.get(0)?, last.get(1)?);
        norm_sum += a.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()? as f64;
        norm_sum += b.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()? as f64;
        diffs.push((a - b)?.to_vec1::<f32>()?);
    }
    let hdim = model.cfg.text.hidden_size;
    let k = diffs.len() as f64;
    let mean: Vec<f32> = (0..hdim).map(|j| (diffs.iter().map(|d| d[j] as f64).sum::<f64>() / k) as f32).collect();
    let (dir, n) = unit(&Tensor::from_vec(mean, hdim, &Device::Cpu)?)?;
    let dir = if method == Method::Pca { Tensor::from_vec(first_pc(&diffs)?, hdim, &Device::Cpu)? } else { dir };
    let info = &model.info;
    Ok(SteeringVector {
        layers: BTreeMap::from([(layer, dir)]),
        meta: VectorMeta {
            model: info.name.clone(),
            checkpoint: info.checkpoint.clone(),
            weights_hash: info.weights_hash.clone(),
            hidden_size: info.hidden_size,
            num_layers: info.num_layers,
            method: method.name().into(),
            pair: pair.name.clone(),
            samples: screens.len(),
            pre_norm: BTreeMap::from([(layer, n)]),
            mean_resid_norm: BTreeMap::from([(layer, (norm_sum / (2.0 * k)) as f32)]),
            created: now(),
        },
    })
}

async fn vector_for(
    pool: &Pool,
    model: &Arc<Qwen2Vl>,
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
    let screens = training_screens(pool, &items).await?;
    let members: Vec<pairs::PromptPair> = match &pair.combine {
        Some(names) => names.iter().map(|n| pairs::find(&all, n).cloned()).collect::<Result<_>>()?,
        None => vec![pair.clone()],
    };
    let (m, method) = (model.clone(), s.vector_method);
    let mut vs = tokio::task::spawn_blocking(move || {
        members.iter().map(|p| compute_vlm_vector(&m, &screens, p, method, layer)).collect::<Result<Vec<_>>>()
    })
    .await
    .context("the VLM vector thread panicked")??;
    let v = if vs.len() == 1 { vs.pop().unwrap() } else { SteeringVector::combine(&vs, &pair.name)? };
    tracing::info!("VLM vector computed in {:.1}s", t0.elapsed().as_secs_f64());
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    v.save(path)?;
    Ok(v)
}

#[allow(clippy::too_many_arguments)]
async fn evaluate(
    s: &Settings,
    vector_cache: Option<&Path>,
    model: Arc<Qwen2Vl>,
    layer: Option<usize>,
    given: Option<(SteeringVector, PathBuf, String)>,
    meta: &RunMeta,
    pending: Vec<(Item, Vec<Arm>)>,
    results: Arc<Mutex<ResultsFile>>,
    progress: bool,
    probe: Option<Arc<crate::agent::vlm::LensProbe>>,
) -> Result<(usize, Option<String>, f64)> {
    env::browser::install_signal_cleanup();
    let pool = Pool::new(s.concurrency, env_config()).await?;
    let steering = match (s.base_only, layer) {
        (false, Some(l)) => {
            let (v, path, hash) = match given {
                Some(g) => g,
                None => {
                    let path = vector_path(s, vector_cache, l, &model.info.name);
                    let v = if path.is_file() {
                        SteeringVector::load(&path)?
                    } else {
                        vector_for(&pool, &model, s, l, &path).await?
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
    let mut engine = VlmEngine::new(model, steering.map(|(st, _)| st), s.max_new_tokens);
    let with_lens = probe.is_some();
    engine.lens = probe;
    let t_eval = Instant::now();
    let total: usize = pending.iter().map(|p| p.1.len()).sum();
    let pb = if progress {
        indicatif::ProgressBar::new(total as u64)
    } else {
        indicatif::ProgressBar::with_draw_target(Some(total as u64), indicatif::ProgressDrawTarget::hidden())
    };
    let meta = Arc::new(meta);
    let counts = Arc::new(Mutex::new(Counts::default()));
    let mut set = tokio::task::JoinSet::new();
    for (item, todo) in pending {
        let (pool, engine, meta, results, counts, pb) =
            (pool.clone(), engine.clone(), meta.clone(), results.clone(), counts.clone(), pb.clone());
        let max_steps = s.max_steps;
        set.spawn(async move {
            let mut tries = 0;
            let outcomes = loop {
                let mut sess = pool.acquire().await?;
                match engine.run_pair(&mut sess, &item.task, item.seed, &todo, max_steps).await {
                    Ok(o) => break o,
                    Err(e) if tries < 3 && e.downcast_ref::<EnvError>().is_some_and(|e| e.is_retryable()) => {
                        tries += 1;
                        tracing::warn!(task = %item.task, seed = item.seed, "retrying the episode: {e:#}");
                    }
                    Err(e) => return Err(e.context(format!("{} seed {}", item.task, item.seed))),
                }
            };
            for ep in &outcomes {
                let mut line = meta.line(&item.task, item.seed, ep);
                if with_lens {
                    line.lens = Some(ep.lens.clone());
                }
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
    pool.shutdown().await;
    Ok((joined?, vector_hash, eval_s))
}
