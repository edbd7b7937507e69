//! `stage serve`: one pipeline stage in its own process. It holds its layers (and the embedding,
//! the vision tower, or the head when they are its share), keeps each driver state's keys and
//! values for its layers, and answers the driver's calls ([`super::wire`]) over HTTP/1.1.
//!
//! Bound to 127.0.0.1 unless told otherwise; any other address needs a token, and with a token
//! every request must carry it (`Authorization: Bearer …`).
use super::client::StageInfo;
use super::manifest::StageManifest;
use super::wire::{self, Ack, Forward, ForwardReply};
use crate::models::decoder::{Decoder, Part, Splice, State};
use crate::models::dtype::DTypeChoice;
use crate::models::hooks::Captures;
use crate::models::qwen2_vl::vision::VisionTower;
use crate::models::weights::{WeightDType, Weights};
use anyhow::{bail, Context, Result};
use bytes::Bytes;
use candle_core::{Device, Tensor};
use http_body_util::{BodyExt, Full, Limited};
use hyper::{body::Incoming, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The largest request body a stage reads (a prefill of a long, wide batch).
const MAX_BODY: usize = 4 << 30;
/// Connections served at once, and how soon a request's headers must arrive.
const MAX_CONNECTIONS: usize = 64;
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// States unused this long are dropped (their driver died without freeing them).
const IDLE: Duration = Duration::from_secs(1800);

/// One stage's model share.
pub struct StageModel {
    pub manifest: StageManifest,
    pub decoder: Decoder,
    pub vision: Option<VisionTower>,
    pub weights_dtype: WeightDType,
    /// Side files a driver fetches, by name: their bytes.
    files: HashMap<String, Vec<u8>>,
}

impl StageModel {
    /// Loads the stage directory `dir` (made by `split`), checking every file's sha256.
    pub fn load(dir: &Path, device: &Device, dtype: DTypeChoice) -> Result<Self> {
        let t0 = Instant::now();
        let manifest = StageManifest::read(dir)?;
        manifest.verify(dir)?;
        let weights = dir.join(&manifest.weights);
        let is_gguf = manifest.source.format == "gguf";
        let wd = match dtype {
            DTypeChoice::Auto if device.is_cpu() && is_gguf => WeightDType::Gguf,
            d => d.resolve(device),
        };
        let part = Part {
            layers: manifest.layers[0]..manifest.layers[1],
            embed: manifest.is_first(),
            head: manifest.is_last(),
        };
        let mut files = HashMap::new();
        let (decoder, vision) = if is_gguf {
            let (d, w) = crate::models::load::decoder_part_from_gguf(&weights, device, wd, Some(part))?;
            let crate::models::weights::Source::Gguf { content, .. } = &w.source else { unreachable!() };
            // The driver's config and tokenizer: the metadata alone, as a GGUF without tensors.
            use candle_core::quantized::gguf_file::Value;
            let mut meta: Vec<(&str, &Value)> = content.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
            // Without tensors the vocabulary size would be lost (see gguf::config).
            let arch = crate::models::gguf::meta_str(content, "general.architecture").unwrap_or("llama");
            let key = format!("{arch}.vocab_size");
            let vocab = Value::U64(d.cfg.vocab_size as u64);
            if manifest.is_first() && !content.metadata.contains_key(&key) {
                meta.push((key.as_str(), &vocab));
            }
            let mut buf = std::io::Cursor::new(Vec::new());
            candle_core::quantized::gguf_file::write(&mut buf, &meta, &[])?;
            files.insert("metadata.gguf".to_string(), buf.into_inner());
            (d, None)
        } else {
            for name in manifest.files.keys().filter(|n| **n != manifest.weights) {
                let p = dir.join(name);
                files.insert(name.clone(), std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?);
            }
            if manifest.source.family == "qwen2-vl" {
                let cfg = crate::models::qwen2_vl::config::Qwen2VlConfig::from_file(&dir.join("config.json"))?;
                let w = Weights::from_safetensors_dir(dir, device, wd)?;
                let vision = if manifest.vision { Some(VisionTower::load(&cfg.vision, &w)?) } else { None };
                (Decoder::load_part(cfg.text.clone(), &w, part)?, vision)
            } else {
                (crate::models::load::decoder_part_from_dir(dir, device, wd, Some(part))?.0, None)
            }
        };
        if decoder.cfg.num_layers != manifest.num_layers {
            bail!(
                "{}: config has {} layers, the manifest {}",
                dir.display(),
                decoder.cfg.num_layers,
                manifest.num_layers
            );
        }
        tracing::info!(
            stage = manifest.stage, layers = ?manifest.layers, dtype = wd.name(),
            "loaded stage {} of {} ({}) in {:.2}s", manifest.stage, manifest.stages, manifest.source.name, t0.elapsed().as_secs_f64()
        );
        Ok(Self { manifest, decoder, vision, weights_dtype: wd, files })
    }

    pub fn info(&self) -> StageInfo {
        let mut files: Vec<String> = self.files.keys().cloned().collect();
        files.sort();
        StageInfo {
            manifest: self.manifest.clone(),
            dtype: format!("{:?}", self.decoder.dtype()).to_lowercase(),
            weights_dtype: self.weights_dtype.name().to_string(),
            batch_invariant: self.decoder.batch_invariant(),
            device: crate::device::device_name(self.decoder.device()),
            files,
        }
    }
}

/// A state the stage does not know: it restarted, or the state was dropped (HTTP 410).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Gone(String);

struct Served {
    model: StageModel,
    states: Mutex<HashMap<u64, (State, Instant)>>,
    token: Option<String>,
}

impl Served {
    fn state_of(states: &mut HashMap<u64, (State, Instant)>, id: u64) -> Result<&mut State> {
        match states.get_mut(&id) {
            Some((s, used)) => {
                *used = Instant::now();
                Ok(s)
            }
            None => Err(Gone(format!("unknown state {id} (this stage restarted, or the state was freed)")).into()),
        }
    }

    fn forward(&self, body: &[u8]) -> Result<Vec<u8>> {
        let (f, mut t): (Forward, _) = wire::decode(body, "forward")?;
        let dec = &self.model.decoder;
        let dev = dec.device().clone();
        let mut spec = wire::spec_of(&f, &mut t)?;
        for iv in &mut spec.interventions {
            iv.vector = iv.vector.to_device(&dev)?;
        }
        let xs = wire::take(&mut t, "xs", "forward")?;
        if self.model.manifest.is_first() {
            // Token ids from the wire index the embedding: checked here, not only by the driver,
            // and while they are still on the host (no copy back from a GPU).
            dec.check_ids(&xs.flatten_all()?.to_vec1::<u32>()?)?;
        }
        let xs = xs.to_device(&dev)?;
        let rope = if f.rope {
            Some((
                wire::take(&mut t, "cos", "forward")?.to_device(&dev)?,
                wire::take(&mut t, "sin", "forward")?.to_device(&dev)?,
            ))
        } else {
            None
        };
        let splice = if f.splice {
            let feats = wire::take(&mut t, "feats", "forward")?.to_device(&dev)?;
            let gather = wire::take(&mut t, "gather", "forward")?.to_vec1::<u32>()?;
            Some(Splice { feats, gather })
        } else {
            None
        };
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        states.retain(|_, (_, used)| now.duration_since(*used) < IDLE);
        if f.cols == 0 && !states.contains_key(&f.state) {
            states.insert(f.state, (dec.new_state(f.left_pad.clone()), now));
        }
        let state = Self::state_of(&mut states, f.state)?;
        if state.cols != f.cols || state.left_pad != f.left_pad {
            bail!(
                "state {}: the driver has {} columns (padding {:?}), this stage {} ({:?})",
                f.state,
                f.cols,
                f.left_pad,
                state.cols,
                state.left_pad
            );
        }
        let mut caps = Captures::default();
        let step = f.step.clone().into();
        let out = dec.forward_part(&xs, splice.as_ref(), state, &step, &spec, &mut caps, f.logits, rope)?;
        let last = self.model.manifest.is_last();
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        let give = !last || f.logits.is_some();
        if give {
            tensors.push(("out".into(), out));
        }
        let mut names = Vec::new();
        for (p, v) in caps.tensors {
            names.push(p.to_string());
            tensors.push((format!("cap.{p}"), Tensor::cat(&v, 1)?));
        }
        wire::encode(&ForwardReply { captures: names, out: give }, &tensors)
    }

    fn fork(&self, body: &[u8]) -> Result<Vec<u8>> {
        let (f, _): (wire::Fork, _) = wire::decode(body, "fork")?;
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        let s = Self::state_of(&mut states, f.from)?.select_rows(&f.rows)?;
        states.insert(f.to, (s, Instant::now()));
        wire::encode(&Ack {}, &[])
    }

    fn merge(&self, body: &[u8]) -> Result<Vec<u8>> {
        let (m, _): (wire::Merge, _) = wire::decode(body, "merge")?;
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        let parts =
            m.from.iter().map(|&id| Ok(Self::state_of(&mut states, id)?.clone())).collect::<Result<Vec<_>>>()?;
        let s = State::merge(&parts)?;
        states.insert(m.to, (s, Instant::now()));
        wire::encode(&Ack {}, &[])
    }

    fn free(&self, body: &[u8]) -> Result<Vec<u8>> {
        let (f, _): (wire::Free, _) = wire::decode(body, "free")?;
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        for id in f.states {
            states.remove(&id);
        }
        wire::encode(&Ack {}, &[])
    }

    fn vision(&self, body: &[u8]) -> Result<Vec<u8>> {
        let (v, mut t): (wire::Vision, _) = wire::decode(body, "vision")?;
        let tower = self.model.vision.as_ref().context("this stage holds no vision tower")?;
        let px = wire::take(&mut t, "pixels", "vision")?.to_device(self.model.decoder.device())?;
        let feats = tower.forward(&px, &v.grids)?;
        wire::encode(&Ack {}, &[("features".into(), feats)])
    }
}

fn reply(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r
}

/// Constant-time comparison, so a token cannot be guessed byte by byte from reply times.
pub(crate) fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn handle(served: Arc<Served>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if let Some(t) = &served.token {
        let given = req.headers().get(hyper::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        let ok = given.and_then(|g| g.strip_prefix("Bearer ")).is_some_and(|g| same(g.as_bytes(), t.as_bytes()));
        if !ok {
            return reply(
                StatusCode::UNAUTHORIZED,
                "this stage needs its token (Authorization: Bearer …; the driver reads MINIWOB_STEER_STAGE_TOKEN_FILE)",
            );
        }
    }
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    if method == Method::GET {
        if path == "/info" {
            return match serde_json::to_vec(&served.model.info()) {
                Ok(b) => reply(StatusCode::OK, b),
                Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            };
        }
        if let Some(name) = path.strip_prefix("/file/") {
            return match served.model.files.get(name) {
                Some(b) => reply(StatusCode::OK, b.clone()),
                None => reply(StatusCode::NOT_FOUND, format!("no side file {name}")),
            };
        }
        return reply(StatusCode::NOT_FOUND, format!("GET {path}"));
    }
    if method != Method::POST {
        return reply(StatusCode::METHOD_NOT_ALLOWED, format!("{method} {path}"));
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return reply(StatusCode::BAD_REQUEST, format!("reading the body: {e}")),
    };
    let s = served.clone();
    let p = path.clone();
    let done = tokio::task::spawn_blocking(move || match p.as_str() {
        "/forward" => s.forward(&body),
        "/fork" => s.fork(&body),
        "/merge" => s.merge(&body),
        "/free" => s.free(&body),
        "/vision" => s.vision(&body),
        other => Err(anyhow::anyhow!("no endpoint {other}")),
    })
    .await;
    match done {
        Ok(Ok(b)) => reply(StatusCode::OK, b),
        Ok(Err(e)) if e.chain().any(|c| c.is::<Gone>()) => reply(StatusCode::GONE, format!("{e:#}")),
        Ok(Err(e)) => {
            tracing::warn!("{path}: {e:#}");
            reply(StatusCode::UNPROCESSABLE_ENTITY, format!("{e:#}"))
        }
        Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, format!("{path} panicked: {e}")),
    }
}

/// Checks a listen address against the token rule: loopback, or a token.
pub fn check_bind(addr: &SocketAddr, token: Option<&str>) -> Result<()> {
    if !addr.ip().is_loopback() && token.is_none() {
        bail!("--listen {addr}: binding a non-loopback address needs --token-file (every request must then carry it)");
    }
    Ok(())
}

/// Serves `model` on `listen` until the process is stopped; `ready` gets the bound address.
pub async fn serve(
    model: StageModel,
    listen: SocketAddr,
    token: Option<String>,
    ready: impl FnOnce(SocketAddr),
) -> Result<()> {
    check_bind(&listen, token.as_deref())?;
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
    ready(listener.local_addr()?);
    let served = Arc::new(Served { model, states: Mutex::new(HashMap::new()), token });
    // A driver needs one connection at a time; the bound keeps strays from holding the stage.
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, _) = listener.accept().await?;
        let permit = slots.clone().acquire_owned().await?;
        let served = served.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let served = served.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(served, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                tracing::debug!("stage connection: {e}");
            }
            drop(permit);
        });
    }
}
