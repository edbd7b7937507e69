//! `stage gateway`: an HTTP JSON API over one model, local or served by pipeline stages
//! (`stages:ADDR,…`), for clients that speak neither the stage wire format nor Rust.
//!
//! * `POST /generate` with `{"prompt": "...", "chat": true, "image": "<base64 PNG>",
//!   "coeffs": [0.0, 4.0], "max_new_tokens": 64, "positions": "last"}` (only `prompt` is
//!   required) generates one row per coefficient, every row in one batch through
//!   [`Engine::generate`], and answers `{"model", "weights_hash", "layer", "positions",
//!   "rows": [{"coeff", "text", "tokens", "stopped"}], "prompt_tokens", "seconds"}`. Without
//!   `coeffs` there is one unsteered row (coefficient 0) and `layer` is null. Greedy decoding
//!   with the model's agent settings ([`Engine::generate_config`]): a row's tokens are those
//!   `generate --json` prints for the same prompt.
//! * `GET /info`: the [`ModelInfo`], whether the model reads images, and the loaded steering
//!   vector's layer and hash (null without one).
//!
//! A request the gateway cannot take is a 400 whose `error` names the field and what was
//! expected; a missing or wrong token is a 401; a body over [`MAX_BODY`] a 413; a failed
//! generation a 500. Every error body is `{"error": "..."}`.
//!
//! Bound to 127.0.0.1 unless told otherwise; any other address needs a token (the rule of
//! [`super::server::check_bind`]), and with a token every request must carry it
//! (`Authorization: Bearer …`). Generations run one at a time on a blocking thread; the model is
//! shared, with one prefix cache across requests (it never changes a bit of a row:
//! docs/determinism.md).
use super::server::{check_bind, same};
use crate::models::engine::Engine;
use crate::models::hooks::{HookPoint, HookSpec, Positions};
use crate::models::load::{render_prompt, Loaded, LoadedModel, ModelInfo};
use crate::models::prefix_cache::{self, PrefixCache};
use crate::models::qwen2_vl::{Qwen2Vl, VlmInput};
use crate::models::registry;
use crate::steering::vector::SteeringVector;
use anyhow::{bail, Context, Result};
use base64::Engine as _;
use bytes::Bytes;
use candle_core::Tensor;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::{body::Incoming, header, Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Map, Value};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The largest request body the gateway reads (a prompt with a large screenshot).
pub const MAX_BODY: usize = 64 << 20;
/// `max_new_tokens` when a request gives none, and the most it may ask for.
pub const DEFAULT_NEW_TOKENS: usize = 64;
pub const MAX_NEW_TOKENS: usize = 1024;
/// The most coefficients (rows) one request may ask for.
pub const MAX_ROWS: usize = 64;
/// The widest and tallest image a request may send, in pixels (Qwen2-VL resizes it anyway;
/// this bounds what decoding a small, highly compressed PNG can allocate).
pub const MAX_IMAGE_SIDE: u32 = 8192;

/// The fields of a `POST /generate` body.
const FIELDS: [&str; 6] = ["prompt", "chat", "image", "coeffs", "max_new_tokens", "positions"];

/// How the gateway listens.
#[derive(Debug, Clone)]
pub struct Options {
    pub listen: SocketAddr,
    /// Every request must carry `Authorization: Bearer TOKEN` when set; required for a
    /// non-loopback `listen`.
    pub token: Option<String>,
    /// The prefix cache's bound in MiB (0 disables it).
    pub prefix_cache_mb: usize,
    /// A request's headers must arrive within this.
    pub header_timeout: Duration,
    /// Connections served at once (the rest wait in the listen backlog).
    pub max_connections: usize,
}

impl Options {
    pub fn new(listen: SocketAddr, token: Option<String>) -> Self {
        Options {
            listen,
            token,
            prefix_cache_mb: prefix_cache::DEFAULT_MB,
            header_timeout: Duration::from_secs(10),
            max_connections: 64,
        }
    }
}

/// The steering vector a gateway adds when a request gives `coeffs`: one layer's direction,
/// at that layer's `resid_post` (as `generate --vector` does).
#[derive(Debug, Clone)]
pub struct Steering {
    pub layer: usize,
    /// The unit direction, `[hidden]`.
    pub vector: Tensor,
    /// [`SteeringVector::content_hash`] of the file.
    pub hash: String,
}

