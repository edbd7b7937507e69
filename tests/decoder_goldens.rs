//! The candle decoder against transformers references for tiny seeded random models of every
//! family (tests/fixtures/tiny-*, made by scripts/goldens/make_goldens.py).
mod common;

use candle_core::{DType, Device, Tensor};
use miniwob_steer::models::decoder::Decoder;
use miniwob_steer::models::generate::{self, GenerateConfig};
use miniwob_steer::models::goldens;
use miniwob_steer::models::load::decoder_from_dir;
use miniwob_steer::models::{Captures, HookPoint, HookSpec, Positions, StepInfo, WeightDType};
use std::collections::HashMap;

const FAMILIES: [&str; 4] = ["tiny-llama", "tiny-qwen2", "tiny-gemma", "tiny-gemma2"];

fn load(name: &str) -> (Decoder, HashMap<String, Tensor>) {
    let dir = common::fixture(name);
    let (d, _) = decoder_from_dir(&dir, &Device::Cpu, WeightDType::F32).unwrap();
    let r = candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    (d, r)
}

fn ids_of(r: &HashMap<String, Tensor>, key: &str) -> Vec<u32> {
    r[key]
        .flatten_all()
        .unwrap()
        .to_dtype(DType::I64)
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .iter()
        .map(|&x| x as u32)
        .collect()
}

/// max |a - b| relative to max |b| (floored at 1).
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    let diff = (&a - &b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1.0);
    diff / scale
}

fn full_forward(d: &Decoder, ids: &[u32], spec: &HookSpec) -> (Tensor, Captures) {
    let t = Tensor::from_vec(ids.to_vec(), (1, ids.len()), &Device::Cpu).unwrap();
    let mut st = d.new_state(vec![0]);
    let mut caps = Captures::default();
    let logits = d.forward(&t, &mut st, &StepInfo::prefill(vec![0]), spec, &mut caps, true).unwrap();
    (logits, caps)
}

fn all_points(n: usize) -> HookSpec {
    let mut s = HookSpec::none().capture(HookPoint::Embed).capture(HookPoint::FinalNorm);
    for i in 0..n {
        s = s.capture(HookPoint::ResidPost(i));
    }
    s
}

/// The comparisons themselves live in the library (`miniwob_steer::models::goldens`), shared with
/// `miniwob-steer check-goldens` on a GPU; these tests run them on the CPU in f32.
fn tiny_checks(fam: &str, keep: impl Fn(&str) -> bool) {
    let rows = goldens::check_tiny(&common::fixture(fam), &Device::Cpu, WeightDType::F32).unwrap();
    let rows: Vec<_> = rows.into_iter().filter(|r| keep(&r.check)).collect();
    assert!(!rows.is_empty(), "{fam}: no checks selected");
    for r in rows {
        assert!(r.passed, "{fam} {}: {} = {} (needs {}) {}", r.check, r.metric, r.value, r.limit, r.detail);
    }
}

#[test]
fn hidden_states_and_logits_match_transformers() {
    for fam in FAMILIES {
        // hook_embed, every blocks.{i}.hook_resid_post, hook_final_norm, logits: rel err < 1e-4.
        tiny_checks(fam, |c| c.starts_with("hook_") || c.starts_with("blocks.") || c.starts_with("logits"));
    }
}

#[test]
fn steered_logits_match_transformers_forward_hook() {
    for fam in FAMILIES {
        // Within 1e-4 of the forward hook, and the steering really changed something.
        tiny_checks(fam, |c| c.starts_with("steer"));
    }
}

#[test]
fn greedy_continuations_match_transformers() {
    for fam in FAMILIES {
        tiny_checks(fam, |c| c.starts_with("greedy"));
    }
}

