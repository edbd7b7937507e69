//! `src/interp/` against transformers and numpy (tests/fixtures/lens, scripts/goldens/lens_goldens.py):
//! image-position hidden states of every layer of the tiny Qwen2-VL on two aspect ratios, the
//! embedding / logit / contextual lenses' top-k on the same vectors, the seeded reservoir, the
//! cross-layer merge, and the logit lens at the last layer against the model's own logits; on
//! qwen-coder-0.5b (real weights) the logit lens of the last layer against greedy next tokens.
mod common;

use candle_core::{DType, Device, Tensor};
use miniwob_steer::interp::extract::{self, vision_cells};
use miniwob_steer::interp::index::{self, Index, IndexMeta, IndexWriter};
use miniwob_steer::interp::lens::{self, EmbeddingLens};
use miniwob_steer::interp::parse_points;
use miniwob_steer::models::hooks::{HookPoint, Positions};
use miniwob_steer::models::qwen2_vl::Qwen2Vl;
use miniwob_steer::models::WeightDType;
use serde_json::Value;
use std::collections::HashMap;

fn golden() -> (HashMap<String, Tensor>, Value) {
    let dir = common::fixture("lens");
    let t = candle_core::safetensors::load(dir.join("hidden.safetensors"), &Device::Cpu).unwrap();
    (t, common::fixture_json("lens", "lens.json"))
}

fn tiny() -> Qwen2Vl {
    Qwen2Vl::load_dir(&common::fixture("tiny-qwen2-vl"), "tiny", "tiny", &Device::Cpu, WeightDType::F32).unwrap()
}

fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let m = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    d / m.max(1.0)
}

fn i64s(t: &Tensor) -> Vec<i64> {
    t.to_vec1::<i64>().unwrap()
}

#[test]
fn image_hidden_states_match_transformers_on_two_aspect_ratios() {
    let (g, meta) = golden();
    let m = tiny();
    let n = m.decoder.cfg.num_layers;
    // Every hidden_states entry (hs:3 = hook_final_norm) and the last block's output.
    let mut points =
        parse_points(&format!("hs:{}", (0..=n).map(|j| j.to_string()).collect::<Vec<_>>().join(",")), n).unwrap();
    points.push(HookPoint::ResidPost(n - 1));
    for name in ["wide", "tall"] {
        let img = image::open(common::fixture("tiny-qwen2-vl").join(format!("images/{name}.png"))).unwrap().to_rgb8();
        let size = (img.width() as usize, img.height() as usize);
        let input = m.user_prompt(&[img], meta["text"].as_str().unwrap()).unwrap();
        assert_eq!(
            input.ids.iter().map(|&i| i as i64).collect::<Vec<_>>(),
            i64s(&g[&format!("{name}.input_ids")]),
            "{name}: ids"
        );
        let e = extract::extract_vlm(&m, &input, &[size], &points, Positions::Image).unwrap();
        let want_pos = i64s(&g[&format!("{name}.image_positions")]);
        assert_eq!(e.positions.iter().map(|&p| p as i64).collect::<Vec<_>>(), want_pos, "{name}: image positions");
        let thw = i64s(&g[&format!("{name}.grid_thw")]);
        assert_eq!(input.images[0].grid_thw.map(|x| x as i64).to_vec(), thw);
        assert_eq!(e.grid.len() as i64, thw[0] * thw[1] * thw[2] / 4, "{name}: one cell per merged token");
        // Cells against transformers' M-RoPE row/column ids of the same tokens.
        let hw = g[&format!("{name}.rope_hw")].to_vec2::<i64>().unwrap();
        for (c, r) in e.grid.iter().zip(&hw) {
            assert_eq!([c[1] as i64, c[2] as i64], [r[0], r[1]], "{name}: grid cell");
        }
        assert_eq!(e.grid.last().unwrap()[1..], [(thw[1] / 2 - 1) as usize, (thw[2] / 2 - 1) as usize]);
        let last_box = e.boxes.last().unwrap();
        assert!((last_box[2] - size.0 as f32).abs() < 1e-3 && (last_box[3] - size.1 as f32).abs() < 1e-3);
        for (k, p) in points.iter().enumerate() {
            let key = if *p == HookPoint::ResidPost(n - 1) {
                format!("{name}.resid_post_last")
            } else {
                format!("{name}.hs.{k}")
            };
            let err = max_rel(&e.states[k], &g[&key]);
            assert!(err < 1e-4, "{name} {p} vs {key}: max rel err {err}");
        }
    }
}

