//! MiniWoB++ over WebDriver (DESIGN.md §5): a static task server, Chromium driven through
//! chromedriver and fantoccini, seeded episodes with observations, actions and rewards, a pool of
//! sessions, Set-of-Marks screenshots and the DOM text that text models read.
//!
//! Nothing here knows about models (DESIGN.md §2). See docs/env.md.
pub mod action;
pub mod browser;
pub mod observation;
pub mod pool;
pub mod server;
pub mod session;
pub mod som;
pub mod tasks;

pub use action::{Action, ActionParseError};
pub use browser::{Browser, BrowserConfig};
pub use observation::{Element, Observation, StepResult};
pub use pool::{Observed, Pool, PooledSession};
pub use server::TaskServer;
pub use session::{EnvConfig, Session};
pub use tasks::{is_exp12, is_multi_step, list_tasks, TaskInfo, EXP12_TASKS};

use std::path::PathBuf;

/// Errors of the environment. Problems with one action (unknown ref, element not interactable)
/// are not errors: they come back in [`StepResult::error`].
#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    /// Missing binaries or assets, or a browser that cannot start: the message says what to run.
    #[error("{0}")]
    Setup(String),
    #[error("unknown task {0:?} (see `miniwob-steer tasks`)")]
    UnknownTask(String),
    /// The browser or chromedriver died or stopped answering. The session is unusable; a pool
    /// replaces it. Retry the episode: this is not the agent's failure.
    #[error("browser died: {0} (the episode can be retried)")]
    BrowserDied(String),
    /// The page itself failed (a JavaScript error in reset or observe).
    #[error("page error: {0}")]
    Page(String),
    /// Another WebDriver error while the browser is still alive.
    #[error("webdriver error: {0}")]
    WebDriver(String),
}

impl EnvError {
    /// True when the episode should be run again on a fresh session.
    pub fn is_retryable(&self) -> bool {
        matches!(self, EnvError::BrowserDied(_))
    }
}

pub use miniwob_steer_schema::paths::assets_home;

/// The unpacked MiniWoB html tree (`$MINIWOB_STEER_HOME/miniwob-html`), checked to contain the
/// core scripts, or an error naming the setup command.
pub fn html_root() -> Result<PathBuf, EnvError> {
    let root = assets_home().join("miniwob-html");
    if root.join("core").join("core.js").is_file() && root.join("miniwob").join("click-test.html").is_file() {
        Ok(root)
    } else {
        Err(EnvError::Setup(format!(
            "MiniWoB pages not found in {} (expected core/core.js and miniwob/*.html): run ./scripts/setup.sh",
            root.display()
        )))
    }
}
