//! Qwen2-VL against transformers on a seeded tiny random checkpoint
//! (scripts/goldens/qwen2_vl_goldens.py → tests/fixtures/tiny-qwen2-vl): config layouts, image
//! processor, vision tower, M-RoPE positions, per-layer text hidden states, logits, greedy
//! decoding with rope_delta, modality hooks.
mod common;

use candle_core::{DType, Device, Tensor};
use miniwob_steer::models::generate::GenerateConfig;
use miniwob_steer::models::hooks::{Captures, HookPoint, HookSpec, Positions, StepInfo};
use miniwob_steer::models::qwen2_vl::{process, rope, Qwen2Vl, Qwen2VlConfig, VlmInput};
use miniwob_steer::models::WeightDType;
use std::collections::HashMap;
use std::sync::OnceLock;

const DIR: &str = "tiny-qwen2-vl";
const SAMPLES: [&str; 3] = ["two", "resized", "text"];
const TOL: f32 = 1e-4;

fn model() -> &'static Qwen2Vl {
    static M: OnceLock<Qwen2Vl> = OnceLock::new();
    M.get_or_init(|| {
        Qwen2Vl::load_dir(&common::fixture(DIR), DIR, DIR, &Device::Cpu, WeightDType::F32)
            .expect("loading the tiny Qwen2-VL")
    })
}

fn reference() -> &'static HashMap<String, Tensor> {
    static R: OnceLock<HashMap<String, Tensor>> = OnceLock::new();
    R.get_or_init(|| {
        candle_core::safetensors::load(common::fixture(DIR).join("reference.safetensors"), &Device::Cpu).unwrap()
    })
}

fn r(key: &str) -> Tensor {
    reference().get(key).unwrap_or_else(|| panic!("reference has no `{key}`")).clone()
}

fn has(key: &str) -> bool {
    reference().contains_key(key)
}

fn ids_of(key: &str) -> Vec<u32> {
    r(key).to_dtype(DType::I64).unwrap().to_vec1::<i64>().unwrap().into_iter().map(|x| x as u32).collect()
}

/// max |a − b| / max |b|: the error relative to the tensor's scale.
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let diff = (&a - &b).unwrap().abs().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    let scale = b.abs().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    diff / scale.max(1e-12)
}

fn grids(sample: &str) -> Vec<[usize; 3]> {
    if !has(&format!("{sample}.grid_thw")) {
        return vec![];
    }
    r(&format!("{sample}.grid_thw"))
        .to_vec2::<i64>()
        .unwrap()
        .into_iter()
        .map(|g| [g[0] as usize, g[1] as usize, g[2] as usize])
        .collect()
}

/// The reference input of a sample, with transformers' pixel_values (exact processor input).
fn reference_input(sample: &str) -> VlmInput {
    let ids = ids_of(&format!("{sample}.input_ids"));
    let gs = grids(sample);
    let mut images = Vec::new();
    if !gs.is_empty() {
        let px = r(&format!("{sample}.pixel_values"));
        let mut start = 0;
        for g in gs {
            let n = g.iter().product::<usize>();
            let rows = px.narrow(0, start, n).unwrap();
            start += n;
            images.push(miniwob_steer::models::qwen2_vl::processor::Processed {
                pixel_values: rows.flatten_all().unwrap().to_vec1().unwrap(),
                grid_thw: g,
                patch_dim: px.dim(1).unwrap(),
            });
        }
    }
    VlmInput { ids, images }
}

fn image(name: &str) -> image::RgbImage {
    image::open(common::fixture(DIR).join("images").join(format!("{name}.png"))).unwrap().to_rgb8()
}

fn prompts() -> serde_json::Value {
    common::fixture_json(DIR, "prompts.json")
}

