//! The DOM as text for text models: one element per line, HTML-like, deterministic.
//!
//! ```text
//! <div ref=3 id="query">Click on the "Ok" button.</div>
//! <input_text ref=5 id="tt" value="abc" focused>
//! <input_checkbox ref=6 checked=false>
//! <select ref=7 value="Betty" options="Alice|Betty|Carol">
//! <t ref=-1>some text</t>
//! ```
//!
//! Lines follow document order. `<body>` is left out, as are bare wrappers (no id, no text, no
//! value and not a leaf: they carry no information). Leaf boxes without text (colour swatches,
//! shapes) keep their background colour (`bg=`). Texts are cut at [`MAX_TEXT`] characters;
//! past `max_elements` lines one final line says how many were left out.
use super::observation::Element;

/// Longest text or value kept per element (characters).
pub const MAX_TEXT: usize = 120;
/// Default element budget.
pub const DEFAULT_MAX_ELEMENTS: usize = 120;

fn escape(s: &str, out: &mut String) {
    for (n, c) in s.chars().enumerate() {
        if n == MAX_TEXT {
            out.push('…');
            return;
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
}

fn is_transparent(c: &str) -> bool {
    c.is_empty() || c == "transparent" || c == "rgba(0, 0, 0, 0)"
}

/// Whether an element gets a line.
pub fn is_informative(e: &Element, has_children: bool) -> bool {
    if e.tag == "BODY" {
        return false;
    }
    let interactive = e.tag.starts_with("INPUT")
        || matches!(e.tag.as_str(), "BUTTON" | "A" | "SELECT" | "TEXTAREA" | "LABEL" | "OPTION");
    interactive || !e.text.is_empty() || !e.id.is_empty() || e.value.is_some() || e.checked.is_some() || !has_children
}

/// Renders elements (as returned in an [`super::Observation`]) to text.
pub fn dom_to_text(elements: &[Element], max_elements: usize) -> String {
    let parents: std::collections::HashSet<i64> = elements.iter().filter_map(|e| e.parent).collect();
    let mut out = String::new();
    let mut shown = 0usize;
    let mut omitted = 0usize;
    for e in elements {
        if !is_informative(e, parents.contains(&e.r#ref)) {
            continue;
        }
        if shown == max_elements {
            omitted += 1;
            continue;
        }
        shown += 1;
        let tag = e.tag.to_ascii_lowercase();
        out.push('<');
        out.push_str(&tag);
        out.push_str(&format!(" ref={}", e.r#ref));
        if !e.id.is_empty() {
            out.push_str(" id=\"");
            escape(&e.id, &mut out);
            out.push('"');
        }
        let classes = e.classes.split_whitespace().collect::<Vec<_>>().join(" ");
        if !classes.is_empty() {
            out.push_str(" class=\"");
            escape(&classes, &mut out);
            out.push('"');
        }
        if let Some(v) = &e.value {
            out.push_str(" value=\"");
            escape(v, &mut out);
            out.push('"');
        }
        if let Some(c) = e.checked {
            out.push_str(if c { " checked=true" } else { " checked=false" });
        }
        if !e.options.is_empty() {
            out.push_str(" options=\"");
            escape(&e.options.join("|"), &mut out);
            out.push('"');
        }
        if e.text.is_empty() && !parents.contains(&e.r#ref) && !is_transparent(&e.bg_color) && e.value.is_none() {
            out.push_str(" bg=\"");
            escape(&e.bg_color, &mut out);
            out.push('"');
        }
        if e.focused {
            out.push_str(" focused");
        }
        out.push('>');
        if !e.text.is_empty() {
            escape(&e.text, &mut out);
            out.push_str("</");
            out.push_str(&tag);
            out.push('>');
        }
        out.push('\n');
    }
    if omitted > 0 {
        out.push_str(&format!("<!-- {omitted} more elements left out -->\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn el(r: i64, parent: Option<i64>, tag: &str, text: &str) -> Element {
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
    fn renders_and_limits() {
        let mut els =
            vec![el(1, None, "BODY", ""), el(2, Some(1), "DIV", ""), el(3, Some(2), "BUTTON", "Say \"<hi>\"")];
        els[1].id = "wrap".into();
        let mut inp = el(4, Some(2), "INPUT_text", "");
        inp.value = Some("a&b".into());
        inp.focused = true;
        els.push(inp);
        let mut sel = el(5, Some(2), "SELECT", "");
        sel.options = vec!["A".into(), "B".into()];
        sel.value = Some("A".into());
        els.push(sel);
        let mut sw = el(6, Some(2), "DIV", "");
        sw.bg_color = "rgb(0, 255, 255)".into();
        els.push(sw);
        let t = dom_to_text(&els, 100);
        assert_eq!(
            t,
            "<div ref=2 id=\"wrap\">\n<button ref=3>Say &quot;&lt;hi&gt;&quot;</button>\n<input_text ref=4 value=\"a&amp;b\" focused>\n<select ref=5 value=\"A\" options=\"A|B\">\n<div ref=6 bg=\"rgb(0, 255, 255)\">\n"
        );
        assert_eq!(t, dom_to_text(&els, 100));
        let short = dom_to_text(&els, 2);
        assert_eq!(short.lines().count(), 3);
        assert!(short.ends_with("<!-- 3 more elements left out -->\n"));
    }
}
