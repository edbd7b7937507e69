//! The in-loop lens read-out of `run --vlm --lens IDX --lens-layer L`: per step, the top-k
//! contextual neighbours of the vision tokens under the element the agent acted on.
use crate::env::{Action, Observation};
use anyhow::Result;
use candle_core::Tensor;
use std::sync::Mutex;

pub struct LensProbe {
    pub index: Mutex<super::index::Index>,
    /// The LLM layer read (`blocks.{L}.hook_resid_post`).
    pub layer: usize,
    pub k: usize,
}

impl LensProbe {
    /// The step's read-out: `{step, ref, tokens, top: [[token, cosine, hook point], …]}` (ref
    /// null and no `top` when no action named an element). `states`: the prompt's states at
    /// the layer at its image positions (`[image tokens, hidden]`); `image`: the first image's patch grid and the
    /// screenshot's size in pixels; `px_per_css`: screenshot pixels per CSS pixel.
    pub fn readout(
        &self,
        step: usize,
        states: Option<&Tensor>,
        image: Option<([usize; 3], (usize, usize))>,
        obs: &Observation,
        actions: &[Action],
        px_per_css: f32,
    ) -> Result<serde_json::Value> {
        let target = actions.iter().find_map(|a| match a {
            Action::ClickRef(r) | Action::TypeRef { r#ref: r, .. } | Action::SelectRef { r#ref: r, .. } => Some(*r),
            _ => None,
        });
        let (Some(r), Some(states), Some((grid, (w, h)))) = (target, states, image) else {
            return Ok(serde_json::json!({"step": step, "ref": target}));
        };
        let Some(e) = obs.element(r) else {
            return Ok(serde_json::json!({"step": step, "ref": r, "tokens": 0}));
        };
        let (_, boxes) = super::extract::vision_cells(grid, 2, 14, w, h);
        let b = [e.left, e.top, e.left + e.width, e.top + e.height].map(|v| v as f32 * px_per_css);
        let mut ix = self.index.lock().unwrap_or_else(|p| p.into_inner());
        let top = super::index::readout(&mut ix, states, &boxes, b, self.k)?;
        Ok(serde_json::json!({"step": step, "ref": r, "tokens": top.0, "top": top.1}))
    }
}
