//! The generator's prefix sharing (baseline and steered rows of one episode prefill their common
//! prefix once) gives the same greedy tokens as plain batched generation, steered rows included,
//! on smollm2-135m f32 and the real prompt builder's format.
use candle_core::{Device, Tensor};
use miniwob_steer::models::generate::{generate, generate_shared, GenerateConfig};
use miniwob_steer::models::hooks::{HookPoint, HookSpec, Positions};
use miniwob_steer::models::load::LoadedModel;
use miniwob_steer::models::tokenizer::ChatMessage;
use miniwob_steer::models::weights::WeightDType;

#[test]
fn prefix_sharing_matches_plain_generation() {
    let m = LoadedModel::load("smollm2-135m", &Device::Cpu, WeightDType::F32)
        .unwrap_or_else(|e| panic!("smollm2-135m is needed: run ./scripts/setup.sh ({e:#})"));
    let enc = |s: &str| {
        let t = m.tokenizer.apply_chat_template(&[ChatMessage::new("user", s)], true).unwrap();
        m.tokenizer.encode(&t, false).unwrap()
    };
    let a = enc("Task: Click on the \"Ok\" button.\n\nPage elements:\n<button ref=4>Ok</button>\n<button ref=5>Cancel</button>\n\nAnswer with the action line(s) only.");
    let b = enc("Task: Focus into the text field.\n\nPage elements:\n<input_text ref=3>\n\nAnswer with the action line(s) only.");
    let prompts = vec![a.clone(), a.clone(), b.clone(), b, a];
    let h = m.info.hidden_size;
    let v: Vec<f32> = (0..h).map(|i| ((i * 7919 % 97) as f32 - 48.0) / 48.0).collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let v = Tensor::from_vec(v.into_iter().map(|x| x / norm).collect::<Vec<_>>(), h, &Device::Cpu).unwrap();
    let spec = HookSpec::none().add(HookPoint::ResidPost(15), v, vec![0.0, 20.0, 0.0, 20.0, -20.0], Positions::Last);
    let cfg = GenerateConfig {
        max_new_tokens: 12,
        stop_ids: m.tokenizer.stop_token_ids(),
        pad_id: m.tokenizer.pad_token_id().unwrap_or(0),
        ..Default::default()
    };
    let plain = generate(&m.decoder, &prompts, &cfg, &spec, &mut Default::default()).unwrap();
    let shared = generate_shared(&m.decoder, &prompts, &cfg, &spec, None).unwrap();
    for (i, (p, s)) in plain.iter().zip(&shared).enumerate() {
        assert_eq!(p.tokens, s.tokens, "row {i}");
        assert_eq!(p.prompt_tokens, s.prompt_tokens);
    }
    // The steering does something (rows 0 and 1 share the prompt and differ by α).
    assert_ne!(plain[0].tokens, plain[1].tokens, "α = 20 should change the greedy output");
}