fn steer_ref(d: &Decoder, r: &HashMap<String, Tensor>) -> (usize, Tensor, f32) {
    let layer = ids_of(r, "steer_layer")[0] as usize;
    let alpha = r["steer_alpha"].flatten_all().unwrap().to_vec1::<f32>().unwrap()[0];
    let v = r["steer_vector"].to_dtype(DType::F32).unwrap();
    assert_eq!(v.dims(), [d.cfg.hidden_size]);
    (layer, v, alpha)
}

#[test]
fn steering_at_layer_l_changes_only_later_layers_by_exactly_alpha_v() {
    for fam in FAMILIES {
        let (d, r) = load(fam);
        let ids = ids_of(&r, "input_ids");
        let n = d.cfg.num_layers;
        let (layer, v, alpha) = steer_ref(&d, &r);
        let (_, base) = full_forward(&d, &ids, &all_points(n));
        let spec = {
            let mut s = all_points(n);
            s.interventions.push(miniwob_steer::models::hooks::AddIntervention {
                point: HookPoint::ResidPost(layer),
                vector: v.clone(),
                coeffs: vec![alpha],
                positions: Positions::All,
            });
            s
        };
        let (_, steered) = full_forward(&d, &ids, &spec);
        for i in 0..n {
            let a = base.get(HookPoint::ResidPost(i)).unwrap();
            let b = steered.get(HookPoint::ResidPost(i)).unwrap();
            let diff = (&b - &a).unwrap();
            let max = diff.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            if i < layer {
                assert_eq!(max, 0.0, "{fam}: layer {i} < {layer} changed");
            } else if i == layer {
                let expect =
                    (v.reshape((1, 1, ())).unwrap() * alpha as f64).unwrap().broadcast_as(diff.shape()).unwrap();
                let e = (&diff - &expect).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(e < 1e-5, "{fam}: layer {layer} moved by something other than alpha*v ({e})");
            } else {
                assert!(max > 1e-4, "{fam}: layer {i} > {layer} did not change");
            }
        }
    }
}

#[test]
fn alpha_zero_is_bit_identical_and_rows_are_independent() {
    for fam in FAMILIES {
        let (d, r) = load(fam);
        let ids = ids_of(&r, "input_ids");
        let (layer, v, alpha) = steer_ref(&d, &r);
        let batch = [ids.clone(), ids.clone()];
        let cfg = GenerateConfig { max_new_tokens: 6, ..Default::default() };
        let run = |spec: &HookSpec| {
            let (ids_t, pads) = generate::left_pad(&batch, 0, &Device::Cpu).unwrap();
            let mut st = d.new_state(pads.clone());
            let mut caps = Captures::default();
            d.forward(&ids_t, &mut st, &StepInfo::prefill(pads), spec, &mut caps, true).unwrap()
        };
        let none = run(&HookSpec::none());
        let zero = run(&HookSpec::none().add(HookPoint::ResidPost(layer), v.clone(), vec![0.0, 0.0], Positions::All));
        let mixed =
            run(&HookSpec::none().add(HookPoint::ResidPost(layer), v.clone(), vec![0.0, alpha], Positions::All));
        let bits = |t: &Tensor, row: usize| -> Vec<u32> {
            t.get(row).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect()
        };
        assert_eq!(bits(&zero, 0), bits(&none, 0), "{fam}: alpha=0 not bit-identical");
        assert_eq!(bits(&zero, 1), bits(&none, 1), "{fam}: alpha=0 not bit-identical");
        assert_eq!(bits(&mixed, 0), bits(&none, 0), "{fam}: baseline row disturbed by the steered row");
        assert_ne!(bits(&mixed, 1), bits(&none, 1), "{fam}: steered row unchanged");
        // Generation: baseline row of a paired batch equals an unsteered run.
        let spec = HookSpec::none().add(HookPoint::ResidPost(layer), v, vec![0.0, alpha], Positions::Last);
        let g = generate::generate(&d, &batch, &cfg, &spec, &mut Captures::default()).unwrap();
        let g0 = generate::generate(&d, &batch[..1], &cfg, &HookSpec::none(), &mut Captures::default()).unwrap();
        assert_eq!(g[0].tokens, g0[0].tokens, "{fam}: paired baseline row differs from a lone run");
    }
}

