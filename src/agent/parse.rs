//! Parsing a model's output into actions (DESIGN.md §5), under a protocol's `parse` section.
//!
//! The agent grammar is a strict subset of the environment's ([`crate::env::Action`]): one action per
//! line, each `click ref=N`, `type ref=N text="..."` or `select ref=N option="..."`; keywords are
//! case-insensitive; with `parse.escapes` strings take `\"`, `\\`, `\n`, `\t` escapes (else a
//! string ends at the next `"`). Always tolerated: leading and trailing whitespace on every line,
//! blank lines, and Markdown code fences (a line that is only three or more backticks, optionally
//! followed by a language tag). Then by `parse.mode`:
//! - `strict`: anything else, including an empty output or an environment action outside the
//!   agent grammar (`click x=.. y=..`, `press`, `none`), makes the whole output a parse failure:
//!   no action runs, the raw text is kept.
//! - `lenient`: lines that are not agent actions are skipped; the output fails only when no line
//!   parses. Past [`MAX_ACTIONS`] actions the rest is ignored.
//! - `first-line`: only the first line that is not blank or a fence is read; it must be an action.
//!
//! Parsing never panics (see the proptest in tests/agent_parse.rs).
use crate::env::Action;
use crate::protocol::ParseMode;

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

/// How outputs are parsed (a protocol's `parse` section).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParseOptions {
    pub mode: ParseMode,
    pub escapes: bool,
}

impl Default for ParseOptions {
    fn default() -> Self {
        ParseOptions { mode: ParseMode::Strict, escapes: true }
    }
}

/// Parses a whole model output with the default (strict) rules.
pub fn parse_output(text: &str) -> Parsed {
    parse_with(text, ParseOptions::default())
}

/// Parses a whole model output (see the module docs).
pub fn parse_with(text: &str, opts: ParseOptions) -> Parsed {
    let fail = |why: String| Parsed { actions: Vec::new(), failure: Some(why) };
    let mut actions = Vec::new();
    let mut first_error: Option<String> = None;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.is_empty() || is_fence(t) {
            continue;
        }
        let why = match Action::parse_with(t, opts.escapes) {
            Ok(a) if in_agent_grammar(&a) => {
                if actions.len() == MAX_ACTIONS {
                    if opts.mode == ParseMode::Lenient {
                        break;
                    }
                    return fail(format!("more than {MAX_ACTIONS} action lines"));
                }
                actions.push(a);
                None
            }
            Ok(a) => Some(format!("line {}: `{a}` is not an agent action (click, type, select with ref=N)", i + 1)),
            Err(e) => {
                let preview: String = t.chars().take(60).collect();
                Some(format!("line {}: {e}: {preview:?}", i + 1))
            }
        };
        match (opts.mode, why) {
            (ParseMode::Strict, Some(w)) => return fail(w),
            (ParseMode::FirstLine, Some(w)) => return fail(w),
            (ParseMode::FirstLine, None) => break,
            (ParseMode::Lenient, Some(w)) => {
                first_error.get_or_insert(w);
            }
            (_, None) => {}
        }
    }
    if actions.is_empty() {
        return fail(first_error.map_or_else(|| "no action in the output".into(), |w| format!("no action line ({w})")));
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

    #[test]
    fn modes_and_escapes() {
        let opts = |mode, escapes| ParseOptions { mode, escapes };
        let text = "Sure, here it is:\nclick ref=4\nThis clicks OK.\ntype ref=5 text=\"a\\\"b\"";
        assert!(!parse_output(text).ok());
        let p = parse_with(text, opts(ParseMode::Lenient, true));
        assert_eq!(p.actions, vec![Action::ClickRef(4), Action::TypeRef { r#ref: 5, text: "a\"b".into() }]);
        // Without escapes the string ends at the backslash's quote: the line does not parse.
        let p = parse_with(text, opts(ParseMode::Lenient, false));
        assert_eq!(p.actions, vec![Action::ClickRef(4)]);
        let p = parse_with("type ref=2 text=\"C:\\dir\\n\"", opts(ParseMode::Strict, false));
        assert_eq!(p.actions, vec![Action::TypeRef { r#ref: 2, text: "C:\\dir\\n".into() }]);
        assert!(!parse_with("type ref=2 text=\"C:\\dir\"", opts(ParseMode::Strict, true)).ok());
        let p = parse_with("```\nclick ref=1\nclick ref=2\nnonsense", opts(ParseMode::FirstLine, true));
        assert_eq!(p.actions, vec![Action::ClickRef(1)]);
        assert!(!parse_with("Sure!\nclick ref=1", opts(ParseMode::FirstLine, true)).ok());
        let e = parse_with("nothing here\npress key=\"Enter\"", opts(ParseMode::Lenient, true));
        assert!(!e.ok() && e.failure.unwrap().contains("no action line"));
        let many: String = (1..=10).map(|i| format!("click ref={i}\n")).collect();
        assert_eq!(parse_with(&many, opts(ParseMode::Lenient, true)).actions.len(), MAX_ACTIONS);
        assert!(!parse_with(&many, opts(ParseMode::Strict, true)).ok());
    }
}