fn check_topk(what: &str, got: &[Vec<(u32, f32)>], want: &Value) {
    let want = want.as_array().unwrap();
    assert_eq!(got.len(), want.len(), "{what}: rows");
    for (t, (g, w)) in got.iter().zip(want).enumerate() {
        let ids: Vec<u32> = w[0].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        let sc: Vec<f32> = w[1].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
        assert_eq!(g.iter().map(|x| x.0).collect::<Vec<_>>(), ids, "{what} token {t}: ids");
        for (a, b) in g.iter().map(|x| x.1).zip(&sc) {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{what} token {t}: score {a} vs {b}");
        }
    }
}

fn query_vectors(g: &HashMap<String, Tensor>, name: &str, hook: &str, n: usize) -> Tensor {
    let p: HookPoint = hook.parse().unwrap();
    match p {
        HookPoint::Embed => g[&format!("{name}.hs.0")].clone(),
        HookPoint::ResidPost(i) if i == n - 1 => g[&format!("{name}.resid_post_last")].clone(),
        HookPoint::ResidPost(i) => g[&format!("{name}.hs.{}", i + 1)].clone(),
        _ => unreachable!(),
    }
}

/// The golden index (numpy's vectors, f16) written through IndexWriter and read back memory-mapped.
fn golden_index(dir: &std::path::Path, meta: &Value) -> Index {
    let t = candle_core::safetensors::load(common::fixture("lens").join("index.safetensors"), &Device::Cpu).unwrap();
    let layers: Vec<String> =
        meta["index_layers"].as_array().unwrap().iter().map(|l| format!("blocks.{}.hook_resid_post", l)).collect();
    let vecs: Vec<Vec<Vec<f32>>> =
        layers.iter().map(|l| t[&format!("layer.{l}")].to_dtype(DType::F32).unwrap().to_vec2().unwrap()).collect();
    let im = IndexMeta {
        model: "tiny".into(),
        adapter: None,
        weights_hash: String::new(),
        hook_points: layers,
        hidden: vecs[0][0].len(),
        slots: 0,
        per_token: 2,
        min_position: 2,
        seed: 7,
        corpus: "golden".into(),
        sentences: 0,
        occurrences: 0,
        dtype: String::new(),
    };
    let mut w = IndexWriter::create(dir, im).unwrap();
    let (ids, sents, pos) = (i64s(&t["slot_token_id"]), i64s(&t["slot_sentence"]), i64s(&t["slot_position"]));
    let keys = meta["slot_keys"].as_array().unwrap();
    for s in 0..ids.len() {
        let rows: Vec<&[f32]> = vecs.iter().map(|v| v[s].as_slice()).collect();
        w.push_slot(keys[s].as_str().unwrap(), ids[s] as u32, sents[s] as u32, pos[s] as u32, &rows).unwrap();
    }
    w.finish().unwrap();
    let mut ix = Index::open(dir).unwrap();
    ix.chunk_rows = 7; // several chunks per layer: the chunked top-k must equal the brute force
    ix
}

#[test]
fn lenses_match_numpy_brute_force() {
    let (g, meta) = golden();
    let m = tiny();
    let n = m.decoder.cfg.num_layers;
    let k = meta["k"].as_u64().unwrap() as usize;
    let emb = EmbeddingLens::new(&m.decoder).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ix = golden_index(dir.path(), &meta);
    let mut checked = 0;
    for name in ["wide", "tall"] {
        for (hook, want) in meta["lens"][name].as_object().unwrap() {
            let q = query_vectors(&g, name, hook, n);
            check_topk(&format!("{name} {hook} embedding"), &emb.topk(&q, k).unwrap(), &want["embedding"]);
            let p: HookPoint = hook.parse().unwrap();
            check_topk(
                &format!("{name} {hook} logit"),
                &lens::logit_lens(&m.decoder, p, &q, k).unwrap(),
                &want["logit"],
            );
            let hits = ix.query(&q, k).unwrap();
            for (t, (h, w)) in hits.iter().zip(want["contextual"].as_array().unwrap()).enumerate() {
                let w = w.as_array().unwrap();
                assert_eq!(h.len(), w.len());
                for (a, b) in h.iter().zip(w) {
                    let layer = meta["index_layers"][a.layer].as_u64().unwrap();
                    assert_eq!(
                        (layer, a.slot as u64),
                        (b[0].as_u64().unwrap(), b[1].as_u64().unwrap()),
                        "{name} {hook} contextual token {t}"
                    );
                    let s = b[2].as_f64().unwrap() as f32;
                    assert!((a.score - s).abs() <= 1e-5, "{name} {hook} contextual token {t}: {} vs {s}", a.score);
                }
                // The merge really mixes layers somewhere, or the test would not test it.
                checked += (h.iter().map(|x| x.layer).collect::<std::collections::BTreeSet<_>>().len() > 1) as usize;
            }
        }
    }
    assert!(checked > 0, "no query merged hits from two layers");
}

