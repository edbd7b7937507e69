//! The real GGUF checkpoints (SmolLM2-135M, Qwen2.5-Coder-0.5B) against transformers loading the
//! same files dequantized to f32 (tests/fixtures/*/logits.json, scripts/goldens/gguf_goldens.py).
//!
//! f32 path: same prompt ids, same top-1, same greedy continuation, cosine ≥ 0.999 over a fixed
//! sample of the vocabulary plus the reference top-64. Quantized path (`--dtype gguf`): same top-1
//! and cosine ≥ 0.99 (a quantized matmul is not the dequantized one, so continuations may drift).
mod common;

use candle_core::{Device, Tensor};
use miniwob_steer::models::generate::{self, GenerateConfig};
use miniwob_steer::models::load::LoadedModel;
use miniwob_steer::models::{HookPoint, HookSpec, WeightDType};
use serde_json::Value;

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}

struct Case {
    text: String,
    ids: Vec<u32>,
    /// Reference top-64 ids, then the fixed vocabulary sample.
    check_ids: Vec<u32>,
    check_logits: Vec<f32>,
    greedy: Vec<u32>,
    hidden: Option<(usize, Vec<Vec<f32>>)>,
}

fn cases(fixture: &str) -> Vec<Case> {
    let doc = common::fixture_json(fixture, "logits.json");
    doc["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let mut check_ids = u32s(&c["top_ids"]);
            let mut check_logits = f32s(&c["top_logits"]);
            check_ids.extend(u32s(&c["sample_ids"]));
            check_logits.extend(f32s(&c["sample_logits"]));
            let hidden = c.get("hidden").map(|h| {
                let rows = h.as_array().unwrap().iter().map(f32s).collect();
                (c["hidden_layer"].as_u64().unwrap() as usize, rows)
            });
            Case {
                text: c["text"].as_str().unwrap().to_string(),
                ids: u32s(&c["ids"]),
                check_ids,
                check_logits,
                greedy: u32s(&c["greedy"]),
                hidden,
            }
        })
        .collect()
}

/// Logit gap under which two candidates count as tied for the quantized path.
const NEAR_TIE: f32 = 0.5;

fn check(alias: &str, fixture: &str, dtype: WeightDType, min_cos: f32, same_greedy: bool) {
    let m = LoadedModel::load(common::gguf_path(alias).to_str().unwrap(), &Device::Cpu, dtype).unwrap();
    let cases = cases(fixture);
    assert!(cases.len() >= 3);
    for c in &cases {
        assert_eq!(m.tokenizer.encode(&c.text, false).unwrap(), c.ids, "{alias}: prompt ids differ for {:?}", c.text);
        let mut spec = HookSpec::none();
        if let Some((layer, _)) = &c.hidden {
            spec = spec.capture(HookPoint::ResidPost(*layer));
        }
        let (logits, caps, _) = generate::prefill(&m.decoder, std::slice::from_ref(&c.ids), 0, &spec).unwrap();
        let logits: Vec<f32> = logits.get(0).unwrap().to_vec1().unwrap();
        let top1 = generate::top_k(&Tensor::new(logits.as_slice(), &Device::Cpu).unwrap(), 1).unwrap()[0].0;
        // The quantized path (activations quantized to 8 bits inside the matmul) may flip a
        // near-tie, as on SmolLM2 Q4_1 for "capital of France" (DESIGN.md §9): there, our top-1
        // must still be the reference's top-2.
        let gap = c.check_logits[0] - c.check_logits[1];
        if same_greedy || gap >= NEAR_TIE {
            assert_eq!(top1, c.check_ids[0], "{alias} {}: top-1 differs for {:?}", dtype.name(), c.text);
        } else {
            assert!(
                c.check_ids[..2].contains(&top1),
                "{alias} {}: top-1 {top1} is not among the reference's near-tied top-2 {:?} for {:?}",
                dtype.name(),
                &c.check_ids[..2],
                c.text
            );
        }
        let ours: Vec<f32> = c.check_ids.iter().map(|&i| logits[i as usize]).collect();
        let cos = cosine(&ours, &c.check_logits);
        assert!(cos >= min_cos, "{alias} {}: logits cosine {cos} < {min_cos} for {:?}", dtype.name(), c.text);
        if let Some((layer, rows)) = &c.hidden {
            let h = caps.get(HookPoint::ResidPost(*layer)).unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap();
            assert_eq!(h.len(), rows.len());
            let flat_ours: Vec<f32> = h.concat();
            let flat_ref: Vec<f32> = rows.concat();
            let cos = cosine(&flat_ours, &flat_ref);
            assert!(cos >= min_cos, "{alias} {}: blocks.{layer}.hook_resid_post cosine {cos}", dtype.name());
        }
        if same_greedy {
            let cfg = GenerateConfig { max_new_tokens: c.greedy.len(), ..Default::default() };
            let g = generate::generate(
                &m.decoder,
                std::slice::from_ref(&c.ids),
                &cfg,
                &HookSpec::none(),
                &mut Default::default(),
            )
            .unwrap();
            assert_eq!(
                g[0].tokens,
                c.greedy,
                "{alias}: greedy continuation differs for {:?}: ours {:?}, transformers {:?}",
                c.text,
                m.tokenizer.decode(&g[0].tokens, false).unwrap(),
                m.tokenizer.decode(&c.greedy, false).unwrap()
            );
        }
    }
}

#[test]
fn smollm2_f32_matches_transformers() {
    check("smollm2-135m", "smollm2", WeightDType::F32, 0.999, true);
}

#[test]
fn smollm2_quantized_top1_matches_transformers() {
    check("smollm2-135m", "smollm2", WeightDType::Gguf, 0.99, false);
}

#[test]
fn qwen_coder_f32_matches_transformers() {
    check("qwen-coder-0.5b", "qwen2", WeightDType::F32, 0.999, true);
}

#[test]
fn qwen_coder_quantized_top1_matches_transformers() {
    check("qwen-coder-0.5b", "qwen2", WeightDType::Gguf, 0.99, false);
}
