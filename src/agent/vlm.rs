//! The VLM agent (`run --vlm`, Qwen2-VL): the observation is the Set-of-Marks screenshot of the
//! task area (every element outlined and labelled `[ref]`) plus the utterance, in one user turn
//! (image first, then the text). Steering acts on the LLM backbone only: the vector lives in the
//! decoder's residual stream (`blocks.{L}.hook_resid_post`), never in the vision tower.
//!
//! Same paired protocol as the text agent ([`super::episode`]): the rows of every arm of one
//! (task, seed) generate in one batch from the first observation, then each arm replays on a
//! fresh reset and acts on its own output. Generation runs on a blocking thread, one batch at a
//! time (the model is behind a mutex: on 2 cores two concurrent forwards only slow each other).
use super::episode::{Arm, EpisodeOutcome};
use super::generator::Steering;
use super::parse::parse_output;
use crate::env::{Action, Observation, Session};
use crate::models::generate::GenerateConfig;
use crate::models::hooks::{HookPoint, HookSpec, Positions};
use crate::models::qwen2_vl::{Qwen2Vl, VlmInput};
use crate::steering::caa::steering_spec;
use anyhow::{anyhow, Context, Result};
use sha2::{Digest, Sha256};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The instruction of the VLM prompt (the text agent's, with the screenshot in place of the
/// element list).
pub const VLM_INSTRUCTION: &str =
    "You are a web agent. Complete the task on the web page in the screenshot by answering with actions.
Every element of the page is outlined and labelled [N], where N is its ref number.

Actions (one per line, nothing else):
click ref=N
type ref=N text=\"TEXT\"
select ref=N option=\"TEXT\"";

/// The text part of the user turn.
pub fn vlm_user_text(obs: &Observation, history: &[String], suffix: Option<&str>) -> String {
    let mut s = String::with_capacity(1024);
    s.push_str(VLM_INSTRUCTION);
    s.push_str("\n\nTask: ");
    s.push_str(obs.utterance.trim());
    s.push('\n');
    if !obs.fields.is_empty() {
        s.push_str("Fields:\n");
        for (k, v) in &obs.fields {
            s.push_str(&format!("{k}: {v}\n"));
        }
    }
    if !history.is_empty() {
        s.push_str("\nActions already taken:\n");
        for a in history {
            s.push_str(a);
            s.push('\n');
        }
    }
    s.push('\n');
    s.push_str(super::prompt::ANSWER);
    if let Some(sfx) = suffix {
        s.push_str("\n\n");
        s.push_str(sfx);
    }
    s
}

/// One model turn's input: the Set-of-Marks screenshot and the text, and a hash of both.
pub struct VlmTurn {
    pub input: VlmInput,
    pub hash: String,
    /// Size of the screenshot the model saw (width, height), for the vision tokens' boxes.
    pub size: (usize, usize),
}

/// Builds the model input of an observation (screenshot taken now).
pub async fn observe_turn(
    model: &Qwen2Vl,
    sess: &mut Session,
    obs: &Observation,
    history: &[String],
    suffix: Option<&str>,
) -> Result<VlmTurn> {
    let png = sess.som_screenshot(obs).await?;
    turn_from_png(model, &png, obs, history, suffix)
}

pub fn turn_from_png(
    model: &Qwen2Vl,
    png: &[u8],
    obs: &Observation,
    history: &[String],
    suffix: Option<&str>,
) -> Result<VlmTurn> {
    let img = image::load_from_memory(png).context("decoding the Set-of-Marks screenshot")?.to_rgb8();
    let (img_w, img_h) = (img.width() as usize, img.height() as usize);
    let text = vlm_user_text(obs, history, suffix);
    let input = model.user_prompt(&[img], &text)?;
    let mut h = Sha256::new();
    h.update(text.as_bytes());
    h.update(png);
    let size = (img_w, img_h);
    Ok(VlmTurn { input, hash: hex::encode(&h.finalize()[..8]), size })
}

/// What one generated row produced.
#[derive(Debug, Clone)]
pub struct VlmOutput {
    pub text: String,
    pub tokens_in: usize,
    pub image_tokens: usize,
    pub tokens_out: usize,
    /// With a lens probe: the states at the image positions, `[image tokens, hidden]` (the same
    /// for every row: they precede the `last` position where steering acts).
    pub image_states: Option<candle_core::Tensor>,
}

/// The in-loop lens read-out of `run --vlm --lens IDX --lens-layer L`: per step, the top-k
/// contextual neighbours of the vision tokens under the element the agent acted on.
pub struct LensProbe {
    pub index: Mutex<crate::interp::index::Index>,
    pub layer: usize,
    pub k: usize,
}

impl LensProbe {
    /// The step's read-out: `{step, ref, tokens, top: [[token, cosine, hook point], …]}` (ref
    /// null and no `top` when no action named an element).
    pub fn readout(
        &self,
        step: usize,
        states: Option<&candle_core::Tensor>,
        turn: (&VlmInput, (usize, usize)),
        obs: &Observation,
        actions: &[Action],
        px_per_css: f32,
    ) -> Result<serde_json::Value> {
        let target = actions.iter().find_map(|a| match a {
            Action::ClickRef(r) | Action::TypeRef { r#ref: r, .. } | Action::SelectRef { r#ref: r, .. } => Some(*r),
            _ => None,
        });
        let (Some(r), Some(states)) = (target, states) else {
            return Ok(serde_json::json!({"step": step, "ref": target}));
        };
        let Some(e) = obs.element(r) else {
            return Ok(serde_json::json!({"step": step, "ref": r, "tokens": 0}));
        };
        let (input, (w, h)) = turn;
        let img = input.images.first().context("the turn has no image")?;
        let (_, boxes) = crate::interp::extract::vision_cells(img.grid_thw, 2, 14, w, h);
        let b = [e.left, e.top, e.left + e.width, e.top + e.height].map(|v| v as f32 * px_per_css);
        let mut ix = self.index.lock().unwrap_or_else(|p| p.into_inner());
        let top = crate::interp::index::readout(&mut ix, states, &boxes, b, self.k)?;
        Ok(serde_json::json!({"step": step, "ref": r, "tokens": top.0, "top": top.1}))
    }
}

/// The model, its steering and generation settings, shared by the episode tasks.
#[derive(Clone)]
pub struct VlmEngine {
    pub model: Arc<Qwen2Vl>,
    pub steering: Option<Steering>,
    pub max_new_tokens: usize,
    pub lens: Option<Arc<LensProbe>>,
    lock: Arc<Mutex<()>>,
}

impl VlmEngine {
    pub fn new(model: Arc<Qwen2Vl>, steering: Option<Steering>, max_new_tokens: usize) -> Self {
        Self { model, steering, max_new_tokens, lens: None, lock: Arc::new(Mutex::new(())) }
    }

    /// The hook spec of a batch: the steering vector added at `last` positions of the LLM
    /// layer with one coefficient per row (none when every row is a baseline).
    pub fn spec(&self, coeffs: &[f32]) -> Result<HookSpec> {
        match &self.steering {
            Some(s) if coeffs.iter().any(|&c| c != 0.0) => {
                steering_spec(&s.vector, s.layer, coeffs, s.mode, Positions::Last)
            }
            None if coeffs.iter().any(|&c| c != 0.0) => {
                Err(anyhow!("a steered row was requested but no steering vector is loaded"))
            }
            _ => Ok(HookSpec::none()),
        }
    }

    /// Generates one row per coefficient from the same input, in one batch.
    pub async fn generate(&self, input: &VlmInput, coeffs: Vec<f32>) -> Result<Vec<VlmOutput>> {
        let me = self.clone();
        let input = input.clone();
        tokio::task::spawn_blocking(move || {
            let _guard = me.lock.lock().unwrap_or_else(|p| p.into_inner());
            let spec = me.spec(&coeffs)?;
            let tok = &me.model.tokenizer;
            let cfg = GenerateConfig {
                max_new_tokens: me.max_new_tokens,
                stop_ids: tok.stop_token_ids(),
                pad_id: tok.pad_token_id().unwrap_or(0),
                ..Default::default()
            };
            let rows = vec![input.clone(); coeffs.len()];
            let t0 = Instant::now();
            // Rows differ only from the last prompt token on: one prefill, forked.
            let points: Vec<HookPoint> = me.lens.iter().map(|l| HookPoint::ResidPost(l.layer)).collect();
            let (gens, caps) = me.model.generate_forked_captured(&input, rows.len(), &cfg, &spec, &points)?;
            let image_id = me.model.cfg.image_token_id;
            let image_tokens = input.ids.iter().filter(|&&t| t == image_id).count();
            let image_states = match points.first() {
                Some(&p) => {
                    let cols: Vec<u32> =
                        (0..input.ids.len() - 1).filter(|&c| input.ids[c] == image_id).map(|c| c as u32).collect();
                    let idx = candle_core::Tensor::from_vec(cols.clone(), cols.len(), &candle_core::Device::Cpu)?;
                    let t = caps.get(p)?.squeeze(0)?.to_device(&candle_core::Device::Cpu)?;
                    Some(t.index_select(&idx, 0)?.to_dtype(candle_core::DType::F32)?)
                }
                None => None,
            };
            tracing::debug!(
                rows = rows.len(),
                tokens_in = input.ids.len(),
                image_tokens,
                "VLM batch in {:.2}s",
                t0.elapsed().as_secs_f64()
            );
            gens.into_iter()
                .map(|g| {
                    Ok(VlmOutput {
                        text: tok.decode(&g.tokens, true)?,
                        tokens_in: input.ids.len(),
                        image_tokens,
                        tokens_out: g.tokens.len() + usize::from(g.stop.is_some()),
                        image_states: image_states.clone(),
                    })
                })
                .collect()
        })
        .await
        .map_err(|e| anyhow!("the VLM generation thread panicked: {e}"))?
    }

    /// Every arm of one (task, seed), paired (see the module docs).
    pub async fn run_pair(
        &self,
        sess: &mut Session,
        task: &str,
        seed: u64,
        arms: &[Arm],
        max_steps: usize,
    ) -> Result<Vec<EpisodeOutcome>> {
        let t_pair = Instant::now();
        let obs0 = sess.reset(task, seed).await?;
        let turn0 = observe_turn(&self.model, sess, &obs0, &[], None).await?;
        let first = self.generate(&turn0.input, arms.iter().map(|a| a.coeff).collect()).await?;
        let shared_s = t_pair.elapsed().as_secs_f64();
        let mut out = Vec::with_capacity(arms.len());
        for (arm, gen) in arms.iter().zip(first) {
            let t0 = Instant::now();
            sess.reset(task, seed).await?;
            let mut ep = EpisodeOutcome {
                condition: arm.condition,
                coeff: arm.coeff,
                prompt_hash: turn0.hash.clone(),
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
            let px = {
                let sc = sess.device_scale() as f32;
                sc * crate::env::som::enlargement(sc) as f32
            };
            let (mut view_obs, mut view_input, mut view_size) = (obs0.clone(), turn0.input.clone(), turn0.size);
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
                if let Some(probe) = &self.lens {
                    let r = probe.readout(
                        ep.steps,
                        gen.image_states.as_ref(),
                        (&view_input, view_size),
                        &view_obs,
                        &parsed.actions,
                        px,
                    )?;
                    ep.lens.push(r);
                }
                if let Some(why) = parsed.failure {
                    ep.parse_failure = true;
                    ep.parse_error.get_or_insert(why);
                    let r = sess.act(&Action::NoOp).await?;
                    (ep.raw_reward, ep.reward, done) = (r.raw_reward, r.reward, r.done);
                } else {
                    for a in &parsed.actions {
                        let r = sess.act(a).await?;
                        ep.actions.push(a.to_string());
                        (ep.raw_reward, ep.reward, done) = (r.raw_reward, r.reward, r.done);
                        if done {
                            break;
                        }
                    }
                }
                if done || ep.steps >= max_steps {
                    break;
                }
                let obs = sess.observe().await?;
                let turn = observe_turn(&self.model, sess, &obs, &ep.actions, None).await?;
                gen = self.generate(&turn.input, vec![arm.coeff]).await?.remove(0);
                (view_obs, view_input, view_size) = (obs, turn.input, turn.size);
            }
            ep.success = ep.raw_reward > 0.0;
            ep.wall_s = shared_s + t0.elapsed().as_secs_f64();
            out.push(ep);
        }
        Ok(out)
    }
}
