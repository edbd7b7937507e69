//! Hook points (TransformerLens names) and hook specs: what to capture and what to add to the
//! residual stream during a forward pass.
//!
//! Off-by-one, explicitly: `blocks.{i}.hook_resid_post` is the output of decoder layer `i`
//! (0-based), which transformers returns as `hidden_states[i + 1]`; `blocks.{i}.hook_resid_pre`
//! is its input (`hidden_states[i]`); `hook_embed` is `hidden_states[0]` (after Gemma's scale).
//! transformers' last `hidden_states` entry has the final norm applied; here that is
//! `hook_final_norm`, distinct from `blocks.{n-1}.hook_resid_post`.
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HookPoint {
    Embed,
    ResidPre(usize),
    ResidPost(usize),
    FinalNorm,
}

impl fmt::Display for HookPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HookPoint::Embed => write!(f, "hook_embed"),
            HookPoint::ResidPre(i) => write!(f, "blocks.{i}.hook_resid_pre"),
            HookPoint::ResidPost(i) => write!(f, "blocks.{i}.hook_resid_post"),
            HookPoint::FinalNorm => write!(f, "hook_final_norm"),
        }
    }
}

impl FromStr for HookPoint {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "hook_embed" => return Ok(HookPoint::Embed),
            "hook_final_norm" => return Ok(HookPoint::FinalNorm),
            _ => {}
        }
        let bad = || {
            anyhow::anyhow!(
                "unknown hook point `{s}`: expected hook_embed, blocks.N.hook_resid_pre, blocks.N.hook_resid_post or hook_final_norm"
            )
        };
        let rest = s.strip_prefix("blocks.").ok_or_else(bad)?;
        let (n, kind) = rest.split_once('.').ok_or_else(bad)?;
        let i: usize = n.parse().map_err(|_| bad())?;
        match kind {
            "hook_resid_pre" => Ok(HookPoint::ResidPre(i)),
            "hook_resid_post" => Ok(HookPoint::ResidPost(i)),
            _ => Err(bad()),
        }
    }
}

impl HookPoint {
    /// Index into transformers' `output_hidden_states` tuple, when there is one.
    pub fn hf_hidden_states_index(&self, num_layers: usize) -> Option<usize> {
        match *self {
            HookPoint::Embed => Some(0),
            HookPoint::ResidPre(i) => Some(i),
            HookPoint::ResidPost(i) if i + 1 < num_layers => Some(i + 1),
            // The last entry of hidden_states is normed in transformers: not this point.
            _ => None,
        }
    }
}

/// Which sequence positions an intervention (or capture) applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Positions {
    /// The last prompt token and every generated token (the exp12 setting).
    Last,
    /// Every real (non-padding) position, prompt and generated.
    All,
    /// Every real prompt position (prefill only).
    Prompt,
    /// Generated positions only (decode steps).
    Generated,
    /// Image-token positions of the prompt (VLMs; prefill only). Needs [`StepInfo::modality`].
    Image,
    /// Text positions: real prompt tokens that are not image tokens, and every generated token.
    Text,
}

impl FromStr for Positions {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "last" => Positions::Last,
            "all" => Positions::All,
            "prompt" => Positions::Prompt,
            "generated" => Positions::Generated,
            "image" => Positions::Image,
            "text" => Positions::Text,
            other => {
                bail!("unknown position selector `{other}`: expected last, all, prompt, generated, image or text")
            }
        })
    }
}

impl fmt::Display for Positions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Positions::Last => "last",
            Positions::All => "all",
            Positions::Prompt => "prompt",
            Positions::Generated => "generated",
            Positions::Image => "image",
            Positions::Text => "text",
        })
    }
}

/// Add `coeffs[row] * vector` to the residual stream at `point`.
#[derive(Debug, Clone)]
pub struct AddIntervention {
    pub point: HookPoint,
    /// Shape `[hidden]`.
    pub vector: Tensor,
    /// One coefficient per batch row; 0 leaves that row bit-identical to no intervention (the
    /// vector is not used for it at all).
    pub coeffs: Vec<f32>,
    pub positions: Positions,
}

