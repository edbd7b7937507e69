//! One model serving many concurrent episodes: a generation thread that batches the rows of
//! every pending request into one [`Engine::generate`] call with per-row steering coefficients
//! (DESIGN.md §7), for text models and VLMs alike. A request's rows always share a batch, so the
//! baseline row and the steered rows of one episode decode together.
use crate::models::engine::Engine;
use crate::models::generate::GenerateConfig;
use crate::models::hooks::{HookPoint, HookSpec, Positions};
use crate::models::prefix_cache::{CacheStats, PrefixCache};
use crate::probe::gate::{Gate, GateDecision};
use crate::steering::caa::{steering_spec, CoeffMode};
use crate::steering::vector::SteeringVector;
use anyhow::{anyhow, Result};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One row to generate: a model input and its steering coefficient (0 = baseline).
#[derive(Debug, Clone)]
pub struct Row<I> {
    pub input: I,
    pub coeff: f32,
}

/// What one row produced.
#[derive(Debug, Clone)]
pub struct RowOutput {
    pub text: String,
    pub tokens_in: usize,
    pub tokens_out: usize,
    /// With [`GeneratorConfig::capture`]: the prompt's image states there (see [`Engine::generate`]).
    pub image_states: Option<candle_core::Tensor>,
    /// A gated steered row: the gate's reading of this prompt (the row ran with α when `on`,
    /// unsteered otherwise). `None` for baseline rows and runs without a gate.
    pub gate: Option<GateDecision>,
}

type Reply = tokio::sync::oneshot::Sender<Result<Vec<RowOutput>, String>>;

struct Request<I> {
    rows: Vec<Row<I>>,
    reply: Reply,
}

/// Steering applied by the generator: a vector, a layer and how coefficients are read.
#[derive(Clone)]
pub struct Steering {
    pub vector: SteeringVector,
    pub layer: usize,
    pub mode: CoeffMode,
    /// Conditional steering (`run --gate`): a steered row keeps its α on a step only when the
    /// probe, read on that step's unsteered prompt, says so.
    pub gate: Option<Arc<Gate>>,
}

/// Settings of the generation thread.
#[derive(Clone)]
pub struct GeneratorConfig {
    pub max_new_tokens: usize,
    /// transformers' repetition penalty (1 = off; a protocol's `generation.repetition_penalty`).
    pub repetition_penalty: f32,
    /// Upper bound on rows per forward batch.
    pub max_batch_rows: usize,
    /// After the first request arrives, wait this long for more before generating.
    pub linger: Duration,
    /// Bound of the prefix cache shared by every request (MiB; 0 = off).
    pub prefix_cache_mb: usize,
    /// Capture every row's image states at this point (the lens read-out; VLMs only).
    pub capture: Option<HookPoint>,
}

/// Counters of the generation thread.
#[derive(Debug, Default, Clone, Copy)]
pub struct GenStats {
    pub batches: u64,
    pub rows: u64,
    pub busy_s: f64,
    pub cache: CacheStats,
}

/// The client side: cheap to clone, usable from async tasks.
pub struct Generator<E: Engine> {
    tx: mpsc::Sender<Request<E::Input>>,
}

impl<E: Engine> Clone for Generator<E> {
    fn clone(&self) -> Self {
        Generator { tx: self.tx.clone() }
    }
}

impl<E: Engine> Generator<E> {
    /// Starts the generation thread. It stops when every [`Generator`] clone is dropped; join
    /// the handle to get its counters.
    pub fn spawn(
        model: Arc<E>,
        steering: Option<Steering>,
        cfg: GeneratorConfig,
    ) -> (Generator<E>, std::thread::JoinHandle<GenStats>) {
        let (tx, rx) = mpsc::channel::<Request<E::Input>>();
        let handle = std::thread::Builder::new()
            .name("generator".into())
            .spawn(move || serve(&*model, steering.as_ref(), &cfg, rx))
            .expect("spawning the generator thread");
        (Generator { tx }, handle)
    }

    /// Generates every row of `rows` in one batch (possibly with other requests' rows).
    pub async fn generate(&self, rows: Vec<Row<E::Input>>) -> Result<Vec<RowOutput>> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.tx.send(Request { rows, reply }).map_err(|_| anyhow!("the generator thread has stopped"))?;
        rx.await.map_err(|_| anyhow!("the generator thread stopped before answering"))?.map_err(|e| anyhow!(e))
    }
}

