//! Prompt construction, in one place for evaluation, the CAA vector and probe data (DESIGN.md §4,
//! §5), driven by the run's [`Protocol`] (docs/protocols.md): its templates give the user text of
//! a turn (the DOM as element lines for a text model, the screenshot's text for a VLM), its
//! `prompt.chat` how that text reaches the model, its `caa.join` how a CAA instruction follows it.
//!
//! Template variables. `prompt.template` / `prompt.vlm_template`: `utterance` (trimmed), `fields`
//! (list of `{key, value}`), `dom` (the element lines joined by `dom.join`; text only), `history`
//! (actions taken so far), `step` (the model turn, from 1). `dom.element` and `dom.keep`: every
//! field of the observation element (`ref`, `parent`, `depth`, `tag` as the page gives it, `text`,
//! `value`, `checked`, `options`, `id`, `classes`, `left`, `top`, `width`, `height`, `focused`,
//! `bg_color`, `fg_color`) and `has_children`. Filters beside minijinja's: `esc(s, n)` (HTML-escape
//! `& < > "`, newlines and tabs to spaces, cut at `n` characters with `…`) and `squash` (runs of
//! whitespace to one space, trimmed).
use crate::env::{Element, Observation};
use crate::models::tokenizer::{template_env, ChatMessage, Tokenizer};
use crate::protocol::{ChatMode, Protocol};
use anyhow::{bail, Context, Result};
use minijinja::Value;
use serde::Serialize;
use std::sync::Arc;

pub use miniwob_steer_schema::hash16;

/// Builds prompts from observations under one protocol.
pub struct PromptBuilder {
    pub protocol: Arc<Protocol>,
    env: minijinja::Environment<'static>,
}

impl std::fmt::Debug for PromptBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PromptBuilder({})", self.protocol.id())
    }
}

impl Default for PromptBuilder {
    fn default() -> Self {
        PromptBuilder::new(Protocol::default_protocol()).expect("the default protocol's templates compile")
    }
}

fn esc(s: String, max: Option<usize>) -> String {
    let mut out = String::with_capacity(s.len());
    for (n, c) in s.chars().enumerate() {
        if Some(n) == max {
            out.push('…');
            break;
        }
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\n' | '\r' | '\t' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

fn squash(s: String) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// What a DOM template sees of one element.
#[derive(Serialize)]
struct ElementVars<'a> {
    #[serde(rename = "ref")]
    r#ref: i64,
    parent: Option<i64>,
    depth: u32,
    tag: &'a str,
    text: &'a str,
    value: Option<&'a str>,
    checked: Option<bool>,
    options: &'a [String],
    id: &'a str,
    classes: &'a str,
    left: f64,
    top: f64,
    width: f64,
    height: f64,
    focused: bool,
    bg_color: &'a str,
    fg_color: &'a str,
    has_children: bool,
}

impl<'a> ElementVars<'a> {
    fn of(e: &'a Element, has_children: bool) -> Self {
        ElementVars {
            r#ref: e.r#ref,
            parent: e.parent,
            depth: e.depth,
            tag: &e.tag,
            text: &e.text,
            value: e.value.as_deref(),
            checked: e.checked,
            options: &e.options,
            id: &e.id,
            classes: &e.classes,
            left: e.left,
            top: e.top,
            width: e.width,
            height: e.height,
            focused: e.focused,
            bg_color: &e.bg_color,
            fg_color: &e.fg_color,
            has_children,
        }
    }
}

#[derive(Serialize)]
struct Field<'a> {
    key: &'a str,
    value: &'a str,
}

impl PromptBuilder {
    /// Compiles the protocol's templates (an error names the key).
    pub fn new(protocol: Arc<Protocol>) -> Result<PromptBuilder> {
        let mut env = template_env();
        env.add_filter("esc", esc);
        env.add_filter("squash", squash);
        let p = &protocol.file;
        let keep = format!("{{% if {} %}}1{{% endif %}}", p.dom.keep);
        for (name, src) in [
            ("prompt.template", p.prompt.template.clone()),
            ("prompt.vlm_template", p.prompt.vlm_template.clone()),
            ("dom.element", p.dom.element.clone()),
            ("dom.keep", keep),
            ("dom.omitted", p.dom.omitted.clone()),
        ] {
            env.add_template_owned(name, src).map_err(|e| anyhow::anyhow!("`{name}`: {e:#}"))?;
        }
        Ok(PromptBuilder { protocol, env })
    }