#[test]
fn both_config_layouts_parse_the_same() {
    let dir = common::fixture(DIR);
    let nested = Qwen2VlConfig::from_file(&dir.join("config.json")).unwrap();
    let hub = Qwen2VlConfig::from_file(&dir.join("config.hub.json")).unwrap();
    assert_eq!(nested.mrope_section, [2, 3, 3]);
    assert_eq!(nested.vision, hub.vision);
    assert_eq!(nested.mrope_section, hub.mrope_section);
    assert_eq!(
        (nested.image_token_id, nested.vision_start_token_id, nested.vision_end_token_id, nested.video_token_id),
        (hub.image_token_id, hub.vision_start_token_id, hub.vision_end_token_id, hub.video_token_id)
    );
    assert_eq!(nested.image_token_id, 5, "special ids come from the config");
    let (a, b) = (&nested.text, &hub.text);
    assert_eq!(
        (a.hidden_size, a.num_layers, a.num_heads, a.num_kv_heads, a.head_dim, a.vocab_size, a.rope_theta),
        (b.hidden_size, b.num_layers, b.num_heads, b.num_kv_heads, b.head_dim, b.vocab_size, b.rope_theta)
    );
    assert!(a.tie_word_embeddings && b.tie_word_embeddings && a.qkv_bias);
    assert_eq!((a.sliding_window, b.sliding_window), (None, None));
}

#[test]
fn qwen25_vl_is_refused_with_a_clear_message() {
    let dir = common::fixture(DIR);
    let hub: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.hub.json")).unwrap()).unwrap();
    let mut by_type = hub.clone();
    by_type["model_type"] = "qwen2_5_vl".into();
    by_type["architectures"] = serde_json::json!(["Qwen2_5_VLForConditionalGeneration"]);
    let mut by_vision = hub.clone();
    by_vision["vision_config"]["window_size"] = 112.into();
    by_vision["vision_config"]["fullatt_block_indexes"] = serde_json::json!([7, 15, 23, 31]);
    for (what, v) in [("model_type", by_type), ("vision_config", by_vision)] {
        let e = Qwen2VlConfig::from_json(&v, "x/config.json").unwrap_err().to_string();
        assert!(
            e.contains("Qwen2.5-VL") && e.contains("window attention") && e.contains("x/config.json"),
            "{what}: {e}"
        );
    }
}

#[test]
fn processor_matches_transformers() {
    let m = model();
    let p = prompts();
    for sample in ["two", "resized"] {
        let names: Vec<String> =
            p[sample]["images"].as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_string()).collect();
        let want_px = r(&format!("{sample}.pixel_values"));
        let want_grids = grids(sample);
        let mut got = Vec::new();
        let mut got_grids = Vec::new();
        for n in &names {
            let out = process(&image(n), &m.processor).unwrap();
            got_grids.push(out.grid_thw);
            got.extend(out.pixel_values);
        }
        assert_eq!(got_grids, want_grids, "{sample}: grid_thw");
        let got = Tensor::from_vec(got, want_px.dims(), &Device::Cpu).unwrap();
        let diff = (&got - &want_px)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        // Sizes that are multiples of 28 are not resampled: float rounding only. The 61x97 image is
        // resized by our port of Pillow's bicubic (fixed-point, 8-bit intermediate): documented
        // tolerance one 8-bit level after normalisation (1/255/std ≈ 0.0152), measured exact.
        let tol = if sample == "two" { 1e-5 } else { 0.0153 };
        assert!(diff <= tol, "{sample}: pixel_values differ by {diff} (tolerance {tol})");
        eprintln!("{sample}: pixel_values max |Δ| = {diff:e}");
    }
}

