//! Prompt construction, in one place for evaluation and for the CAA vector (DESIGN.md §4, §5).
//!
//! Text mode: one user turn holding the agent instruction, the action grammar, the task utterance
//! (and its key/value fields when the page gives them), the DOM serialization of
//! [`crate::env::dom::dom_to_text`], the actions already taken (multi-step episodes) and a closing
//! request. It goes through the model's chat template with the generation prompt. No system turn:
//! some chat templates (Gemma) reject one, and the user turn carries everything.
//!
//! Screenshot mode (a VLM): the same turn with the Set-of-Marks screenshot before the text, the
//! screenshot's instruction in place of the text one and no element list.
//!
//! CAA training prompts are the same user turn followed by `"\n\n" + instruction` (the positive or
//! the negative one of a prompt pair), exactly the shape of [`crate::steering::caa::pair_prompts`].
use crate::env::{dom, Observation};
use crate::models::tokenizer::{ChatMessage, Tokenizer};
use anyhow::Result;

/// The instruction and grammar that open every prompt.
pub const INSTRUCTION: &str = "You are a web agent. Complete the task on the web page below by answering with actions.

Actions (one per line, nothing else):
click ref=N
type ref=N text=\"TEXT\"
select ref=N option=\"TEXT\"
N is the ref number of an element in the list below.";

/// The instruction of the screenshot observation (the text one, with the screenshot in place of
/// the element list).
pub const VLM_INSTRUCTION: &str =
    "You are a web agent. Complete the task on the web page in the screenshot by answering with actions.
Every element of the page is outlined and labelled [N], where N is its ref number.

Actions (one per line, nothing else):
click ref=N
type ref=N text=\"TEXT\"
select ref=N option=\"TEXT\"";

/// The closing request.
pub const ANSWER: &str = "Answer with the action line(s) only.";

/// Builds prompts from observations.
#[derive(Debug, Clone)]
pub struct PromptBuilder {
    /// Element budget of the DOM text.
    pub max_elements: usize,
}

impl Default for PromptBuilder {
    fn default() -> Self {
        PromptBuilder { max_elements: dom::DEFAULT_MAX_ELEMENTS }
    }
}

impl PromptBuilder {
    /// The user-turn text for an observation and the actions taken so far in the episode: with
    /// the element list (a text model), or for the screenshot beside it (`screenshot`: a VLM).
    /// `suffix` (a CAA instruction) is appended after a blank line.
    pub fn user_text(&self, obs: &Observation, history: &[String], screenshot: bool, suffix: Option<&str>) -> String {
        let mut s = String::with_capacity(2048);
        s.push_str(if screenshot { VLM_INSTRUCTION } else { INSTRUCTION });
        s.push_str("\n\nTask: ");
        s.push_str(obs.utterance.trim());
        s.push('\n');
        if !obs.fields.is_empty() {
            s.push_str("Fields:\n");
            for (k, v) in &obs.fields {
                s.push_str(&format!("{k}: {v}\n"));
            }
        }
        if !screenshot {
            s.push_str("\nPage elements:\n");
            s.push_str(&dom::dom_to_text(&obs.elements, self.max_elements));
        }
        if !history.is_empty() {
            s.push_str("\nActions already taken:\n");
            for a in history {
                s.push_str(a);
                s.push('\n');
            }
        }
        s.push('\n');
        s.push_str(ANSWER);
        if let Some(sfx) = suffix {
            s.push_str("\n\n");
            s.push_str(sfx);
        }
        s
    }

    /// The chat messages of one text-model turn.
    pub fn messages(&self, obs: &Observation, history: &[String], suffix: Option<&str>) -> Vec<ChatMessage> {
        vec![ChatMessage::new("user", &self.user_text(obs, history, false, suffix))]
    }

    /// The rendered prompt (chat template with the generation prompt).
    pub fn render(
        &self,
        tok: &Tokenizer,
        obs: &Observation,
        history: &[String],
        suffix: Option<&str>,
    ) -> Result<String> {
        tok.apply_chat_template(&self.messages(obs, history, suffix), true)
    }
}

pub use miniwob_steer_schema::hash16;
