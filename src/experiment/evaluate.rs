//! The evaluation loop, one for every model: the plan's pending (task, seed) pairs run
//! concurrently on the browser pool, their rows batched across episodes by one generation thread;
//! every episode's line is appended (whole or rolled back) as soon as its pair finishes.
use super::meta::RunMeta;
use super::plan::{self, Item};
use super::results::ResultsFile;
use super::settings::Settings;
use super::summary::{summarize, Counts, Summary};
use super::vectors;
use crate::agent::generator::GenStats;
use crate::agent::turn::AgentModel;
use crate::agent::{Agent, Arm, Condition, Generator, GeneratorConfig, PromptBuilder, Steering};
use crate::env::{self, EnvConfig, Pool};
use crate::interp::readout::LensProbe;
use crate::models::hooks::HookPoint;
use crate::models::registry;
use crate::protocol::Protocol;
use crate::steering::vector::SteeringVector;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The arms of every (task, seed): the baseline and one per coefficient.
pub fn arms(s: &Settings) -> Vec<Arm> {
    let mut v = vec![Arm { condition: Condition::Baseline, coeff: 0.0 }];
    if !s.base_only {
        v.extend(s.coeffs.iter().map(|&c| Arm { condition: Condition::Steered, coeff: c }));
    }
    v
}

/// Checks what can be checked before the model loads (a bad `--vector` file, pair or task fails
/// in a second, not after minutes of setup); returns the `--vector` file when one is given.
pub fn preflight(s: &Settings) -> Result<Option<(SteeringVector, PathBuf, String)>> {
    let given = vectors::given_vector(s)?;
    if !s.base_only && s.vector.is_none() {
        let all = crate::steering::pairs::load(s.pairs.as_deref())?;
        crate::steering::pairs::find(&all, &s.pair)?;
    }
    let root = env::html_root()?;
    for t in &s.tasks {
        if !env::tasks::task_exists(&root, t) {
            bail!("unknown task `{t}` (not in {}; see `miniwob-steer tasks`)", root.display());
        }
    }
    Ok(given)
}

/// Runs the plan of `s` with `model` and returns its summary. `given`: [`preflight`]'s
/// `--vector`; `lens`: the in-loop read-out (`--lens`, VLMs).
pub fn execute<E: AgentModel>(
    s: &Settings,
    model: Arc<E>,
    given: Option<(SteeringVector, PathBuf, String)>,
    vector_cache: Option<&Path>,
    progress: bool,
    lens: Option<LensProbe>,
) -> Result<Summary> {
    let t_run = Instant::now();
    let info = model.info().clone();
    let layer =
        if s.base_only && s.vector.is_none() { None } else { Some(registry::parse_layer(&s.layer, info.num_layers)?) };
    vectors::check_given_vector(&given, &info, layer, s.allow_foreign_vector, &s.protocol)?;
    if let Some(g) = &s.gate {
        g.gate.check_model(&info)?;
    }
    let arms = arms(s);
    let items = plan::shard(&s.eval_items()?, s.shard);
    let pairs_hash = vectors::pairs_hash(s)?;
    let mut meta =
        RunMeta::new(s, &info, layer, E::SCREENSHOT, given.as_ref().map(|g| g.2.as_str()), pairs_hash.as_deref());
    let results = ResultsFile::open(&s.out, &meta.config, s.keep_other_configs)?;
    let pending = pending(&items, &arms, &results, &meta);
    let planned = items.len() * arms.len();
    tracing::info!(
        shard = %s.shard, planned, done = planned - pending.iter().map(|p| p.1.len()).sum::<usize>(), vlm = E::SCREENSHOT,
        "plan: {} tasks × {} seeds × {} conditions", s.tasks.len(), s.eval_steps, arms.len()
    );
    let results = Arc::new(Mutex::new(results));
    let (mut failed, mut eval_s, mut gen) = (0usize, 0.0, GenStats::default());
    if !pending.is_empty() {
        let rt = runtime()?;
        let run = Run { s, vector_cache, layer, meta: &meta, results: results.clone(), progress };
        let r = rt.block_on(evaluate(run, model, given, pending, lens));
        rt.shutdown_timeout(Duration::from_secs(5));
        let (f, vh, e, g) = r?;
        (failed, eval_s, gen) = (f, e, g);
        meta.vector_hash = vh;
    }
    let results = results.lock().unwrap_or_else(|p| p.into_inner());
    let mut summary = summarize(s, &meta, &items, &arms, layer, &results, (failed, eval_s), t_run)?;
    summary.rows_per_batch = gen.rows as f64 / gen.batches.max(1) as f64;
    summary.prefix_cache = gen.cache;
    Ok(summary)
}

/// The error a task returns when the results file could not be written: the run stops.
#[derive(Debug)]
pub struct WriteFailed;

impl std::fmt::Display for WriteFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the results file could not be written; the run stopped")
    }
}