#[test]
fn chat_template_expands_image_pads_like_transformers() {
    let m = model();
    let p = prompts();
    for sample in SAMPLES {
        let rendered = m.render(&p[sample]["messages"], true).unwrap();
        assert_eq!(rendered, p[sample]["text"].as_str().unwrap(), "{sample}: rendered template");
        let images = p[sample]["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| process(&image(n.as_str().unwrap()), &m.processor).unwrap())
            .collect();
        let input = m.encode_expanded(&rendered, images).unwrap();
        assert_eq!(input.ids, ids_of(&format!("{sample}.input_ids")), "{sample}: input ids");
    }
}

#[test]
fn mrope_positions_and_delta_match() {
    let m = model();
    for sample in SAMPLES {
        let ids = ids_of(&format!("{sample}.input_ids"));
        let p = rope::mrope_positions(&ids, &grids(sample), m.cfg.image_token_id, 2).unwrap();
        let want = r(&format!("{sample}.position_ids")).to_vec2::<i64>().unwrap();
        for (axis, (got, want)) in p.ids.iter().zip(&want).enumerate() {
            assert_eq!(got, want, "{sample}: position ids, axis {axis}");
        }
        assert_eq!(p.delta, r(&format!("{sample}.rope_delta")).to_vec1::<i64>().unwrap()[0], "{sample}: rope_delta");
    }
}

#[test]
fn vision_tower_matches_transformers() {
    let m = model();
    for sample in ["two", "resized"] {
        let px = r(&format!("{sample}.pixel_values"));
        let g = grids(sample);
        let pre = m.vision.as_ref().unwrap().encode(&px, &g).unwrap();
        let e = rel_err(&pre, &r(&format!("{sample}.vision_pre_merge")));
        assert!(e <= TOL, "{sample}: vision blocks rel err {e}");
        let out = m.vision.as_ref().unwrap().merge(&pre).unwrap();
        let e = rel_err(&out, &r(&format!("{sample}.vision_out")));
        assert!(e <= TOL, "{sample}: merger output rel err {e}");
    }
}

fn capture_all(layers: usize) -> HookSpec {
    let mut spec = HookSpec::none().capture(HookPoint::Embed).capture(HookPoint::FinalNorm);
    for i in 0..layers {
        spec = spec.capture(HookPoint::ResidPost(i));
    }
    spec
}

#[test]
fn text_hidden_states_and_logits_match_transformers() {
    let m = model();
    let n = m.cfg.text.num_layers;
    for sample in SAMPLES {
        let input = reference_input(sample);
        let mut caps = Captures::default();
        let out = m.prefill(&[input], &capture_all(n), &mut caps, true).unwrap();
        let check = |name: &str, got: &Tensor, key: &str| {
            let e = rel_err(&got.squeeze(0).unwrap(), &r(&format!("{sample}.{key}")));
            assert!(e <= TOL, "{sample}: {name} rel err {e} > {TOL}");
        };
        check("hook_embed", &caps.get(HookPoint::Embed).unwrap(), "hook_embed");
        for i in 0..n {
            check(
                &format!("blocks.{i}.hook_resid_post"),
                &caps.get(HookPoint::ResidPost(i)).unwrap(),
                &format!("resid_post.{i}"),
            );
        }
        check("hook_final_norm", &caps.get(HookPoint::FinalNorm).unwrap(), "final_norm");
        check("logits", &out.logits, "logits");
    }
}

/// The same embeddings through the decoder with plain 1-D positions (column index): the golden
/// must reject it, or the tests above could not catch an M-RoPE bug.
#[test]
fn plain_1d_rope_fails_the_golden() {
    let m = model();
    for sample in ["two", "resized"] {
        let input = reference_input(sample);
        let feats = m.image_features(std::slice::from_ref(&input)).unwrap().unwrap();
        let ids = Tensor::from_vec(input.ids.clone(), (1, input.ids.len()), &Device::Cpu).unwrap();
        let emb = m.decoder.embed(&ids).unwrap().squeeze(0).unwrap();
        // Scatter the image features into the pad rows, the same way the model does.
        let mut rows = Vec::new();
        let mut k = 0;
        for (i, &t) in input.ids.iter().enumerate() {
            if t == m.cfg.image_token_id {
                rows.push(feats.get(k).unwrap());
                k += 1;
            } else {
                rows.push(emb.get(i).unwrap());
            }
        }
        let xs = Tensor::stack(&rows, 0).unwrap().unsqueeze(0).unwrap();
        let mut state = m.decoder.new_state(vec![0]);
        let logits = m
            .decoder
            .forward_embeds(
                xs,
                &mut state,
                &StepInfo::prefill(vec![0]),
                &HookSpec::none(),
                &mut Captures::default(),
                true,
            )
            .unwrap();
        let want = r(&format!("{sample}.logits"));
        let e = rel_err(&logits.squeeze(0).unwrap(), &want);
        assert!(e > 100.0 * TOL, "{sample}: 1-D RoPE logits are within {e} of the golden: the test cannot see M-RoPE");
        // The text before the first image has identical positions under both schemes.
        let first_img = input.ids.iter().position(|&t| t == m.cfg.image_token_id).unwrap();
        let e0 = rel_err(
            &logits.squeeze(0).unwrap().narrow(0, 0, first_img).unwrap(),
            &want.narrow(0, 0, first_img).unwrap(),
        );
        assert!(e0 <= TOL, "{sample}: prefix before the image differs ({e0})");
    }
}

#[test]
fn greedy_decoding_with_rope_delta_matches_transformers() {
    let m = model();
    for sample in SAMPLES {
        let want = ids_of(&format!("{sample}.greedy_ids"));
        let cfg = GenerateConfig { max_new_tokens: want.len(), stop_ids: vec![], ..Default::default() };
        let got = m.generate(&[reference_input(sample)], &cfg, &HookSpec::none()).unwrap();
        assert_eq!(got[0].tokens, want, "{sample}: greedy ids");
    }
}

#[test]
fn left_padded_batch_matches_single_rows() {
    let m = model();
    // The last row repeats the first: its image goes through the vision tower once.
    let names = ["two", "resized", "text", "two"];
    let rows: Vec<VlmInput> = names.iter().map(|s| reference_input(s)).collect();
    let batch = m.prefill(&rows, &HookSpec::none(), &mut Captures::default(), false).unwrap();
    for (i, s) in names.iter().enumerate() {
        let want = r(&format!("{s}.logits"));
        let last = want.narrow(0, want.dim(0).unwrap() - 1, 1).unwrap();
        let e = rel_err(&batch.logits.get(i).unwrap(), &last);
        assert!(e <= TOL, "{s}: batched last logits rel err {e}");
    }
    let want: Vec<Vec<u32>> = names.iter().map(|s| ids_of(&format!("{s}.greedy_ids"))).collect();
    let cfg = GenerateConfig { max_new_tokens: want[0].len(), stop_ids: vec![], ..Default::default() };
    let got = m.generate(&rows, &cfg, &HookSpec::none()).unwrap();
    for (i, s) in names.iter().enumerate() {
        assert_eq!(got[i].tokens, want[i], "{s}: batched greedy ids");
    }
}

#[test]
fn modality_selectors_steer_image_or_text_positions() {
    let m = model();
    let input = reference_input("two");
    let h = m.cfg.text.hidden_size;
    let layer = 1;
    let v = Tensor::ones(h, DType::F32, &Device::Cpu).unwrap();
    let run = |spec: &HookSpec| {
        let mut caps = Captures::default();
        let out = m
            .prefill(
                &[input.clone(), input.clone()],
                &spec.clone().capture(HookPoint::ResidPost(layer)),
                &mut caps,
                true,
            )
            .unwrap();
        (out.logits, caps.get(HookPoint::ResidPost(layer)).unwrap())
    };
    let (base, base_resid) = run(&HookSpec::none());
    // α = 0 on both rows: bit-identical to no hook.
    let (zero, _) =
        run(&HookSpec::none().add(HookPoint::ResidPost(layer), v.clone(), vec![0.0, 0.0], Positions::Image));
    assert_eq!(
        zero.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        base.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    let is_img: Vec<bool> = input.ids.iter().map(|&t| t == m.cfg.image_token_id).collect();
    for (sel, want_changed) in [(Positions::Image, true), (Positions::Text, false)] {
        let (_, resid) = run(&HookSpec::none().add(HookPoint::ResidPost(layer), v.clone(), vec![0.0, 2.0], sel));
        let d = (&resid - &base_resid).unwrap().abs().unwrap().sum(2).unwrap().to_vec2::<f32>().unwrap();
        assert!(d[0].iter().all(|&x| x == 0.0), "{sel}: the α = 0 row changed");
        for (c, &img) in is_img.iter().enumerate() {
            let changed = (d[1][c] - 2.0 * h as f32).abs() < 1e-3;
            assert_eq!(changed, img == want_changed, "{sel}: column {c} (image: {img}) changed: {changed}");
        }
    }
}

/// `qwen-vl-2b` resolves offline from an hf-hub cache (`$HF_HOME/hub/models--Qwen--Qwen2-VL-2B-
/// Instruct/{refs/main, snapshots/<rev>/}`), here filled with the tiny checkpoint's files.
#[test]
fn registry_alias_loads_from_the_hf_hub_cache() {
    let home = tempfile::tempdir().unwrap();
    let repo = home.path().join("hub").join("models--Qwen--Qwen2-VL-2B-Instruct");
    let rev = "0123456789abcdef0123456789abcdef01234567";
    let snap = repo.join("snapshots").join(rev);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), rev).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.json"] {
        std::os::unix::fs::symlink(common::fixture(DIR).join(f), snap.join(f)).unwrap();
    }
    // Only this test reads HF_HOME in this binary.
    std::env::set_var("HF_HOME", home.path());
    let m = Qwen2Vl::load("qwen-vl-2b", &Device::Cpu, WeightDType::F32).unwrap();
    std::env::remove_var("HF_HOME");
    assert_eq!((m.info.name.as_str(), m.info.checkpoint.as_str()), ("qwen-vl-2b", "Qwen/Qwen2-VL-2B-Instruct"));
    assert_eq!(m.info.family, "qwen2-vl");
    assert_eq!(m.cfg.text.num_layers, 3);
}

