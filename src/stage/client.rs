//! The driver's side: a [`Pipeline`] of connected stages that a [`Decoder`] built by
//! [`Decoder::remote`] sends every forward to, and the remote KV-cache handles its states hold.
use super::manifest::{SourceModel, StageManifest};
use super::wire::{self, Ack, Forward, ForwardReply};
use crate::models::decoder::{Decoder, Splice, State};
use crate::models::hooks::{Captures, HookPoint, HookSpec, StepInfo};
use anyhow::{bail, Context, Result};
use bytes::Bytes;
use candle_core::{DType, Tensor};
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The prefix of a model spec naming stages instead of weights: `stages:ADDR,ADDR,…`.
pub const SCHEME: &str = "stages:";
/// A file holding the shared token (`stage serve --token-file`), read by the driver.
pub const TOKEN_ENV: &str = "MINIWOB_STEER_STAGE_TOKEN_FILE";
/// The largest reply body the driver reads.
const MAX_REPLY: usize = 4 << 30;
/// Seconds one request may take before the stage counts as timed out.
pub const TIMEOUT_ENV: &str = "MINIWOB_STEER_STAGE_TIMEOUT_S";
/// Seconds a failed call waits, in all, for its stage to come back before giving up.
pub const RETRY_ENV: &str = "MINIWOB_STEER_STAGE_RETRY_S";

/// The stage addresses of a `stages:` model spec.
pub fn addrs_of(spec: &str) -> Option<Vec<String>> {
    spec.strip_prefix(SCHEME).map(|s| s.split(',').map(|a| a.trim().to_string()).filter(|a| !a.is_empty()).collect())
}

/// A failed call to one stage. `retryable`: the stage was unreachable, timed out, or lost the
/// state (it restarted): the same call can succeed once it is back.
#[derive(Debug, thiserror::Error)]
#[error("stage {stage} ({addr}): {msg}")]
pub struct StageError {
    pub stage: usize,
    pub addr: String,
    pub msg: String,
    pub retryable: bool,
}

/// What `GET /info` returns.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StageInfo {
    pub manifest: StageManifest,
    /// The compute dtype (`f32`, `bf16`, …) and the weight dtype choice (`gguf`, `f32`, …).
    pub dtype: String,
    pub weights_dtype: String,
    pub batch_invariant: bool,
    pub device: String,
    /// Side files a driver may fetch (`GET /file/NAME`): config, tokenizer, templates.
    pub files: Vec<String>,
}

/// Connected stages, in order; shared by a driver's decoder and every state it made.
pub struct Pipeline {
    addrs: Vec<String>,
    /// Each stage's `/info` at connect.
    infos: Vec<StageInfo>,
    token: Option<String>,
    timeout: Duration,
    retry: Duration,
    /// `Some` until dropped (see the `Drop` impl).
    rt: Option<tokio::runtime::Runtime>,
    client: hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    next_id: AtomicU64,
    /// Side files of the first stage (config, tokenizer), fetched at connect.
    files: tempfile::TempDir,
    /// Bytes sent and received, for `bench stages`.
    sent: AtomicU64,
    received: AtomicU64,
}

/// A state's keys and values on every stage, under one id; freed on every stage when dropped.
pub struct RemoteState {
    id: u64,
    pipeline: Arc<Pipeline>,
    /// Whether any stage may hold it (a forward, fork or merge was sent).
    sent: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for RemoteState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RemoteState({})", self.id)
    }
}