#[derive(Debug, Clone, Default)]
pub struct HookSpec {
    pub captures: Vec<HookPoint>,
    pub interventions: Vec<AddIntervention>,
}

impl HookSpec {
    pub fn none() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.captures.is_empty() && self.interventions.is_empty()
    }

    pub fn capture(mut self, point: HookPoint) -> Self {
        self.captures.push(point);
        self
    }

    pub fn add(mut self, point: HookPoint, vector: Tensor, coeffs: Vec<f32>, positions: Positions) -> Self {
        self.interventions.push(AddIntervention { point, vector, coeffs, positions });
        self
    }

    /// Does anything happen at this point? Checked per layer so an empty spec costs nothing.
    pub fn touches(&self, point: HookPoint) -> bool {
        self.captures.contains(&point) || self.interventions.iter().any(|iv| iv.point == point)
    }

    pub fn validate(&self, batch: usize, hidden: usize, num_layers: usize) -> Result<()> {
        let check_point = |p: &HookPoint| -> Result<()> {
            match p {
                HookPoint::ResidPre(i) | HookPoint::ResidPost(i) if *i >= num_layers => {
                    bail!("hook point `{p}` is out of range: {}", crate::models::registry::layer_range(num_layers))
                }
                _ => Ok(()),
            }
        };
        for p in &self.captures {
            check_point(p)?;
        }
        for iv in &self.interventions {
            check_point(&iv.point)?;
            if iv.vector.dims() != [hidden] {
                bail!(
                    "steering vector for `{}` has shape {:?}, expected [{hidden}] (the model's hidden size)",
                    iv.point,
                    iv.vector.dims()
                );
            }
            if iv.coeffs.len() != batch {
                bail!(
                    "intervention at `{}` has {} coefficients, expected one per batch row ({batch})",
                    iv.point,
                    iv.coeffs.len()
                );
            }
        }
        Ok(())
    }
}

/// Where the current forward call sits in a generation: which columns are real prompt tokens
/// and whether this call is the prefill or a decode step.
#[derive(Debug, Clone)]
pub struct StepInfo {
    /// Number of left-padding columns per row (prefill only; decode positions are all real).
    pub left_pad: Vec<usize>,
    pub is_prefill: bool,
    /// Per row, per column of this call: is it an image token? (VLM prefill; `None` = all text.)
    /// Read by the `image` and `text` selectors.
    pub modality: Option<Vec<Vec<bool>>>,
}

impl StepInfo {
    pub fn prefill(left_pad: Vec<usize>) -> Self {
        Self { left_pad, is_prefill: true, modality: None }
    }
    pub fn decode(batch: usize) -> Self {
        Self { left_pad: vec![0; batch], is_prefill: false, modality: None }
    }
    /// This step with per-row image-token masks (`[row][column]`), for the `image`/`text` selectors.
    pub fn with_modality(mut self, image: Vec<Vec<bool>>) -> Self {
        self.modality = Some(image);
        self
    }

    /// `[seq]` 0/1 mask of the positions selected for one row in this call, or None when no
    /// position is selected.
    fn row_mask(&self, positions: Positions, row: usize, seq: usize) -> Option<Vec<f32>> {
        let pad = self.left_pad.get(row).copied().unwrap_or(0);
        let mut m = vec![0f32; seq];
        match (positions, self.is_prefill) {
            (Positions::Last, true) => m[seq - 1] = 1.0,
            (Positions::Prompt, true) | (Positions::All, true) => m[pad.min(seq)..].iter_mut().for_each(|x| *x = 1.0),
            (Positions::Generated, true) | (Positions::Prompt, false) => return None,
            (Positions::Last, false) | (Positions::All, false) | (Positions::Generated, false) => {
                m.iter_mut().for_each(|x| *x = 1.0)
            }
            (Positions::Image, false) => return None,
            (Positions::Image, true) | (Positions::Text, _) => {
                let image = self.modality.as_ref().and_then(|m| m.get(row));
                for (c, x) in m.iter_mut().enumerate() {
                    let is_image = image.and_then(|r| r.get(c)).copied().unwrap_or(false);
                    // Padding columns are neither; decode steps are generated text.
                    let real = !self.is_prefill || c >= pad;
                    let want = if positions == Positions::Image { is_image } else { !is_image };
                    *x = if real && want { 1.0 } else { 0.0 };
                }
                if m.iter().all(|&x| x == 0.0) {
                    return None;
                }
            }
        }
        Some(m)
    }
}

