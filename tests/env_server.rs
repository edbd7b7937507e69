//! The task file server: content types, and no way out of the html root.
use miniwob_steer::env::server::ServerLimits;
use miniwob_steer::env::{self, TaskServer};
use std::io::{Read, Write};
use std::time::{Duration, Instant};

/// Sends one raw HTTP/1.1 request and returns (status, content-type, body).
fn get(addr: std::net::SocketAddr, method: &str, path: &str) -> (u16, String, Vec<u8>) {
    get_as(addr, &format!("127.0.0.1:{}", addr.port()), method, path)
}

/// [`get`] with the given `Host` header.
fn get_as(addr: std::net::SocketAddr, host: &str, method: &str, path: &str) -> (u16, String, Vec<u8>) {
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(c, "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").unwrap();
    let mut buf = Vec::new();
    c.read_to_end(&mut buf).unwrap();
    let split = buf.windows(4).position(|w| w == b"\r\n\r\n").expect("headers end");
    let head = String::from_utf8_lossy(&buf[..split]).to_string();
    let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let ct = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-type:").map(|v| v.trim().to_string()))
        .unwrap_or_default();
    (status, ct, buf[split + 4..].to_vec())
}

#[test]
fn serves_files_and_refuses_traversal() {
    let outer = tempfile::tempdir().unwrap();
    std::fs::write(outer.path().join("secret.txt"), "SECRET").unwrap();
    let root = outer.path().join("html");
    std::fs::create_dir_all(root.join("miniwob")).unwrap();
    std::fs::write(root.join("miniwob/page.html"), "<html>hi</html>").unwrap();
    std::fs::write(root.join("miniwob/app.js"), "var x;").unwrap();
    std::fs::write(root.join("style.css"), "body{}").unwrap();
    std::fs::write(root.join("pic.png"), [0x89u8, b'P', b'N', b'G']).unwrap();
    std::os::unix::fs::symlink(outer.path().join("secret.txt"), root.join("link-out.txt")).unwrap();
    std::os::unix::fs::symlink(outer.path(), root.join("dir-out")).unwrap();
    std::os::unix::fs::symlink(root.join("style.css"), root.join("link-in.css")).unwrap();

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let server = rt.block_on(TaskServer::start(&root)).unwrap();
    let addr = server.addr();
    assert!(server.base_url().starts_with("http://127.0.0.1:"));

    let ok = get(addr, "GET", "/miniwob/page.html");
    assert_eq!((ok.0, ok.1.as_str(), ok.2.as_slice()), (200, "text/html; charset=utf-8", &b"<html>hi</html>"[..]));
    assert_eq!(get(addr, "GET", "/miniwob/app.js").1, "text/javascript; charset=utf-8");
    assert_eq!(get(addr, "GET", "/style.css").1, "text/css; charset=utf-8");
    assert_eq!(get(addr, "GET", "/pic.png").1, "image/png");
    assert_eq!(get(addr, "GET", "/link-in.css").0, 200, "a symlink inside the root is fine");
    assert_eq!(get(addr, "GET", "/miniwob/%70age.html").0, 200, "percent-encoded names decode");
    let head = get(addr, "HEAD", "/miniwob/page.html");
    assert_eq!((head.0, head.2.len()), (200, 0));
    assert_eq!(get(addr, "POST", "/miniwob/page.html").0, 405);
    assert_eq!(get(addr, "GET", "/nope.html").0, 404);
    assert_eq!(get(addr, "GET", "/").0, 404);
    assert_eq!(get(addr, "GET", "/miniwob").0, 404, "directories are not listed");

    for bad in [
        "/../secret.txt",
        "/miniwob/../../secret.txt",
        "/%2e%2e/secret.txt",
        "/%2E%2E/secret.txt",
        "/miniwob/%2e%2e%2f%2e%2e%2fsecret.txt",
        "/./miniwob/page.html",
        "/link-out.txt",
        "/dir-out/secret.txt",
        "//etc/passwd",
        "/etc/passwd",
        "/%2fetc%2fpasswd",
        "/..%5csecret.txt",
        "/x%00.html",
        "/%ff%fe",
        "http://127.0.0.1/../secret.txt",
    ] {
        let (status, _, body) = get(addr, "GET", bad);
        assert!(matches!(status, 400 | 403 | 404), "{bad}: status {status}");
        assert!(!String::from_utf8_lossy(&body).contains("SECRET"), "{bad} leaked the secret");
        assert!(!String::from_utf8_lossy(&body).contains("root:"), "{bad} leaked /etc/passwd");
    }
    assert_eq!(get(addr, "GET", "/%2e%2e/secret.txt").0, 403);
    assert_eq!(get(addr, "GET", "/link-out.txt").0, 403);
    drop(server);
}

