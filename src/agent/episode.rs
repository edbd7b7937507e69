//! The episode loop, one for every model: reset with the episode seed, observe (the DOM, and the
//! Set-of-Marks screenshot for a VLM), build the turn, generate, parse, act, reward.
//!
//! Everything between the observation and the reward follows the prompt builder's protocol
//! (docs/protocols.md): the turn's text, the parser, the success rule.
//!
//! Paired: the rows of every condition of one (task, seed) (baseline α = 0 and the steered
//! coefficients) are generated from the same first observation in one batch. Each condition then
//! replays on a fresh reset of the same seed and acts on its own output; multi-step tasks go on
//! (observe, generate one row, act) until the page says done or `max_steps` model turns.
use super::generator::{Generator, Row, RowOutput};
use super::parse::parse_with;
use super::prompt::PromptBuilder;
use super::turn::{AgentModel, Turn, View};
use crate::env::{Action, Observation, Session};
use crate::interp::readout::LensProbe;
use crate::protocol::SuccessRule;
use anyhow::Result;
use image::RgbImage;
use std::time::Instant;

pub use miniwob_steer_schema::Condition;

/// One trajectory to run: its condition and steering coefficient.
#[derive(Debug, Clone, PartialEq)]
pub struct Arm {
    pub condition: Condition,
    pub coeff: f32,
}

/// The outcome of one episode (one arm).
#[derive(Debug, Clone)]
pub struct EpisodeOutcome {
    pub condition: Condition,
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
    /// `run --gate`: the gate's decision at every step of a steered arm (empty otherwise).
    pub gate: Vec<crate::probe::gate::GateDecision>,
}

/// Everything an episode needs besides the session.
pub struct Agent<'a, E: AgentModel> {
    pub generator: &'a Generator<E>,
    pub model: &'a E,
    pub prompts: &'a PromptBuilder,
    pub max_steps: usize,
    /// The in-loop lens read-out (VLMs; the generator must capture at its layer).
    pub lens: Option<&'a LensProbe>,
}

/// An observation with what the model sees of it.
struct Seen<I> {
    obs: Observation,
    screenshot: Option<RgbImage>,
    turn: Turn<I>,
}

impl<E: AgentModel> Agent<'_, E> {
    /// Observes the page as the model sees it after `history`.
    async fn see(
        &self,
        sess: &mut Session,
        obs: Observation,
        history: &[String],
        step: usize,
    ) -> Result<Seen<E::Input>> {
        let screenshot = if E::SCREENSHOT { Some(sess.som_image(&obs).await?) } else { None };
        let view = View { obs: &obs, screenshot: screenshot.as_ref(), history, step };
        let turn = self.model.turn(self.prompts, &view, None)?;
        Ok(Seen { obs, screenshot, turn })
    }

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
        let seen0 = self.see(sess, obs0, &[], 1).await?;
        let rows = arms.iter().map(|a| Row { input: seen0.turn.input.clone(), coeff: a.coeff }).collect();
        let first = self.generator.generate(rows).await?;
        let shared_s = t_pair.elapsed().as_secs_f64();
        // Device pixels per CSS pixel of the screenshot (the lens maps element boxes with it).
        let px = {
            let sc = sess.device_scale() as f32;
            sc * crate::env::som::enlargement(sc) as f32
        };
        let mut out = Vec::with_capacity(arms.len());
        // What the same-seed check compares: the page as text (cheap: no tokenizing, no screenshot).
        let page0 = self.prompts.page_text(&seen0.obs)?;
        let protocol = &self.prompts.protocol;
        for (arm, gen) in arms.iter().zip(first) {
            let t0 = Instant::now();
            // Every arm acts on a fresh reset of the same seed, which must show the same page.
            let obs = sess.reset(task, seed).await?;
            if self.prompts.page_text(&obs)? != page0 {
                tracing::warn!(task, seed, "the page differed on a second reset with the same seed");
            }
            // The turn the model answered: the shared first one, then each later observation.
            let mut later: Option<Seen<E::Input>> = None;
            let mut ep = EpisodeOutcome {
                condition: arm.condition,
                coeff: arm.coeff,
                prompt_hash: seen0.turn.hash.clone(),
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
                gate: Vec::new(),
            };
            let mut gen: RowOutput = gen;
            loop {
                ep.steps += 1;
                ep.tokens_in += gen.tokens_in;
                ep.tokens_out += gen.tokens_out;
                if !ep.output.is_empty() {
                    ep.output.push_str("\n---\n");
                }
                ep.output.push_str(&gen.text);
                ep.gate.extend(gen.gate);
                let parsed = parse_with(&gen.text, protocol.parse_options());
                let seen = later.as_ref().unwrap_or(&seen0);
                if let Some(probe) = self.lens {
                    let grid = E::image_grid(&seen.turn.input);
                    let size = seen.screenshot.as_ref().map(|i| (i.width() as usize, i.height() as usize));
                    ep.lens.push(probe.readout(
                        ep.steps,
                        gen.image_states.as_ref(),
                        grid.zip(size),
                        &seen.obs,
                        &parsed.actions,
                        px,
                    )?);
                }
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
                let next = self.see(sess, obs, &ep.actions, ep.steps + 1).await?;
                let row = Row { input: next.turn.input.clone(), coeff: arm.coeff };
                later = Some(next);
                gen = self.generator.generate(vec![row]).await?.remove(0);
            }
            ep.success = match protocol.file.env.success {
                SuccessRule::Raw => ep.raw_reward > 0.0,
                SuccessRule::Reward => ep.reward > 0.0,
            };
            ep.wall_s = shared_s + t0.elapsed().as_secs_f64();
            out.push(ep);
        }
        Ok(out)
    }
}
