//! One browser session running MiniWoB episodes: `reset(task, seed)`, `observe()`, `act(action)`.
//!
//! Everything the model produces reaches the page only as WebDriver script *arguments* or as
//! WebDriver key input, never as JavaScript source: the scripts below are constants.
use super::action::{parse_key_chord, Action};
use super::browser::{Browser, BrowserConfig};
use super::observation::{Element, Observation, StepResult};
use super::server::TaskServer;
use super::{html_root, tasks, EnvError};
use fantoccini::actions::{InputSource, KeyAction, KeyActions, MouseActions, PointerAction, MOUSE_BUTTON_LEFT};
use fantoccini::error::CmdError;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Largest seed that is exactly a JS number (2^53 − 1).
pub const MAX_SEED: u64 = (1 << 53) - 1;

/// Settings of a session.
#[derive(Debug, Clone)]
pub struct EnvConfig {
    pub browser: BrowserConfig,
    /// `core.EPISODE_MAX_TIME` in ms, set at every reset (the page's own default is 10 s).
    pub episode_max_time_ms: u64,
    /// `core.setDataMode` (`train` as in the Python gym).
    pub data_mode: String,
    /// Upper bound for one WebDriver call; past it the browser is declared dead.
    pub call_timeout: Duration,
    /// How `select ref=N option="…"` runs (a protocol's `env.select`).
    pub select: crate::protocol::SelectMode,
}

impl Default for EnvConfig {
    fn default() -> Self {
        EnvConfig {
            browser: BrowserConfig::default(),
            episode_max_time_ms: 60_000,
            data_mode: "train".into(),
            call_timeout: Duration::from_secs(30),
            select: crate::protocol::SelectMode::Set,
        }
    }
}

// The page scripts live in src/env/js/; the macros let `concat!` join them into single round trips.
macro_rules! reset_body {
    () => {
        include_str!("js/reset.js")
    };
}

macro_rules! observe_body {
    () => {
        include_str!("js/observe.js")
    };
}

/// Runs a body that returns `true` or an error message, refusing to run once the episode is
/// over, and returns `{err, done, reward, raw, reason}`.
macro_rules! with_state {
    ($body:expr) => {
        concat!(include_str!("js/state_head.js"), $body, include_str!("js/state_tail.js"))
    };
}

macro_rules! click_body {
    () => {
        include_str!("js/click.js")
    };
}

macro_rules! select_body {
    () => {
        include_str!("js/select.js")
    };
}

/// Reset and first observation in one round trip (`false`: the task is not ready yet; a
/// string: the page is broken).
const RESET_JS: &str = concat!(reset_body!(), observe_body!());

const READY_JS: &str = "return (typeof WOB_TASK_READY === 'undefined') ? true : !!WOB_TASK_READY;";

const LOADED_JS: &str =
    "return document.readyState === 'complete' && typeof core !== 'undefined' && !!document.getElementById('sync-task-cover');";

const OBSERVE_JS: &str = observe_body!();

const STATE_JS: &str = with_state!("return true;");

const CLICK_JS: &str = with_state!(click_body!());

const SELECT_JS: &str = with_state!(select_body!());

const INSERT_TEXT_JS: &str = "return document.execCommand('insertText', false, arguments[0]);";

const WRAP_RECT_JS: &str = include_str!("js/wrap_rect.js");

/// A MiniWoB session: one Chromium, one task page at a time.
pub struct Session {
    browser: Browser,
    server: Arc<TaskServer>,
    cfg: EnvConfig,
    loaded: Option<String>,
    task: Option<String>,
    seed: u64,
    start: Instant,
    boxes: HashMap<i64, (f64, f64, f64, f64)>,
    dead: bool,
    episodes: u64,
}

struct State {
    err: Option<String>,
    done: bool,
    reward: f64,
    raw: f64,
    reason: Option<String>,
}

/// How an action-level WebDriver error is reported: in the StepResult, or as an EnvError.
enum Fail {
    Action(String),
    Env(EnvError),
}

impl From<EnvError> for Fail {
    fn from(e: EnvError) -> Self {
        Fail::Env(e)
    }
}