impl Steering {
    /// Layer `layer` (`auto` or an index) of `sv`, checked against the model (`allow_foreign`:
    /// a vector of other weights of the same shape).
    pub fn new(sv: &SteeringVector, layer: &str, info: &ModelInfo, allow_foreign: bool) -> Result<Self> {
        sv.check_model(info, allow_foreign)?;
        let l = registry::parse_layer(layer, info.num_layers)?;
        let vector = sv.layer(l)?.clone();
        Ok(Steering { layer: l, vector, hash: sv.content_hash()? })
    }
}

/// A model the gateway serves: an [`Engine`] that builds a row's input from a request's prompt.
pub trait GatewayEngine: Engine {
    /// Whether a request may send an image.
    fn reads_images(&self) -> bool;
    /// The input of `prompt`: with `chat`, one user turn of the chat template (the image, when
    /// given, before the text), else the raw text. Called with an image only when
    /// [`reads_images`](Self::reads_images) and `chat`.
    fn prompt_input(&self, prompt: &str, chat: bool, image: Option<image::RgbImage>) -> Result<Self::Input>;
}

impl GatewayEngine for LoadedModel {
    fn reads_images(&self) -> bool {
        false
    }
    fn prompt_input(&self, prompt: &str, chat: bool, image: Option<image::RgbImage>) -> Result<Vec<u32>> {
        if image.is_some() {
            bail!("{} reads no images", self.info.name);
        }
        // What `generate --prompt P [--chat]` feeds the model.
        let text = render_prompt(self, prompt, chat)?;
        self.tokenizer.encode(&text, !chat)
    }
}

impl GatewayEngine for Qwen2Vl {
    fn reads_images(&self) -> bool {
        true
    }
    fn prompt_input(&self, prompt: &str, chat: bool, image: Option<image::RgbImage>) -> Result<VlmInput> {
        match (chat, image) {
            (true, image) => self.user_prompt(image.as_slice(), prompt),
            (false, None) => Ok(VlmInput { ids: self.tokenizer.encode(prompt, true)?, images: Vec::new() }),
            (false, Some(_)) => bail!("an image needs the chat template"),
        }
    }
}

/// A parsed `POST /generate` body.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    pub prompt: String,
    pub chat: bool,
    /// The image's bytes (base64-decoded, not yet decoded as an image).
    pub image: Option<Vec<u8>>,
    pub coeffs: Option<Vec<f32>>,
    pub max_new_tokens: usize,
    pub positions: Option<Positions>,
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A field that is absent or null.
fn given<'a>(obj: &'a Map<String, Value>, field: &str) -> Option<&'a Value> {
    obj.get(field).filter(|v| !v.is_null())
}

/// Parses a `POST /generate` body; an error is a message for a 400 naming the field.
pub fn parse_request(body: &[u8]) -> std::result::Result<GenerateRequest, String> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| format!("the body is not valid JSON ({e}): expected an object such as {{\"prompt\": \"...\"}}"))?;
    let Value::Object(obj) = v else {
        return Err(format!("the body is {}: expected a JSON object with a \"prompt\" field", kind(&v)));
    };
    if let Some(k) = obj.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(format!("\"{k}\": unknown field (expected one of {})", FIELDS.join(", ")));
    }
    let prompt = match given(&obj, "prompt") {
        Some(Value::String(s)) => s.clone(),
        None => return Err("\"prompt\": missing (expected a string)".into()),
        Some(o) => return Err(format!("\"prompt\": expected a string, found {}", kind(o))),
    };
    let chat = match given(&obj, "chat") {
        None => true,
        Some(Value::Bool(b)) => *b,
        Some(o) => return Err(format!("\"chat\": expected true or false, found {}", kind(o))),
    };
    let image = match given(&obj, "image") {
        None => None,
        Some(Value::String(s)) => {
            // A data URL's header is allowed (what a browser's canvas gives).
            let b64 = match s.split_once(',') {
                Some((head, rest)) if head.starts_with("data:") => rest,
                _ => s.as_str(),
            };
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|e| format!("\"image\": not valid base64 ({e}): expected a base64-encoded PNG"))?;
            if bytes.is_empty() {
                return Err("\"image\": empty (expected a base64-encoded PNG)".into());
            }
            Some(bytes)
        }
        Some(o) => return Err(format!("\"image\": expected a base64-encoded PNG as a string, found {}", kind(o))),
    };
    let coeffs = match given(&obj, "coeffs") {
        None => None,
        Some(Value::Array(a)) => {
            if a.is_empty() || a.len() > MAX_ROWS {
                return Err(format!("\"coeffs\": expected 1 to {MAX_ROWS} numbers (one row each), found {}", a.len()));
            }
            let mut c = Vec::with_capacity(a.len());
            for (i, x) in a.iter().enumerate() {
                match x.as_f64().map(|f| f as f32) {
                    Some(f) if f.is_finite() => c.push(f),
                    _ => return Err(format!("\"coeffs\"[{i}]: expected a finite number, found {x}")),
                }
            }
            Some(c)
        }
        Some(o) => return Err(format!("\"coeffs\": expected an array of numbers, found {}", kind(o))),
    };
    let max_new_tokens = match given(&obj, "max_new_tokens") {
        None => DEFAULT_NEW_TOKENS,
        Some(x) => match x.as_u64() {
            Some(n) if (1..=MAX_NEW_TOKENS as u64).contains(&n) => n as usize,
            _ => return Err(format!("\"max_new_tokens\": expected an integer from 1 to {MAX_NEW_TOKENS}, found {x}")),
        },
    };
    let positions = match given(&obj, "positions") {
        None => None,
        Some(Value::String(s)) => Some(s.parse::<Positions>().map_err(|e| format!("\"positions\": {e}"))?),
        Some(o) => return Err(format!("\"positions\": expected a string (last, all, prompt, …), found {}", kind(o))),
    };
    Ok(GenerateRequest { prompt, chat, image, coeffs, max_new_tokens, positions })
}

