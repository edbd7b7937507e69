//! The action grammar shared by the environment, the agent and the CLI (DESIGN.md §5).
//!
//! One action per string; keywords are case-insensitive, tokens are separated by spaces or tabs,
//! nothing else may follow the last token:
//!
//! ```text
//! click ref=N                      click element N (core.elementClick; a text node: its centre)
//! click x=X y=Y                    click at CSS pixel (X, Y) of the page (W3C pointer actions)
//! type ref=N text="..."            click element N, then type the text into the focused element
//! type text="..."                  type into whatever element has the focus
//! select ref=N option="..."        choose the option of <select> N whose text (or value) matches
//! press key="Enter"                press a key or a chord: "Tab", "Control+a", "Shift+ArrowLeft", "x"
//! none                             do nothing
//! ```
//!
//! `N` is a decimal integer (negative refs are the text nodes of `core.getDOMInfo`). Strings are
//! double-quoted; inside them `\"`, `\\`, `\n` and `\t` are the only escapes, any other backslash
//! sequence is an error. Parsing never panics; [`Action`]'s `Display` writes the canonical form,
//! which parses back to the same action.
use std::fmt;
use std::str::FromStr;

/// One action on the page.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// `click ref=N`
    ClickRef(i64),
    /// `click x=X y=Y` (CSS pixels, viewport coordinates; the task area is at the origin)
    ClickAt { x: f64, y: f64 },
    /// `type ref=N text="..."`: focus element N by clicking it, then type.
    TypeRef { r#ref: i64, text: String },
    /// `type text="..."`: type into the focused element.
    TypeFocused { text: String },
    /// `select ref=N option="..."`
    SelectRef { r#ref: i64, option: String },
    /// `press key="..."`
    PressKey { key: String },
    /// `none`
    NoOp,
}

/// Why a string is not an action.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid action: {0}")]
pub struct ActionParseError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, ActionParseError> {
    Err(ActionParseError(msg.into()))
}

/// Keys accepted by `press key="..."`, with their WebDriver code points.
pub const NAMED_KEYS: &[(&str, char)] = &[
    ("Enter", '\u{E007}'),
    ("Return", '\u{E006}'),
    ("Tab", '\u{E004}'),
    ("Backspace", '\u{E003}'),
    ("Delete", '\u{E017}'),
    ("Escape", '\u{E00C}'),
    ("Space", ' '),
    ("ArrowLeft", '\u{E012}'),
    ("ArrowUp", '\u{E013}'),
    ("ArrowRight", '\u{E014}'),
    ("ArrowDown", '\u{E015}'),
    ("Home", '\u{E011}'),
    ("End", '\u{E010}'),
    ("PageUp", '\u{E00E}'),
    ("PageDown", '\u{E00F}'),
    ("Insert", '\u{E016}'),
];

/// Modifier names accepted before `+` in a chord.
pub const MODIFIER_KEYS: &[(&str, char)] =
    &[("Control", '\u{E009}'), ("Ctrl", '\u{E009}'), ("Shift", '\u{E008}'), ("Alt", '\u{E00A}'), ("Meta", '\u{E03D}')];

/// A parsed key chord: modifiers to hold, then the key to press.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyChord {
    pub modifiers: Vec<char>,
    pub key: char,
}

/// Parses `Enter`, `a`, `Control+a`, `Shift+Tab`, `+` (the plus key itself). Names are
/// case-insensitive; a single character is taken literally.
pub fn parse_key_chord(s: &str) -> Result<KeyChord, ActionParseError> {
    if s.is_empty() {
        return err("empty key");
    }
    let mut parts: Vec<&str> = Vec::new();
    // Split on '+' but let a trailing "+" (as in "Control++" or "+") be the key itself.
    let mut rest = s;
    while let Some(i) = rest.find('+') {
        if i == 0 {
            break;
        }
        parts.push(&rest[..i]);
        rest = &rest[i + 1..];
    }
    if rest.is_empty() {
        return err(format!("key chord {s:?} ends with '+' and no key"));
    }
    let mut modifiers = Vec::new();
    for m in &parts {
        match MODIFIER_KEYS.iter().find(|(n, _)| n.eq_ignore_ascii_case(m)) {
            Some((_, c)) => modifiers.push(*c),
            None => return err(format!("unknown modifier {m:?} (known: Control, Shift, Alt, Meta)")),
        }
    }
    let mut chars = rest.chars();
    let key = match (chars.next(), chars.next()) {
        (Some(c), None) => c,
        _ => match NAMED_KEYS.iter().find(|(n, _)| n.eq_ignore_ascii_case(rest)) {
            Some((_, c)) => *c,
            None => return err(format!("unknown key {rest:?} (a single character or one of Enter, Tab, Backspace, Delete, Escape, Space, Arrow*, Home, End, PageUp, PageDown)")),
        },
    };
    Ok(KeyChord { modifiers, key })
}

