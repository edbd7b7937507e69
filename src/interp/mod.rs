//! Interpretability read-outs (DESIGN.md §6b): per-layer extraction at image or text positions
//! (`extract`), the embedding, logit and contextual (LatentLens) lenses (`lens`, `index`), and the
//! judge-free grounded score on MiniWoB screenshots (`grounded`). docs/lens.md has the commands.
//!
//! Layer numbering, explicitly: a plain number `i` is `blocks.{i}.hook_resid_post`, the output of
//! decoder layer i, which is transformers' `hidden_states[i + 1]`. `hs:j` is transformers'
//! numbering: `hs:0` = `hook_embed`, `hs:j` = `blocks.{j-1}.hook_resid_post` for 0 < j < L, and
//! `hs:L` = `hook_final_norm`, because transformers applies the final norm to its last entry.
//! Every output names the TransformerLens hook point.
pub mod corpus;
pub mod extract;
pub mod grounded;
pub mod index;
pub mod lens;
pub mod plot;
pub mod readout;

use crate::models::hooks::HookPoint;
use crate::models::registry;
use anyhow::{bail, Context, Result};

/// `--layers`: `all` (hook_embed and every `blocks.{i}.hook_resid_post`), a list of layer
/// indices and hook point names (`0,8,hook_final_norm`), or `hs:` + transformers'
/// `hidden_states` indices (`hs:0,8,28`).
pub fn parse_points(spec: &str, num_layers: usize) -> Result<Vec<HookPoint>> {
    let spec = spec.trim();
    let mut out = Vec::new();
    if spec == "all" {
        out.push(HookPoint::Embed);
        out.extend((0..num_layers).map(HookPoint::ResidPost));
        return Ok(out);
    }
    if let Some(rest) = spec.strip_prefix("hs:") {
        for s in rest.split(',') {
            let j: usize = s.trim().parse().with_context(|| {
                format!("--layers hs:{rest}: `{s}` is not a hidden_states index (expected 0..={num_layers})")
            })?;
            out.push(match j {
                0 => HookPoint::Embed,
                j if j < num_layers => HookPoint::ResidPost(j - 1),
                j if j == num_layers => HookPoint::FinalNorm,
                j => bail!(
                    "--layers hs:{j}: the model has {num_layers} layers, so hidden_states has indices 0..={num_layers}"
                ),
            });
        }
    } else {
        for s in spec.split(',') {
            let s = s.trim();
            out.push(if s == "embed" {
                HookPoint::Embed
            } else if s.contains("hook_") {
                let p: HookPoint = s.parse()?;
                if let HookPoint::ResidPre(i) | HookPoint::ResidPost(i) = p {
                    if i >= num_layers {
                        bail!("--layers {s}: the model has {num_layers} layers (0..{})", num_layers - 1);
                    }
                }
                p
            } else {
                HookPoint::ResidPost(registry::parse_layer(s, num_layers).with_context(|| format!("--layers {spec}"))?)
            });
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    out.retain(|p| seen.insert(*p));
    if out.is_empty() {
        bail!("--layers {spec}: no layer selected");
    }
    Ok(out)
}

/// A bar on stderr for long loops (hidden when stderr is not a terminal).
pub fn progress(n: u64, what: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(n);
    pb.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_specs() {
        let p = |s: &str| parse_points(s, 28).map(|v| v.iter().map(|p| p.to_string()).collect::<Vec<_>>());
        assert_eq!(p("all").unwrap().len(), 29);
        assert_eq!(p("0,8").unwrap(), ["blocks.0.hook_resid_post", "blocks.8.hook_resid_post"]);
        // transformers' numbering: 0 = embeddings, j = output of layer j-1, 28 = normed last.
        assert_eq!(p("hs:0,8,28").unwrap(), ["hook_embed", "blocks.7.hook_resid_post", "hook_final_norm"]);
        assert!(p("hs:29").unwrap_err().to_string().contains("0..=28"));
        assert!(p("28").is_err());
        assert_eq!(
            p("embed,hook_final_norm,3,3").unwrap(),
            ["hook_embed", "hook_final_norm", "blocks.3.hook_resid_post"]
        );
    }
}