    fn render(&self, name: &str, ctx: impl Serialize) -> Result<String> {
        let t = self.env.get_template(name).expect("compiled in new()");
        t.render(ctx).with_context(|| format!("{}: rendering `{name}`", self.protocol.origin))
    }

    /// The DOM as the protocol's element lines: elements that `dom.keep` accepts, in document
    /// order, at most `dom.max_elements` (then the `dom.omitted` line), joined by `dom.join`.
    pub fn dom_text(&self, elements: &[Element]) -> Result<String> {
        let d = &self.protocol.file.dom;
        let parents: std::collections::HashSet<i64> = elements.iter().filter_map(|e| e.parent).collect();
        let mut lines = Vec::new();
        let mut omitted = 0usize;
        for e in elements {
            let vars = ElementVars::of(e, parents.contains(&e.r#ref));
            let ctx = Value::from_serialize(&vars);
            if self.render("dom.keep", &ctx)?.is_empty() {
                continue;
            }
            if lines.len() == d.max_elements {
                omitted += 1;
                continue;
            }
            lines.push(self.render("dom.element", &ctx)?);
        }
        if omitted > 0 && !d.omitted.is_empty() {
            lines.push(self.render("dom.omitted", minijinja::context! { n => omitted })?);
        }
        Ok(lines.join(&d.join))
    }

    /// The user text of a turn: the observation after `history` (model turn `history`-many
    /// actions in; `step` counts turns from 1), with the element list (a text model) or for the
    /// screenshot (`screenshot`: a VLM); `suffix` (a CAA instruction) follows after `caa.join`.
    pub fn user_text(
        &self,
        obs: &Observation,
        history: &[String],
        step: usize,
        screenshot: bool,
        suffix: Option<&str>,
    ) -> Result<String> {
        let fields: Vec<Field> = obs.fields.iter().map(|(k, v)| Field { key: k, value: v }).collect();
        let dom = if screenshot { None } else { Some(self.dom_text(&obs.elements)?) };
        let ctx = minijinja::context! {
            utterance => obs.utterance.trim(),
            fields => fields,
            dom => dom,
            history => history,
            step => step,
        };
        let mut s = self.render(if screenshot { "prompt.vlm_template" } else { "prompt.template" }, ctx)?;
        if let Some(sfx) = suffix {
            s.push_str(&self.protocol.file.caa.join);
            s.push_str(sfx);
        }
        Ok(s)
    }

    /// The page as text, for the same-seed replay check (no history, no suffix).
    pub fn page_text(&self, obs: &Observation) -> Result<String> {
        self.user_text(obs, &[], 1, false, None)
    }

    /// The chat messages of a text-model turn (`prompt.chat` = `user` or `system+user`).
    pub fn messages(&self, user_text: &str) -> Vec<ChatMessage> {
        let p = &self.protocol.file.prompt;
        let mut m = Vec::with_capacity(2);
        if let (ChatMode::SystemUser, Some(sys)) = (p.chat, &p.system) {
            m.push(ChatMessage::new("system", sys));
        }
        m.push(ChatMessage::new("user", user_text));
        m
    }

    /// The text a text model reads for `user_text`: through the chat template with the
    /// generation prompt, or as it is (`prompt.chat = "none"`).
    pub fn model_text(&self, tok: &Tokenizer, user_text: &str) -> Result<String> {
        let p = &self.protocol.file.prompt;
        if p.chat == ChatMode::None {
            return Ok(user_text.to_string());
        }
        tok.apply_chat_template(&self.messages(user_text), true).map_err(|e| {
            if p.chat == ChatMode::SystemUser {
                anyhow::anyhow!(
                    "{}: prompt.chat = \"system+user\", but this model's chat template refused a system turn ({e:#}); \
                     use chat = \"user\"",
                    self.protocol.origin
                )
            } else {
                e
            }
        })
    }

    /// Token ids of a model text (`prompt.add_special_tokens`).
    pub fn encode(&self, tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
        tok.encode(text, self.protocol.file.prompt.add_special_tokens)
    }

    /// The system turn of a VLM prompt; `prompt.chat = "none"` has no meaning there (the image
    /// placeholders come from the chat template).
    pub fn vlm_system(&self) -> Result<Option<&str>> {
        let p = &self.protocol.file.prompt;
        match p.chat {
            ChatMode::None => bail!(
                "{}: prompt.chat = \"none\" cannot place a screenshot (a VLM's image tokens come from its chat template)",
                self.protocol.origin
            ),
            ChatMode::User => Ok(None),
            ChatMode::SystemUser => Ok(p.system.as_deref()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn el(r: i64, parent: Option<i64>, tag: &str, text: &str) -> Element {
        Element {
            r#ref: r,
            parent,
            depth: 0,
            tag: tag.into(),
            text: text.into(),
            value: None,
            checked: None,
            options: vec![],
            id: String::new(),
            classes: String::new(),
            left: 0.0,
            top: 0.0,
            width: 10.0,
            height: 10.0,
            focused: false,
            bg_color: "rgba(0, 0, 0, 0)".into(),
            fg_color: "rgb(0, 0, 0)".into(),
        }
    }

    #[test]
    fn default_dom_lines_and_budget() {
        let mut els =
            vec![el(1, None, "BODY", ""), el(2, Some(1), "DIV", ""), el(3, Some(2), "BUTTON", "Say \"<hi>\"")];
        els[1].id = "wrap".into();
        let mut inp = el(4, Some(2), "INPUT_text", "");
        inp.value = Some("a&b".into());
        inp.focused = true;
        inp.classes = "  a \n b ".into();
        els.push(inp);
        let mut sel = el(5, Some(2), "SELECT", "");
        sel.options = vec!["A".into(), "B".into()];
        sel.value = Some("A".into());
        els.push(sel);
        let mut sw = el(6, Some(2), "DIV", "");
        sw.bg_color = "rgb(0, 255, 255)".into();
        els.push(sw);
        let mut cb = el(7, Some(2), "INPUT_checkbox", "");
        cb.checked = Some(false);
        els.push(cb);
        els.push(el(8, Some(2), "SPAN", &"x".repeat(130)));
        let b = PromptBuilder::default();
        let t = b.dom_text(&els).unwrap();
        assert_eq!(
            t,
            format!(
                "<div ref=2 id=\"wrap\">\n<button ref=3>Say &quot;&lt;hi&gt;&quot;</button>\n\
                 <input_text ref=4 class=\"a b\" value=\"a&amp;b\" focused>\n<select ref=5 value=\"A\" options=\"A|B\">\n\
                 <div ref=6 bg=\"rgb(0, 255, 255)\">\n<input_checkbox ref=7 checked=false>\n<span ref=8>{}…</span>",
                "x".repeat(120)
            )
        );
        let mut p = (*Protocol::default_protocol()).clone();
        p.file.dom.max_elements = 2;
        let short = PromptBuilder::new(Arc::new(p)).unwrap().dom_text(&els).unwrap();
        assert_eq!(short.lines().count(), 3);
        assert!(short.ends_with("\n<!-- 5 more elements left out -->"), "{short}");
    }

    #[test]
    fn templates_see_every_variable() {
        let mut p = (*Protocol::default_protocol()).clone();
        p.file.prompt.template =
            "{{ step }}|{{ utterance }}|{% for f in fields %}{{ f.key }}={{ f.value }};{% endfor %}|{{ history|join(',') }}|{{ dom }}".into();
        p.file.dom.element = "{{ ref }}:{{ tag }}:{{ left }}:{{ focused }}:{{ has_children }}".into();
        p.file.dom.keep = "tag != 'BODY'".into();
        p.file.dom.join = " ; ".into();
        p.file.caa.join = " // ".into();
        let b = PromptBuilder::new(Arc::new(p)).unwrap();
        let obs = Observation {
            task: "t".into(),
            seed: 0,
            utterance: "  Do it ".into(),
            fields: vec![("a".into(), "1".into())],
            elements: vec![el(1, None, "BODY", ""), el(2, Some(1), "INPUT_text", ""), el(3, Some(2), "B", "x")],
            episode_time_ms: 0.0,
            done: false,
        };
        let t = b.user_text(&obs, &["click ref=2".into()], 2, false, Some("Be exact.")).unwrap();
        // Booleans print as Jinja (Python) does.
        assert_eq!(t, "2|Do it|a=1;|click ref=2|2:INPUT_text:0.0:False:True ; 3:B:0.0:False:False // Be exact.");
    }
}