struct Lexer<'a> {
    s: &'a str,
    pos: usize,
    /// Backslash escapes in strings (else a string ends at the next `"`, backslashes literal).
    escapes: bool,
}

impl<'a> Lexer<'a> {
    fn skip_ws(&mut self) -> bool {
        let start = self.pos;
        while let Some(c) = self.s[self.pos..].chars().next() {
            if c == ' ' || c == '\t' {
                self.pos += 1;
            } else {
                break;
            }
        }
        self.pos > start
    }
    fn at_end(&self) -> bool {
        self.pos >= self.s.len()
    }
    fn word(&mut self) -> &'a str {
        let start = self.pos;
        while let Some(c) = self.s[self.pos..].chars().next() {
            if c.is_ascii_alphabetic() {
                self.pos += 1;
            } else {
                break;
            }
        }
        &self.s[start..self.pos]
    }
    /// Expects whitespace then `name=` (name case-insensitive).
    fn key(&mut self, name: &str) -> Result<(), ActionParseError> {
        if !self.skip_ws() {
            return err(format!("expected a space before {name}="));
        }
        let w = self.word();
        if !w.eq_ignore_ascii_case(name) {
            return err(format!("expected {name}=, found {:?}", self.rest_preview(w)));
        }
        if !self.s[self.pos..].starts_with('=') {
            return err(format!("expected '=' after {name}"));
        }
        self.pos += 1;
        Ok(())
    }
    fn rest_preview(&self, w: &str) -> String {
        let tail: String = self.s[self.pos..].chars().take(12).collect();
        format!("{w}{tail}")
    }
    fn number_token(&mut self) -> &'a str {
        let start = self.pos;
        while let Some(c) = self.s[self.pos..].chars().next() {
            if c.is_ascii_digit() || c == '-' || c == '.' || c == '+' {
                self.pos += 1;
            } else {
                break;
            }
        }
        &self.s[start..self.pos]
    }
    fn int(&mut self) -> Result<i64, ActionParseError> {
        let t = self.number_token();
        let digits = t.strip_prefix('-').unwrap_or(t);
        if digits.is_empty() || digits.len() > 9 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return err(format!("expected an integer ref, found {t:?}"));
        }
        t.parse::<i64>().or_else(|_| err(format!("bad integer {t:?}")))
    }
    fn float(&mut self) -> Result<f64, ActionParseError> {
        let t = self.number_token();
        let body = t.strip_prefix('-').unwrap_or(t);
        let mut it = body.splitn(2, '.');
        let int_part = it.next().unwrap_or("");
        let frac = it.next();
        let ok = !int_part.is_empty()
            && int_part.len() <= 6
            && int_part.bytes().all(|b| b.is_ascii_digit())
            && frac.is_none_or(|f| !f.is_empty() && f.len() <= 6 && f.bytes().all(|b| b.is_ascii_digit()));
        if !ok {
            return err(format!("expected a number, found {t:?}"));
        }
        t.parse::<f64>().or_else(|_| err(format!("bad number {t:?}")))
    }
    fn string(&mut self) -> Result<String, ActionParseError> {
        if !self.s[self.pos..].starts_with('"') {
            return err("expected a double-quoted string");
        }
        self.pos += 1;
        let mut out = String::new();
        let mut chars = self.s[self.pos..].char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    self.pos += i + 1;
                    return Ok(out);
                }
                '\\' if self.escapes => match chars.next() {
                    Some((_, '"')) => out.push('"'),
                    Some((_, '\\')) => out.push('\\'),
                    Some((_, 'n')) => out.push('\n'),
                    Some((_, 't')) => out.push('\t'),
                    Some((_, o)) => return err(format!("unknown escape \\{o} in string (use \\\" \\\\ \\n \\t)")),
                    None => return err("unterminated string"),
                },
                c => out.push(c),
            }
        }
        err("unterminated string (missing closing \")")
    }
}