impl Drop for RemoteState {
    fn drop(&mut self) {
        if !self.sent.load(Ordering::Relaxed) {
            return;
        }
        let Ok(body) = wire::encode(&wire::Free { states: vec![self.id] }, &[]) else { return };
        // Fire and forget, on the pipeline's runtime: a hung stage must not hold up the caller
        // (a lost free is covered by the stage's idle eviction).
        for k in 0..self.pipeline.addrs.len() {
            self.pipeline.spawn_free(k, body.clone(), self.id);
        }
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        // The last model handle may go inside the caller's runtime, where a blocking shutdown
        // would panic.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl RemoteState {
    /// A new, empty state of the same pipeline.
    pub fn fresh(&self) -> Arc<RemoteState> {
        self.pipeline.new_state()
    }

    fn mark_sent(&self) {
        self.sent.store(true, Ordering::Relaxed);
    }

    /// A new state whose row `i` is row `rows[i]` of this one, on every stage.
    pub fn fork(&self, rows: &[usize]) -> Result<Arc<RemoteState>> {
        let to = self.pipeline.new_state();
        to.mark_sent();
        let body = wire::encode(&wire::Fork { from: self.id, to: to.id, rows: rows.to_vec() }, &[])?;
        self.pipeline.each(|k| self.pipeline.call_ack(k, "/fork", body.clone()))?;
        Ok(to)
    }

    /// One state of the batch-1 states `parts` (this one among them), on every stage.
    pub fn merge(&self, parts: &[Arc<RemoteState>]) -> Result<Arc<RemoteState>> {
        let to = self.pipeline.new_state();
        to.mark_sent();
        let body = wire::encode(&wire::Merge { from: parts.iter().map(|p| p.id).collect(), to: to.id }, &[])?;
        self.pipeline.each(|k| self.pipeline.call_ack(k, "/merge", body.clone()))?;
        Ok(to)
    }
}

fn env_secs(name: &str, default: u64) -> Result<Duration> {
    match std::env::var(name) {
        Ok(v) => Ok(Duration::from_secs(v.trim().parse().with_context(|| format!("{name}={v}: expected seconds"))?)),
        Err(_) => Ok(Duration::from_secs(default)),
    }
}

/// The token of [`TOKEN_ENV`]'s file, if set.
pub fn token_from_env() -> Result<Option<String>> {
    match std::env::var_os(TOKEN_ENV) {
        Some(p) => Ok(Some(read_token(Path::new(&p))?)),
        None => Ok(None),
    }
}

/// A token file's content (one line, at least 16 characters).
pub fn read_token(path: &Path) -> Result<String> {
    let t = std::fs::read_to_string(path).with_context(|| format!("reading the token file {}", path.display()))?;
    let t = t.trim().to_string();
    if t.len() < 16 {
        bail!("{}: a token needs at least 16 characters, found {}", path.display(), t.len());
    }
    Ok(t)
}

impl Pipeline {
    /// Connects to the stages at `addrs` (in order), checks they are the stages of one split of
    /// one model, tiling its layers, and fetches the first stage's config and tokenizer.
    pub fn connect(addrs: &[String]) -> Result<Arc<Pipeline>> {
        let p = Self::open(addrs)?;
        for name in &p.infos[0].files {
            // A file name from the wire: one plain component, so it cannot point elsewhere.
            let mut parts = Path::new(name).components();
            if !matches!((parts.next(), parts.next()), (Some(std::path::Component::Normal(_)), None)) {
                bail!("stage 0 ({}): side file name {name:?} is not a plain file name: refused", p.addrs[0]);
            }
            let bytes = p.call(0, Method::GET, &format!("/file/{name}"), Vec::new())?;
            let path = p.files.path().join(name);
            std::fs::write(&path, &bytes).with_context(|| format!("writing {}", path.display()))?;
        }
        let src = &p.infos[0].manifest.source;
        tracing::info!(
            model = %src.name, stages = addrs.len(), dtype = %p.infos[0].dtype,
            "connected to {}", addrs.join(", ")
        );
        Ok(Arc::new(p))
    }

    /// The source model's family as stage 0 reports it (one `/info` call).
    pub fn family_of(addrs: &[String]) -> Result<String> {
        let p = Self::new(&addrs[..addrs.len().min(1)])?;
        Ok(p.fetch_info(0)?.manifest.source.family)
    }

