//! Protocols (docs/protocols.md): the default protocol renders exactly what the hard-coded prompt
//! builder did, every key changes its own part and nothing else, the CAA read points, the
//! `response-text` method and the repetition penalty match transformers on the real
//! Qwen2.5-Coder-0.5B GGUF (f32), the env keys act on real Chromium pages, and `run --plan` /
//! `--protocol` work end to end on smollm2.
mod common;

use candle_core::Device;
use miniwob_steer::agent::PromptBuilder;
use miniwob_steer::env::{Action, EnvConfig, Observation, Pool};
use miniwob_steer::models::generate::{generate, generate_shared, GenerateConfig};
use miniwob_steer::models::hooks::Positions;
use miniwob_steer::models::load::LoadedModel;
use miniwob_steer::models::tokenizer::Tokenizer;
use miniwob_steer::models::WeightDType;
use miniwob_steer::protocol::{ChatMode, Protocol, ReadPoint, SelectMode};
use miniwob_steer::steering::caa::{self, CaaOptions, Method};
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};

const BIN: &str = env!("CARGO_BIN_EXE_miniwob-steer");

/// One browser-and-model job at a time (2 cores in CI).
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// The default protocol with one edit.
fn edited(edit: impl FnOnce(&mut miniwob_steer::protocol::ProtocolFile)) -> PromptBuilder {
    let mut p = (*Protocol::default_protocol()).clone();
    edit(&mut p.file);
    PromptBuilder::new(Arc::new(p)).unwrap()
}

/// Real Chromium observations of 20 tasks and what the hard-coded builder of 5d9851d made of them.
fn recorded() -> Vec<Value> {
    common::fixture_json("protocol-default", "prompts.json")["cases"].as_array().unwrap().clone()
}

fn obs_of(case: &Value) -> Observation {
    serde_json::from_value(case["obs"].clone()).unwrap()
}

#[test]
fn default_protocol_renders_the_hard_coded_prompts_byte_for_byte() {
    let b = PromptBuilder::default();
    let small = edited(|f| f.dom.max_elements = 10);
    let cases = recorded();
    assert_eq!(cases.len(), 20);
    let mut fields = 0;
    for c in &cases {
        let obs = obs_of(c);
        fields += usize::from(!obs.fields.is_empty());
        let hist: Vec<String> = serde_json::from_value(c["history"].clone()).unwrap();
        let want = |k: &str| c[k].as_str().unwrap().to_string();
        let task = &obs.task;
        assert_eq!(b.user_text(&obs, &[], 1, false, None).unwrap(), want("plain"), "{task}: plain");
        assert_eq!(b.user_text(&obs, &hist, 2, false, None).unwrap(), want("history_text"), "{task}: history");
        assert_eq!(b.user_text(&obs, &[], 1, false, Some("Be accurate.")).unwrap(), want("suffix"), "{task}: suffix");
        assert_eq!(b.user_text(&obs, &[], 1, true, None).unwrap(), want("vlm"), "{task}: vlm");
        assert_eq!(
            b.user_text(&obs, &hist, 2, true, Some("Be accurate.")).unwrap(),
            want("vlm_history"),
            "{task}: vlm + history + suffix"
        );
        assert_eq!(small.user_text(&obs, &[], 1, false, None).unwrap(), want("budget10"), "{task}: budget 10");
    }
    assert!(fields >= 3, "the recorded cases include key/value fields");
    assert!(
        cases.iter().any(|c| c["budget10"].as_str().unwrap().contains("more elements left out")),
        "a recorded page exceeds the budget"
    );
}

/// The page part of a default user text: between "Page elements:\n" and the closing request.
fn dom_part(text: &str) -> &str {
    let a = text.find("Page elements:\n").unwrap() + "Page elements:\n".len();
    let b = text.rfind("\n\nAnswer with").unwrap();
    &text[a..b]
}