impl Session {
    /// Starts a browser for pages served by `server`.
    pub async fn new(server: Arc<TaskServer>, cfg: EnvConfig) -> Result<Session, EnvError> {
        let browser = Browser::launch(&cfg.browser).await?;
        let _ = browser.client.set_window_size(cfg.browser.window.0, cfg.browser.window.1).await;
        Ok(Session {
            browser,
            server,
            cfg,
            loaded: None,
            task: None,
            seed: 0,
            start: Instant::now(),
            boxes: HashMap::new(),
            dead: false,
            episodes: 0,
        })
    }

    /// Starts its own task server on the html tree of `scripts/setup.sh`, then a browser.
    pub async fn start(cfg: EnvConfig) -> Result<Session, EnvError> {
        let root = html_root()?;
        let server =
            TaskServer::start(&root).await.map_err(|e| EnvError::Setup(format!("starting the task server: {e}")))?;
        Session::new(Arc::new(server), cfg).await
    }

    pub fn server(&self) -> &Arc<TaskServer> {
        &self.server
    }

    pub fn browser(&self) -> &Browser {
        &self.browser
    }

    /// True once a call found the browser dead; the session cannot be used again.
    pub fn is_dead(&self) -> bool {
        self.dead
    }

    /// Not known dead and chromedriver still running (cheap, no WebDriver call).
    pub fn is_healthy(&mut self) -> bool {
        !self.dead && self.browser.driver_alive()
    }

    /// Episodes started in this session.
    pub fn episodes(&self) -> u64 {
        self.episodes
    }

    /// Closes the WebDriver session and stops the browser.
    pub async fn close(self) {
        self.browser.close().await;
    }

    fn died(&mut self, why: String) -> EnvError {
        self.dead = true;
        EnvError::BrowserDied(why)
    }

    fn check_alive(&mut self) -> Result<(), EnvError> {
        if self.dead {
            return Err(EnvError::BrowserDied("this session's browser died earlier".into()));
        }
        if !self.browser.driver_alive() {
            return Err(self.died("chromedriver exited".into()));
        }
        Ok(())
    }

    /// Turns a WebDriver error into an EnvError: JavaScript errors are the page's, anything else
    /// is checked with a trivial script; if that fails too the browser is dead.
    async fn classify(&mut self, e: CmdError) -> EnvError {
        if e.is_javascript_error() {
            return EnvError::Page(e.to_string());
        }
        if self.probe().await {
            EnvError::WebDriver(e.to_string())
        } else {
            self.died(e.to_string())
        }
    }

    async fn probe(&mut self) -> bool {
        if !self.browser.driver_alive() {
            return false;
        }
        matches!(
            tokio::time::timeout(Duration::from_secs(5), self.browser.client.execute("return 1", vec![])).await,
            Ok(Ok(_))
        )
    }

