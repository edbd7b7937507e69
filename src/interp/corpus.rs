//! Corpora for the contextual index, one sentence a line: WordNet glosses and examples (Debian's
//! `wordnet-base`, `scripts/setup.sh --wordnet`) and MiniWoB texts (utterances and DOM texts of
//! tasks over many seeds, from the environment).
use anyhow::{bail, Context, Result};
use std::collections::HashSet;
use std::path::Path;

/// Where Debian's wordnet-base puts the database.
pub const WORDNET_DIR: &str = "/usr/share/wordnet";

/// Glosses and examples of one `data.{noun,verb,adj,adv}` file's lines: the text after ` | `,
/// split at `; `, quotes removed. License header lines start with two spaces.
pub fn wordnet_sentences(data: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in data.lines() {
        if line.starts_with("  ") {
            continue;
        }
        let Some((_, gloss)) = line.split_once(" | ") else { continue };
        for part in gloss.split("; ") {
            let s = part.trim().trim_matches('"').trim();
            if s.split_whitespace().count() >= 3 {
                out.push(s.to_string());
            }
        }
    }
    out
}

pub fn wordnet_corpus(dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for pos in ["noun", "verb", "adj", "adv"] {
        let p = dir.join(format!("data.{pos}"));
        let t = std::fs::read_to_string(&p).with_context(|| {
            format!(
                "reading {}: install WordNet with ./scripts/setup.sh --wordnet (Debian's wordnet-base)",
                p.display()
            )
        })?;
        out.extend(wordnet_sentences(&t));
    }
    if out.is_empty() {
        bail!("{}: no glosses found", dir.display());
    }
    Ok(out)
}

/// Utterances and DOM texts (element texts, values, options) of `tasks` over `seeds`,
/// de-duplicated in first-seen order.
pub async fn miniwob_corpus(tasks: &[String], seeds: &[u64], pb: &indicatif::ProgressBar) -> Result<Vec<String>> {
    let mut s = crate::env::Session::start(crate::env::EnvConfig::default()).await?;
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let r = async {
        for t in tasks {
            for &seed in seeds {
                let obs = match s.reset(t, seed).await {
                    Ok(o) => o,
                    Err(e) => {
                        tracing::warn!("{t} seed {seed}: {e}; skipped");
                        continue;
                    }
                };
                let mut texts = vec![obs.utterance.clone()];
                for e in &obs.elements {
                    texts.push(e.text.clone());
                    texts.extend(e.value.clone());
                    texts.extend(e.options.iter().cloned());
                }
                for x in texts {
                    let x = x.split_whitespace().collect::<Vec<_>>().join(" ");
                    if !x.is_empty() && seen.insert(x.clone()) {
                        out.push(x);
                    }
                }
                pb.inc(1);
            }
        }
        anyhow::Ok(())
    }
    .await;
    s.close().await;
    r?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wordnet_glosses_and_examples() {
        let data = "  1 This software and database is being provided\n\
            00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived or known or inferred to have its own distinct existence (living or nonliving)  \n\
            00002137 04 v 01 run 0 | move fast by using one's feet; \"Don't run--you'll be out of breath\"; \"The children ran to the store\"  \n";
        let s = wordnet_sentences(data);
        assert_eq!(
            s,
            [
                "that which is perceived or known or inferred to have its own distinct existence (living or nonliving)",
                "move fast by using one's feet",
                "Don't run--you'll be out of breath",
                "The children ran to the store"
            ]
        );
    }
}