    /// [`connect`](Self::connect) without fetching the side files.
    fn open(addrs: &[String]) -> Result<Pipeline> {
        let mut p = Self::new(addrs)?;
        p.infos = (0..addrs.len()).map(|k| p.fetch_info(k)).collect::<Result<_>>()?;
        p.check()?;
        Ok(p)
    }

    fn new(addrs: &[String]) -> Result<Pipeline> {
        if addrs.is_empty() {
            bail!("--stages: no addresses");
        }
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(hyper_util::client::legacy::connect::HttpConnector::new());
        Ok(Pipeline {
            addrs: addrs.to_vec(),
            infos: Vec::new(),
            token: token_from_env()?,
            timeout: env_secs(TIMEOUT_ENV, 600)?,
            retry: env_secs(RETRY_ENV, 120)?,
            rt: Some(rt),
            client,
            next_id: AtomicU64::new(rand::random::<u64>() >> 16),
            files: tempfile::Builder::new().prefix("miniwob-steer-stages-").tempdir()?,
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
        })
    }

    fn fetch_info(&self, k: usize) -> Result<StageInfo> {
        self.fetch_info_within(k, self.timeout)
    }

    fn fetch_info_within(&self, k: usize, timeout: Duration) -> Result<StageInfo> {
        let bytes = self.call_within(k, Method::GET, "/info", Vec::new(), timeout)?;
        serde_json::from_slice(&bytes).with_context(|| format!("stage {k} ({}): bad /info reply", self.addrs[k]))
    }

    /// The stages are one split of one model, in order, tiling its layers, in one dtype.
    fn check(&self) -> Result<()> {
        let n = self.addrs.len();
        let first = &self.infos[0];
        let (src, addr0) = (&first.manifest.source, &self.addrs[0]);
        let mut next = 0;
        for (k, info) in self.infos.iter().enumerate() {
            let m = &info.manifest;
            let here = format!("stage {k} ({})", self.addrs[k]);
            if m.source.weights_hash != src.weights_hash || m.source.name != src.name {
                bail!(
                    "{here} serves a split of {} (weights {}), stage 0 ({addr0}) one of {} (weights {}): \
                     refused (start every stage from the same `split`)",
                    m.source.name,
                    m.source.weights_hash,
                    src.name,
                    src.weights_hash
                );
            }
            if m.stages != n || m.stage != k {
                bail!("{here} is stage {} of a {}-stage split, given as stage {k} of {n}", m.stage, m.stages);
            }
            if m.layers[0] != next {
                bail!("{here} holds layers {}..{}, expected them to start at {next}", m.layers[0], m.layers[1]);
            }
            next = m.layers[1];
            if info.dtype != first.dtype || info.weights_dtype != first.weights_dtype {
                bail!(
                    "{here} runs {} ({}), stage 0 ({addr0}) {} ({}): start every stage with the same --dtype",
                    info.weights_dtype,
                    info.dtype,
                    first.weights_dtype,
                    first.dtype
                );
            }
        }
        if next != first.manifest.num_layers {
            bail!("the stages hold layers 0..{next} of {}: the last stage is missing", first.manifest.num_layers);
        }
        Ok(())
    }

    pub fn source(&self) -> &SourceModel {
        &self.infos[0].manifest.source
    }
    /// The first stage's side files (config.json, tokenizer, templates; `metadata.gguf` for a
    /// GGUF split).
    pub fn files_dir(&self) -> &Path {
        self.files.path()
    }
    pub fn weights_dtype(&self) -> &str {
        &self.infos[0].weights_dtype
    }
    pub fn dtype(&self) -> DType {
        match self.infos[0].dtype.as_str() {
            "bf16" => DType::BF16,
            "f16" => DType::F16,
            _ => DType::F32,
        }
    }
    pub fn batch_invariant(&self) -> bool {
        self.infos.iter().all(|i| i.batch_invariant)
    }
    pub fn addrs(&self) -> Vec<&str> {
        self.addrs.iter().map(|a| a.as_str()).collect()
    }
    /// Bytes sent to and received from the stages so far.
    pub fn traffic(&self) -> (u64, u64) {
        (self.sent.load(Ordering::Relaxed), self.received.load(Ordering::Relaxed))
    }