#[test]
fn exp12_tasks_exist_in_the_wheel() {
    let root = env::html_root().unwrap_or_else(|e| panic!("{e}"));
    let all = env::list_tasks(&root).unwrap();
    assert!(all.len() >= 125, "only {} tasks under {}", all.len(), root.display());
    for t in env::EXP12_TASKS {
        assert!(env::tasks::task_exists(&root, t), "exp12 task {t} has no page in {}", root.display());
        assert!(all.iter().any(|x| x.name == t && x.exp12));
    }
    for t in env::tasks::SINGLE_ACTION_TASKS {
        assert!(env::tasks::task_exists(&root, t), "{t}");
    }
    assert!(all.iter().any(|t| t.name == "login-user" && t.multi_step));
    assert!(all.iter().any(|t| t.name == "flight.AA" && t.flight));
}

fn small_root() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("page.html"), "<html>ok</html>").unwrap();
    d
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap()
}

/// Issue 18.14: only this server's loopback names and port are served (DNS rebinding).
#[test]
fn other_host_names_are_refused() {
    let root = small_root();
    let rt = runtime();
    let server = rt.block_on(TaskServer::start(root.path())).unwrap();
    let (addr, port) = (server.addr(), server.addr().port());
    for ok in [format!("127.0.0.1:{port}"), format!("localhost:{port}"), format!("LOCALHOST:{port}")] {
        assert_eq!(get_as(addr, &ok, "GET", "/page.html").0, 200, "{ok}");
    }
    for bad in [
        format!("evil.example:{port}"),
        "evil.example".to_string(),
        "127.0.0.1".to_string(),
        format!("127.0.0.1:{}", port.wrapping_add(1)),
        format!("127.0.0.1.evil.example:{port}"),
        String::new(),
    ] {
        let (status, _, body) = get_as(addr, &bad, "GET", "/page.html");
        assert_eq!(status, 421, "Host {bad:?}");
        assert!(!String::from_utf8_lossy(&body).contains("ok</html>"), "Host {bad:?} read the page");
    }
}

/// Issue 18.13: a connection that never finishes its headers is closed after the header
/// timeout (before: held forever), and no more than `max_connections` are served at once while
/// a normal request still gets through.
#[test]
fn half_sent_requests_are_timed_out_and_bounded() {
    let root = small_root();
    let rt = runtime();
    // The default limits: one half-sent request is dropped within the default timeout.
    let server = rt.block_on(TaskServer::start(root.path())).unwrap();
    let mut c = std::net::TcpStream::connect(server.addr()).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(25))).unwrap();
    c.write_all(b"GET /page.html HTTP/1.1\r\nHost: 127.0").unwrap();
    let t0 = Instant::now();
    let mut buf = Vec::new();
    let r = c.read_to_end(&mut buf);
    assert!(r.is_ok() && t0.elapsed() < Duration::from_secs(20), "held {:?}: {r:?}", t0.elapsed());
    drop(server);

    let limits = ServerLimits { header_timeout: Duration::from_secs(1), max_connections: 4 };
    let server = rt.block_on(TaskServer::start_with(root.path(), limits)).unwrap();
    let addr = server.addr();
    let mut held: Vec<std::net::TcpStream> = (0..40)
        .map(|_| {
            let mut c = std::net::TcpStream::connect(addr).unwrap();
            c.write_all(b"GET /page.html HTTP/1.1\r\nHost: 12").unwrap();
            c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            c
        })
        .collect();
    let t0 = Instant::now();
    let mut peak = 0;
    while t0.elapsed() < Duration::from_millis(1500) {
        peak = peak.max(server.active_connections());
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!((1..=4).contains(&peak), "{peak} connections served at once, limit 4");
    // Every held connection is closed in turn (10 rounds of 4 × 1 s), then a request is served.
    for c in &mut held {
        let mut b = Vec::new();
        assert!(c.read_to_end(&mut b).is_ok(), "a half-sent request was held past its timeout");
    }
    assert!(t0.elapsed() < Duration::from_secs(25), "{:?}", t0.elapsed());
    assert_eq!(get(addr, "GET", "/page.html").0, 200);
    assert!(server.active_connections() <= 1);
}