#[test]
fn logit_lens_at_the_last_layer_is_the_models_logits() {
    let (g, meta) = golden();
    let m = tiny();
    let n = m.decoder.cfg.num_layers;
    let last = HookPoint::ResidPost(n - 1);
    for name in ["wide", "tall"] {
        let img = image::open(common::fixture("tiny-qwen2-vl").join(format!("images/{name}.png"))).unwrap().to_rgb8();
        let input = m.user_prompt(&[img], meta["text"].as_str().unwrap()).unwrap();
        let mut caps = Default::default();
        let pre =
            m.prefill(std::slice::from_ref(&input), &miniwob_steer::models::HookSpec::none(), &mut caps, true).unwrap();
        let e = extract::extract_vlm(&m, &input, &[(1, 1)], &[last], Positions::Image).unwrap();
        let lens_logits = lens::logit_lens_logits(&m.decoder, last, &e.states[0]).unwrap();
        let idx = Tensor::from_vec(
            e.positions.iter().map(|&p| p as u32).collect::<Vec<_>>(),
            e.positions.len(),
            &Device::Cpu,
        )
        .unwrap();
        let own = pre.logits.squeeze(0).unwrap().index_select(&idx, 0).unwrap();
        assert!(max_rel(&lens_logits, &own) < 1e-6, "{name}: lens vs own logits {}", max_rel(&lens_logits, &own));
        let err = max_rel(&lens_logits, &g[&format!("{name}.logits")]);
        assert!(err < 1e-4, "{name}: lens vs transformers logits {err}");
        // An earlier layer's lens is not the output (the check can tell layers apart).
        let e0 = extract::extract_vlm(&m, &input, &[(1, 1)], &[HookPoint::ResidPost(0)], Positions::Image).unwrap();
        let l0 = lens::logit_lens_logits(&m.decoder, HookPoint::ResidPost(0), &e0.states[0]).unwrap();
        assert!(max_rel(&l0, &own) > 1e-2);
    }
}