    async fn exec(&mut self, script: &str, args: Vec<Value>) -> Result<Value, EnvError> {
        self.check_alive()?;
        match tokio::time::timeout(self.cfg.call_timeout, self.browser.client.execute(script, args)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.classify(e).await),
            Err(_) => Err(self.died(format!("a WebDriver call took more than {:?}", self.cfg.call_timeout))),
        }
    }

    /// Runs a script that returns `true` or an error message for the action.
    async fn exec_action(&mut self, script: &str, args: Vec<Value>) -> Result<Option<String>, EnvError> {
        match self.exec(script, args).await {
            Ok(Value::Bool(true)) => Ok(None),
            Ok(Value::String(s)) => Ok(Some(s)),
            Ok(v) => Ok(Some(format!("unexpected script result {v}"))),
            Err(EnvError::Page(m)) => Ok(Some(format!("page error: {m}"))),
            Err(e) => Err(e),
        }
    }

    async fn load(&mut self, task: &str) -> Result<(), EnvError> {
        if self.loaded.as_deref() == Some(task) {
            return Ok(());
        }
        let page = tasks::page_path(task).ok_or_else(|| EnvError::UnknownTask(task.to_string()))?;
        if !self.server.root().join(&page).is_file() {
            return Err(EnvError::UnknownTask(task.to_string()));
        }
        self.loaded = None;
        let url = format!("{}{}", self.server.base_url(), page);
        self.check_alive()?;
        match tokio::time::timeout(self.cfg.call_timeout, self.browser.client.goto(&url)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(self.classify(e).await),
            Err(_) => return Err(self.died("page load timed out".into())),
        }
        let t0 = Instant::now();
        loop {
            if self.exec(LOADED_JS, vec![]).await? == Value::Bool(true) {
                break;
            }
            if t0.elapsed() > Duration::from_secs(10) {
                return Err(EnvError::Page(format!("{url} did not finish loading (no #sync-task-cover after 10 s)")));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.loaded = Some(task.to_string());
        Ok(())
    }

    /// Starts an episode of `task` with `seed` (a JS number: `Math.seedrandom(seed)`), and
    /// returns its first observation. The same (task, seed) gives the same utterance and DOM.
    pub async fn reset(&mut self, task: &str, seed: u64) -> Result<Observation, EnvError> {
        if seed > MAX_SEED {
            return Err(EnvError::Page(format!(
                "seed {seed} is not exactly representable as a JS number (max {MAX_SEED})"
            )));
        }
        if !tasks::valid_name(task) || !tasks::task_exists(self.server.root(), task) {
            return Err(EnvError::UnknownTask(task.to_string()));
        }
        self.load(task).await?;
        let args = vec![json!(seed), json!(self.cfg.data_mode), json!(self.cfg.episode_max_time_ms)];
        let mut v = self.exec(RESET_JS, args.clone()).await?;
        if let Value::String(_) = v {
            // A page in a bad state: reload it once.
            self.loaded = None;
            self.load(task).await?;
            v = self.exec(RESET_JS, args).await?;
            if let Value::String(m) = v {
                return Err(EnvError::Page(format!("reset failed: {m}")));
            }
        }
        self.task = Some(task.to_string());
        self.seed = seed;
        self.start = Instant::now();
        self.episodes += 1;
        if v == Value::Bool(false) {
            // Not ready yet (FlightWoB loads its site in a frame): poll, then observe.
            let t0 = Instant::now();
            while self.exec(READY_JS, vec![]).await? != Value::Bool(true) {
                if t0.elapsed() > Duration::from_secs(5) {
                    return Err(EnvError::Page("WOB_TASK_READY stayed false for 5 s".into()));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            return self.observe().await;
        }
        Ok(self.parse_observation(v))
    }

    /// The current observation of the running episode.
    pub async fn observe(&mut self) -> Result<Observation, EnvError> {
        if self.task.is_none() {
            return Err(EnvError::Page("observe() before reset()".into()));
        }
        let v = self.exec(OBSERVE_JS, vec![]).await?;
        Ok(self.parse_observation(v))
    }

    fn parse_observation(&mut self, v: Value) -> Observation {
        let task = self.task.clone().unwrap_or_default();
        let (utterance, fields) = match v.get("utterance") {
            Some(Value::String(s)) => (s.clone(), Vec::new()),
            Some(Value::Object(o)) => {
                let u = o.get("utterance").and_then(Value::as_str).unwrap_or("").to_string();
                let mut f: Vec<(String, String)> = o
                    .get("fields")
                    .and_then(Value::as_object)
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| (k.clone(), v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())))
                            .collect()
                    })
                    .unwrap_or_default();
                f.sort();
                (u, f)
            }
            _ => (String::new(), Vec::new()),
        };
        // FlightWoB's utterance is a JSON object of fields (as the Python gym's extractor reads it).
        let fields = if fields.is_empty() && task.starts_with("flight.") {
            match serde_json::from_str::<serde_json::Map<String, Value>>(&utterance) {
                Ok(m) => {
                    let mut f: Vec<(String, String)> = m
                        .into_iter()
                        .map(|(k, v)| (k, v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())))
                        .collect();
                    f.sort();
                    f
                }
                Err(_) => fields,
            }
        } else {
            fields
        };
        let mut elements = Vec::new();
        let empty = serde_json::Map::new();
        let extra = v.get("extra").and_then(Value::as_object).unwrap_or(&empty);
        if let Some(root) = v.get("dom") {
            match DomNode::deserialize(root) {
                Ok(tree) => flatten(&tree, None, 0, extra, &mut elements),
                Err(e) => tracing::warn!(task = %task, "core.getDOMInfo() is not a DOM tree: {e}"),
            }
        }
        self.boxes = elements.iter().map(|e| (e.r#ref, (e.left, e.top, e.width, e.height))).collect();
        Observation {
            task,
            seed: self.seed,
            utterance,
            fields,
            elements,
            episode_time_ms: v.get("t").and_then(Value::as_f64).unwrap_or(0.0),
            done: v.get("done").and_then(Value::as_bool).unwrap_or(false),
        }
    }

    /// The task area (`#wrap`, 160×210 CSS px) at the browser's device scale, decoded.
    pub async fn screenshot_image(&mut self) -> Result<image::RgbaImage, EnvError> {
        let rect = self.exec(WRAP_RECT_JS, vec![]).await?;
        let r: Vec<f64> = serde_json::from_value(rect).unwrap_or_default();
        self.check_alive()?;
        let png = match tokio::time::timeout(self.cfg.call_timeout, self.browser.client.screenshot()).await {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => return Err(self.classify(e).await),
            Err(_) => return Err(self.died("screenshot timed out".into())),
        };
        let img = image::load_from_memory(&png).map_err(|e| EnvError::WebDriver(format!("bad screenshot: {e}")))?;
        let s = self.cfg.browser.device_scale.max(1) as f64;
        let (x, y, w, h) = if r.len() == 4 { (r[0], r[1], r[2], r[3]) } else { (0.0, 0.0, 160.0, 210.0) };
        let px = |v: f64| (v * s).round().max(0.0) as u32;
        let (x, y) = (px(x).min(img.width().saturating_sub(1)), px(y).min(img.height().saturating_sub(1)));
        let w = px(w).min(img.width() - x).max(1);
        let h = px(h).min(img.height() - y).max(1);
        Ok(img.crop_imm(x, y, w, h).to_rgba8())
    }

    /// PNG of [`screenshot_image`](Self::screenshot_image).
    pub async fn screenshot(&mut self) -> Result<Vec<u8>, EnvError> {
        encode_png(self.screenshot_image().await?)
    }

    /// The screenshot with Set-of-Marks boxes and `[ref]` labels for the elements of `obs`,
    /// decoded (what a VLM turn takes: no PNG round trip).
    pub async fn som_image(&mut self, obs: &Observation) -> Result<image::RgbImage, EnvError> {
        let img = self.screenshot_image().await?;
        let marked = super::som::render(img, &obs.elements, self.cfg.browser.device_scale.max(1) as f32)
            .map_err(|e| EnvError::Setup(format!("Set-of-Marks: {e}")))?;
        Ok(image::DynamicImage::ImageRgba8(marked).to_rgb8())
    }

    /// PNG of [`som_image`](Self::som_image).
    pub async fn som_screenshot(&mut self, obs: &Observation) -> Result<Vec<u8>, EnvError> {
        encode_png(self.som_image(obs).await?)
    }

    /// Device pixels per CSS pixel of [`Session::screenshot`].
    pub fn device_scale(&self) -> u32 {
        self.cfg.browser.device_scale.max(1)
    }

    /// Runs a `with_state!` script: `{err, done, reward, raw, reason}`.
    async fn exec_state(&mut self, script: &str, args: Vec<Value>) -> Result<State, EnvError> {
        match self.exec(script, args).await {
            Ok(v) => Ok(State {
                err: v.get("err").and_then(Value::as_str).map(str::to_string),
                done: v.get("done").and_then(Value::as_bool).unwrap_or(false),
                reward: v.get("reward").and_then(Value::as_f64).unwrap_or(0.0),
                raw: v.get("raw").and_then(Value::as_f64).unwrap_or(0.0),
                reason: v.get("reason").and_then(Value::as_str).map(str::to_string),
            }),
            Err(EnvError::Page(m)) => {
                let mut st = Box::pin(self.exec_state(STATE_JS, vec![])).await?;
                st.err = Some(format!("page error: {m}"));
                Ok(st)
            }
            Err(e) => Err(e),
        }
    }

    /// Performs one action and reads the reward. An action that cannot run is reported in
    /// `StepResult::error`; `Err` means the browser itself failed (see [`EnvError::is_retryable`]).
    ///
    /// Clicks and selects by ref take one WebDriver round trip (check, act and read the reward
    /// in one script); typing, keys and coordinate clicks take three.
    pub async fn act(&mut self, action: &Action) -> Result<StepResult, EnvError> {
        if self.task.is_none() {
            return Err(EnvError::Page("act() before reset()".into()));
        }
        let st = match action {
            Action::ClickRef(r) if *r >= 0 => self.exec_state(CLICK_JS, vec![json!(r)]).await?,
            Action::SelectRef { r#ref, option } if self.cfg.select == crate::protocol::SelectMode::Set => {
                self.exec_state(SELECT_JS, vec![json!(r#ref), json!(option)]).await?
            }
            // Typing, and a select run as keystrokes: click the element, then type the text (for a
            // select, the browser's type-ahead picks the option, as a user's keyboard would).
            Action::TypeRef { r#ref, .. } | Action::SelectRef { r#ref, .. } if *r#ref < 0 => {
                let mut st = self.exec_state(STATE_JS, vec![]).await?;
                st.err.get_or_insert_with(|| format!("ref {} is a text fragment; it cannot take input", r#ref));
                st
            }
            Action::TypeRef { r#ref, text } | Action::SelectRef { r#ref, option: text } => {
                let st = self.exec_state(CLICK_JS, vec![json!(r#ref)]).await?;
                if st.err.is_some() {
                    st
                } else {
                    let err = outcome(self.type_text(text).await)?;
                    let mut st = self.exec_state(STATE_JS, vec![]).await?;
                    st.err = err;
                    st
                }
            }
            _ => {
                let before = self.exec_state(STATE_JS, vec![]).await?;
                if before.err.is_some() {
                    before
                } else {
                    let err = outcome(self.perform(action).await)?;
                    let mut st = self.exec_state(STATE_JS, vec![]).await?;
                    st.err = err;
                    st
                }
            }
        };
        Ok(StepResult {
            action: action.to_string(),
            raw_reward: st.raw,
            reward: st.reward,
            done: st.done,
            reason: st.reason,
            error: st.err,
            elapsed_ms: self.start.elapsed().as_secs_f64() * 1000.0,
        })
    }

    /// Actions that are not a single script: coordinates, typing into the focus, keys.
    async fn perform(&mut self, action: &Action) -> Result<(), Fail> {
        match action {
            Action::NoOp => Ok(()),
            Action::ClickRef(r) => {
                let (x, y, w, h) = *self.boxes.get(r).ok_or_else(|| Fail::Action(format!("unknown ref {r}")))?;
                self.click_at(x + w / 2.0, y + h / 2.0).await
            }
            Action::ClickAt { x, y } => self.click_at(*x, *y).await,
            Action::TypeRef { .. } | Action::SelectRef { .. } => unreachable!("handled in act"),
            Action::TypeFocused { text } => self.type_text(text).await,
            Action::PressKey { key } => {
                let chord = parse_key_chord(key).map_err(|e| Fail::Action(e.to_string()))?;
                let mut k = KeyActions::new("keyboard".into());
                for m in &chord.modifiers {
                    k = k.then(KeyAction::Down { value: *m });
                }
                k = k.then(KeyAction::Down { value: chord.key }).then(KeyAction::Up { value: chord.key });
                for m in chord.modifiers.iter().rev() {
                    k = k.then(KeyAction::Up { value: *m });
                }
                self.input(k.into()).await
            }
        }
    }

    async fn click_at(&mut self, x: f64, y: f64) -> Result<(), Fail> {
        let (w, h) = self.cfg.browser.window;
        if !(x.is_finite() && y.is_finite()) || x < 0.0 || y < 0.0 || x >= w as f64 || y >= h as f64 - 143.0 {
            return Err(Fail::Action(format!("point ({x}, {y}) is outside the page")));
        }
        let m = MouseActions::new("mouse".into())
            .then(PointerAction::MoveTo { duration: Some(Duration::ZERO), x: x.floor(), y: y.floor() })
            .then(PointerAction::Down { button: MOUSE_BUTTON_LEFT })
            .then(PointerAction::Up { button: MOUSE_BUTTON_LEFT });
        self.input(m.into()).await
    }

    async fn input(&mut self, actions: fantoccini::actions::Actions) -> Result<(), Fail> {
        self.check_alive()?;
        let r = tokio::time::timeout(self.cfg.call_timeout, self.browser.client.perform_actions(actions)).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.browser.client.release_actions()).await;
        match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.action_error(e).await),
            Err(_) => Err(Fail::Env(self.died("input actions timed out".into()))),
        }
    }

    /// Element-level WebDriver errors belong to the action; the rest are classified.
    async fn action_error(&mut self, e: CmdError) -> Fail {
        if let CmdError::Standard(w) = &e {
            use fantoccini::error::ErrorStatus as S;
            match w.error {
                S::ElementNotInteractable
                | S::ElementClickIntercepted
                | S::InvalidElementState
                | S::StaleElementReference
                | S::NoSuchElement
                | S::InvalidArgument
                | S::MoveTargetOutOfBounds
                | S::JavascriptError => return Fail::Action(w.message.to_string()),
                _ => {}
            }
        }
        Fail::Env(self.classify(e).await)
    }

    /// Types `text` into the focused element: WebDriver Send Keys on the active element (the
    /// text arrives as key input, literally; `\n` is the Enter key, which inserts a newline in a
    /// textarea). Characters outside the BMP, which chromedriver cannot type, tabs, and the
    /// private-use range U+E000–U+F8FF, which WebDriver reads as key codes (U+E003 is
    /// Backspace), go through `document.execCommand('insertText')` with the text as a script
    /// argument, so model output never presses a key it did not write.
    async fn type_text(&mut self, text: &str) -> Result<(), Fail> {
        if text.is_empty() {
            return Ok(());
        }
        self.check_alive()?;
        let el = match tokio::time::timeout(self.cfg.call_timeout, self.browser.client.active_element()).await {
            Ok(Ok(el)) => el,
            Ok(Err(e)) => return Err(self.action_error(e).await),
            Err(_) => return Err(Fail::Env(self.died("active element lookup timed out".into()))),
        };
        for (keyable, run) in typing_runs(text) {
            if keyable {
                // Long text is typed in chunks, each under the call timeout: slow typing is not
                // a dead browser, and a dead one still times out within one chunk.
                for chunk in chunks(&run, TYPE_CHUNK_CHARS) {
                    match tokio::time::timeout(self.cfg.call_timeout, el.send_keys(chunk)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return Err(self.action_error(e).await),
                        Err(_) => return Err(Fail::Env(self.died("typing timed out".into()))),
                    }
                }
            } else if let Some(m) = self.exec_action(INSERT_TEXT_JS, vec![json!(run)]).await? {
                return Err(Fail::Action(m));
            }
        }
        Ok(())
    }
}

/// Characters per Send Keys call (chromedriver types ≈ 1–2 ms per character here).
const TYPE_CHUNK_CHARS: usize = 200;

/// Can this character be sent as WebDriver key input and arrive as itself?
fn keyable(c: char) -> bool {
    let u = c as u32;
    u <= 0xFFFF && c != '\t' && !(0xE000..=0xF8FF).contains(&u)
}

fn encode_png(img: impl Into<image::DynamicImage>) -> Result<Vec<u8>, EnvError> {
    let mut out = Vec::new();
    img.into()
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .map_err(|e| EnvError::WebDriver(format!("encoding the screenshot: {e}")))?;
    Ok(out)
}

/// `text` split into runs of keyable characters and runs of the others, in order.
pub fn typing_runs(text: &str) -> Vec<(bool, String)> {
    let mut runs: Vec<(bool, String)> = Vec::new();
    for c in text.chars() {
        let k = keyable(c);
        match runs.last_mut() {
            Some((rk, s)) if *rk == k => s.push(c),
            _ => runs.push((k, c.to_string())),
        }
    }
    runs
}

/// `s` in pieces of at most `n` characters.
fn chunks(s: &str, n: usize) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    for (count, (i, _)) in s.char_indices().enumerate() {
        if count > 0 && count % n == 0 {
            out.push(&s[start..i]);
            start = i;
        }
    }
    out.push(&s[start..]);
    out
}

fn outcome(r: Result<(), Fail>) -> Result<Option<String>, EnvError> {
    match r {
        Ok(()) => Ok(None),
        Err(Fail::Action(m)) => Ok(Some(m)),
        Err(Fail::Env(e)) => Err(e),
    }
}

/// One node of `core.getDOMInfo()`. Lenient like the page: a missing or mistyped field reads as
/// empty (`text`, `id`, the box), `value` is a string, number or bool, `classes` a string or an
/// SVG class object (then `extra` has it).
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct DomNode {
    #[serde(rename = "ref", deserialize_with = "lenient")]
    r#ref: i64,
    #[serde(deserialize_with = "lenient")]
    tag: String,
    #[serde(deserialize_with = "lenient")]
    text: String,
    #[serde(deserialize_with = "lenient")]
    id: String,
    classes: Value,
    value: Value,
    #[serde(deserialize_with = "lenient")]
    left: f64,
    #[serde(deserialize_with = "lenient")]
    top: f64,
    #[serde(deserialize_with = "lenient")]
    width: f64,
    #[serde(deserialize_with = "lenient")]
    height: f64,
    #[serde(deserialize_with = "lenient")]
    focused: bool,
    #[serde(deserialize_with = "lenient")]
    bg_color: String,
    #[serde(deserialize_with = "lenient")]
    fg_color: String,
    children: Vec<DomNode>,
}

/// The field's value when it has the field's type, else its default (null, a wrong type).
fn lenient<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned + Default,
{
    let v = Value::deserialize(d)?;
    Ok(serde_json::from_value(v).unwrap_or_default())
}

/// The DOM tree, flattened in document (pre-)order, with `<select>` options and SVG classes
/// from `extra`.
fn flatten(
    node: &DomNode,
    parent: Option<i64>,
    depth: u32,
    extra: &serde_json::Map<String, Value>,
    out: &mut Vec<Element>,
) {
    let r = node.r#ref;
    let ex = extra.get(&r.to_string());
    let (mut value, mut checked) = (None, None);
    match &node.value {
        Value::Bool(b) => checked = Some(*b),
        Value::String(v) => value = Some(v.clone()),
        Value::Number(n) => value = Some(n.to_string()),
        _ => {}
    }
    let mut options = Vec::new();
    if let Some(opts) = ex.and_then(|e| e.get("options")).and_then(Value::as_array) {
        options = opts.iter().map(|v| v.as_str().unwrap_or("").to_string()).collect();
        value = ex.and_then(|e| e.get("selected")).and_then(Value::as_str).map(str::to_string);
    }
    let classes = match &node.classes {
        Value::String(c) => c.clone(),
        _ => ex.and_then(|e| e.get("cls")).and_then(Value::as_str).unwrap_or("").to_string(),
    };
    out.push(Element {
        r#ref: r,
        parent,
        depth,
        tag: node.tag.clone(),
        text: node.text.clone(),
        value,
        checked,
        options,
        id: node.id.clone(),
        classes,
        left: node.left,
        top: node.top,
        width: node.width,
        height: node.height,
        focused: node.focused,
        bg_color: node.bg_color.clone(),
        fg_color: node.fg_color.clone(),
    });
    for c in &node.children {
        flatten(c, Some(r), depth + 1, extra, out);
    }
}
