//! Static file server for the MiniWoB html tree: tokio + hyper, bound to 127.0.0.1 on a free port.
//!
//! Only GET and HEAD; the decoded path is split into segments and any `.` / `..` segment, NUL,
//! backslash or bad UTF-8 is refused (so `..`, `%2e%2e` and `%2f..` all fail), and the file found
//! must canonicalize to a path inside the canonical root (so a symlink pointing out is refused).
use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// A running file server; stopped when dropped.
pub struct TaskServer {
    addr: SocketAddr,
    root: PathBuf,
    stop: watch::Sender<bool>,
}

impl TaskServer {
    /// Serves `root` on 127.0.0.1 (free port). Must be called inside a tokio runtime; the
    /// server runs on that runtime until the `TaskServer` is dropped.
    pub async fn start(root: &Path) -> std::io::Result<TaskServer> {
        let root = std::fs::canonicalize(root)?;
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let (stop, mut stopped) = watch::channel(false);
        let shared = Arc::new(root.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stopped.changed() => break,
                    acc = listener.accept() => {
                        let Ok((stream, _)) = acc else { continue };
                        let root = shared.clone();
                        let mut stop_conn = stopped.clone();
                        tokio::spawn(async move {
                            let svc = hyper::service::service_fn(move |req| {
                                let root = root.clone();
                                async move { Ok::<_, std::convert::Infallible>(handle(&root, req).await) }
                            });
                            let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
                            tokio::select! {
                                _ = conn => {}
                                _ = stop_conn.changed() => {}
                            }
                        });
                    }
                }
            }
        });
        Ok(TaskServer { addr, root, stop })
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

async fn handle(root: &Path, req: Request<Incoming>) -> Response<Full<Bytes>> {
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