/// A PNG (or JPEG) as RGB, within [`MAX_IMAGE_SIDE`].
fn decode_image(bytes: &[u8]) -> std::result::Result<image::RgbImage, String> {
    let mut r = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| format!("\"image\": {e}"))?;
    if r.format().is_none() {
        return Err("\"image\": not a PNG (nor a JPEG): expected a base64-encoded PNG".into());
    }
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    r.limits(limits);
    let img = r.decode().map_err(|e| {
        format!("\"image\": cannot decode it ({e}); expected a PNG of at most {MAX_IMAGE_SIDE}×{MAX_IMAGE_SIDE} pixels")
    })?;
    Ok(img.to_rgb8())
}

/// A reply's status and message.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn bad(message: impl Into<String>) -> Self {
        ApiError { status: StatusCode::BAD_REQUEST, message: message.into() }
    }
}

struct Served<E: GatewayEngine> {
    model: E,
    steering: Option<Steering>,
    /// Also what makes generations take turns.
    cache: Mutex<PrefixCache>,
    token: Option<String>,
}

impl<E: GatewayEngine> Served<E> {
    fn info(&self) -> Value {
        let mut v = serde_json::to_value(self.model.info()).unwrap_or_else(|_| json!({}));
        if let Value::Object(m) = &mut v {
            m.insert("reads_images".into(), json!(self.model.reads_images()));
            m.insert("layer".into(), json!(self.steering.as_ref().map(|s| s.layer)));
            m.insert(
                "hook_point".into(),
                json!(self.steering.as_ref().map(|s| HookPoint::ResidPost(s.layer).to_string())),
            );
            m.insert("vector_hash".into(), json!(self.steering.as_ref().map(|s| s.hash.clone())));
            m.insert("max_new_tokens".into(), json!(MAX_NEW_TOKENS));
            m.insert("max_rows".into(), json!(MAX_ROWS));
        }
        v
    }