impl FromStr for Action {
    type Err = ActionParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Action::parse_with(s, true)
    }
}

impl Action {
    /// Parses one action; `escapes = false` reads strings without backslash escapes (a string
    /// ends at the next `"`; a protocol's `parse.escapes`).
    pub fn parse_with(s: &str, escapes: bool) -> Result<Action, ActionParseError> {
        let s = s.trim();
        let mut lx = Lexer { s, pos: 0, escapes };
        let verb = lx.word().to_ascii_lowercase();
        let action = match verb.as_str() {
            "none" => Action::NoOp,
            "click" => {
                let save = lx.pos;
                lx.skip_ws();
                let w = lx.word().to_ascii_lowercase();
                lx.pos = save;
                match w.as_str() {
                    "ref" => {
                        lx.key("ref")?;
                        Action::ClickRef(lx.int()?)
                    }
                    "x" => {
                        lx.key("x")?;
                        let x = lx.float()?;
                        lx.key("y")?;
                        let y = lx.float()?;
                        Action::ClickAt { x, y }
                    }
                    _ => return err("click needs ref=N or x=X y=Y"),
                }
            }
            "type" => {
                let save = lx.pos;
                lx.skip_ws();
                let w = lx.word().to_ascii_lowercase();
                lx.pos = save;
                match w.as_str() {
                    "ref" => {
                        lx.key("ref")?;
                        let r = lx.int()?;
                        lx.key("text")?;
                        Action::TypeRef { r#ref: r, text: lx.string()? }
                    }
                    "text" => {
                        lx.key("text")?;
                        Action::TypeFocused { text: lx.string()? }
                    }
                    _ => return err("type needs ref=N text=\"...\" or text=\"...\""),
                }
            }
            "select" => {
                lx.key("ref")?;
                let r = lx.int()?;
                lx.key("option")?;
                Action::SelectRef { r#ref: r, option: lx.string()? }
            }
            "press" => {
                lx.key("key")?;
                let key = lx.string()?;
                parse_key_chord(&key)?;
                Action::PressKey { key }
            }
            "" => return err("empty action"),
            v => return err(format!("unknown action {v:?} (click, type, select, press, none)")),
        };
        lx.skip_ws();
        if !lx.at_end() {
            let tail: String = lx.s[lx.pos..].chars().take(20).collect();
            return err(format!("unexpected text after the action: {tail:?}"));
        }
        Ok(action)
    }
}

/// Writes `s` as a double-quoted grammar string (escaping `"`, `\`, newline and tab).
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::ClickRef(r) => write!(f, "click ref={r}"),
            Action::ClickAt { x, y } => write!(f, "click x={x} y={y}"),
            Action::TypeRef { r#ref, text } => write!(f, "type ref={} text={}", r#ref, quote(text)),
            Action::TypeFocused { text } => write!(f, "type text={}", quote(text)),
            Action::SelectRef { r#ref, option } => write!(f, "select ref={} option={}", r#ref, quote(option)),
            Action::PressKey { key } => write!(f, "press key={}", quote(key)),
            Action::NoOp => write!(f, "none"),
        }
    }
}

impl serde::Serialize for Action {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> serde::Deserialize<'de> for Action {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Action, ActionParseError> {
        s.parse()
    }

