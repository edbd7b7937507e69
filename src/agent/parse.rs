//! Parsing a model's output into actions (DESIGN.md §5).
//!
//! The agent grammar is a strict subset of the environment's ([`crate::env::Action`]): one action per
//! line, each `click ref=N`, `type ref=N text="..."` or `select ref=N option="..."`; keywords are
//! case-insensitive, strings take `\"`, `\\`, `\n`, `\t` escapes. Tolerated around the actions:
//! leading and trailing whitespace on every line, blank lines, and Markdown code fences (a line
//! that is only three or more backticks, optionally followed by a language tag). Anything else,
//! including an empty output or an environment action outside the agent grammar (`click x=.. y=..`,
//! `press`, `none`), makes the whole output a parse failure: no action runs, the raw text is kept.
//! Parsing never panics (see the proptest in tests/agent_parse.rs).
use crate::env::Action;

/// At most this many action lines are accepted from one model turn.
pub const MAX_ACTIONS: usize = 8;

/// The outcome of parsing one model output.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    pub actions: Vec<Action>,
    /// Why the output is not a valid answer; `None` when every line parsed.
    pub failure: Option<String>,
}

impl Parsed {
    pub fn ok(&self) -> bool {
        self.failure.is_none()
    }
}

fn is_fence(line: &str) -> bool {
    let t = line.trim();
    let ticks = t.chars().take_while(|&c| c == '`').count();
    if ticks < 3 {
        return false;
    }
    // A language tag after the fence: letters, digits, `-`, `_`, `+` only.
    t[ticks..].chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '+'))
}

/// True for the three action kinds of the agent grammar.
pub fn in_agent_grammar(a: &Action) -> bool {
    matches!(a, Action::ClickRef(_) | Action::TypeRef { .. } | Action::SelectRef { .. })
}

/// Parses a whole model output (see the module docs).
pub fn parse_output(text: &str) -> Parsed {
    let fail = |why: String| Parsed { actions: Vec::new(), failure: Some(why) };
    let mut actions = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.is_empty() || is_fence(t) {
            continue;
        }
        match t.parse::<Action>() {
            Ok(a) if in_agent_grammar(&a) => {
                if actions.len() == MAX_ACTIONS {
                    return fail(format!("more than {MAX_ACTIONS} action lines"));
                }
                actions.push(a);
            }
            Ok(a) => {
                return fail(format!("line {}: `{a}` is not an agent action (click, type, select with ref=N)", i + 1))
            }
            Err(e) => {
                let preview: String = t.chars().take(60).collect();
                return fail(format!("line {}: {e}: {preview:?}", i + 1));
            }
        }
    }
    if actions.is_empty() {
        return fail("no action in the output".into());
    }
    Parsed { actions, failure: None }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fences_and_whitespace() {
        let p = parse_output("```\nclick ref=4\n```");
        assert_eq!(p.actions, vec![Action::ClickRef(4)]);
        let p = parse_output("  ```text\n\n   CLICK REF=4  \n```  \n");
        assert_eq!(p.actions, vec![Action::ClickRef(4)]);
        assert!(is_fence("````") && is_fence("```python") && !is_fence("``") && !is_fence("``` x"));
    }

    #[test]
    fn strict_otherwise() {
        assert!(!parse_output("").ok());
        assert!(!parse_output("```\n```").ok());
        assert!(!parse_output("Sure! click ref=4").ok());
        assert!(!parse_output("click ref=4\nThis clicks the button.").ok());
        assert!(!parse_output("press key=\"Enter\"").ok());
        assert!(!parse_output("none").ok());
        assert!(!parse_output("click x=3 y=4").ok());
    }
}
