//! A chromedriver child process plus a fantoccini client over plain loopback HTTP.
//!
//! chromedriver runs in its own process group, and Chromium (which it starts) inherits it, so
//! killing the group (SIGKILL to `-pgid`) takes the whole browser down. Each browser is in a
//! process-wide registry: `Drop` kills its group and removes its temp profile, an `atexit` hook
//! does the same for browsers held in statics (test binaries), and [`install_signal_cleanup`] does
//! it on SIGINT, SIGTERM and SIGHUP. Only a SIGKILL of this process leaves them behind.
use super::EnvError;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

/// What to launch.
#[derive(Debug, Clone)]
pub struct BrowserConfig {
    /// chromedriver binary; default `$MINIWOB_STEER_CHROMEDRIVER` or `chromedriver` on PATH.
    pub chromedriver: Option<PathBuf>,
    /// Chromium binary; default `$MINIWOB_STEER_CHROMIUM`, else `chromium`, `chromium-browser`,
    /// `google-chrome` on PATH.
    pub chromium: Option<PathBuf>,
    /// Window size (DESIGN.md §5: the viewport is height − 143 px, so keep height ≥ 400).
    pub window: (u32, u32),
    /// Device scale factor (1 or 2): screenshots come back at this many pixels per CSS pixel.
    pub device_scale: u32,
    pub headless: bool,
}

impl Default for BrowserConfig {
    fn default() -> Self {
        BrowserConfig { chromedriver: None, chromium: None, window: (500, 400), device_scale: 1, headless: true }
    }
}

/// Process groups and profile dirs of live browsers, for the exit and Ctrl-C cleanup.
static LIVE: Mutex<Vec<(i32, PathBuf)>> = Mutex::new(Vec::new());
static ATEXIT: Once = Once::new();

extern "C" fn cleanup_at_exit() {
    kill_all_browsers();
}

/// Kills every browser this process started and removes their profiles. Safe to call twice.
pub fn kill_all_browsers() {
    let live = match LIVE.lock() {
        Ok(mut g) => std::mem::take(&mut *g),
        Err(p) => std::mem::take(&mut *p.into_inner()),
    };
    for (pgid, profile) in live {
        kill_group(pgid);
        let _ = std::fs::remove_dir_all(&profile);
    }
}

/// Write end of the pipe that the signal handler reports on (-1 until installed).
static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);
static SIGNALS: Once = Once::new();
/// Set once a signal is being handled: no browser starts after it.
static STOPPING: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(sig: libc::c_int) {
    // Only async-signal-safe work here: hand the signal number to the cleanup thread.
    let fd = SIGNAL_PIPE.load(Ordering::Relaxed);
    if fd >= 0 {
        let b = sig as u8;
        // SAFETY: write(2) of one byte from a live stack variable; async-signal-safe.
        unsafe {
            libc::write(fd, (&b as *const u8).cast(), 1);
        }
    }
}

/// On SIGINT, SIGTERM or SIGHUP (Ctrl-C, `kill`, `timeout`, Slurm, a closed terminal): wait for
/// a results line being written to finish, kill every browser, remove their profiles and exit
/// with 128 + the signal (130, 143, 129). Installed once per process, by the first browser
/// launch or by a command; runs on its own thread, so it works whichever tokio runtime is alive.
pub fn install_signal_cleanup() {
    SIGNALS.call_once(|| {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe2(2) fills the two-element array.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            tracing::warn!("no signal cleanup: pipe failed: {}", std::io::Error::last_os_error());
            return;
        }
        let read_fd = fds[0];
        let spawned = std::thread::Builder::new().name("signal-cleanup".into()).spawn(move || {
            let mut b = 0u8;
            loop {
                // SAFETY: read(2) of one byte into a live stack variable.
                let n = unsafe { libc::read(read_fd, (&mut b as *mut u8).cast(), 1) };
                if n == 1 {
                    break;
                }
                if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return;
            }
            let sig = i32::from(b);
            // Held until exit: a line being appended is finished, none is started after.
            let _writes = crate::util::hold_writes();
            STOPPING.store(true, Ordering::SeqCst);
            kill_all_browsers();
            let name = match sig {
                libc::SIGINT => "SIGINT",
                libc::SIGTERM => "SIGTERM",
                libc::SIGHUP => "SIGHUP",
                _ => "a signal",
            };
            eprintln!("{name}: browsers stopped, exiting");
            std::process::exit(128 + sig);
        });
        if let Err(e) = spawned {
            tracing::warn!("no signal cleanup: {e}");
            return;
        }
        SIGNAL_PIPE.store(fds[1], Ordering::Relaxed);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            // SAFETY: a zeroed sigaction with a plain handler and an empty mask is valid.
            unsafe {
                // A signal the parent set to be ignored (`nohup`, a background job's SIGINT)
                // stays ignored.
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, std::ptr::null(), &mut old) == 0 && old.sa_sigaction == libc::SIG_IGN {
                    continue;
                }
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
                sa.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut sa.sa_mask);
                libc::sigaction(sig, &sa, std::ptr::null_mut());
            }
        }
    });
}