    /// One `POST /generate`, from the body to the reply (on a blocking thread).
    fn generate(&self, body: &[u8]) -> std::result::Result<Value, ApiError> {
        let req = parse_request(body).map_err(ApiError::bad)?;
        let info = self.model.info();
        let vlm = self.model.reads_images();
        if req.image.is_some() && !vlm {
            return Err(ApiError::bad(format!(
                "\"image\": {} is a text model and reads no images (only a Qwen2-VL model takes an image)",
                info.name
            )));
        }
        if req.image.is_some() && !req.chat {
            return Err(ApiError::bad(
                "\"image\": needs \"chat\": true (the image goes in the chat template's user turn)",
            ));
        }
        if req.coeffs.is_some() && self.steering.is_none() {
            return Err(ApiError::bad(
                "\"coeffs\": no --vector loaded (start the gateway with --vector FILE [--layer L] to steer)",
            ));
        }
        let positions = req.positions.unwrap_or(Positions::Last);
        if !vlm && matches!(positions, Positions::Image | Positions::Text) {
            return Err(ApiError::bad(format!(
                "\"positions\": `{positions}` selects image or text tokens, which only a vision-language model has \
                 (expected last, all, prompt or generated)"
            )));
        }
        let image = req.image.as_deref().map(decode_image).transpose().map_err(ApiError::bad)?;
        let input = self.model.prompt_input(&req.prompt, req.chat, image).map_err(|e| ApiError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            message: format!("building the prompt: {e:#}"),
        })?;
        let prompt_tokens = E::ids(&input).len();
        if prompt_tokens == 0 {
            return Err(ApiError::bad("\"prompt\": no tokens (an empty prompt without the chat template)"));
        }
        let (spec, coeffs, layer) = match (&req.coeffs, &self.steering) {
            (Some(c), Some(s)) => (
                HookSpec::none().add(HookPoint::ResidPost(s.layer), s.vector.clone(), c.clone(), positions),
                c.clone(),
                Some(s.layer),
            ),
            _ => (HookSpec::none(), vec![0.0], None),
        };
        let rows: Vec<&E::Input> = vec![&input; coeffs.len()];
        let cfg = self.model.generate_config(req.max_new_tokens);
        let internal = |e: anyhow::Error| {
            tracing::warn!("generate: {e:#}");
            ApiError { status: StatusCode::INTERNAL_SERVER_ERROR, message: format!("generation failed: {e:#}") }
        };
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let t0 = Instant::now();
        let out = self.model.generate(&rows, &cfg, &spec, &mut cache, None).map_err(internal)?;
        let seconds = t0.elapsed().as_secs_f64();
        drop(cache);
        let tok = self.model.tokenizer();
        let mut rows_json = Vec::with_capacity(out.len());
        for (g, c) in out.iter().zip(&coeffs) {
            let g = &g.generation;
            let text = tok.decode(&g.tokens, true).map_err(internal)?;
            rows_json.push(json!({"coeff": c, "text": text, "tokens": g.tokens, "stopped": g.stop.is_some()}));
        }
        let new: usize = out.iter().map(|g| g.generation.tokens.len()).sum();
        tracing::info!(
            rows = out.len(),
            prompt_tokens,
            new_tokens = new,
            image = req.image.is_some(),
            "generated in {seconds:.2}s"
        );
        Ok(json!({
            "model": info.name, "weights_hash": info.weights_hash, "layer": layer,
            "positions": layer.map(|_| positions.to_string()),
            "rows": rows_json, "prompt_tokens": prompt_tokens, "seconds": seconds,
        }))
    }
}

fn reply(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    r
}

fn error(status: StatusCode, message: impl Into<String>) -> Response<Full<Bytes>> {
    reply(status, &json!({ "error": message.into() }))
}

async fn handle<E: GatewayEngine>(served: Arc<Served<E>>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if let Some(t) = &served.token {
        let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        let ok = given.and_then(|g| g.strip_prefix("Bearer ")).is_some_and(|g| same(g.as_bytes(), t.as_bytes()));
        if !ok {
            let mut r = error(StatusCode::UNAUTHORIZED, "this gateway needs its token (Authorization: Bearer …)");
            r.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            return r;
        }
    }
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    match (&method, path.as_str()) {
        (&Method::GET, "/info") => reply(StatusCode::OK, &served.info()),
        (&Method::POST, "/generate") => {
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) if e.is::<LengthLimitError>() => {
                    return error(StatusCode::PAYLOAD_TOO_LARGE, format!("the body is over {} MiB", MAX_BODY >> 20))
                }
                Err(e) => return error(StatusCode::BAD_REQUEST, format!("reading the body: {e}")),
            };
            let s = served.clone();
            match tokio::task::spawn_blocking(move || s.generate(&body)).await {
                Ok(Ok(v)) => reply(StatusCode::OK, &v),
                Ok(Err(e)) => error(e.status, e.message),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("generate panicked: {e}")),
            }
        }
        (_, "/info" | "/generate") => error(StatusCode::METHOD_NOT_ALLOWED, format!("{method} {path}")),
        _ => error(StatusCode::NOT_FOUND, format!("{method} {path}: expected POST /generate or GET /info")),
    }
}

/// Serves `model` until the process is stopped; `ready` gets the bound address.
pub async fn serve<E: GatewayEngine>(
    model: E,
    steering: Option<Steering>,
    opts: Options,
    ready: impl FnOnce(SocketAddr),
) -> Result<()> {
    check_bind(&opts.listen, opts.token.as_deref())?;
    if let Some(s) = &steering {
        let h = model.info().hidden_size;
        if s.vector.dims() != [h] {
            bail!("the steering vector has shape {:?}, the model's hidden size is {h}", s.vector.dims());
        }
    }
    let listener =
        tokio::net::TcpListener::bind(opts.listen).await.with_context(|| format!("binding {}", opts.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(
        model = %model.info().name, layer = ?steering.as_ref().map(|s| s.layer), token = opts.token.is_some(),
        "gateway listening on {addr}"
    );
    ready(addr);
    let served = Arc::new(Served {
        model,
        steering,
        cache: Mutex::new(PrefixCache::new(opts.prefix_cache_mb)),
        token: opts.token.clone(),
    });
    let slots = Arc::new(tokio::sync::Semaphore::new(opts.max_connections.max(1)));
    let mut backoff = Duration::from_millis(5);
    loop {
        // A slot first: past the limit, new connections wait in the kernel's backlog.
        let permit = slots.clone().acquire_owned().await?;
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                backoff = Duration::from_millis(5);
                stream
            }
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning.
                tracing::warn!("gateway: accept failed: {e}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let served = served.clone();
        let timeout = opts.header_timeout;
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let served = served.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(served, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(timeout)
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                tracing::debug!("gateway connection: {e}");
            }
            drop(permit);
        });
    }
}

