//! Qwen3 on the shared decoder against transformers 5.17 (tests/fixtures/tiny-qwen3, made by
//! scripts/goldens/qwen3_goldens.py): every hook point and the logits within 1e-4, steering, greedy
//! decoding, the chat template with `enable_thinking` absent, on and off, and the training forward.
mod common;

use candle_core::{DType, Device, Tensor};
use miniwob_steer::models::config::Family;
use miniwob_steer::models::goldens;
use miniwob_steer::models::load::decoder_from_dir;
use miniwob_steer::models::tokenizer::{ChatMessage, Tokenizer};
use miniwob_steer::models::{Captures, HookSpec, StepInfo, WeightDType};

const FIXTURE: &str = "tiny-qwen3";

#[test]
fn every_layer_logits_steering_and_greedy_match_transformers() {
    let rows = goldens::check_tiny(&common::fixture(FIXTURE), &Device::Cpu, WeightDType::F32).unwrap();
    // hook_embed, 3 × resid_post, final_norm, logits, top1, steered, moved, greedy, greedy steered.
    assert!(rows.len() >= 10, "only {} checks ran", rows.len());
    for want in ["blocks.2.hook_resid_post", "logits", "greedy_ids"] {
        assert!(rows.iter().any(|r| r.check.starts_with(want)), "no `{want}` check");
    }
    for r in rows {
        assert!(r.passed, "{}: {} = {} (needs {}) {}", r.check, r.metric, r.value, r.limit, r.detail);
    }
}

#[test]
fn config_is_qwen3_with_qk_norm_and_explicit_head_dim() {
    let (d, _) = decoder_from_dir(&common::fixture(FIXTURE), &Device::Cpu, WeightDType::F32).unwrap();
    assert_eq!(d.cfg.family, Family::Qwen3);
    assert!(d.cfg.qk_norm && !d.cfg.qkv_bias);
    // head_dim 16 with hidden 32 and 4 heads: the explicit field, not hidden / heads.
    assert_eq!((d.cfg.hidden_size, d.cfg.num_heads, d.cfg.head_dim), (32, 4, 16));
}

