//! One model serving many concurrent episodes: a generation thread that batches the rows of
//! every pending request into one `generate` call with per-row steering coefficients
//! (DESIGN.md §7). A request's rows always share a batch, so the baseline row and the steered
//! rows of one episode decode together.
use crate::models::generate::{self, GenerateConfig};
use crate::models::hooks::{HookSpec, Positions};
use crate::models::load::LoadedModel;
use crate::models::prefix_cache::{CacheStats, PrefixCache};
use crate::steering::caa::{steering_spec, CoeffMode};
use crate::steering::vector::SteeringVector;
use anyhow::{anyhow, Result};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One row to generate: a rendered prompt and its steering coefficient (0 = baseline).
#[derive(Debug, Clone)]
pub struct Row {
    pub prompt: String,
    pub coeff: f32,
}

/// What one row produced.
#[derive(Debug, Clone)]
pub struct RowOutput {
    pub text: String,
    pub tokens_in: usize,
    pub tokens_out: usize,
    /// Wall time of the batch this row was in.
    pub batch_s: f64,
}

struct Request {
    rows: Vec<Row>,
    reply: tokio::sync::oneshot::Sender<Result<Vec<RowOutput>, String>>,
}

/// Steering applied by the generator: a vector, a layer and how coefficients are read.
#[derive(Clone)]
pub struct Steering {
    pub vector: SteeringVector,
    pub layer: usize,
    pub mode: CoeffMode,
}

/// Settings of the generation thread.
#[derive(Clone)]
pub struct GeneratorConfig {
    pub max_new_tokens: usize,
    /// Upper bound on rows per forward batch.
    pub max_batch_rows: usize,
    /// After the first request arrives, wait this long for more before generating.
    pub linger: Duration,
    /// Bound of the prefix cache shared by every request (MiB; 0 = off).
    pub prefix_cache_mb: usize,
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
#[derive(Clone)]
pub struct Generator {
    tx: mpsc::Sender<Request>,
}

impl Generator {
    /// Starts the generation thread. It stops when every [`Generator`] clone is dropped; join
    /// the handle to get its counters.
    pub fn spawn(
        model: Arc<LoadedModel>,
        steering: Option<Steering>,
        cfg: GeneratorConfig,
    ) -> (Generator, std::thread::JoinHandle<GenStats>) {
        let (tx, rx) = mpsc::channel::<Request>();
        let handle = std::thread::Builder::new()
            .name("generator".into())
            .spawn(move || serve(&model, steering.as_ref(), &cfg, rx))
            .expect("spawning the generator thread");
        (Generator { tx }, handle)
    }

    /// Generates every row of `rows` in one batch (possibly with other requests' rows).
    pub async fn generate(&self, rows: Vec<Row>) -> Result<Vec<RowOutput>> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.tx.send(Request { rows, reply }).map_err(|_| anyhow!("the generator thread has stopped"))?;
        rx.await.map_err(|_| anyhow!("the generator thread stopped before answering"))?.map_err(|e| anyhow!(e))
    }
}

fn serve(
    model: &LoadedModel,
    steering: Option<&Steering>,
    cfg: &GeneratorConfig,
    rx: mpsc::Receiver<Request>,
) -> GenStats {
    let mut stats = GenStats::default();
    let gen_cfg = GenerateConfig {
        max_new_tokens: cfg.max_new_tokens,
        stop_ids: model.tokenizer.stop_token_ids(),
        pad_id: model.tokenizer.pad_token_id().unwrap_or(0),
        ..Default::default()
    };
    let mut cache = PrefixCache::new(cfg.prefix_cache_mb);
    let mut carry: Option<Request> = None;
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
        let result = run_batch(model, steering, &gen_cfg, &batch, &mut cache);
        let secs = t0.elapsed().as_secs_f64();
        stats.batches += 1;
        stats.rows += nrows as u64;
        stats.busy_s += secs;
        match result {
            Ok(mut outs) => {
                for req in batch {
                    let rest = outs.split_off(req.rows.len());
                    let mine = std::mem::replace(&mut outs, rest);
                    let mine = mine.into_iter().map(|mut o| {
                        o.batch_s = secs;
                        o
                    });
                    let _ = req.reply.send(Ok(mine.collect()));
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

fn run_batch(
    model: &LoadedModel,
    steering: Option<&Steering>,
    gen_cfg: &GenerateConfig,
    batch: &[Request],
    cache: &mut PrefixCache,
) -> Result<Vec<RowOutput>> {
    let rows: Vec<&Row> = batch.iter().flat_map(|r| r.rows.iter()).collect();
    let prompts: Vec<Vec<u32>> =
        rows.iter().map(|r| model.tokenizer.encode(&r.prompt, false)).collect::<Result<_>>()?;
    let coeffs: Vec<f32> = rows.iter().map(|r| r.coeff).collect();
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
    let gens = generate::generate_shared(&model.decoder, &prompts, gen_cfg, &spec, Some(cache))?;
    gens.into_iter()
        .zip(&prompts)
        .map(|(g, p)| {
            Ok(RowOutput {
                text: model.tokenizer.decode(&g.tokens, true)?,
                tokens_in: p.len(),
                tokens_out: g.tokens.len() + usize::from(g.stop.is_some()),
                batch_s: 0.0,
            })
        })
        .collect()
}