#[test]
fn reservoir_index_matches_python() {
    let (_, meta) = golden();
    let m = tiny();
    let corpus: Vec<String> =
        meta["corpus"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect();
    let points: Vec<HookPoint> = meta["index_layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| HookPoint::ResidPost(l.as_u64().unwrap() as usize))
        .collect();
    let im = IndexMeta {
        model: "tiny".into(),
        adapter: None,
        weights_hash: String::new(),
        hook_points: points.iter().map(|p| p.to_string()).collect(),
        hidden: m.decoder.cfg.hidden_size,
        slots: 0,
        per_token: meta["per_token"].as_u64().unwrap() as usize,
        min_position: meta["min_position"].as_u64().unwrap() as usize,
        seed: meta["seed"].as_u64().unwrap(),
        corpus: "golden".into(),
        sentences: 0,
        occurrences: 0,
        dtype: String::new(),
    };
    let dir = tempfile::tempdir().unwrap();
    // Batches of 3 left-padded sentences: padding must not shift positions or keys.
    let built = index::build(&m.decoder, &m.tokenizer, &corpus, &points, im, dir.path(), 3).unwrap();
    let t = candle_core::safetensors::load(common::fixture("lens").join("index.safetensors"), &Device::Cpu).unwrap();
    let ix = Index::open(dir.path()).unwrap();
    let want_ids = i64s(&t["slot_token_id"]);
    assert_eq!(built.slots, want_ids.len());
    assert!(built.occurrences as usize > 2 * want_ids.len() / 2, "the corpus must overflow the reservoir");
    let got: Vec<[i64; 3]> = ix.slots.iter().map(|s| [s[1] as i64, s[2] as i64, s[3] as i64]).collect();
    let want: Vec<[i64; 3]> = (0..want_ids.len())
        .map(|s| [want_ids[s], i64s(&t["slot_sentence"])[s], i64s(&t["slot_position"])[s]])
        .collect();
    assert_eq!(got, want, "reservoir slots (token id, sentence, position)");
    let keys: Vec<String> = ix.slots.iter().map(|s| ix.keys[s[0] as usize].clone()).collect();
    let want_keys: Vec<String> =
        meta["slot_keys"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect();
    assert_eq!(keys, want_keys);
    for (k, p) in points.iter().enumerate() {
        let a = ix.rows(k, 0, built.slots, &Device::Cpu).unwrap();
        let b = t[&format!("layer.{p}")].to_dtype(DType::F32).unwrap();
        // Both sides round unit vectors to f16; inputs differ by float noise, so at most 1-2 ulp.
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 2e-3, "{p}: stored vectors differ by {d}");
    }
}

#[test]
fn cells_follow_the_resize() {
    // The Set-of-Marks screenshot: 320×420 → smart_resize 308×420 → 22×30 patches → 11×15 cells.
    let (g, b) = vision_cells([1, 30, 22], 2, 14, 320, 420);
    assert_eq!(g.len(), 165);
    let w = 28.0 * 320.0 / 308.0;
    assert!((b[1][0] - w).abs() < 1e-4 && (b[11][1] - 28.0).abs() < 1e-4, "{:?} {:?}", b[1], b[11]);
}

/// Real weights, text positions: the logit lens of the last layer is the model's next-token
/// prediction at every position of the goldens' prompts, and at the last position the
/// transformers greedy token.
#[test]
fn qwen_coder_logit_lens_predicts_greedy_next_tokens() {
    common::gguf_path("qwen-coder-0.5b");
    let lm = miniwob_steer::models::load::LoadedModel::load("qwen-coder-0.5b", &Device::Cpu, WeightDType::F32).unwrap();
    let n = lm.decoder.cfg.num_layers;
    let last = HookPoint::ResidPost(n - 1);
    let cases = common::fixture_json("qwen2", "logits.json");
    let mut positions = 0;
    for c in cases["cases"].as_array().unwrap() {
        let ids: Vec<u32> = c["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        let e = extract::extract_text(&lm.decoder, &ids, 0, &[last]).unwrap();
        let top = lens::logit_lens(&lm.decoder, last, &e.states[0], 1).unwrap();
        // The model's own greedy choice at every position (one forward with all logits).
        let t = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let mut st = lm.decoder.new_state(vec![0]);
        let logits = lm
            .decoder
            .forward(
                &t,
                &mut st,
                &miniwob_steer::models::StepInfo::prefill(vec![0]),
                &Default::default(),
                &mut Default::default(),
                true,
            )
            .unwrap();
        let own = logits.squeeze(0).unwrap().argmax(1).unwrap().to_vec1::<u32>().unwrap();
        assert_eq!(top.iter().map(|r| r[0].0).collect::<Vec<_>>(), own, "{}", c["prompt"]);
        assert_eq!(
            top.last().unwrap()[0].0 as u64,
            c["greedy"][0].as_u64().unwrap(),
            "{}: transformers' greedy token",
            c["prompt"]
        );
        positions += ids.len();
    }
    assert!(positions > 50);
}

/// The in-loop read-out (`run --vlm --lens`): the tokens under a box, their contextual hits
/// pooled, one per token string, best first, equal to the same pooling of numpy's top-k.
#[test]
fn readout_pools_the_tokens_under_a_box() {
    let (g, meta) = golden();
    let dir = tempfile::tempdir().unwrap();
    let mut ix = golden_index(dir.path(), &meta);
    let hook = "blocks.1.hook_resid_post";
    let q = query_vectors(&g, "wide", hook, 3);
    // wide.png is 112×56: 2×4 cells of 28 px; this box covers cells 1 and 2 of the first row.
    let (_, boxes) = vision_cells([1, 4, 8], 2, 14, 112, 56);
    let (n, top) = index::readout(&mut ix, &q, &boxes, [30.0, 2.0, 80.0, 20.0], 3).unwrap();
    assert_eq!(n, 2);
    let keys = meta["slot_keys"].as_array().unwrap();
    let mut pooled: Vec<(f64, u64, u64)> = Vec::new();
    for t in [1, 2] {
        for h in meta["lens"]["wide"][hook]["contextual"][t].as_array().unwrap() {
            pooled.push((h[2].as_f64().unwrap(), h[0].as_u64().unwrap(), h[1].as_u64().unwrap()));
        }
    }
    pooled.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let mut want: Vec<(String, f64)> = Vec::new();
    for (s, _, slot) in pooled {
        let k = keys[slot as usize].as_str().unwrap().to_string();
        if !want.iter().any(|w| w.0 == k) {
            want.push((k, s));
        }
    }
    want.truncate(3);
    assert_eq!(
        top.iter().map(|t| t.0.clone()).collect::<Vec<_>>(),
        want.iter().map(|w| w.0.clone()).collect::<Vec<_>>()
    );
    for (a, b) in top.iter().zip(&want) {
        assert!((a.1 as f64 - b.1).abs() < 1e-5);
    }
    // A box between cells overlaps nothing.
    assert_eq!(index::readout(&mut ix, &q, &boxes, [200.0, 0.0, 210.0, 5.0], 3).unwrap(), (0, vec![]));
}