    pub fn new_state(self: &Arc<Self>) -> Arc<RemoteState> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        Arc::new(RemoteState { id, pipeline: self.clone(), sent: Default::default() })
    }

    /// Sends `/free` to stage `k` without waiting for it.
    fn spawn_free(&self, k: usize, body: Vec<u8>, id: u64) {
        let Some(rt) = self.rt.as_ref() else { return };
        let Ok(req) = self.request(k, Method::POST, "/free", body) else { return };
        let client = self.client.clone();
        let timeout = self.timeout.min(Duration::from_secs(30));
        rt.spawn(async move {
            match tokio::time::timeout(timeout, client.request(req)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::debug!("freeing state {id} on stage {k}: {e}"),
                Err(_) => tracing::debug!("freeing state {id} on stage {k}: timed out"),
            }
        });
    }

    fn request(&self, k: usize, method: Method, path: &str, body: Vec<u8>) -> Result<Request<Full<Bytes>>> {
        let mut req = Request::builder().method(method).uri(format!("http://{}{path}", self.addrs[k]));
        if let Some(t) = &self.token {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        self.sent.fetch_add(body.len() as u64, Ordering::Relaxed);
        Ok(req.body(Full::new(Bytes::from(body)))?)
    }

    fn each(&self, f: impl Fn(usize) -> Result<()>) -> Result<()> {
        (0..self.addrs.len()).try_for_each(f)
    }

    fn call_ack(&self, k: usize, path: &str, body: Vec<u8>) -> Result<()> {
        let bytes = self.call(k, Method::POST, path, body)?;
        let _: (Ack, _) = wire::decode(&bytes, &format!("stage {k} ({}): {path} reply", self.addrs[k]))?;
        Ok(())
    }

    /// One HTTP request to stage `k`; a failure is a [`StageError`] naming the stage.
    fn call(&self, k: usize, method: Method, path: &str, body: Vec<u8>) -> Result<Bytes> {
        self.call_within(k, method, path, body, self.timeout)
    }

    fn call_within(&self, k: usize, method: Method, path: &str, body: Vec<u8>, timeout: Duration) -> Result<Bytes> {
        let addr = &self.addrs[k];
        let err = |msg: String, retryable: bool| StageError { stage: k, addr: addr.clone(), msg, retryable };
        let req = self.request(k, method, path, body)?;
        let fut = async {
            let resp = tokio::time::timeout(timeout, self.client.request(req))
                .await
                .map_err(|_| err(format!("{path}: no reply within {} s", timeout.as_secs_f64()), true))?
                .map_err(|e| err(format!("{path}: {}", error_chain(&e)), true))?;
            let status = resp.status();
            let body = http_body_util::Limited::new(resp.into_body(), MAX_REPLY);
            let bytes = tokio::time::timeout(timeout, body.collect())
                .await
                .map_err(|_| err(format!("{path}: the reply did not finish within {} s", timeout.as_secs_f64()), true))?
                .map_err(|e| err(format!("{path}: reading the reply: {e}"), true))?
                .to_bytes();
            Ok::<_, StageError>((status, bytes))
        };
        // Our own runtime, entered from a plain thread (the caller may be on another runtime).
        let rt = self.rt.as_ref().expect("the runtime lives as long as the pipeline");
        let (status, bytes) = if tokio::runtime::Handle::try_current().is_ok() {
            std::thread::scope(|s| s.spawn(|| rt.block_on(fut)).join().expect("the request thread panicked"))?
        } else {
            rt.block_on(fut)?
        };
        self.received.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        if status != StatusCode::OK {
            let msg = String::from_utf8_lossy(&bytes).trim().to_string();
            // 410: the stage does not know the state (it restarted); the call can be redone.
            return Err(err(format!("{path}: {status}: {msg}"), status == StatusCode::GONE).into());
        }
        Ok(bytes)
    }

    /// Waits until every stage answers `/info` again with the manifest it had at connect (a
    /// restarted stage from another split is refused), for at most `budget`.
    fn wait_ready(&self, budget: Duration) -> Result<()> {
        let t0 = Instant::now();
        for (k, was) in self.infos.iter().enumerate() {
            loop {
                // Each probe within what is left of the budget (a hung stage must not overrun it).
                let left = budget.saturating_sub(t0.elapsed()).max(Duration::from_millis(100));
                match self.fetch_info_within(k, left.min(Duration::from_secs(10))) {
                    Ok(info)
                        if info.manifest == was.manifest
                            && info.dtype == was.dtype
                            && info.weights_dtype == was.weights_dtype
                            && info.batch_invariant == was.batch_invariant =>
                    {
                        break
                    }
                    Ok(info) if info.manifest == was.manifest => bail!(
                        "stage {k} ({}) came back running {} ({}), not {} ({}): refused (restart it with the same --dtype)",
                        self.addrs[k],
                        info.weights_dtype,
                        info.dtype,
                        was.weights_dtype,
                        was.dtype
                    ),
                    Ok(info) => bail!(
                        "stage {k} ({}) came back serving another split ({} layers {}..{}, weights {}): refused",
                        self.addrs[k],
                        info.manifest.source.name,
                        info.manifest.layers[0],
                        info.manifest.layers[1],
                        info.manifest.source.weights_hash
                    ),
                    Err(e) if t0.elapsed() < budget => {
                        tracing::debug!("waiting for stage {k}: {e:#}");
                        std::thread::sleep(Duration::from_millis(500));
                    }
                    Err(e) => {
                        return Err(e.context(format!("stage {k} did not come back within {} s", budget.as_secs())))
                    }
                }
            }
        }
        Ok(())
    }

    /// One forward through every stage (see [`Decoder::forward_part`]): token ids go to the
    /// first, each stage's residual to the next; hooks run on the stage owning their point.
    /// Returns the last stage's logits when `logits` asks for them.
    #[allow(clippy::too_many_arguments)] // Decoder::forward_ids' arguments
    pub fn forward(
        &self,
        dec: &Decoder,
        ids: &Tensor,
        splice: Option<&Splice>,
        state: &mut State,
        step: &StepInfo,
        spec: &HookSpec,
        caps: &mut Captures,
        logits: Option<bool>,
        rope: Option<(Tensor, Tensor)>,
    ) -> Result<Option<Tensor>> {
        let cfg = &dec.cfg;
        let (b, seq) = ids.dims2()?;
        if b != state.batch() {
            bail!("batch of {b} rows but the state was made for {}", state.batch());
        }
        if !spec.is_empty() {
            spec.validate(b, cfg.hidden_size, cfg.num_layers)?;
        }
        if state.adapters.iter().any(|a| a.is_some()) {
            bail!("LoRA adapters are not served by pipeline stages");
        }
        let handle = state.remote.as_ref().context("a local state given to a pipeline")?;
        // Copy on write: another state still shares these keys and values.
        if Arc::strong_count(handle) > 1 {
            let fork = handle.fork(&(0..b).collect::<Vec<_>>())?;
            state.remote = Some(fork);
        }
        let handle = state.remote.as_ref().expect("set above");
        handle.mark_sent();
        let id = handle.id;
        let n = self.addrs.len();
        let mut x = ids.clone();
        for (k, info) in self.infos.iter().enumerate() {
            let m = &info.manifest;
            let owns = |p: HookPoint| match p {
                HookPoint::Embed => k == 0,
                HookPoint::ResidPre(i) | HookPoint::ResidPost(i) => (m.layers[0]..m.layers[1]).contains(&i),
                HookPoint::FinalNorm => k + 1 == n,
            };
            let (interventions, captures, mut tensors) = wire::spec_part(spec, owns);
            tensors.push(("xs".into(), x.clone()));
            if let Some((cos, sin)) = &rope {
                tensors.push(("cos".into(), cos.clone()));
                tensors.push(("sin".into(), sin.clone()));
            }
            let spliced = k == 0 && splice.is_some();
            if let (true, Some(sp)) = (spliced, splice) {
                tensors.push(("feats".into(), sp.feats.clone()));
                tensors.push((
                    "gather".into(),
                    Tensor::from_vec(sp.gather.clone(), sp.gather.len(), &candle_core::Device::Cpu)?,
                ));
            }
            let header = Forward {
                state: id,
                left_pad: state.left_pad.clone(),
                cols: state.cols,
                step: step.into(),
                interventions,
                captures,
                logits: if k + 1 == n { logits } else { None },
                rope: rope.is_some(),
                splice: spliced,
            };
            let bytes = self.call(k, Method::POST, "/forward", wire::encode(&header, &tensors)?)?;
            let what = format!("stage {k} ({}): forward reply", self.addrs[k]);
            let (reply, mut out): (ForwardReply, _) = wire::decode(&bytes, &what)?;
            for c in &reply.captures {
                let t = wire::take(&mut out, &format!("cap.{c}"), &what)?;
                caps.tensors.entry(c.parse()?).or_default().push(t);
            }
            if reply.out {
                x = wire::take(&mut out, "out", &what)?;
            } else if k + 1 < n {
                bail!("stage {k} ({}) returned no residual", self.addrs[k]);
            }
        }
        state.cols += seq;
        Ok(logits.map(|_| x))
    }

    /// The first stage's vision tower on `pixels` (`[patches, patch_dim]`).
    pub fn vision(&self, pixels: &Tensor, grids: &[[usize; 3]]) -> Result<Tensor> {
        if !self.infos[0].manifest.vision {
            bail!("stage 0 ({}) holds no vision tower", self.addrs[0]);
        }
        let body = wire::encode(&wire::Vision { grids: grids.to_vec() }, &[("pixels".into(), pixels.clone())])?;
        let bytes = self.call(0, Method::POST, "/vision", body)?;
        let (_, mut out): (Ack, _) = wire::decode(&bytes, "vision reply")?;
        wire::take(&mut out, "features", "vision reply")
    }

    /// Runs `f`; when it fails because a stage was unreachable, timed out or restarted, waits
    /// for every stage to be back (the same split) and runs it again, for at most
    /// [`RETRY_ENV`] seconds in all. `f` must start from scratch (new states): a restarted stage
    /// has lost every key and value.
    pub fn retry<T>(&self, mut f: impl FnMut() -> Result<T>) -> Result<T> {
        // The budget is for waiting: the calls themselves may take as long as they take.
        let mut waited = Duration::ZERO;
        let mut attempt = 1;
        loop {
            match f() {
                Ok(v) => return Ok(v),
                Err(e) => {
                    let Some(se) = e.chain().find_map(|c| c.downcast_ref::<StageError>()) else { return Err(e) };
                    let left = self.retry.saturating_sub(waited);
                    if !se.retryable || left.is_zero() {
                        return Err(e);
                    }
                    tracing::warn!(
                        "{se}; waiting up to {} s for the stages, then redoing the call (attempt {})",
                        left.as_secs(),
                        attempt + 1
                    );
                    let t0 = Instant::now();
                    self.wait_ready(left)?;
                    waited += t0.elapsed();
                    attempt += 1;
                }
            }
        }
    }
}

/// [`Pipeline::retry`] when `dec` is served by stages, else `f` once.
pub fn with_retry<T>(dec: &Decoder, f: impl FnMut() -> Result<T>) -> Result<T> {
    match dec.pipeline() {
        Some(p) => p.retry(f),
        None => {
            let mut f = f;
            f()
        }
    }
}

/// An error and its sources on one line (hyper's "client error (Connect)" alone says little).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
