//! Prefix sharing (DESIGN.md §3) against unshared runs on smollm2-135m f32: a forked row's
//! logits equal a full prefill's within 1e-5 relative, an α = 0 row beside a steered one is
//! bit-identical to no hook at all, and CAA's pair-wise shared prefill reads the same
//! last-position states as a plain padded batch.
use candle_core::{Device, Tensor};
use miniwob_steer::models::generate::{last_states_shared, prefill, prefill_forked};
use miniwob_steer::models::hooks::{HookPoint, HookSpec, Positions};
use miniwob_steer::models::load::LoadedModel;
use miniwob_steer::models::tokenizer::ChatMessage;
use miniwob_steer::models::weights::WeightDType;

fn model() -> LoadedModel {
    LoadedModel::load("smollm2-135m", &Device::Cpu, WeightDType::F32)
        .unwrap_or_else(|e| panic!("smollm2-135m is needed: run ./scripts/setup.sh ({e:#})"))
}

fn chat(m: &LoadedModel, s: &str) -> Vec<u32> {
    let t = m.tokenizer.apply_chat_template(&[ChatMessage::new("user", s)], true).unwrap();
    m.tokenizer.encode(&t, false).unwrap()
}

fn unit_vector(h: usize) -> Tensor {
    let v: Vec<f32> = (0..h).map(|i| ((i * 7919 % 97) as f32 - 48.0) / 48.0).collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    Tensor::from_vec(v.into_iter().map(|x| x / norm).collect::<Vec<_>>(), h, &Device::Cpu).unwrap()
}

/// max |a − b| / max |b|.
fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max) / scale
}

const TASK: &str = "Task: Click on the \"Ok\" button.\n\nPage elements:\n<button ref=4>Ok</button>\n<button ref=5>Cancel</button>\n\nAnswer with the action line(s) only.";

#[test]
fn forked_rows_match_an_unshared_prefill_and_alpha_zero_is_bit_identical() {
    let m = model();
    let pad = m.tokenizer.pad_token_id().unwrap_or(0);
    let a = chat(&m, TASK);
    let b = chat(&m, "Task: Focus into the text field.\n\nPage elements:\n<input_text ref=3>");
    let v = unit_vector(m.info.hidden_size);
    // Rows: a baseline, a steered, b steered, a steered the other way.
    let coeffs = vec![0.0, 8.0, 8.0, -8.0];
    let spec = HookSpec::none().add(HookPoint::ResidPost(10), v, coeffs, Positions::Last);
    let prompts = vec![a.clone(), a.clone(), b.clone(), a.clone()];
    let (plain, _, _) = prefill(&m.decoder, &prompts, pad, &spec).unwrap();
    let (_, forked) = prefill_forked(&m.decoder, &[&a, &b], &[0, 0, 1, 0], &spec, None).unwrap();
    let forked = forked.squeeze(1).unwrap();
    for r in 0..prompts.len() {
        let d = rel_diff(&forked.get(r).unwrap(), &plain.get(r).unwrap());
        assert!(d <= 1e-5, "row {r}: forked logits differ from the unshared prefill by {d:e} (relative)");
    }
    // The steering is real: the steered row's logits move.
    assert!(rel_diff(&forked.get(1).unwrap(), &forked.get(0).unwrap()) > 1e-3);

    // α = 0 next to steered rows gives exactly the logits of a run without any hook.
    let (_, none) = prefill_forked(&m.decoder, &[&a, &b], &[0, 0, 1, 0], &HookSpec::none(), None).unwrap();
    let none = none.squeeze(1).unwrap();
    let (x, y): (Vec<f32>, Vec<f32>) =
        (forked.get(0).unwrap().to_vec1().unwrap(), none.get(0).unwrap().to_vec1().unwrap());
    assert!(x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()), "α = 0 row is not bit-identical");

    // Selectors other than `last` would see a different prompt split: refused.
    let v = unit_vector(m.info.hidden_size);
    let all = HookSpec::none().add(HookPoint::ResidPost(10), v, vec![1.0], Positions::All);
    let e = prefill_forked(&m.decoder, &[&a], &[0], &all, None).unwrap_err().to_string();
    assert!(e.contains("`last` position selector"), "{e}");
}