fn serve<E: Engine>(
    model: &E,
    steering: Option<&Steering>,
    cfg: &GeneratorConfig,
    rx: mpsc::Receiver<Request<E::Input>>,
) -> GenStats {
    let mut stats = GenStats::default();
    let mut gen_cfg = model.generate_config(cfg.max_new_tokens);
    gen_cfg.repetition_penalty = cfg.repetition_penalty;
    let mut cache = PrefixCache::new(cfg.prefix_cache_mb);
    let mut carry: Option<Request<E::Input>> = None;
    loop {
        let first = match carry.take() {
            Some(r) => r,
            None => match rx.recv() {
                Ok(r) => r,
                Err(_) => {
                    stats.cache = cache.stats();
                    return stats;
                }
            },
        };
        let mut batch = vec![first];
        let mut nrows = batch[0].rows.len();
        let deadline = Instant::now() + cfg.linger;
        while nrows < cfg.max_batch_rows {
            let next = match rx.try_recv() {
                Ok(r) => Some(r),
                Err(mpsc::TryRecvError::Empty) => {
                    let now = Instant::now();
                    if now >= deadline {
                        None
                    } else {
                        rx.recv_timeout(deadline - now).ok()
                    }
                }
                Err(mpsc::TryRecvError::Disconnected) => None,
            };
            match next {
                Some(r) if nrows + r.rows.len() <= cfg.max_batch_rows => {
                    nrows += r.rows.len();
                    batch.push(r);
                }
                Some(r) => {
                    carry = Some(r);
                    break;
                }
                None => break,
            }
        }
        let t0 = Instant::now();
        let result = run_batch(model, steering, &gen_cfg, cfg.capture, &batch, &mut cache);
        let secs = t0.elapsed().as_secs_f64();
        stats.batches += 1;
        stats.rows += nrows as u64;
        stats.busy_s += secs;
        match result {
            Ok(mut outs) => {
                for req in batch {
                    let rest = outs.split_off(req.rows.len());
                    let _ = req.reply.send(Ok(std::mem::replace(&mut outs, rest)));
                }
            }
            Err(e) => {
                let msg = format!("{e:#}");
                for req in batch {
                    let _ = req.reply.send(Err(msg.clone()));
                }
            }
        }
    }
}

fn run_batch<E: Engine>(
    model: &E,
    steering: Option<&Steering>,
    gen_cfg: &GenerateConfig,
    capture: Option<HookPoint>,
    batch: &[Request<E::Input>],
    cache: &mut PrefixCache,
) -> Result<Vec<RowOutput>> {
    let rows: Vec<&Row<E::Input>> = batch.iter().flat_map(|r| r.rows.iter()).collect();
    let mut coeffs: Vec<f32> = rows.iter().map(|r| r.coeff).collect();
    let decisions = match steering.and_then(|s| s.gate.as_ref()) {
        Some(gate) => gate_rows(model, gate, &rows, cache)?,
        None => vec![None; rows.len()],
    };
    for (c, d) in coeffs.iter_mut().zip(&decisions) {
        if d.is_some_and(|d| !d.on) {
            *c = 0.0;
        }
    }
    let spec = match steering {
        Some(s) if coeffs.iter().any(|&c| c != 0.0) => {
            steering_spec(&s.vector, s.layer, &coeffs, s.mode, Positions::Last)?
        }
        Some(_) | None => {
            if coeffs.iter().any(|&c| c != 0.0) {
                anyhow::bail!("a steered row was requested but no steering vector is loaded");
            }
            HookSpec::none()
        }
    };
    let inputs: Vec<&E::Input> = rows.iter().map(|r| &r.input).collect();
    let gens = model.generate(&inputs, gen_cfg, &spec, cache, capture)?;
    gens.into_iter()
        .zip(&inputs)
        .zip(decisions)
        .map(|((g, input), gate)| {
            Ok(RowOutput {
                text: model.tokenizer().decode(&g.generation.tokens, true)?,
                tokens_in: E::ids(input).len(),
                tokens_out: g.generation.tokens.len() + usize::from(g.generation.stop.is_some()),
                image_states: g.image_states,
                gate,
            })
        })
        .collect()
}

/// The gate's decision for every steered row (rows with the same input read once); `None` for
/// baseline rows.
fn gate_rows<E: Engine>(
    model: &E,
    gate: &Gate,
    rows: &[&Row<E::Input>],
    cache: &mut PrefixCache,
) -> Result<Vec<Option<GateDecision>>> {
    let mut unique: Vec<&E::Input> = Vec::new();
    let mut of_row: Vec<Option<usize>> = Vec::with_capacity(rows.len());
    for r in rows {
        if r.coeff == 0.0 {
            of_row.push(None);
            continue;
        }
        let u = unique.iter().position(|u| *u == &r.input).unwrap_or_else(|| {
            unique.push(&r.input);
            unique.len() - 1
        });
        of_row.push(Some(u));
    }
    if unique.is_empty() {
        return Ok(vec![None; rows.len()]);
    }
    let decided = gate.decide_inputs(model, &unique, cache)?;
    Ok(of_row.into_iter().map(|u| u.map(|u| decided[u])).collect())
}