    #[test]
    fn parses_the_design_grammar() {
        assert_eq!(p("click ref=4").unwrap(), Action::ClickRef(4));
        assert_eq!(p("  CLICK   ref=12 \t").unwrap(), Action::ClickRef(12));
        assert_eq!(p("click ref=-3").unwrap(), Action::ClickRef(-3));
        assert_eq!(
            p(r#"type ref=5 text="hello world""#).unwrap(),
            Action::TypeRef { r#ref: 5, text: "hello world".into() }
        );
        assert_eq!(
            p(r#"select ref=7 option="Betty""#).unwrap(),
            Action::SelectRef { r#ref: 7, option: "Betty".into() }
        );
        assert_eq!(p("click x=10 y=20.5").unwrap(), Action::ClickAt { x: 10.0, y: 20.5 });
        assert_eq!(p(r#"type text="é ü 中""#).unwrap(), Action::TypeFocused { text: "é ü 中".into() });
        assert_eq!(p(r#"press key="Enter""#).unwrap(), Action::PressKey { key: "Enter".into() });
        assert_eq!(p(r#"press key="Control+a""#).unwrap(), Action::PressKey { key: "Control+a".into() });
        assert_eq!(p("none").unwrap(), Action::NoOp);
    }

    #[test]
    fn escapes() {
        let a = p(r#"type ref=1 text="a \"q\" b\\c\nd""#).unwrap();
        assert_eq!(a, Action::TypeRef { r#ref: 1, text: "a \"q\" b\\c\nd".into() });
        assert!(p(r#"type ref=1 text="bad \x escape""#).is_err());
        assert!(p(r#"type ref=1 text="unterminated"#).is_err());
        assert!(p(r#"type ref=1 text="trailing \"#).is_err());
    }

    #[test]
    fn rejects_everything_else() {
        for s in [
            "",
            "click",
            "click ref=",
            "click ref=abc",
            "click ref=4 extra",
            "click ref=4;",
            "click ref=1234567890123",
            "clickref=4",
            "click ref =4",
            "type ref=4",
            "type ref=4 text=unquoted",
            "select ref=4",
            "select ref=4 option=\"a\" x",
            "press key=\"NoSuchKey\"",
            "press key=\"\"",
            "press key=\"Hyper+a\"",
            "click x=1",
            "click x=NaN y=1",
            "click x=inf y=2",
            "click x=1e9 y=2",
            "drag ref=1",
            "none please",
            "\u{0}",
        ] {
            assert!(p(s).is_err(), "{s:?} should not parse");
        }
    }

    #[test]
    fn display_round_trips() {
        let cases = vec![
            Action::ClickRef(3),
            Action::ClickRef(-2),
            Action::ClickAt { x: 12.5, y: 0.0 },
            Action::TypeRef { r#ref: 9, text: "q\"uote\\ back </script>\nnew\tline ünïcode 🙂".into() },
            Action::TypeFocused { text: String::new() },
            Action::SelectRef { r#ref: 2, option: "A \"B\"".into() },
            Action::PressKey { key: "Shift+Tab".into() },
            Action::NoOp,
        ];
        for a in cases {
            let s = a.to_string();
            assert_eq!(p(&s).unwrap(), a, "{s}");
        }
    }

    #[test]
    fn key_chords() {
        assert_eq!(parse_key_chord("Enter").unwrap(), KeyChord { modifiers: vec![], key: '\u{E007}' });
        assert_eq!(parse_key_chord("ctrl+a").unwrap(), KeyChord { modifiers: vec!['\u{E009}'], key: 'a' });
        assert_eq!(parse_key_chord("+").unwrap().key, '+');
        assert_eq!(parse_key_chord("Control++").unwrap(), KeyChord { modifiers: vec!['\u{E009}'], key: '+' });
        assert!(parse_key_chord("Control+").is_err());
    }

    #[test]
    fn never_panics_on_odd_bytes() {
        let pieces = [
            "click", "type", "select", "press", " ", "ref=", "x=", "y=", "text=", "\"", "\\", "-", "9", ".", "é", "🙂",
            "=", "key=", "option=", "\t",
        ];
        // Deterministic pseudo-random concatenations.
        let mut state = 0x2545F4914F6CDD1Du64;
        for _ in 0..20_000 {
            let mut s = String::new();
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let n = (state % 8) as usize;
            let mut st = state;
            for _ in 0..n {
                s.push_str(pieces[(st % pieces.len() as u64) as usize]);
                st /= pieces.len() as u64;
            }
            if let Ok(a) = p(&s) {
                assert_eq!(p(&a.to_string()).unwrap(), a);
            }
        }
    }
}