/// Captured activations, in call order per point (prefill first, then one entry per decode step).
#[derive(Debug, Default)]
pub struct Captures {
    pub tensors: BTreeMap<HookPoint, Vec<Tensor>>,
}

impl Captures {
    /// All calls of one point concatenated along the sequence axis: `[batch, seq, hidden]`.
    pub fn get(&self, point: HookPoint) -> Result<Tensor> {
        match self.tensors.get(&point) {
            Some(v) if !v.is_empty() => Ok(Tensor::cat(v, 1)?),
            _ => bail!("nothing was captured at `{point}`"),
        }
    }
}

/// Runs the hooks registered at `point` on the residual `xs` (`[batch, seq, hidden]`).
pub(crate) fn apply(
    spec: &HookSpec,
    point: HookPoint,
    xs: Tensor,
    step: &StepInfo,
    captures: &mut Captures,
) -> Result<Tensor> {
    let mut xs = xs;
    for iv in spec.interventions.iter().filter(|iv| iv.point == point) {
        let (b, seq, _h) = xs.dims3()?;
        // Per-row scale times position mask, as one [b, seq, 1] tensor.
        let mut scale = Vec::with_capacity(b * seq);
        let mut any = false;
        for row in 0..b {
            let c = iv.coeffs[row];
            match step.row_mask(iv.positions, row, seq) {
                Some(m) if c != 0.0 => {
                    any = true;
                    scale.extend(m.into_iter().map(|x| x * c));
                }
                _ => scale.extend(std::iter::repeat_n(0f32, seq)),
            }
        }
        if !any {
            continue;
        }
        let dev: &Device = xs.device();
        let keep = scale.contains(&0.0).then(|| scale.iter().map(|&x| u8::from(x != 0.0)).collect::<Vec<u8>>());
        let scale = Tensor::from_vec(scale, (b, seq, 1), dev)?.to_dtype(xs.dtype())?;
        let v = iv.vector.to_device(dev)?.to_dtype(xs.dtype())?.reshape((1, 1, ()))?;
        let steered = (&xs + scale.broadcast_mul(&v)?)?;
        xs = match keep {
            // Positions with α = 0 (baseline rows, unselected positions) keep their values
            // untouched, not `x + 0 * v`: that is NaN for a non-finite v, and -0.0 becomes +0.0.
            Some(keep) => {
                Tensor::from_vec(keep, (b, seq, 1), dev)?.broadcast_as(xs.shape())?.where_cond(&steered, &xs)?
            }
            None => steered,
        };
    }
    if spec.captures.contains(&point) {
        captures.tensors.entry(point).or_default().push(xs.to_dtype(DType::F32)?);
    }
    Ok(xs)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 18.7: a row with α = 0 never touches the vector: NaN in the vector leaves it
    /// exactly as it was (before: 0 × NaN = NaN), and -0.0 stays -0.0.
    #[test]
    fn zero_coefficient_rows_do_not_touch_the_vector() {
        let vals: Vec<f32> = (0..24).map(|i| if i == 5 { -0.0 } else { i as f32 * 0.5 - 3.0 }).collect();
        let xs = Tensor::from_vec(vals.clone(), (2, 3, 4), &Device::Cpu).unwrap();
        let bits = |t: &Tensor| {
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        };
        let v = Tensor::new(&[f32::NAN, 1.0, f32::INFINITY, 2.0], &Device::Cpu).unwrap();
        let spec = HookSpec::none().add(HookPoint::ResidPost(0), v, vec![0.0, 1.0], Positions::Last);
        let out =
            apply(&spec, HookPoint::ResidPost(0), xs.clone(), &StepInfo::prefill(vec![0, 0]), &mut Captures::default())
                .unwrap();
        let (o, x) = (bits(&out), bits(&xs));
        assert_eq!(o[..12], x[..12], "the α = 0 row is untouched");
        assert_eq!(o[12..20], x[12..20], "unselected positions of the steered row are untouched");
        let last: Vec<f32> = out.get(1).unwrap().get(2).unwrap().to_vec1().unwrap();
        assert!(last[0].is_nan() && last[1] == vals[21] + 1.0 && last[2].is_infinite());
        // A finite vector: the α = 0 row is bit-identical (sign of zero included), the other moves.
        let v = Tensor::new(&[1.0f32, 1.0, 1.0, 1.0], &Device::Cpu).unwrap();
        let spec = HookSpec::none().add(HookPoint::ResidPost(0), v, vec![2.0, 0.0], Positions::All);
        let out =
            apply(&spec, HookPoint::ResidPost(0), xs.clone(), &StepInfo::prefill(vec![0, 0]), &mut Captures::default())
                .unwrap();
        let o = bits(&out);
        assert_eq!(o[12..], x[12..]);
        assert_eq!(out.get(0).unwrap().get(1).unwrap().to_vec1::<f32>().unwrap()[1], -0.0 + 2.0);
    }

    #[test]
    fn hook_point_names_round_trip() {
        for p in [HookPoint::Embed, HookPoint::ResidPre(3), HookPoint::ResidPost(14), HookPoint::FinalNorm] {
            assert_eq!(p.to_string().parse::<HookPoint>().unwrap(), p);
        }
        assert_eq!(HookPoint::ResidPost(7).to_string(), "blocks.7.hook_resid_post");
        assert!("blocks.x.hook_resid_post".parse::<HookPoint>().is_err());
        assert!("blocks.1.hook_attn".parse::<HookPoint>().is_err());
    }

    #[test]
    fn hf_index_off_by_one() {
        assert_eq!(HookPoint::ResidPost(0).hf_hidden_states_index(4), Some(1));
        assert_eq!(HookPoint::ResidPre(2).hf_hidden_states_index(4), Some(2));
        assert_eq!(HookPoint::ResidPost(3).hf_hidden_states_index(4), None);
    }

    #[test]
    fn position_masks() {
        let s = StepInfo::prefill(vec![0, 2]);
        assert_eq!(s.row_mask(Positions::Last, 1, 5), Some(vec![0., 0., 0., 0., 1.]));
        assert_eq!(s.row_mask(Positions::Prompt, 1, 5), Some(vec![0., 0., 1., 1., 1.]));
        assert_eq!(s.row_mask(Positions::All, 0, 3), Some(vec![1., 1., 1.]));
        assert_eq!(s.row_mask(Positions::Generated, 0, 3), None);
        let d = StepInfo::decode(2);
        assert_eq!(d.row_mask(Positions::Generated, 0, 1), Some(vec![1.]));
        assert_eq!(d.row_mask(Positions::Last, 0, 1), Some(vec![1.]));
        assert_eq!(d.row_mask(Positions::Prompt, 0, 1), None);
    }

    #[test]
    fn modality_masks() {
        let s = StepInfo::prefill(vec![1, 0])
            .with_modality(vec![vec![false, false, true, true, false], vec![false, true, true, false, false]]);
        assert_eq!(s.row_mask(Positions::Image, 0, 5), Some(vec![0., 0., 1., 1., 0.]));
        assert_eq!(s.row_mask(Positions::Text, 0, 5), Some(vec![0., 1., 0., 0., 1.]));
        assert_eq!(s.row_mask(Positions::Image, 1, 5), Some(vec![0., 1., 1., 0., 0.]));
        // No image in a text-only row: the image selector selects nothing.
        assert_eq!(StepInfo::prefill(vec![0]).row_mask(Positions::Image, 0, 3), None);
        assert_eq!(StepInfo::decode(1).row_mask(Positions::Image, 0, 1), None);
        assert_eq!(StepInfo::decode(1).row_mask(Positions::Text, 0, 1), Some(vec![1.]));
        assert_eq!("image".parse::<Positions>().unwrap(), Positions::Image);
        assert_eq!(Positions::Text.to_string(), "text");
    }
}