fn kill_group(pgid: i32) {
    if pgid > 1 {
        // SAFETY: kill(2) with a negative pid signals a process group; no memory is touched.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
    }
}

fn find_on_path(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    for dir in std::env::split_paths(&path) {
        for n in names {
            let p = dir.join(n);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

/// Locates chromedriver and Chromium, or explains how to install them.
pub fn find_binaries(cfg: &BrowserConfig) -> Result<(PathBuf, PathBuf), EnvError> {
    let driver = cfg
        .chromedriver
        .clone()
        .or_else(|| std::env::var_os("MINIWOB_STEER_CHROMEDRIVER").map(PathBuf::from))
        .or_else(|| find_on_path(&["chromedriver"]))
        .filter(|p| p.is_file())
        .ok_or_else(|| {
            EnvError::Setup(
                "chromedriver not found (PATH or $MINIWOB_STEER_CHROMEDRIVER): run ./scripts/setup.sh".into(),
            )
        })?;
    let chromium = cfg
        .chromium
        .clone()
        .or_else(|| std::env::var_os("MINIWOB_STEER_CHROMIUM").map(PathBuf::from))
        .or_else(|| find_on_path(&["chromium", "chromium-browser", "google-chrome"]))
        .filter(|p| p.is_file())
        .ok_or_else(|| {
            EnvError::Setup("Chromium not found (PATH or $MINIWOB_STEER_CHROMIUM): run ./scripts/setup.sh".into())
        })?;
    Ok((driver, chromium))
}

fn free_port() -> std::io::Result<u16> {
    let l = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    Ok(l.local_addr()?.port())
}

/// The chromedriver process group and the profile dir; killed and removed on drop.
struct DriverProc {
    driver: Child,
    pgid: i32,
    profile: PathBuf,
}

impl Drop for DriverProc {
    fn drop(&mut self) {
        kill_group(self.pgid);
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
        let mut g = LIVE.lock().unwrap_or_else(|p| p.into_inner());
        g.retain(|(p, _)| *p != self.pgid);
    }
}

/// A live browser: chromedriver child, Chromium, a WebDriver session and a temp profile.
pub struct Browser {
    pub client: fantoccini::Client,
    proc: DriverProc,
    /// When the session was created (for logs).
    pub started: Instant,
}

impl Browser {
    /// Starts chromedriver on a free loopback port and opens a Chromium session.
    pub async fn launch(cfg: &BrowserConfig) -> Result<Browser, EnvError> {
        let (driver_bin, chromium_bin) = find_binaries(cfg)?;
        ATEXIT.call_once(|| {
            // SAFETY: registers a plain extern "C" fn with no arguments.
            unsafe {
                libc::atexit(cleanup_at_exit);
            }
        });
        install_signal_cleanup();
        let mut last_err = String::new();
        for _attempt in 0..3 {
            let port = free_port().map_err(|e| EnvError::Setup(format!("finding a free port: {e}")))?;
            let mut cmd = Command::new(&driver_bin);
            cmd.arg(format!("--port={port}"))
                .arg("--allowed-ips=127.0.0.1")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
            // Profile made, driver spawned and both registered under the lock, and none of it
            // once a signal is being handled: the cleanup sees this browser or it never starts.
            let (driver, profile) = {
                let mut live = LIVE.lock().unwrap_or_else(|p| p.into_inner());
                if STOPPING.load(Ordering::SeqCst) {
                    return Err(EnvError::Setup("stopping on a signal; no new browser".into()));
                }
                let profile = tempfile::Builder::new()
                    .prefix("miniwob-steer-chromium-")
                    .tempdir()
                    .map_err(|e| EnvError::Setup(format!("creating a temp profile dir: {e}")))?
                    .keep();
                let driver = match cmd.spawn() {
                    Ok(d) => d,
                    Err(e) => {
                        let _ = std::fs::remove_dir_all(&profile);
                        return Err(EnvError::Setup(format!(
                            "starting {}: {e}; run ./scripts/setup.sh",
                            driver_bin.display()
                        )));
                    }
                };
                live.push((driver.id() as i32, profile.clone()));
                (driver, profile)
            };
            let pgid = driver.id() as i32;
            let mut proc = DriverProc { driver, pgid, profile };
            match connect(&mut proc, port, &chromium_bin, cfg).await {
                Ok(client) => return Ok(Browser { client, proc, started: Instant::now() }),
                Err(e) => {
                    last_err = e;
                    // Drop kills the group and removes the profile; the retry makes a new one.
                    drop(proc);
                }
            }
        }
        Err(EnvError::Setup(format!("could not start a browser session: {last_err}")))
    }
}

async fn connect(
    p: &mut DriverProc,
    port: u16,
    chromium: &Path,
    cfg: &BrowserConfig,
) -> Result<fantoccini::Client, String> {
    {
        // Wait for chromedriver to listen.
        let t0 = Instant::now();
        loop {
            if let Ok(Some(st)) = p.driver.try_wait() {
                return Err(format!("chromedriver exited at start ({st})"));
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                break;
            }
            if t0.elapsed() > Duration::from_secs(15) {
                return Err("chromedriver did not listen within 15 s".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut args = vec![
            "--no-sandbox".to_string(),
            "--disable-gpu".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--disable-dev-shm-usage".into(),
            "--disable-extensions".into(),
            "--mute-audio".into(),
            "--hide-scrollbars".into(),
            format!("--window-size={},{}", cfg.window.0, cfg.window.1),
            format!("--force-device-scale-factor={}", cfg.device_scale.max(1)),
            format!("--user-data-dir={}", p.profile.display()),
        ];
        if cfg.headless {
            args.insert(0, "--headless=new".into());
        }
        let mut caps = serde_json::Map::new();
        caps.insert("browserName".into(), "chrome".into());
        caps.insert("pageLoadStrategy".into(), "normal".into());
        caps.insert("unhandledPromptBehavior".into(), "dismiss".into());
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({ "binary": chromium.to_string_lossy(), "args": args }),
        );
        let mut builder = fantoccini::ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new());
        builder.capabilities(caps);
        let url = format!("http://127.0.0.1:{port}");
        let fut = builder.connect(&url);
        match tokio::time::timeout(Duration::from_secs(30), fut).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(format!("new session: {e}")),
            Err(_) => Err("new session timed out after 30 s".into()),
        }
    }
}

impl Browser {
    /// True while the chromedriver process is running.
    pub fn driver_alive(&mut self) -> bool {
        matches!(self.proc.driver.try_wait(), Ok(None))
    }

    /// chromedriver's pid (= the process group of the whole browser).
    pub fn pid(&self) -> u32 {
        self.proc.pgid as u32
    }

    /// Pids of the Chromium processes in this browser's group (for tests that kill them).
    pub fn chromium_pids(&self) -> Vec<u32> {
        let mut out = Vec::new();
        let Ok(rd) = std::fs::read_dir("/proc") else { return out };
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
            if pid == self.proc.pgid as u32 {
                continue;
            }
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
            // pid (comm) state ppid pgrp ...
            let Some(close) = stat.rfind(')') else { continue };
            let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
            if fields.get(2).and_then(|g| g.parse::<i32>().ok()) == Some(self.proc.pgid) {
                out.push(pid);
            }
        }
        out.sort_unstable();
        out
    }

    /// Closes the WebDriver session politely, then kills what is left.
    pub async fn close(self) {
        let _ = tokio::time::timeout(Duration::from_secs(3), self.client.clone().close()).await;
        drop(self);
    }

    /// Temp profile directory (removed on drop).
    pub fn profile_dir(&self) -> &Path {
        &self.proc.profile
    }
}
