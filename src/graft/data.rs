//! `graft data`: screenshot QA pairs from MiniWoB, answers read off the DOM, so training and
//! evaluation need no download. Per (task, seed): one Set-of-Marks screenshot of the task area
//! (every element outlined and labelled `[ref]`, as the VLM agent sees it), saved as PNG, and
//! questions about it:
//!
//! - `instruction`: "What is the task instruction shown above the task area?" → the utterance;
//! - `label`: "What does the element marked [N] say?" → its text, for every element with its own
//!   text (buttons, links, labels, spans);
//! - `locate`: "Which element holds the text "X"? Answer with its mark." → `[N]`, for texts that
//!   occur in exactly one element.
//!
//! Lines are `{image, prompt, response, task, seed, kind}` (the training reader ignores the
//! extra fields); image paths are relative to the JSONL file.
use crate::env::{EnvConfig, Observation, Session};
use anyhow::{Context, Result};
use serde::Serialize;
use std::io::Write;
use std::path::PathBuf;

#[derive(Debug, Clone)]
pub struct DataOptions {
    pub tasks: Vec<String>,
    pub seeds: Vec<u64>,
    /// The JSONL file; images go to `<stem>-images/` beside it.
    pub out: PathBuf,
    /// At most this many `label` and `locate` questions per episode (each).
    pub per_kind: usize,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct QaLine {
    pub image: String,
    pub prompt: String,
    pub response: String,
    pub task: String,
    pub seed: u64,
    pub kind: String,
}

/// The questions of one observation (`image` is the screenshot's path relative to the JSONL).
pub fn questions(obs: &Observation, image: &str, per_kind: usize) -> Vec<QaLine> {
    let line = |prompt: String, response: String, kind: &str| QaLine {
        image: image.to_string(),
        prompt,
        response,
        task: obs.task.clone(),
        seed: obs.seed,
        kind: kind.to_string(),
    };
    let mut out = Vec::new();
    if !obs.utterance.trim().is_empty() {
        out.push(line(
            "What is the task instruction shown above the task area?".into(),
            obs.utterance.trim().to_string(),
            "instruction",
        ));
    }
    // Elements with their own text, visible, with a positive ref (marks are drawn for those).
    let texted: Vec<_> = obs
        .elements
        .iter()
        .filter(|e| e.r#ref > 0 && e.width > 0.0 && e.height > 0.0 && !e.text.trim().is_empty() && e.tag != "BODY")
        .filter(|e| !e.id.starts_with("wrap") && e.id != "query")
        .collect();
    for e in texted.iter().take(per_kind) {
        out.push(line(format!("What does the element marked [{}] say?", e.r#ref), e.text.trim().to_string(), "label"));
    }
    let mut located = 0;
    for e in &texted {
        if located == per_kind {
            break;
        }
        let t = e.text.trim();
        if texted.iter().filter(|o| o.text.trim() == t).count() == 1 && t.len() <= 40 {
            out.push(line(
                format!("Which element holds the text \"{t}\"? Answer with its mark."),
                format!("[{}]", e.r#ref),
                "locate",
            ));
            located += 1;
        }
    }
    out
}

/// Runs the episodes and writes the JSONL; returns the number of lines.
pub async fn collect(o: &DataOptions) -> Result<usize> {
    let stem = o.out.file_stem().and_then(|s| s.to_str()).unwrap_or("qa").to_string();
    let base = o.out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new(".")).to_path_buf();
    let img_dir = base.join(format!("{stem}-images"));
    std::fs::create_dir_all(&img_dir).with_context(|| format!("creating {}", img_dir.display()))?;
    let mut session = Session::start(EnvConfig::default()).await.context("starting a browser session")?;
    let mut f = std::fs::File::create(&o.out).with_context(|| format!("creating {}", o.out.display()))?;
    let mut n = 0;
    for task in &o.tasks {
        for &seed in &o.seeds {
            let obs = session.reset(task, seed).await.with_context(|| format!("reset {task} seed {seed}"))?;
            let png = session.som_screenshot(&obs).await.with_context(|| format!("screenshot {task} seed {seed}"))?;
            let name = format!("{task}-{seed}.png");
            std::fs::write(img_dir.join(&name), &png)?;
            for q in questions(&obs, &format!("{stem}-images/{name}"), o.per_kind) {
                writeln!(f, "{}", serde_json::to_string(&q)?)?;
                n += 1;
            }
        }
    }
    session.close().await;
    tracing::info!(out = %o.out.display(), lines = n, "graft data");
    Ok(n)
}
