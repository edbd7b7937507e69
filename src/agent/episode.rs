//! The episode loop: reset with the episode seed, observe, prompt, generate, parse, act, reward.
//!
//! Paired: the rows of every condition of one (task, seed) (baseline α = 0 and the steered
//! coefficients) are generated from the same first observation in one batch. Each condition then
//! replays on a fresh reset of the same seed and acts on its own output; multi-step tasks go on
//! (observe, generate one row, act) until the page says done or `max_steps` model turns.
use super::generator::{Generator, Row};
use super::parse::parse_output;
use super::prompt::{hash16, PromptBuilder};
use crate::env::{Action, Session};
use crate::models::tokenizer::Tokenizer;
use anyhow::Result;
use std::time::Instant;

/// One trajectory to run: its condition name and steering coefficient.
#[derive(Debug, Clone, PartialEq)]
pub struct Arm {
    /// `baseline` or `steered`.
    pub condition: &'static str,
    pub coeff: f32,
}

/// The outcome of one episode (one arm).
#[derive(Debug, Clone)]
pub struct EpisodeOutcome {
    pub condition: &'static str,
    pub coeff: f32,
    pub prompt_hash: String,
    /// Raw model output of every step joined with `\n---\n`.
    pub output: String,
    pub actions: Vec<String>,
    pub parse_failure: bool,
    /// First parse error, for logs.
    pub parse_error: Option<String>,
    pub raw_reward: f64,
    pub reward: f64,
    pub success: bool,
    pub steps: usize,
    pub wall_s: f64,
    pub tokens_in: usize,
    pub tokens_out: usize,
    /// `run --vlm --lens`: one read-out per step (empty otherwise).
    pub lens: Vec<serde_json::Value>,
}

/// Everything an episode needs besides the session.
pub struct Agent<'a> {
    pub generator: &'a Generator,
    pub tokenizer: &'a Tokenizer,
    pub prompts: &'a PromptBuilder,
    pub max_steps: usize,
}

impl Agent<'_> {
    /// Runs every arm of one (task, seed) on `sess`. An `Err` wrapping
    /// [`crate::env::EnvError`] with `is_retryable()` means the browser died: run the pair again.
    pub async fn run_pair(
        &self,
        sess: &mut Session,
        task: &str,
        seed: u64,
        arms: &[Arm],
    ) -> Result<Vec<EpisodeOutcome>> {
        let t_pair = Instant::now();
        let obs0 = sess.reset(task, seed).await?;
        let prompt0 = self.prompts.render(self.tokenizer, &obs0, &[], None)?;
        let rows = arms.iter().map(|a| Row { prompt: prompt0.clone(), coeff: a.coeff }).collect();
        let first = self.generator.generate(rows).await?;
        let shared_s = t_pair.elapsed().as_secs_f64();
        let mut out = Vec::with_capacity(arms.len());
        for (arm, gen) in arms.iter().zip(first) {
            let t0 = Instant::now();
            let obs = sess.reset(task, seed).await?;
            let again = self.prompts.render(self.tokenizer, &obs, &[], None)?;
            if again != prompt0 {
                tracing::warn!(task, seed, "the page differed on a second reset with the same seed");
            }
            let mut ep = EpisodeOutcome {
                condition: arm.condition,
                coeff: arm.coeff,
                prompt_hash: hash16(&prompt0),
                output: String::new(),
                actions: Vec::new(),
                parse_failure: false,
                parse_error: None,
                raw_reward: 0.0,
                reward: 0.0,
                success: false,
                steps: 0,
                wall_s: 0.0,
                tokens_in: 0,
                tokens_out: 0,
                lens: Vec::new(),
            };
            let mut gen = gen;
            loop {
                ep.steps += 1;
                ep.tokens_in += gen.tokens_in;
                ep.tokens_out += gen.tokens_out;
                if !ep.output.is_empty() {
                    ep.output.push_str("\n---\n");
                }
                ep.output.push_str(&gen.text);
                let parsed = parse_output(&gen.text);
                let mut done = false;
                if let Some(why) = parsed.failure {
                    ep.parse_failure = true;
                    ep.parse_error.get_or_insert(why);
                    // Read the page's reward without acting.
                    let r = sess.act(&Action::NoOp).await?;
                    (ep.raw_reward, ep.reward, done) = (r.raw_reward, r.reward, r.done);
                } else {
                    for a in &parsed.actions {
                        let r = sess.act(a).await?;
                        ep.actions.push(a.to_string());
                        (ep.raw_reward, ep.reward, done) = (r.raw_reward, r.reward, r.done);
                        if let Some(e) = &r.error {
                            tracing::debug!(task, seed, action = %a, "action failed: {e}");
                        }
                        if done {
                            break;
                        }
                    }
                }
                if done || ep.steps >= self.max_steps {
                    break;
                }
                let obs = sess.observe().await?;
                let prompt = self.prompts.render(self.tokenizer, &obs, &ep.actions, None)?;
                gen = self.generator.generate(vec![Row { prompt, coeff: arm.coeff }]).await?.remove(0);
            }
            ep.success = ep.raw_reward > 0.0;
            ep.wall_s = shared_s + t0.elapsed().as_secs_f64();
            out.push(ep);
        }
        Ok(out)
    }
}