#[test]
fn caa_pairs_share_their_prefix_and_read_the_same_states() {
    let m = model();
    let pad = m.tokenizer.pad_token_id().unwrap_or(0);
    // A pair: the same task prompt, then instructions of different lengths (two length groups),
    // and a third row of yet another length.
    let p = chat(&m, &format!("{TASK}\n\nBe accurate."));
    let n = chat(&m, &format!("{TASK}\n\nAnswer quickly without checking the page carefully."));
    let q = chat(&m, &format!("{TASK}\n\nBe careful and precise."));
    assert_ne!(p.len(), n.len());
    let layers = [3usize, 15, 29];
    let mut spec = HookSpec::none();
    for &l in &layers {
        spec = spec.capture(HookPoint::ResidPost(l));
    }
    let prompts = vec![p, n, q];
    let (logits, states) = last_states_shared(&m.decoder, &prompts, pad, &spec, None).unwrap();
    let (plain_logits, caps, _) = prefill(&m.decoder, &prompts, pad, &spec).unwrap();
    for r in 0..prompts.len() {
        let d = rel_diff(&logits.get(r).unwrap(), &plain_logits.get(r).unwrap());
        assert!(d <= 1e-5, "row {r} logits: {d:e}");
        for &l in &layers {
            let h = caps.get(HookPoint::ResidPost(l)).unwrap();
            let seq = h.dim(1).unwrap();
            let want = h.get(r).unwrap().get(seq - 1).unwrap();
            let got = states[&HookPoint::ResidPost(l)].get(r).unwrap();
            let d = rel_diff(&got, &want);
            assert!(d <= 1e-5, "row {r} layer {l}: {d:e}");
        }
    }
    let v = unit_vector(m.info.hidden_size);
    let steer = HookSpec::none().add(HookPoint::ResidPost(3), v, vec![1.0; 3], Positions::Last);
    assert!(last_states_shared(&m.decoder, &prompts, pad, &steer, None).is_err(), "interventions are refused");
}

/// The prefix cache: a prefix served from it gives the keys and values of prefilling it, bit for
/// bit; the byte bound holds, evicting the deepest blocks first so what stays is reachable.
#[test]
fn prefix_cache_serves_exact_prefixes_within_its_bound() {
    use miniwob_steer::models::prefix_cache::{prefill_prefix, PrefixCache, BLOCK};
    let m = model();
    let a = chat(&m, TASK);
    assert!(a.len() > 3 * BLOCK, "{} tokens", a.len());
    let bits = |s: &miniwob_steer::models::State| -> Vec<Vec<u32>> {
        s.kv.iter()
            .flatten()
            .flat_map(|(k, v)| [k, v])
            .map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f32::to_bits).collect())
            .collect()
    };
    let plain = prefill_prefix(&m.decoder, &a, None).unwrap();
    let mut cache = PrefixCache::new(64);
    let first = prefill_prefix(&m.decoder, &a, Some(&mut cache)).unwrap();
    let second = prefill_prefix(&m.decoder, &a, Some(&mut cache)).unwrap();
    assert_eq!(bits(&first), bits(&plain));
    assert_eq!(bits(&second), bits(&plain), "served from the cache");
    let st = cache.stats();
    assert_eq!(st.hit_tokens as usize, a.len() / BLOCK * BLOCK, "whole blocks of the second call: {st:?}");
    assert_eq!(st.computed_tokens as usize, a.len() + a.len() % BLOCK, "{st:?}");
    // Another prompt with the same first block shares it.
    let mut b = a[..BLOCK].to_vec();
    b.extend(chat(&m, "Focus into the text field."));
    let shared = prefill_prefix(&m.decoder, &b, Some(&mut cache)).unwrap();
    assert_eq!(bits(&shared), bits(&prefill_prefix(&m.decoder, &b, None).unwrap()));
    assert_eq!(cache.stats().hit_tokens as usize, st.hit_tokens as usize + BLOCK);

    // One block of smollm2 is 30 layers × 2 × 3 kv heads × 16 × 64 × 4 bytes = 720 KiB: a 1 MiB
    // cache keeps one, the first.
    let mut small = PrefixCache::new(1);
    prefill_prefix(&m.decoder, &a, Some(&mut small)).unwrap();
    let s = small.stats();
    assert!(s.bytes <= 1 << 20 && s.blocks == 1, "{s:?}");
    assert_eq!(s.evicted_blocks as usize, a.len() / BLOCK - 1);
    let again = prefill_prefix(&m.decoder, &a, Some(&mut small)).unwrap();
    assert_eq!(small.stats().hit_tokens as usize, BLOCK, "the first block stayed");
    assert_eq!(bits(&again), bits(&plain));
}
