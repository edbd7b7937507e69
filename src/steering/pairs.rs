//! Contrastive prompt pairs from TOML (experiments/prompt_pairs.toml is built in).
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::Path;

pub const BUILTIN: &str = include_str!("../../experiments/prompt_pairs.toml");

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PromptPair {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub positive: Option<String>,
    pub negative: Option<String>,
    /// Composite: the normalised sum of these pairs' vectors.
    pub combine: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PairsFile {
    pair: Vec<PromptPair>,
}

pub fn parse(text: &str, origin: &str) -> Result<Vec<PromptPair>> {
    let f: PairsFile = toml::from_str(text).with_context(|| format!("{origin}: invalid prompt-pair TOML"))?;
    for p in &f.pair {
        match (&p.positive, &p.negative, &p.combine) {
            (Some(_), Some(_), None) => {}
            (None, None, Some(c)) if !c.is_empty() => {
                for m in c {
                    if !f.pair.iter().any(|q| &q.name == m && q.combine.is_none()) {
                        bail!(
                            "{origin}: composite pair `{}` names `{m}`, which is not a plain pair in the file",
                            p.name
                        );
                    }
                }
            }
            _ => bail!("{origin}: pair `{}` needs `positive` and `negative`, or a non-empty `combine` list", p.name),
        }
    }
    let mut names: Vec<&str> = f.pair.iter().map(|p| p.name.as_str()).collect();
    names.sort();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        bail!("{origin}: pair `{}` is defined twice", w[0]);
    }
    Ok(f.pair)
}

/// The built-in pairs, plus those of `extra` (which win on a name clash).
pub fn load(extra: Option<&Path>) -> Result<Vec<PromptPair>> {
    let mut pairs = parse(BUILTIN, "experiments/prompt_pairs.toml")?;
    if let Some(path) = extra {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        for p in parse(&text, &path.display().to_string())? {
            pairs.retain(|q| q.name != p.name);
            pairs.push(p);
        }
    }
    Ok(pairs)
}

pub fn find<'a>(pairs: &'a [PromptPair], name: &str) -> Result<&'a PromptPair> {
    pairs.iter().find(|p| p.name == name).with_context(|| {
        format!(
            "unknown prompt pair `{name}`; known: {}",
            pairs.iter().map(|p| p.name.as_str()).collect::<Vec<_>>().join(", ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_pairs_parse_and_are_plentiful() {
        let pairs = load(None).unwrap();
        let plain = pairs.iter().filter(|p| p.combine.is_none()).count();
        assert!(plain >= 12, "{plain} plain pairs");
        assert!(pairs.iter().any(|p| p.combine.is_some()));
        assert!(find(&pairs, "accuracy").is_ok());
        assert!(find(&pairs, "nope").unwrap_err().to_string().contains("accuracy"));
    }

    #[test]
    fn bad_pairs_are_rejected_with_names() {
        let e = parse("[[pair]]\nname = \"x\"\npositive = \"a\"\n", "f.toml").unwrap_err().to_string();
        assert!(e.contains("`x`") && e.contains("negative"), "{e}");
        let e = parse("[[pair]]\nname = \"c\"\ncombine = [\"missing\"]\n", "f.toml").unwrap_err().to_string();
        assert!(e.contains("missing"), "{e}");
    }
}