/// Without the q/k norms the decoder misses the golden: the goldens see them.
#[test]
fn dropping_the_qk_norms_fails_the_golden() {
    let dir = common::fixture(FIXTURE);
    let tmp = tempfile::tempdir().unwrap();
    for f in ["model.safetensors", "reference.safetensors"] {
        std::fs::copy(dir.join(f), tmp.path().join(f)).unwrap();
    }
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    cfg["model_type"] = "qwen2".into();
    cfg["architectures"] = serde_json::json!(["Qwen2ForCausalLM"]);
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    // Qwen2 wants QKV biases the checkpoint lacks: a clear missing-tensor error, not a silent load.
    let err = match decoder_from_dir(tmp.path(), &Device::Cpu, WeightDType::F32) {
        Ok(_) => panic!("a Qwen3 checkpoint loaded as Qwen2"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("q_proj.bias"), "{err}");
    cfg["attention_bias"] = false.into();
    cfg["model_type"] = "llama".into();
    cfg["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    let rows = goldens::check_tiny(tmp.path(), &Device::Cpu, WeightDType::F32).unwrap();
    let logits = rows.iter().find(|r| r.check == "logits").unwrap();
    assert!(!logits.passed, "the decoder without q/k norms still matched ({})", logits.value);
}

#[test]
fn chat_template_renders_like_transformers_with_thinking_absent_on_and_off() {
    let dir = common::fixture(FIXTURE);
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let renders = common::fixture_json(FIXTURE, "renders.json");
    let renders = renders.as_array().unwrap();
    assert_eq!(renders.len(), 12);
    let mut off_differs = 0;
    for r in renders {
        let msgs: Vec<ChatMessage> = serde_json::from_value(r["messages"].clone()).unwrap();
        let gen = r["add_generation_prompt"].as_bool().unwrap();
        let think = r["enable_thinking"].as_bool();
        let text = tok.apply_chat_template_thinking(&msgs, gen, think).unwrap();
        let want = r["text"].as_str().unwrap();
        assert_eq!(text, want, "{} (enable_thinking {think:?})", r["name"]);
        let ids = tok.encode(&text, false).unwrap();
        let want_ids: Vec<u32> = serde_json::from_value(r["ids"].clone()).unwrap();
        assert_eq!(ids, want_ids, "{} (enable_thinking {think:?}) ids", r["name"]);
        if think == Some(false) && gen {
            assert!(text.ends_with("<|im_start|>assistant\n<think>\n\n</think>\n\n"), "{text:?}");
            off_differs += 1;
        }
    }
    assert_eq!(off_differs, 3, "three conversations end with a user turn");
    // The default (absent) is thinking on.
    let m = [ChatMessage::new("user", "hi")];
    assert_eq!(
        tok.apply_chat_template(&m, true).unwrap(),
        tok.apply_chat_template_thinking(&m, true, Some(true)).unwrap()
    );
    assert_eq!(tok.token_to_id("<think>"), Some(384));
    assert_eq!(tok.token_to_id("</think>"), Some(385));
}

/// The graft trains through `Decoder::forward_train` (plain candle ops with a backward pass);
/// it must compute what the inference path computes.
#[test]
fn training_forward_matches_the_inference_forward() {
    let dir = common::fixture(FIXTURE);
    let (d, _) = decoder_from_dir(&dir, &Device::Cpu, WeightDType::F32).unwrap();
    let r = candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    let ids: Vec<u32> = r["input_ids"].to_vec1::<i64>().unwrap().iter().map(|&x| x as u32).collect();
    let t = Tensor::from_vec(ids.clone(), (1, ids.len()), &Device::Cpu).unwrap();
    let mut st = d.new_state(vec![0]);
    let inf =
        d.forward(&t, &mut st, &StepInfo::prefill(vec![0]), &HookSpec::none(), &mut Captures::default(), true).unwrap();
    let x = candle_core::Var::from_tensor(&d.embed(&t).unwrap()).unwrap();
    let train = d.forward_train(x.as_tensor(), 0).unwrap();
    let tail = d.forward_train(x.as_tensor(), 4).unwrap();
    assert_eq!(tail.dims()[1], ids.len() - 4);
    let d4 = (&tail - &train.narrow(1, 4, ids.len() - 4).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(d4, 0.0, "logits from position 4 differ from the full run's");
    let diff = (&train - &inf).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff < 1e-4, "training logits differ from inference by {diff}");
    let reference = r["logits"].to_dtype(DType::F32).unwrap();
    let diff = (&train - &reference).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff < 1e-4, "training logits differ from transformers by {diff}");
    // Gradients reach the input embeddings.
    let grads = train.sum_all().unwrap().backward().unwrap();
    let g = grads.get(x.as_tensor()).expect("no gradient for the input embeddings");
    assert!(g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0);
}

/// The tiny Qwen3 converted to GGUF by llama.cpp's own `gguf` package (its qwen3 tensor-name
/// map, `qwen3.attention.key_length` = 16 ≠ hidden/heads; scripts/goldens/qwen3_gguf.py)
/// against the transformers references of the safetensors checkpoint: f32 tensors read as f32
/// within the f32 tolerance with greedy tokens identical; Q8_0 kept quantized (our 8-bit kernel)
/// by cosine.
#[test]
fn gguf_conversions_match_transformers() {
    let dir = common::fixture(FIXTURE);
    for (file, dtype, exact) in
        [("model-f32.gguf", WeightDType::F32, true), ("model-q8_0.gguf", WeightDType::Gguf, false)]
    {
        let rows = goldens::check_tiny_gguf(&dir.join(file), &dir, &Device::Cpu, dtype, exact).unwrap();
        assert!(rows.iter().any(|r| r.check.starts_with("blocks.2.hook_resid_post")));
        if exact {
            assert!(rows.iter().any(|r| r.check == "greedy_ids"), "{file}: greedy not checked");
        }
        for r in rows {
            eprintln!("{file}: {} {} = {} (limit {})", r.check, r.metric, r.value, r.limit);
            assert!(r.passed, "{file}: {}: {} = {} (needs {}) {}", r.check, r.metric, r.value, r.limit, r.detail);
        }
    }
}
