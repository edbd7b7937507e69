//! K sessions shared by concurrent episodes.
//!
//! [`Pool::acquire`] hands out a [`PooledSession`]; dropping it returns the session. A session
//! whose browser died (an `EnvError::BrowserDied` from any call, or a chromedriver that exited)
//! is not returned: its processes are killed and the next `acquire` starts a fresh browser in its
//! slot. The episode that saw the death gets an error with `is_retryable() == true` and should be
//! run again; [`Pool::run`] does that for you.
use super::server::TaskServer;
use super::session::{EnvConfig, Session};
use super::{html_root, EnvError};
use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

struct Shared {
    server: Arc<TaskServer>,
    cfg: EnvConfig,
    idle: Mutex<Vec<Session>>,
    permits: Arc<Semaphore>,
    replaced: AtomicU64,
    size: usize,
}

/// A pool of up to `size` browser sessions.
#[derive(Clone)]
pub struct Pool {
    shared: Arc<Shared>,
}

/// A session on loan from a [`Pool`]; returned on drop (or discarded when its browser died).
pub struct PooledSession {
    session: Option<Session>,
    shared: Arc<Shared>,
    _permit: OwnedSemaphorePermit,
}

impl Pool {
    /// Starts the task server and `size` browsers (in parallel). Call inside a tokio runtime.
    pub async fn new(size: usize, cfg: EnvConfig) -> Result<Pool, EnvError> {
        let root = html_root()?;
        let server =
            TaskServer::start(&root).await.map_err(|e| EnvError::Setup(format!("starting the task server: {e}")))?;
        Pool::with_server(Arc::new(server), size, cfg).await
    }

    /// Like [`Pool::new`] with an existing server.
    pub async fn with_server(server: Arc<TaskServer>, size: usize, cfg: EnvConfig) -> Result<Pool, EnvError> {
        let size = size.max(1);
        let mut starts = Vec::new();
        for _ in 0..size {
            let server = server.clone();
            let cfg = cfg.clone();
            starts.push(tokio::spawn(async move { Session::new(server, cfg).await }));
        }
        let mut sessions = Vec::new();
        for s in starts {
            sessions.push(s.await.map_err(|e| EnvError::Setup(format!("session start task: {e}")))??);
        }
        Ok(Pool {
            shared: Arc::new(Shared {
                server,
                cfg,
                idle: Mutex::new(sessions),
                permits: Arc::new(Semaphore::new(size)),
                replaced: AtomicU64::new(0),
                size,
            }),
        })
    }

    pub fn size(&self) -> usize {
        self.shared.size
    }

    pub fn server(&self) -> &Arc<TaskServer> {
        &self.shared.server
    }

    /// How many dead sessions were replaced so far.
    pub fn replaced(&self) -> u64 {
        self.shared.replaced.load(Ordering::Relaxed)
    }

    /// Waits for a free slot and returns a live session (starting a new browser if the slot's
    /// previous one died).
    pub async fn acquire(&self) -> Result<PooledSession, EnvError> {
        let permit =
            self.shared.permits.clone().acquire_owned().await.map_err(|_| EnvError::Setup("pool closed".into()))?;
        let mut popped = self.shared.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let healthy = popped.as_mut().is_some_and(|s| s.is_healthy());
        let session = match popped {
            Some(s) if healthy => s,
            other => {
                drop(other);
                self.shared.replaced.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("starting a fresh browser to replace a dead session");
                Session::new(self.shared.server.clone(), self.shared.cfg.clone()).await?
            }
        };
        Ok(PooledSession { session: Some(session), shared: self.shared.clone(), _permit: permit })
    }

    /// Runs `episode` on a pooled session; when it fails with a retryable error (the browser
    /// died), runs it again on a fresh session, up to `retries` more times.
    pub async fn run<T, Er, F, Fut>(&self, retries: usize, mut episode: F) -> Result<T, Er>
    where
        F: FnMut(PooledSession) -> Fut,
        Fut: Future<Output = Result<T, Er>>,
        Er: Retryable + From<EnvError> + std::fmt::Display,
    {
        let mut attempt = 0;
        loop {
            let s = self.acquire().await?;
            match episode(s).await {
                Err(e) if e.is_retryable() && attempt < retries => {
                    attempt += 1;
                    tracing::warn!("episode retried after: {e}");
                }
                r => return r,
            }
        }
    }

    /// The first observation of each (task, seed) in `items` (reset only; the Set-of-Marks
    /// screenshot too when `screenshots`), in order, concurrently over the pool, each retried
    /// on a fresh session when its browser dies.
    pub async fn observe_all(&self, items: &[(String, u64)], screenshots: bool) -> Result<Vec<Observed>, EnvError> {
        let mut set = tokio::task::JoinSet::new();
        for (i, (task, seed)) in items.iter().cloned().enumerate() {
            let pool = self.clone();
            set.spawn(async move {
                let seen = pool
                    .run(3, |mut s| {
                        let task = task.clone();
                        async move {
                            let obs = s.reset(&task, seed).await?;
                            let screenshot = if screenshots { Some(s.som_image(&obs).await?) } else { None };
                            Ok::<_, EnvError>(Observed { obs, screenshot })
                        }
                    })
                    .await?;
                Ok::<_, EnvError>((i, seen))
            });
        }
        let mut out: Vec<Option<Observed>> = (0..items.len()).map(|_| None).collect();
        while let Some(r) = set.join_next().await {
            let (i, v) = r.map_err(|e| EnvError::Setup(format!("observation task: {e}")))??;
            out[i] = Some(v);
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// Closes every idle session (sessions on loan close when dropped).
    pub async fn shutdown(&self) {
        let all: Vec<Session> = std::mem::take(&mut *self.shared.idle.lock().unwrap_or_else(|p| p.into_inner()));
        for s in all {
            s.close().await;
        }
    }
}

impl Deref for PooledSession {
    type Target = Session;
    fn deref(&self) -> &Session {
        self.session.as_ref().expect("session present until drop")
    }
}

impl DerefMut for PooledSession {
    fn deref_mut(&mut self) -> &mut Session {
        self.session.as_mut().expect("session present until drop")
    }
}

impl Drop for PooledSession {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            if !s.is_dead() {
                self.shared.idle.lock().unwrap_or_else(|p| p.into_inner()).push(s);
            }
            // A dead session is dropped here: Browser's Drop kills its processes.
        }
    }
}

/// An error that may mean "the browser died: run the episode again" ([`EnvError::is_retryable`]).
pub trait Retryable {
    fn is_retryable(&self) -> bool;
}

impl Retryable for EnvError {
    fn is_retryable(&self) -> bool {
        EnvError::is_retryable(self)
    }
}

/// An episode's error chain: retryable when it holds a retryable [`EnvError`].
impl Retryable for anyhow::Error {
    fn is_retryable(&self) -> bool {
        self.chain().any(|e| e.downcast_ref::<EnvError>().is_some_and(EnvError::is_retryable))
    }
}

/// A first observation and, when asked for, its Set-of-Marks screenshot.
pub struct Observed {
    pub obs: super::Observation,
    pub screenshot: Option<image::RgbImage>,
}