#[test]
fn each_prompt_key_changes_its_own_part_only() {
    let base = PromptBuilder::default();
    for c in recorded() {
        let obs = obs_of(&c);
        let plain = base.user_text(&obs, &[], 1, false, None).unwrap();
        let dom = dom_part(&plain);
        let (head, tail) = plain.split_at(plain.find(dom).unwrap());
        let tail = &tail[dom.len()..];
        let with_dom = |d: &str| format!("{head}{d}{tail}");
        // dom.join: the separator, nothing else.
        let t = edited(|f| f.dom.join = " | ".into()).user_text(&obs, &[], 1, false, None).unwrap();
        assert_eq!(t, with_dom(&dom.replace('\n', " | ")), "{}: dom.join", obs.task);
        // dom.element: the lines, one per kept element, in the same order.
        let t = edited(|f| f.dom.element = "#{{ ref }}".into()).user_text(&obs, &[], 1, false, None).unwrap();
        let refs: Vec<String> =
            dom.lines().filter(|l| l.starts_with('<') && !l.starts_with("<!--")).map(ref_of).collect();
        assert_eq!(
            dom_part(&t).lines().filter(|l| !l.starts_with("<!--")).map(|l| l[1..].to_string()).collect::<Vec<_>>(),
            refs
        );
        assert_eq!(t.replace(dom_part(&t), ""), plain.replace(dom, ""), "{}: dom.element", obs.task);
        // dom.keep: which elements, not how they look.
        let t = edited(|f| f.dom.keep = "tag == \"BUTTON\"".into()).user_text(&obs, &[], 1, false, None).unwrap();
        let buttons: Vec<&str> = dom.lines().filter(|l| l.starts_with("<button ")).collect();
        assert_eq!(dom_part(&t).lines().filter(|l| !l.is_empty()).collect::<Vec<_>>(), buttons, "{}", obs.task);
        // dom.max_elements: the first lines, then the omitted line.
        let t = edited(|f| f.dom.max_elements = 2).user_text(&obs, &[], 1, false, None).unwrap();
        let lines: Vec<&str> = dom.lines().filter(|l| !l.starts_with("<!--")).collect();
        if lines.len() > 2 {
            let want = format!("{}\n<!-- {} more elements left out -->", lines[..2].join("\n"), lines.len() - 2);
            assert_eq!(t, with_dom(&want), "{}: dom.max_elements", obs.task);
        }
        // caa.join: only between the text and the instruction.
        let t = edited(|f| f.caa.join = " || ".into()).user_text(&obs, &[], 1, false, Some("Be exact.")).unwrap();
        assert_eq!(t, format!("{plain} || Be exact."));
        // prompt.template: the whole text, from the same variables.
        let t = edited(|f| f.prompt.template = "{{ step }} {{ utterance }} {{ history|length }}".into())
            .user_text(&obs, &["click ref=1".into()], 2, false, None)
            .unwrap();
        assert_eq!(t, format!("2 {} 1", obs.utterance.trim()));
        // prompt.vlm_template: the screenshot text only.
        let v = edited(|f| f.prompt.vlm_template = "V {{ utterance }}".into());
        assert_eq!(v.user_text(&obs, &[], 1, true, None).unwrap(), format!("V {}", obs.utterance.trim()));
        assert_eq!(v.user_text(&obs, &[], 1, false, None).unwrap(), plain);
    }
}

fn ref_of(line: &str) -> String {
    let a = line.find(" ref=").unwrap() + 5;
    let b = a + line[a..].find([' ', '>']).unwrap();
    line[a..b].to_string()
}