/// The plan's (item, arms) pairs that have no line in `results` yet.
pub fn pending(items: &[Item], arms: &[Arm], results: &ResultsFile, meta: &RunMeta) -> Vec<(Item, Vec<Arm>)> {
    items
        .iter()
        .filter_map(|it| {
            let todo: Vec<Arm> = arms
                .iter()
                .filter(|a| !results.contains(&meta.key(&it.task, it.seed, a.condition.name(), a.coeff)))
                .cloned()
                .collect();
            (!todo.is_empty()).then(|| (it.clone(), todo))
        })
        .collect()
}

/// Waits for the episode tasks. A task that could not write its lines ([`WriteFailed`]) stops
/// the run: the others are abandoned (nothing half-written: every append is whole or rolled
/// back) and its error is returned. Otherwise returns the number of failed pairs.
pub async fn join_episodes(set: &mut tokio::task::JoinSet<Result<()>>) -> Result<usize> {
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

pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

/// The browser settings a protocol fixes (`env`): the page clock and the select execution.
pub fn env_config(protocol: &Protocol) -> EnvConfig {
    let e = &protocol.file.env;
    EnvConfig { episode_max_time_ms: e.episode_max_time_ms, select: e.select, ..EnvConfig::default() }
}

/// What the evaluation shares with [`execute`].
struct Run<'a> {
    s: &'a Settings,
    vector_cache: Option<&'a Path>,
    layer: Option<usize>,
    meta: &'a RunMeta,
    results: Arc<Mutex<ResultsFile>>,
    progress: bool,
}

fn progress_bar(total: usize, shown: bool) -> ProgressBar {
    if !shown {
        return ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::hidden());
    }
    let pb = ProgressBar::new(total as u64);
    pb.set_style(
        ProgressStyle::with_template("{spinner} [{bar:25}] {pos}/{len} {elapsed_precise} eta {eta} {msg}")
            .unwrap()
            .progress_chars("=> "),
    );
    pb.enable_steady_tick(Duration::from_millis(500));
    pb
}

/// Returns (failed pairs, vector hash, evaluation seconds, generation counters).
async fn evaluate<E: AgentModel>(
    run: Run<'_>,
    model: Arc<E>,
    given: Option<(SteeringVector, PathBuf, String)>,
    pending: Vec<(Item, Vec<Arm>)>,
    lens: Option<LensProbe>,
) -> Result<(usize, Option<String>, f64, GenStats)> {
    let s = run.s;
    env::browser::install_signal_cleanup();
    let t0 = Instant::now();
    let pool = Pool::new(s.concurrency, env_config(&s.protocol)).await?;
    tracing::info!(sessions = s.concurrency, "browsers up in {:.1}s", t0.elapsed().as_secs_f64());
    let steering = match (s.base_only, run.layer) {
        (false, Some(l)) => {
            let (v, path, hash) = vectors::resolve(&pool, &*model, s, l, given, run.vector_cache).await?;
            vectors::check_vector_hash(&run.results.lock().unwrap_or_else(|p| p.into_inner()), Some(&hash), &path)?;
            let gate = s.gate.as_ref().map(|g| g.gate.clone());
            Some((Steering { vector: v, layer: l, mode: s.coeff_mode, gate }, hash))
        }
        _ => None,
    };
    let mut meta = run.meta.clone();
    let vector_hash = steering.as_ref().map(|(_, h)| h.clone());
    meta.vector_hash = vector_hash.clone();
    let (generator, handle) = Generator::spawn(
        model.clone(),
        steering.map(|(st, _)| st),
        GeneratorConfig {
            max_new_tokens: s.max_new_tokens,
            repetition_penalty: s.protocol.repetition_penalty(model.info())?,
            max_batch_rows: (s.concurrency * (1 + s.coeffs.len())).max(2),
            linger: Duration::from_millis(250),
            prefix_cache_mb: s.prefix_cache_mb,
            capture: lens.as_ref().map(|l| HookPoint::ResidPost(l.layer)),
        },
    );
    let t_eval = Instant::now();
    let total: usize = pending.iter().map(|p| p.1.len()).sum();
    let pb = progress_bar(total, run.progress);
    let meta = Arc::new(meta);
    let builder = Arc::new(PromptBuilder::new(s.protocol.clone())?);
    let lens = lens.map(Arc::new);
    let counts = Arc::new(Mutex::new(Counts::default()));
    let mut set = tokio::task::JoinSet::new();
    for (item, todo) in pending {
        let (pool, generator, model, meta, builder, results, counts, pb, lens) = (
            pool.clone(),
            generator.clone(),
            model.clone(),
            meta.clone(),
            builder.clone(),
            run.results.clone(),
            counts.clone(),
            pb.clone(),
            lens.clone(),
        );
        let max_steps = s.max_steps;
        set.spawn(async move {
            let agent =
                Agent { generator: &generator, model: &*model, prompts: &builder, max_steps, lens: lens.as_deref() };
            let outcomes = pool
                .run(3, |mut sess| {
                    let (agent, item, todo) = (&agent, &item, &todo);
                    async move { agent.run_pair(&mut sess, &item.task, item.seed, todo).await }
                })
                .await
                .with_context(|| format!("{} seed {}", item.task, item.seed))?;
            for ep in &outcomes {
                let mut line = meta.line(&item.task, item.seed, ep);
                if lens.is_some() {
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
mod tests {
    use super::{join_episodes, WriteFailed};
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
}
