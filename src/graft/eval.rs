//! `graft eval`: exact-match accuracy of a hybrid on held-out screenshot QA (the JSONL of
//! `graft train`), with Qwen3's thinking off and on, plus generation samples.
//!
//! The expected answer is the response without its think block; the model's answer is its output
//! (up to the stop token) without any think block, both trimmed. With thinking on, an output
//! whose think block never closes has no answer and counts as wrong; `max_new_tokens` bounds it.
use super::train::{read_samples, strip_think};
use super::Hybrid;
use crate::models::generate::GenerateConfig;
use crate::models::hooks::HookSpec;
use anyhow::{Context, Result};
use serde::Serialize;
use std::path::PathBuf;

#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub data: PathBuf,
    /// `Some(false)`: thinking off; `Some(true)`: on; `None`: the template's default.
    pub modes: Vec<Option<bool>>,
    pub max_new_tokens: usize,
    /// Generations kept per mode in the report.
    pub samples: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalSample {
    pub image: PathBuf,
    pub prompt: String,
    pub expected: String,
    pub output: String,
    pub answer: String,
    pub correct: bool,
    /// The output opened a think block.
    pub thought: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalRow {
    pub enable_thinking: Option<bool>,
    pub n: usize,
    pub correct: usize,
    pub accuracy: f64,
    /// Outputs that contain `<think>`.
    pub thinking_outputs: usize,
    pub mean_output_tokens: f64,
    pub samples: Vec<EvalSample>,
}

pub fn evaluate(h: &Hybrid, o: &EvalOptions) -> Result<Vec<EvalRow>> {
    let data = read_samples(&o.data)?;
    let cfg = GenerateConfig { max_new_tokens: o.max_new_tokens, stop_ids: h.stop_ids(), ..Default::default() };
    let mut rows = Vec::new();
    for &mode in &o.modes {
        let (mut correct, mut thinking, mut tokens) = (0, 0, 0);
        let mut samples = Vec::new();
        for s in &data {
            let img = image::open(&s.image).with_context(|| format!("reading image {}", s.image.display()))?.to_rgb8();
            let input = h.user_prompt(Some(&img), &s.prompt, mode)?;
            let g = h.generate(&input, &cfg, &HookSpec::none())?;
            // Keep the think markers (added tokens, not special) for the answer extraction.
            let output = h.tokenizer.decode(&g.tokens, false)?;
            let expected = strip_think(&s.response).trim().to_string();
            let answer = strip_think(&output).trim().to_string();
            let ok = answer == expected;
            correct += ok as usize;
            thinking += output.contains("<think>") as usize;
            tokens += g.tokens.len();
            if samples.len() < o.samples {
                samples.push(EvalSample {
                    image: s.image.clone(),
                    prompt: s.prompt.clone(),
                    expected,
                    output: output.clone(),
                    answer,
                    correct: ok,
                    thought: output.contains("<think>"),
                });
            }
        }
        let n = data.len();
        tracing::info!(enable_thinking = ?mode, n, correct, "graft eval");
        rows.push(EvalRow {
            enable_thinking: mode,
            n,
            correct,
            accuracy: correct as f64 / n as f64,
            thinking_outputs: thinking,
            mean_output_tokens: tokens as f64 / n as f64,
            samples,
        });
    }
    Ok(rows)
}