/// A tokenizer that adds a BOS and whose chat template refuses a system turn (as Gemma's does).
fn strict_tokenizer(dir: &Path) -> Tokenizer {
    std::fs::copy(common::fixture("tiny-qwen2-vl").join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    let template = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}<u>{{ m['content'] }}</u>{% endfor %}{% if add_generation_prompt %}<a>{% endif %}";
    let cfg = serde_json::json!({"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "add_bos_token": true, "chat_template": template});
    std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    Tokenizer::from_dir(dir).unwrap()
}

#[test]
fn chat_modes_and_special_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let tok = strict_tokenizer(dir.path());
    let bos = tok.bos_token_id().unwrap();
    let user = "Task: click OK";
    let b = PromptBuilder::default();
    assert_eq!(b.model_text(&tok, user).unwrap(), "<u>Task: click OK</u><a>");
    assert_ne!(b.encode(&tok, user).unwrap()[0], bos, "the default adds no special tokens");
    let none = edited(|f| f.prompt.chat = ChatMode::None);
    assert_eq!(none.model_text(&tok, user).unwrap(), user, "chat = none is the raw text");
    let special = edited(|f| f.prompt.add_special_tokens = true);
    let ids = special.encode(&tok, user).unwrap();
    assert_eq!((ids[0], &ids[1..]), (bos, &b.encode(&tok, user).unwrap()[..]), "BOS first, nothing else changes");
    let sys = edited(|f| {
        f.prompt.chat = ChatMode::SystemUser;
        f.prompt.system = Some("You act on web pages.".into());
    });
    let e = format!("{:#}", sys.model_text(&tok, user).unwrap_err());
    assert!(e.contains("system+user") && e.contains("System role not supported"), "{e}");
    // A template that takes a system turn puts it first.
    let path = common::gguf_path("smollm2-135m");
    let mut f = std::fs::File::open(&path).unwrap();
    let smol = Tokenizer::from_gguf(&candle_core::quantized::gguf_file::Content::read(&mut f).unwrap()).unwrap();
    let t = sys.model_text(&smol, user).unwrap();
    assert!(t.find("You act on web pages.").unwrap() < t.find(user).unwrap(), "{t}");
    assert!(!PromptBuilder::default().model_text(&smol, user).unwrap().contains("You act on web pages."));
    assert!(sys.vlm_system().unwrap().is_some() && none.vlm_system().is_err());
}

fn qwen() -> &'static LoadedModel {
    static M: OnceLock<LoadedModel> = OnceLock::new();
    M.get_or_init(|| {
        let p = common::gguf_path("qwen-coder-0.5b");
        LoadedModel::load(p.to_str().unwrap(), &Device::Cpu, WeightDType::F32).unwrap()
    })
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn repetition_penalty_matches_transformers() {
    let _g = serial();
    let fx = common::fixture_json("qwen2", "protocol.json");
    let rp = &fx["repetition_penalty"];
    let m = qwen();
    let mut changed = 0;
    for (i, c) in rp["cases"].as_array().unwrap().iter().enumerate() {
        let prompt = ids(&c["ids"]);
        let n = rp["max_new_tokens"].as_u64().unwrap() as usize;
        let cfg = |p: f32| GenerateConfig { max_new_tokens: n, repetition_penalty: p, ..Default::default() };
        let pen = rp["penalty"].as_f64().unwrap() as f32;
        let plain = generate(
            &m.decoder,
            std::slice::from_ref(&prompt),
            &cfg(1.0),
            &Default::default(),
            &mut Default::default(),
        );
        assert_eq!(plain.unwrap()[0].tokens, ids(&c["greedy_plain"]), "case {i}: penalty 1");
        let with = generate(
            &m.decoder,
            std::slice::from_ref(&prompt),
            &cfg(pen),
            &Default::default(),
            &mut Default::default(),
        );
        let with = with.unwrap().remove(0).tokens;
        assert_eq!(with, ids(&c["greedy"]), "case {i}: penalty {pen}");
        changed += usize::from(with != ids(&c["greedy_plain"]));
        // The shared-prefix path (two rows of one prompt, the cache) applies it the same way.
        let mut cache = miniwob_steer::models::prefix_cache::PrefixCache::new(64);
        let shared =
            generate_shared(&m.decoder, &[prompt.clone(), prompt], &cfg(pen), &Default::default(), Some(&mut cache));
        assert!(shared.unwrap().iter().all(|g| g.tokens == with), "case {i}: shared prefill");
    }
    assert!(changed >= 2, "the penalty changed only {changed} continuations: the comparison would prove little");
}

fn cosine(a: &[f32], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y).sum();
    let na: f64 = a.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    dot / (na * nb)
}