#[test]
fn left_padded_batch_matches_single_runs() {
    for fam in FAMILIES {
        let (d, r) = load(fam);
        let ids = ids_of(&r, "input_ids");
        let short: Vec<u32> = ids[3..].to_vec();
        let cfg = GenerateConfig { max_new_tokens: 6, ..Default::default() };
        let batch =
            generate::generate(&d, &[ids.clone(), short.clone()], &cfg, &HookSpec::none(), &mut Captures::default())
                .unwrap();
        for (row, p) in [ids, short].iter().enumerate() {
            let single =
                generate::generate(&d, std::slice::from_ref(p), &cfg, &HookSpec::none(), &mut Captures::default())
                    .unwrap();
            assert_eq!(batch[row].tokens, single[0].tokens, "{fam}: row {row} differs when batched with padding");
        }
        // Last-position logits agree numerically too.
        let (l_batch, _, _) = generate::prefill(
            &d,
            &[ids_of(&r, "input_ids"), ids_of(&r, "input_ids")[3..].to_vec()],
            0,
            &HookSpec::none(),
        )
        .unwrap();
        let (l_one, _, _) =
            generate::prefill(&d, &[ids_of(&r, "input_ids")[3..].to_vec()], 0, &HookSpec::none()).unwrap();
        let e = rel_err(&l_batch.get(1).unwrap(), &l_one.get(0).unwrap());
        assert!(e < 1e-5, "{fam}: padded row logits differ by {e}");
    }
}

#[test]
fn forked_prefix_state_continues_like_a_full_prefill() {
    let (d, r) = load("tiny-qwen2");
    let ids = ids_of(&r, "input_ids");
    let split = ids.len() - 4;
    // Full prefill.
    let (full, _, _) = generate::prefill(&d, std::slice::from_ref(&ids), 0, &HookSpec::none()).unwrap();
    // Prefix once, fork into two rows, then the suffix.
    let prefix = Tensor::from_vec(ids[..split].to_vec(), (1, split), &Device::Cpu).unwrap();
    let mut st = d.new_state(vec![0]);
    let mut caps = Captures::default();
    d.forward(&prefix, &mut st, &StepInfo::prefill(vec![0]), &HookSpec::none(), &mut caps, false).unwrap();
    let mut forked = st.select_rows(&[0, 0]).unwrap();
    let suffix: Vec<u32> = ids[split..].iter().chain(ids[split..].iter()).copied().collect();
    let suffix = Tensor::from_vec(suffix, (2, ids.len() - split), &Device::Cpu).unwrap();
    let out =
        d.forward(&suffix, &mut forked, &StepInfo::prefill(vec![0, 0]), &HookSpec::none(), &mut caps, false).unwrap();
    for row in 0..2 {
        let e = rel_err(&out.get(row).unwrap().squeeze(0).unwrap(), &full.get(0).unwrap());
        assert!(e < 1e-5, "forked row {row} differs by {e}");
    }
}

#[test]
fn shape_mismatch_names_tensor_and_shapes() {
    // Copy a tiny model and lie about the intermediate size in its config.
    let src = common::fixture("tiny-llama");
    let tmp = tempfile::tempdir().unwrap();
    for f in ["model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        if src.join(f).exists() {
            std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
        }
    }
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let im = cfg["intermediate_size"].as_u64().unwrap();
    cfg["intermediate_size"] = (im * 2).into();
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    let err = match decoder_from_dir(tmp.path(), &Device::Cpu, WeightDType::F32) {
        Ok(_) => panic!("loading a mismatched checkpoint succeeded"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("model.layers.0.mlp.gate_proj.weight"), "{err}");
    assert!(err.contains(&format!("[{}, ", im * 2)) && err.contains(&format!("found [{im}, ")), "{err}");
    assert!(err.contains("model id"), "{err}");
}