/// Text-only prompts: M-RoPE's three ids are equal, so the LLM loaded by the text path (plain
/// decoder, 1-D RoPE) matches the golden too.
#[test]
fn text_path_loads_the_llm_of_a_qwen2_vl_directory() {
    let dir = common::fixture(DIR);
    let lm =
        miniwob_steer::models::load::LoadedModel::load(dir.to_str().unwrap(), &Device::Cpu, WeightDType::F32).unwrap();
    let ids = ids_of("text.input_ids");
    let t = Tensor::from_vec(ids.clone(), (1, ids.len()), &Device::Cpu).unwrap();
    let mut state = lm.decoder.new_state(vec![0]);
    let logits = lm
        .decoder
        .forward(&t, &mut state, &StepInfo::prefill(vec![0]), &HookSpec::none(), &mut Captures::default(), true)
        .unwrap();
    let e = rel_err(&logits.squeeze(0).unwrap(), &r("text.logits"));
    assert!(e <= TOL, "text-only logits through the text path: rel err {e}");
}

/// Forked generation (one prefill of the prompt but its last token, KV cache forked into the
/// rows, per-row steering from the last token on) equals generating the rows separately.
#[test]
fn forked_generation_equals_the_plain_batch() {
    let m = model();
    let h = m.cfg.text.hidden_size;
    let v = Tensor::ones(h, DType::F32, &Device::Cpu).unwrap();
    let spec = HookSpec::none().add(HookPoint::ResidPost(1), v, vec![0.0, 3.0, -3.0], Positions::Last);
    let cfg = GenerateConfig { max_new_tokens: 6, stop_ids: vec![], ..Default::default() };
    for sample in SAMPLES {
        let input = reference_input(sample);
        let plain = m.generate(&vec![input.clone(); 3], &cfg, &spec).unwrap();
        let forked = m.generate_forked(&input, 3, &cfg, &spec).unwrap();
        let toks =
            |g: &[miniwob_steer::models::generate::Generation]| g.iter().map(|x| x.tokens.clone()).collect::<Vec<_>>();
        assert_eq!(toks(&forked), toks(&plain), "{sample}");
        assert_eq!(forked[0].tokens, ids_of(&format!("{sample}.greedy_ids")), "{sample}: α = 0 row is the golden");
        assert_ne!(forked[1].tokens, forked[0].tokens, "{sample}: steering had no effect");
    }
}
