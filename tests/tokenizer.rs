//! Tokenizers built from GGUF metadata against transformers (tests/fixtures/{smollm2,qwen2}/,
//! made by scripts/goldens/smollm2_tokenizer.py): identical ids, decoded text and chat templates.
mod common;

use miniwob_steer::models::tokenizer::{ChatMessage, Tokenizer};
use serde_json::Value;

fn tokenizer(alias: &str) -> Tokenizer {
    let path = common::gguf_path(alias);
    let content = miniwob_steer::models::gguf::read(&path).unwrap();
    Tokenizer::from_gguf(&content).unwrap()
}

fn check_ids(alias: &str, fixture: &str) {
    let tok = tokenizer(alias);
    let doc = common::fixture_json(fixture, "tokens.json");
    let meta = &doc["meta"];
    assert_eq!(tok.vocab_size() as u64, meta["vocab_size"].as_u64().unwrap(), "{alias} vocab size");
    assert_eq!(tok.eos_token_id().map(u64::from), meta["eos_token_id"].as_u64(), "{alias} eos");
    let cases = doc["cases"].as_array().unwrap();
    assert!(cases.len() >= 8);
    let mut failures = vec![];
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let want: Vec<u32> = c["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        let want_special: Vec<u32> =
            c["ids_special"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        let got = tok.encode(text, false).unwrap();
        if got != want {
            failures.push(format!("{text:?}: ids {got:?}, transformers {want:?}"));
            continue;
        }
        let got_special = tok.encode(text, true).unwrap();
        if got_special != want_special {
            failures.push(format!("{text:?}: ids with special tokens {got_special:?}, transformers {want_special:?}"));
        }
        let decoded = tok.decode(&got, false).unwrap();
        if decoded != c["decoded"].as_str().unwrap() {
            failures.push(format!("{text:?}: decoded {decoded:?}, transformers {:?}", c["decoded"]));
        }
    }
    assert!(failures.is_empty(), "{alias}: {} mismatches:\n{}", failures.len(), failures.join("\n"));
}

fn check_chat(alias: &str, fixture: &str) {
    let tok = tokenizer(alias);
    let doc = common::fixture_json(fixture, "chat.json");
    for c in doc.as_array().unwrap() {
        let messages: Vec<ChatMessage> = serde_json::from_value(c["messages"].clone()).unwrap();
        let agp = c["add_generation_prompt"].as_bool().unwrap();
        let got = tok.apply_chat_template(&messages, agp).unwrap();
        assert_eq!(got, c["text"].as_str().unwrap(), "{alias}: chat template differs for {messages:?} (agp {agp})");
    }
}

#[test]
fn smollm2_ids_match_transformers() {
    check_ids("smollm2-135m", "smollm2");
}

#[test]
fn smollm2_chat_template_matches_transformers() {
    check_chat("smollm2-135m", "smollm2");
}

#[test]
fn qwen_coder_ids_match_transformers() {
    check_ids("qwen-coder-0.5b", "qwen2");
}

#[test]
fn qwen_coder_chat_template_matches_transformers() {
    check_chat("qwen-coder-0.5b", "qwen2");
}

#[test]
fn smollm2_hello_is_one_token() {
    // DESIGN.md §9: candle's own GGUF tokenizer helper gets this wrong (prefix space).
    let tok = tokenizer("smollm2-135m");
    assert_eq!(tok.encode("Hello", false).unwrap(), vec![19556]);
    let v: Value = common::fixture_json("smollm2", "tokens.json");
    assert_eq!(v["cases"][0]["ids"][0].as_u64(), Some(19556));
}
