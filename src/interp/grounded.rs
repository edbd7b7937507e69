//! The judge-free grounded score: a MiniWoB screenshot comes with its DOM, so each element's box
//! and text are known. A vision token whose pixel box overlaps an element's text counts as
//! grounded (per lens, per layer) when one of its top-k neighbours is a word of that text,
//! case-folded and sub-word aware ([`matches`]). The rate is grounded / overlapping tokens.
use super::lens::Neighbour;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::Path;

/// An element's text and its box in image pixels (x0, y0, x1, y1).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TextBox {
    pub text: String,
    #[serde(rename = "box")]
    pub bbox: [f32; 4],
}

/// Lower-cased alphanumeric runs of at least two characters (single letters match too much).
pub fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric()).filter(|w| w.chars().count() >= 2).map(|w| w.to_lowercase()).collect()
}

/// A neighbour's token string, case-folded, without spaces, byte-level markers or punctuation.
pub fn normalize_token(s: &str) -> String {
    // Ġ / ▁ are the byte-level and sentencepiece space markers (raw vocabulary strings).
    s.chars().filter(|&c| c.is_alphanumeric() && c != 'Ġ' && c != '▁').flat_map(|c| c.to_lowercase()).collect()
}

/// Sub-word aware match of a normalised token against a word: equal, or a piece of the word of
/// at least 3 characters (`butt` in `button`), or the word plus an ending (`buttons`).
pub fn matches(token: &str, word: &str) -> bool {
    if token.is_empty() {
        return false;
    }
    token == word
        || (token.chars().count() >= 3 && word.contains(token))
        || (word.chars().count() >= 3 && token.starts_with(word))
}

fn overlaps(a: &[f32; 4], b: &[f32; 4]) -> bool {
    a[0].max(b[0]) < a[2].min(b[2]) && a[1].max(b[1]) < a[3].min(b[3])
}

/// The words of every text box the token box overlaps (empty: the token is not scored).
pub fn words_under(tbox: &[f32; 4], texts: &[TextBox]) -> Vec<String> {
    texts.iter().filter(|t| overlaps(tbox, &t.bbox)).flat_map(|t| words(&t.text)).collect()
}

pub fn is_grounded<'a>(neighbours: impl IntoIterator<Item = &'a str>, words: &[String]) -> bool {
    neighbours.into_iter().map(normalize_token).any(|t| words.iter().any(|w| matches(&t, w)))
}

/// Counts per (lens, hook point).
#[derive(Debug, Default, Clone)]
pub struct Tally {
    /// (lens, hook point) → (grounded, scored tokens).
    pub counts: BTreeMap<(String, String), (u64, u64)>,
    /// Hook points in first-seen order (the plot's x axis).
    pub points: Vec<String>,
}

impl Tally {
    pub fn add(&mut self, lens: &str, point: &str, grounded: bool) {
        if !self.points.iter().any(|p| p == point) {
            self.points.push(point.to_string());
        }
        let e = self.counts.entry((lens.to_string(), point.to_string())).or_default();
        e.0 += grounded as u64;
        e.1 += 1;
    }

    pub fn lenses(&self) -> Vec<String> {
        let mut v: Vec<String> = self.counts.keys().map(|(l, _)| l.clone()).collect();
        v.dedup();
        v
    }

    pub fn rate(&self, lens: &str, point: &str) -> Option<f64> {
        self.counts.get(&(lens.to_string(), point.to_string())).filter(|c| c.1 > 0).map(|&(g, n)| g as f64 / n as f64)
    }

    /// Markdown: one row per hook point, one column per lens, `rate (grounded/n)`.
    pub fn markdown(&self) -> String {
        let lenses = self.lenses();
        let mut s = format!("| hook point | {} |\n|---|{}\n", lenses.join(" | "), "---|".repeat(lenses.len()));
        for p in &self.points {
            s.push_str(&format!("| {p} |"));
            for l in &lenses {
                match self.counts.get(&(l.clone(), p.clone())) {
                    Some(&(g, n)) if n > 0 => s.push_str(&format!(" {:.1}% ({g}/{n}) |", 100.0 * g as f64 / n as f64)),
                    _ => s.push_str(" – |"),
                }
            }
            s.push('\n');
        }
        s
    }