/// [`serve`] for a text model or a Qwen2-VL, whichever `model` is.
pub async fn serve_loaded(
    model: Loaded,
    steering: Option<Steering>,
    opts: Options,
    ready: impl FnOnce(SocketAddr),
) -> Result<()> {
    match model {
        Loaded::Text(m) => serve(*m, steering, opts, ready).await,
        Loaded::Vlm(m) => serve(*m, steering, opts, ready).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(body: &str) -> String {
        parse_request(body.as_bytes()).unwrap_err()
    }

    #[test]
    fn defaults_and_fields() {
        let r = parse_request(br#"{"prompt": "hi"}"#).unwrap();
        assert_eq!(
            r,
            GenerateRequest {
                prompt: "hi".into(),
                chat: true,
                image: None,
                coeffs: None,
                max_new_tokens: DEFAULT_NEW_TOKENS,
                positions: None
            }
        );
        let r = parse_request(
            br#"{"prompt": "", "chat": false, "coeffs": [0, 4.5], "max_new_tokens": 1024, "positions": "all", "image": null}"#,
        )
        .unwrap();
        assert_eq!(
            (r.chat, r.coeffs, r.max_new_tokens, r.positions),
            (false, Some(vec![0.0, 4.5]), 1024, Some(Positions::All))
        );
        let r = parse_request(br#"{"prompt": "x", "image": "data:image/png;base64,iVBORw0K"}"#).unwrap();
        assert_eq!(r.image.unwrap()[..4], [0x89, b'P', b'N', b'G']);
    }

    #[test]
    fn errors_name_the_field() {
        for (body, field, what) in [
            ("not json", "not valid JSON", "prompt"),
            ("[1]", "an array", "object"),
            ("{}", "\"prompt\": missing", "string"),
            (r#"{"prompt": 3}"#, "\"prompt\"", "a string, found a number"),
            (r#"{"prompt": "x", "chat": "yes"}"#, "\"chat\"", "true or false"),
            (r#"{"prompt": "x", "coeffs": 4}"#, "\"coeffs\"", "an array of numbers"),
            (r#"{"prompt": "x", "coeffs": []}"#, "\"coeffs\"", "1 to 64"),
            (r#"{"prompt": "x", "coeffs": [1, "a"]}"#, "\"coeffs\"[1]", "finite number"),
            (r#"{"prompt": "x", "coeffs": [1e300]}"#, "\"coeffs\"[0]", "finite number"),
            (r#"{"prompt": "x", "max_new_tokens": 1025}"#, "\"max_new_tokens\"", "1 to 1024"),
            (r#"{"prompt": "x", "max_new_tokens": 0}"#, "\"max_new_tokens\"", "1 to 1024"),
            (r#"{"prompt": "x", "max_new_tokens": 2.5}"#, "\"max_new_tokens\"", "integer"),
            (r#"{"prompt": "x", "positions": "middle"}"#, "\"positions\"", "expected last, all"),
            (r#"{"prompt": "x", "image": "%%%"}"#, "\"image\"", "base64"),
            (r#"{"prompt": "x", "image": 1}"#, "\"image\"", "base64-encoded PNG"),
            (r#"{"prompt": "x", "temperature": 1}"#, "\"temperature\": unknown field", "max_new_tokens"),
        ] {
            let e = err(body);
            assert!(e.contains(field) && e.contains(what), "{body}: {e}");
        }
    }

    #[test]
    fn images_decode_within_limits() {
        let img = image::RgbImage::from_pixel(3, 2, image::Rgb([10, 20, 30]));
        let mut png = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
        assert_eq!(decode_image(&png).unwrap(), img);
        assert!(decode_image(b"hello there").unwrap_err().contains("not a PNG"));
        let wide = image::GrayImage::new(MAX_IMAGE_SIDE + 1, 1);
        let mut png = Vec::new();
        wide.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
        assert!(decode_image(&png).unwrap_err().contains("cannot decode"), "an image over the side limit");
    }
}
