//! Prompt construction, in one place for evaluation and for the CAA vector (DESIGN.md §4, §5).
//!
//! Text mode: one user turn holding the agent instruction, the action grammar, the task utterance
//! (and its key/value fields when the page gives them), the DOM serialization of
//! [`crate::env::dom::dom_to_text`], the actions already taken (multi-step episodes) and a closing
//! request. It goes through the model's chat template with the generation prompt. No system turn:
//! some chat templates (Gemma) reject one, and the user turn carries everything.
//!
//! CAA training prompts are the same user turn followed by `"\n\n" + instruction` (the positive or
//! the negative one of a prompt pair), exactly the shape of [`crate::steering::caa::pair_prompts`].
use crate::env::{dom, Observation};
use crate::models::tokenizer::{ChatMessage, Tokenizer};
use crate::steering::pairs::PromptPair;
use anyhow::{bail, Result};
use sha2::{Digest, Sha256};

/// The instruction and grammar that open every prompt.
pub const INSTRUCTION: &str = "You are a web agent. Complete the task on the web page below by answering with actions.

Actions (one per line, nothing else):
click ref=N
type ref=N text=\"TEXT\"
select ref=N option=\"TEXT\"
N is the ref number of an element in the list below.";

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
    /// The user-turn text for an observation and the actions taken so far in the episode.
    pub fn user_text(&self, obs: &Observation, history: &[String]) -> String {
        let mut s = String::with_capacity(2048);
        s.push_str(INSTRUCTION);
        s.push_str("\n\nTask: ");
        s.push_str(obs.utterance.trim());
        s.push('\n');
        if !obs.fields.is_empty() {
            s.push_str("Fields:\n");
            for (k, v) in &obs.fields {
                s.push_str(&format!("{k}: {v}\n"));
            }
        }
        s.push_str("\nPage elements:\n");
        s.push_str(&dom::dom_to_text(&obs.elements, self.max_elements));
        if !history.is_empty() {
            s.push_str("\nActions already taken:\n");
            for a in history {
                s.push_str(a);
                s.push('\n');
            }
        }
        s.push('\n');
        s.push_str(ANSWER);
        s
    }

    /// The chat messages of one model turn; `suffix` (a CAA instruction) is appended to the user
    /// text after a blank line.
    pub fn messages(&self, obs: &Observation, history: &[String], suffix: Option<&str>) -> Vec<ChatMessage> {
        let mut content = self.user_text(obs, history);
        if let Some(sfx) = suffix {
            content.push_str("\n\n");
            content.push_str(sfx);
        }
        vec![ChatMessage::new("user", &content)]
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

    /// Tokenized (positive, negative) CAA prompts for training observations.
    pub fn caa_pairs(
        &self,
        tok: &Tokenizer,
        observations: &[Observation],
        pair: &PromptPair,
    ) -> Result<Vec<(Vec<u32>, Vec<u32>)>> {
        let (pos, neg) = match (&pair.positive, &pair.negative) {
            (Some(p), Some(n)) => (p.as_str(), n.as_str()),
            _ => bail!("pair `{}` is a composite; compute its members and combine them", pair.name),
        };
        observations
            .iter()
            .map(|o| {
                let p = tok.encode(&self.render(tok, o, &[], Some(pos))?, false)?;
                let n = tok.encode(&self.render(tok, o, &[], Some(neg))?, false)?;
                Ok((p, n))
            })
            .collect()
    }
}

/// sha256 prefix (16 hex) of a string: prompt hashes in result lines.
pub fn hash16(s: &str) -> String {
    hex::encode(&Sha256::digest(s.as_bytes())[..8])
}