    pub fn csv(&self) -> String {
        let mut s = String::from("lens,hook_point,grounded,tokens,rate\n");
        for ((l, p), &(g, n)) in &self.counts {
            s.push_str(&format!("{l},{p},{g},{n},{}\n", if n > 0 { g as f64 / n as f64 } else { f64::NAN }));
        }
        s
    }
}

/// The grounded tally of a `lens query` output over the extracted items' text boxes.
pub fn tally_lens_results(extracted: &Path, lens_results: &Path, k: usize) -> Result<Tally> {
    let mut texts: std::collections::HashMap<String, Vec<TextBox>> = Default::default();
    for f in super::extract::item_files(extracted)? {
        let item = super::extract::read_item(&f)?;
        let tb = item.meta.get("text_boxes").cloned().with_context(|| {
            format!("{}: no `text_boxes` in the metadata (extract with --task to get the DOM)", f.display())
        })?;
        texts.insert(
            item.name,
            serde_json::from_value(tb).with_context(|| format!("{}: bad `text_boxes`", f.display()))?,
        );
    }
    let f = std::fs::File::open(lens_results).with_context(|| format!("reading {}", lens_results.display()))?;
    let mut tally = Tally::default();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let v: Value = serde_json::from_str(&line?)
            .with_context(|| format!("{}:{}: invalid JSON", lens_results.display(), i + 1))?;
        let field = |k: &str| v.get(k).with_context(|| format!("{}:{}: no field `{k}`", lens_results.display(), i + 1));
        let item = field("item")?.as_str().unwrap_or_default();
        let Some(tb) = texts.get(item) else {
            bail!("{}:{}: item {item} is not in {}", lens_results.display(), i + 1, extracted.display())
        };
        let b: [f32; 4] = serde_json::from_value(field("box")?.clone()).with_context(|| {
            format!("{}:{}: `box` is not four numbers (not image positions?)", lens_results.display(), i + 1)
        })?;
        let words = words_under(&b, tb);
        if words.is_empty() {
            continue;
        }
        let nb: Vec<Neighbour> = serde_json::from_value(field("neighbours")?.clone())?;
        let ok = is_grounded(nb.iter().take(k).map(|n| n.token.as_str()), &words);
        tally.add(field("lens")?.as_str().unwrap_or_default(), field("hook_point")?.as_str().unwrap_or_default(), ok);
    }
    Ok(tally)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_matching() {
        assert_eq!(words("Click on the \"OK\" button!"), ["click", "on", "the", "ok", "button"]);
        let w = words("Submit buttons");
        assert!(is_grounded([" Sub", "mit"], &w), "`mit` is a 3-letter piece of submit");
        assert!(is_grounded(["ĠBUTTON"], &w));
        assert!(is_grounded([" submitted"], &w), "the word plus an ending");
        assert!(!is_grounded(["su", "x", "", "!!"], &w), "2-letter pieces and punctuation do not count");
        assert!(!is_grounded(["cancel"], &w));
    }

    #[test]
    fn overlap_and_tally() {
        let t = vec![TextBox { text: "Yes".into(), bbox: [10.0, 10.0, 30.0, 20.0] }];
        assert_eq!(words_under(&[0.0, 0.0, 11.0, 11.0], &t), ["yes"]);
        assert!(words_under(&[0.0, 0.0, 10.0, 10.0], &t).is_empty(), "touching edges do not overlap");
        let mut tally = Tally::default();
        tally.add("logit", "blocks.0.hook_resid_post", true);
        tally.add("logit", "blocks.0.hook_resid_post", false);
        tally.add("embedding", "blocks.0.hook_resid_post", false);
        assert_eq!(tally.rate("logit", "blocks.0.hook_resid_post"), Some(0.5));
        assert!(
            tally.markdown().contains("| blocks.0.hook_resid_post | 0.0% (0/1) | 50.0% (1/2) |"),
            "{}",
            tally.markdown()
        );
    }
}
