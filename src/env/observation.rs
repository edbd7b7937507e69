//! What the agent sees and what an action returns: the flattened DOM elements, the observation,
//! the step result. Plain serde types (no browser), used by the session, the DOM text, the
//! Set-of-Marks drawing and the agent.
use serde::{Deserialize, Serialize};

/// One element of `core.getDOMInfo()`, flattened in document (pre-)order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Element {
    /// Episode-local id the actions use. Elements count up from 1; text fragments of mixed
    /// content (`tag == "t"`) count down from −1 and can only be clicked.
    #[serde(rename = "ref")]
    pub r#ref: i64,
    /// Ref of the enclosing element (None for `<body>`).
    pub parent: Option<i64>,
    pub depth: u32,
    /// Upper-case tag; inputs are `INPUT_<type>` (`INPUT_text`, `INPUT_checkbox`, ...).
    pub tag: String,
    /// Own text when the element holds only text (empty otherwise).
    pub text: String,
    /// Value of text-like inputs and textareas; the selected option's text for `<select>`.
    pub value: Option<String>,
    /// Checked state of checkboxes and radios.
    pub checked: Option<bool>,
    /// Option texts of a `<select>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
    pub id: String,
    pub classes: String,
    /// Bounding box in CSS pixels (viewport coordinates; the task area starts at 0,0).
    pub left: f64,
    pub top: f64,
    pub width: f64,
    pub height: f64,
    pub focused: bool,
    pub bg_color: String,
    pub fg_color: String,
}

impl Element {
    pub fn center(&self) -> (f64, f64) {
        (self.left + self.width / 2.0, self.top + self.height / 2.0)
    }
}

/// What the agent sees.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Observation {
    pub task: String,
    pub seed: u64,
    /// The instruction (`core.getUtterance()`, whitespace-normalised).
    pub utterance: String,
    /// Key/value fields when the page gives them (`getUtterance()` returning an object, as
    /// FlightWoB does); empty otherwise.
    pub fields: Vec<(String, String)>,
    pub elements: Vec<Element>,
    /// Milliseconds since the episode started (page clock).
    pub episode_time_ms: f64,
    /// The episode already ended (the agent acted on the reward).
    pub done: bool,
}

impl Observation {
    pub fn element(&self, r: i64) -> Option<&Element> {
        self.elements.iter().find(|e| e.r#ref == r)
    }
}

/// Outcome of one action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepResult {
    pub action: String,
    /// Task reward without the time penalty (`WOB_RAW_REWARD_GLOBAL`; success = raw > 0).
    pub raw_reward: f64,
    /// Reward scaled by the time left, as the page computes it (`WOB_REWARD_GLOBAL`).
    pub reward: f64,
    pub done: bool,
    /// `WOB_REWARD_REASON` when the page gives one.
    pub reason: Option<String>,
    /// Why the action could not run (unknown ref, element not interactable, episode over).
    pub error: Option<String>,
    /// Milliseconds since the episode started (harness clock).
    pub elapsed_ms: f64,
}

impl StepResult {
    pub fn success(&self) -> bool {
        self.done && self.raw_reward > 0.0
    }
}