#[test]
fn caa_read_points_and_response_text_match_transformers() {
    let _g = serial();
    let fx = common::fixture_json("qwen2", "protocol.json");
    let c = &fx["caa"];
    let layer = c["layer"].as_u64().unwrap() as usize;
    let m = qwen();
    let pairs: Vec<(Vec<u32>, Vec<u32>)> =
        c["pairs"].as_array().unwrap().iter().map(|p| (ids(&p["positive_ids"]), ids(&p["negative_ids"]))).collect();
    // The response-text step itself: decode without special tokens, strip, re-encode.
    for p in c["pairs"].as_array().unwrap() {
        for side in ["positive", "negative"] {
            let text = m.tokenizer.decode(&ids(&p[format!("{side}_response")]), true).unwrap();
            assert_eq!(text.trim(), p[format!("{side}_response_text")].as_str().unwrap());
            assert_eq!(m.tokenizer.encode(text.trim(), true).unwrap(), ids(&p[format!("{side}_text_ids")]));
        }
    }
    let reference = |k: &str| -> (Vec<f64>, f64) {
        let v = &c["vectors"][k];
        (v["direction"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect(), v["norm"].as_f64().unwrap())
    };
    let mut got = std::collections::BTreeMap::new();
    for (method, read) in [
        (Method::Prompt, ReadPoint::ResidPost),
        (Method::Prompt, ReadPoint::ResidPre),
        (Method::ResponseText, ReadPoint::ResidPost),
        (Method::ResponseText, ReadPoint::ResidPre),
    ] {
        let opts = CaaOptions {
            layers: vec![layer],
            method,
            read,
            batch_size: 4,
            response_tokens: c["response_tokens"].as_u64().unwrap() as usize,
            repetition_penalty: 1.0,
            add_special_tokens: true,
            protocol: None,
        };
        let v = caa::compute(m, &pairs, "accuracy", &opts).unwrap();
        let key = format!("{}/{}", method.name(), read.name());
        let (dir, norm) = reference(&key);
        let d: Vec<f32> = v.layers[&layer].to_vec1().unwrap();
        let cos = cosine(&d, &dir);
        let n = v.meta.pre_norm[&layer] as f64;
        eprintln!("{key}: cosine {cos:.6} with transformers, norm {n:.5} vs {norm:.5}");
        assert!(cos > 0.999, "{key}: cosine {cos} with transformers");
        assert!((n - norm).abs() / norm < 1e-2, "{key}: norm {n} vs {norm}");
        assert_eq!(v.meta.read.as_deref(), (read == ReadPoint::ResidPre).then_some("resid_pre"));
        got.insert(key, d);
    }
    // The read point matters: the two differ, so the comparison above can tell them apart.
    let (pre, _) = reference("prompt/resid_pre");
    assert!(cosine(&got["prompt/resid_post"], &pre) < 0.9, "resid_post and resid_pre should differ");
    // And the vector is added at the output of the layer whichever point it was read at.
    let v = caa::compute(
        m,
        &pairs[..1],
        "accuracy",
        &CaaOptions::of_protocol(&Protocol::load("legacy").unwrap(), vec![layer], Method::Prompt, 1.0),
    )
    .unwrap();
    let spec = caa::steering_spec(&v, layer, &[1.0], caa::CoeffMode::Absolute, Positions::Last).unwrap();
    assert_eq!(spec.interventions[0].point.to_string(), format!("blocks.{layer}.hook_resid_post"));
    assert!(v.meta.protocol.as_deref().unwrap().starts_with("legacy@"));
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

#[test]
fn select_keystrokes_and_the_page_clock_on_chromium() {
    let _g = serial();
    miniwob_steer::env::html_root().expect("MiniWoB pages: run ./scripts/setup.sh");
    rt().block_on(async {
        for select in [SelectMode::Set, SelectMode::Keystrokes] {
            let pool = Pool::new(1, EnvConfig { select, ..EnvConfig::default() }).await.unwrap();
            let mut s = pool.acquire().await.unwrap();
            for seed in [1, 2, 3] {
                let obs = s.reset("choose-list", seed).await.unwrap();
                let sel = obs.elements.iter().find(|e| e.tag == "SELECT").unwrap();
                let want = obs.utterance.split("Select ").nth(1).unwrap().split(" from").next().unwrap().to_string();
                assert!(sel.options.contains(&want), "{want:?} in {:?}", sel.options);
                let r = s.act(&Action::SelectRef { r#ref: sel.r#ref, option: want.clone() }).await.unwrap();
                assert!(r.error.is_none(), "{select:?}: {:?}", r.error);
                let after = s.observe().await.unwrap();
                let value = after.element(sel.r#ref).unwrap().value.clone();
                assert_eq!(value.as_deref(), Some(want.as_str()), "{select:?} seed {seed}");
                let submit = after.elements.iter().find(|e| e.tag == "BUTTON").unwrap().r#ref;
                let r = s.act(&Action::ClickRef(submit)).await.unwrap();
                assert!(r.done && r.raw_reward > 0.0, "{select:?} seed {seed}: {r:?}");
            }
            // What tells the two apart: setting checks the option exists; keystrokes just type.
            let obs = s.reset("choose-list", 9).await.unwrap();
            let sel = obs.elements.iter().find(|e| e.tag == "SELECT").unwrap();
            let before = sel.value.clone();
            let r = s.act(&Action::SelectRef { r#ref: sel.r#ref, option: "Qqqq no such".into() }).await.unwrap();
            match select {
                SelectMode::Set => assert!(r.error.as_deref().unwrap().contains("has no option"), "{r:?}"),
                SelectMode::Keystrokes => assert!(r.error.is_none(), "typing into a select raises nothing: {r:?}"),
            }
            assert_eq!(s.observe().await.unwrap().element(sel.r#ref).unwrap().value, before, "{select:?}");
            drop(s);
            pool.shutdown().await;
        }
        // env.episode_max_time_ms: the page's own clock ends a slow episode with no success.
        let pool = Pool::new(1, EnvConfig { episode_max_time_ms: 1500, ..EnvConfig::default() }).await.unwrap();
        let mut s = pool.acquire().await.unwrap();
        let obs = s.reset("click-test", 4).await.unwrap();
        let button = obs.elements.iter().find(|e| e.tag == "BUTTON").unwrap().r#ref;
        tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
        let r = s.act(&Action::ClickRef(button)).await.unwrap();
        assert!(r.done && r.reward <= 0.0 && r.raw_reward <= 0.0, "past the clock: {r:?}");
        let obs = s.reset("click-test", 4).await.unwrap();
        let r = s.act(&Action::ClickRef(obs.elements.iter().find(|e| e.tag == "BUTTON").unwrap().r#ref)).await.unwrap();
        assert!(r.done && r.raw_reward > 0.0 && r.reward > 0.0 && r.reward < r.raw_reward, "in time: {r:?}");
        drop(s);
        pool.shutdown().await;
    });
}

fn lines(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn run(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(["run", "--model", "smollm2-135m", "--dtype", "f32", "--no-progress", "--name", "proto"])
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

#[test]
fn plans_and_protocols_end_to_end() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("plan.jsonl");
    let plan_lines = [
        r#"{"task": "click-button", "seed": 7, "split": "eval"}"#,
        r#"{"task": "click-test", "seed": 5, "split": "train"}"#,
        r#"{"task": "click-test", "seed": 3, "split": "eval"}"#,
        r#"{"task": "click-link", "seed": 6, "split": "train"}"#,
    ];
    std::fs::write(&plan, plan_lines.join("\n") + "\n").unwrap();
    let plan_s = plan.to_str().unwrap();
    // A bad plan line fails before anything starts, naming the file and the line.
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        format!("{}\n{{\"task\": \"click-nothing\", \"seed\": 1, \"split\": \"eval\"}}\n", plan_lines[0]),
    )
    .unwrap();
    let out =
        run(&["--plan", bad.to_str().unwrap(), "--base-only", "--out", dir.path().join("x.jsonl").to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("bad.jsonl line 2") && err.contains("click-nothing"), "{err}");

    // The legacy protocol with a vector from the plan's training episodes.
    let res = dir.path().join("legacy.jsonl");
    let res_s = res.to_str().unwrap();
    let legacy = ["--protocol", "legacy", "--plan", plan_s, "--coeff", "2", "--max-new-tokens", "12", "--out", res_s];
    let out = run(&legacy);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ls = lines(&res);
    assert_eq!(ls.len(), 4, "2 eval items × (baseline, steered)");
    let order: Vec<(String, u64)> =
        ls.iter().map(|l| (l["task"].as_str().unwrap().to_string(), l["seed"].as_u64().unwrap())).collect();
    assert_eq!(order.iter().filter(|(t, s)| t == "click-button" && *s == 7).count(), 2);
    assert_eq!(order.iter().filter(|(t, s)| t == "click-test" && *s == 3).count(), 2);
    let legacy_id = Protocol::load("legacy").unwrap().id();
    for l in &ls {
        assert_eq!(l["protocol"].as_str(), Some(legacy_id.as_str()));
        assert_eq!(l["vector_method"].as_str(), Some("response-text"));
        assert_eq!(l["success"].as_bool().unwrap(), l["reward"].as_f64().unwrap() > 0.0, "env.success = reward");
        assert!(l["vector_source"].as_str().unwrap().starts_with("caa:plan="));
    }
    // The vector records the protocol and its read point.
    let vdir = dir.path().join("vectors");
    let vf = std::fs::read_dir(&vdir).unwrap().next().unwrap().unwrap().path();
    let v = miniwob_steer::steering::vector::SteeringVector::load(&vf).unwrap();
    assert_eq!((v.meta.protocol.as_deref(), v.meta.read.as_deref()), (Some(legacy_id.as_str()), Some("resid_pre")));
    // A rerun resumes: nothing new.
    assert!(run(&legacy).status.success());
    assert_eq!(lines(&res).len(), 4);
    // The same file under the default protocol is another configuration.
    let out = run(&["--plan", plan_s, "--coeff", "2", "--max-new-tokens", "12", "--out", res_s]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("protocol"), "{err}");
    // Its vector under the default protocol: refused from the cache, used with a warning as --vector.
    let def = dir.path().join("default.jsonl");
    let cache = ["--vector-cache", vf.to_str().unwrap()];
    let out = run(&[
        &["--plan", plan_s, "--coeff", "2", "--max-new-tokens", "12", "--out", def.to_str().unwrap()],
        &cache[..],
    ]
    .concat());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("computed under protocol legacy@"), "{err}");
    let out = run(&[
        "--plan",
        plan_s,
        "--coeff",
        "2",
        "--max-new-tokens",
        "12",
        "--vector",
        vf.to_str().unwrap(),
        "--out",
        def.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.contains("computed under protocol legacy@"), "{err}");
    for l in lines(&def) {
        assert!(l["protocol"].as_str().unwrap().starts_with("default@"));
    }
}
