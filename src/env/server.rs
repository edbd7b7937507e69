//! Static file server for the MiniWoB html tree: tokio + hyper, bound to 127.0.0.1 on a free port.
//!
//! Only GET and HEAD; the decoded path is split into segments and any `.` / `..` segment, NUL,
//! backslash or bad UTF-8 is refused (so `..`, `%2e%2e` and `%2f..` all fail), and the file found
//! must canonicalize to a path inside the canonical root (so a symlink pointing out is refused).
//! The `Host` header must be `127.0.0.1:PORT` or `localhost:PORT` (this server's port), so a
//! DNS-rebinding page in the same browser cannot read the tree under another name. Headers
//! must arrive within a timeout, and connections are bounded (see [`ServerLimits`]).
use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

/// What the connection handlers share.
struct Served {
    root: PathBuf,
    port: u16,
}

/// Limits that keep a misbehaving client (or a page in the same browser) from holding the
/// server: a request's headers must arrive within `header_timeout`, at most `max_connections`
/// are served at once (the rest wait in the listen backlog).
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    pub header_timeout: Duration,
    pub max_connections: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        // A few browsers on loopback need a handful of connections and send headers at once.
        ServerLimits { header_timeout: Duration::from_secs(10), max_connections: 256 }
    }
}

/// A running file server; stopped when dropped.
pub struct TaskServer {
    addr: SocketAddr,
    root: PathBuf,
    stop: watch::Sender<bool>,
    active: Arc<AtomicUsize>,
}

impl TaskServer {
    /// Serves `root` on 127.0.0.1 (free port). Must be called inside a tokio runtime; the
    /// server runs on that runtime until the `TaskServer` is dropped.
    pub async fn start(root: &Path) -> std::io::Result<TaskServer> {
        Self::start_with(root, ServerLimits::default()).await
    }

    /// [`TaskServer::start`] with explicit limits.
    pub async fn start_with(root: &Path, limits: ServerLimits) -> std::io::Result<TaskServer> {
        let root = std::fs::canonicalize(root)?;
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let (stop, mut stopped) = watch::channel(false);
        let shared = Arc::new(Served { root: root.clone(), port: addr.port() });
        let active = Arc::new(AtomicUsize::new(0));
        let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
        let counter = active.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(5);
            loop {
                // A slot first: past the limit, new connections wait in the kernel's backlog.
                let permit = tokio::select! {
                    _ = stopped.changed() => break,
                    p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                };
                let stream = tokio::select! {
                    _ = stopped.changed() => break,
                    acc = listener.accept() => match acc {
                        Ok((stream, _)) => { backoff = Duration::from_millis(5); stream }
                        Err(e) => {
                            // Out of file descriptors and the like: wait instead of spinning.
                            tracing::warn!("task server: accept failed: {e}; retrying in {backoff:?}");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(1));
                            continue;
                        }
                    },
                };
                let served = shared.clone();
                let mut stop_conn = stopped.clone();
                let counter = counter.clone();
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let served = served.clone();
                        async move { Ok::<_, std::convert::Infallible>(handle(&served, req).await) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(limits.header_timeout)
                        .serve_connection(TokioIo::new(stream), svc);
                    tokio::select! {
                        _ = conn => {}
                        _ = stop_conn.changed() => {}
                    }
                    counter.fetch_sub(1, Ordering::SeqCst);
                    drop(permit);
                });
            }
        });
        Ok(TaskServer { addr, root, stop, active })
    }

    /// Connections being served now (never more than [`ServerLimits::max_connections`]).
    pub fn active_connections(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// `http://127.0.0.1:PORT/`
    pub fn base_url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The canonical html root.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

impl Drop for TaskServer {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

fn status(code: StatusCode, msg: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(msg.as_bytes())));
    *r.status_mut() = code;
    r.headers_mut()
        .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

/// Maps a request path to a file path under `root`, or the status to answer with.
pub fn resolve(root: &Path, raw_path: &str) -> Result<PathBuf, StatusCode> {
    let decoded = percent_encoding::percent_decode_str(raw_path).decode_utf8().map_err(|_| StatusCode::BAD_REQUEST)?;
    if !decoded.starts_with('/') || decoded.contains('\0') || decoded.contains('\\') {
        return Err(StatusCode::BAD_REQUEST);
    }
    let mut path = root.to_path_buf();
    let mut any = false;
    for seg in decoded.split('/') {
        if seg.is_empty() {
            continue;
        }
        if seg == "." || seg == ".." {
            return Err(StatusCode::FORBIDDEN);
        }
        path.push(seg);
        any = true;
    }
    if !any {
        return Err(StatusCode::NOT_FOUND);
    }
    let canon = std::fs::canonicalize(&path).map_err(|_| StatusCode::NOT_FOUND)?;
    if !canon.starts_with(root) {
        return Err(StatusCode::FORBIDDEN);
    }
    if !canon.is_file() {
        return Err(StatusCode::NOT_FOUND);
    }
    Ok(canon)
}

/// Content type by file extension.
pub fn content_type(path: &Path) -> &'static str {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    match ext.as_str() {
        "html" | "htm" => "text/html; charset=utf-8",
        "js" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" => "application/json",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "svg" => "image/svg+xml",
        "ico" => "image/x-icon",
        "woff" => "font/woff",
        "woff2" => "font/woff2",
        "ttf" => "font/ttf",
        "txt" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

/// Is `host` (a `Host` header) this server's own loopback name and port?
pub fn host_allowed(host: &str, port: u16) -> bool {
    let Some((name, p)) = host.rsplit_once(':') else { return false };
    matches!(name.to_ascii_lowercase().as_str(), "127.0.0.1" | "localhost") && p.parse::<u16>() == Ok(port)
}

async fn handle(served: &Served, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let root = served.root.as_path();
    let host = req.headers().get(hyper::header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
    if !host_allowed(host, served.port) {
        return status(StatusCode::MISDIRECTED_REQUEST, "wrong host\n");
    }
    let head = match *req.method() {
        Method::GET => false,
        Method::HEAD => true,
        _ => return status(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
    };
    let path = match resolve(root, req.uri().path()) {
        Ok(p) => p,
        Err(StatusCode::FORBIDDEN) => return status(StatusCode::FORBIDDEN, "forbidden\n"),
        Err(StatusCode::BAD_REQUEST) => return status(StatusCode::BAD_REQUEST, "bad request\n"),
        Err(_) => return status(StatusCode::NOT_FOUND, "not found\n"),
    };
    let body = match tokio::fs::read(&path).await {
        Ok(b) => b,
        Err(_) => return status(StatusCode::NOT_FOUND, "not found\n"),
    };
    let len = body.len();
    let mut r = Response::new(Full::new(if head { Bytes::new() } else { Bytes::from(body) }));
    let h = r.headers_mut();
    h.insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(content_type(&path)));
    h.insert(hyper::header::CONTENT_LENGTH, hyper::header::HeaderValue::from(len));
    h.insert(hyper::header::CACHE_CONTROL, hyper::header::HeaderValue::from_static("max-age=3600"));
    r
}
