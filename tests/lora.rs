//! PEFT LoRA adapters on the shared decoder against transformers + peft (fixtures made by
//! scripts/goldens/lora_goldens.py): logits and greedy tokens of two seeded adapters on two
//! tiny families; rows of different adapters (and of none) in one batch, each bit-identical to
//! itself alone; the prefix cache keeps adapted and plain prefixes apart; bad adapters refused.
mod common;

use candle_core::{DType, Device, Tensor};
use miniwob_steer::models::decoder::Decoder;
use miniwob_steer::models::generate::{self, GenerateConfig};
use miniwob_steer::models::load::decoder_from_dir;
use miniwob_steer::models::lora::LoraAdapter;
use miniwob_steer::models::prefix_cache::PrefixCache;
use miniwob_steer::models::{Captures, HookSpec, StepInfo, WeightDType};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const MODELS: [&str; 2] = ["tiny-qwen2", "tiny-llama"];
const ADAPTERS: [&str; 2] = ["attn", "all"];

fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(common::fixture("tiny-lora/reference.safetensors"), &Device::Cpu).unwrap()
}

fn ids(r: &HashMap<String, Tensor>, key: &str) -> Vec<u32> {
    r[key].to_dtype(DType::I64).unwrap().to_vec1::<i64>().unwrap().iter().map(|&x| x as u32).collect()
}

fn base(model: &str) -> Decoder {
    decoder_from_dir(&common::fixture(model), &Device::Cpu, WeightDType::F32).unwrap().0
}

fn adapter_dir(model: &str, adapter: &str) -> PathBuf {
    common::fixture(&format!("tiny-lora/{model}-{adapter}"))
}

fn load_adapter(d: &Decoder, dir: &Path) -> anyhow::Result<LoraAdapter> {
    LoraAdapter::load("a", dir, &d.cfg, d.device(), d.dtype())
}

/// `model` with `adapter` attached as every row's default (`--adapter`).
fn adapted(model: &str, adapter: &str) -> Decoder {
    let mut d = base(model);
    let a = load_adapter(&d, &adapter_dir(model, adapter)).unwrap();
    let id = d.attach_adapter(a).unwrap();
    d.set_default_adapter(Some(id)).unwrap();
    d
}

fn all_logits(d: &Decoder, ids: &[u32]) -> Tensor {
    let t = Tensor::from_vec(ids.to_vec(), (1, ids.len()), &Device::Cpu).unwrap();
    let mut st = d.new_state(vec![0]);
    d.forward(&t, &mut st, &StepInfo::prefill(vec![0]), &HookSpec::none(), &mut Captures::default(), true)
        .unwrap()
        .squeeze(0)
        .unwrap()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

fn greedy(n: usize) -> GenerateConfig {
    GenerateConfig { max_new_tokens: n, ..Default::default() }
}

#[test]
fn logits_and_greedy_tokens_match_transformers_peft() {
    let r = reference();
    for model in MODELS {
        for adapter in ADAPTERS {
            let d = adapted(model, adapter);
            let mut worst = 0f32;
            for i in 0..3 {
                let p = ids(&r, &format!("input_ids.{i}"));
                let want = &r[&format!("{model}.{adapter}.logits.{i}")];
                let got = all_logits(&d, &p);
                worst = worst.max(max_abs(&got, want));
                // The adapter matters: far from the base model's logits.
                assert!(
                    max_abs(want, &r[&format!("{model}.base.logits.{i}")]) > 1.0,
                    "{model}/{adapter}: a no-op adapter"
                );
                let g = generate::generate(&d, &[p], &greedy(8), &HookSpec::none(), &mut Captures::default()).unwrap();
                assert_eq!(
                    g[0].tokens,
                    ids(&r, &format!("{model}.{adapter}.greedy.{i}")),
                    "{model}/{adapter} prompt {i}"
                );
            }
            eprintln!("{model} + {adapter}: max |logit - peft| = {worst:.2e}");
            assert!(worst < 1e-4, "{model} + {adapter}: logits differ from peft by {worst}");
        }
    }
}

#[test]
fn rows_of_different_adapters_share_one_batch_bit_for_bit() {
    let r = reference();
    let prompts: Vec<Vec<u32>> = (0..3).map(|i| ids(&r, &format!("input_ids.{i}"))).collect();
    for model in MODELS {
        let plain = base(model);
        let mut d = base(model);
        let a = d.attach_adapter(load_adapter(&d, &adapter_dir(model, "attn")).unwrap()).unwrap();
        let b = d.attach_adapter(load_adapter(&d, &adapter_dir(model, "all")).unwrap()).unwrap();
        let rows =
            vec![prompts[0].clone(), prompts[1].clone(), prompts[2].clone(), prompts[0].clone(), prompts[1].clone()];
        let choice = [Some(a), None, Some(b), Some(b), Some(a)];
        let cfg = greedy(6);
        let batch =
            generate::generate_routed(&d, &rows, Some(&choice), &cfg, &HookSpec::none(), &mut Captures::default())
                .unwrap();
        for (i, (p, c)) in rows.iter().zip(choice).enumerate() {
            let alone = generate::generate_routed(
                &d,
                std::slice::from_ref(p),
                Some(&[c]),
                &cfg,
                &HookSpec::none(),
                &mut Captures::default(),
            )
            .unwrap();
            assert_eq!(batch[i], alone[0], "{model} row {i} ({c:?}) differs from itself alone");
        }
        // A row without an adapter is the plain model, bit for bit.
        let no = generate::generate(&plain, &rows[1..2], &cfg, &HookSpec::none(), &mut Captures::default()).unwrap();
        assert_eq!(batch[1], no[0], "{model}: the unadapted row differs from the plain model");
        // And a routed row equals the model with that adapter as its default (`--adapter`).
        let def = adapted(model, "all");
        let g = generate::generate(&def, &rows[2..3], &cfg, &HookSpec::none(), &mut Captures::default()).unwrap();
        assert_eq!(batch[2], g[0], "{model}: routed row != --adapter");
        assert_ne!(batch[0].logits_hash, no[0].logits_hash);
    }
}

#[test]
fn the_prefix_cache_keeps_adapted_and_plain_prefixes_apart() {
    let r = reference();
    let p: Vec<u32> = (0..40).map(|i| 3 + (i * 7 % 90) as u32).chain(ids(&r, "input_ids.2")).collect();
    let plain = base("tiny-qwen2");
    let d = adapted("tiny-qwen2", "all");
    let cfg = greedy(4);
    let want =
        generate::generate(&d, std::slice::from_ref(&p), &cfg, &HookSpec::none(), &mut Captures::default()).unwrap();
    let mut cache = PrefixCache::new(64);
    // The plain model fills the cache with this prompt's prefix first.
    generate::generate_shared(&plain, std::slice::from_ref(&p), &cfg, &HookSpec::none(), Some(&mut cache)).unwrap();
    let filled = cache.stats().computed_tokens;
    assert!(filled >= 32);
    let got =
        generate::generate_shared(&d, std::slice::from_ref(&p), &cfg, &HookSpec::none(), Some(&mut cache)).unwrap();
    assert_eq!(got, want, "the adapted model was served the plain model's prefix");
    assert_eq!(cache.stats().hit_tokens, 0, "an adapted prompt hit a plain prefix");
    let again =
        generate::generate_shared(&d, std::slice::from_ref(&p), &cfg, &HookSpec::none(), Some(&mut cache)).unwrap();
    assert_eq!(again, want);
    assert!(cache.stats().hit_tokens >= 32, "the adapted prefix was not reused: {:?}", cache.stats());
}

/// A copy of a fixture adapter with `edit` applied to its config and `tensors` to its weights.
fn broken(
    name: &str,
    edit: impl FnOnce(&mut serde_json::Value),
    tensors: impl FnOnce(&mut HashMap<String, Tensor>),
) -> tempfile::TempDir {
    let src = adapter_dir("tiny-qwen2", "attn");
    let dir = tempfile::Builder::new().prefix(name).tempdir().unwrap();
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap()).unwrap();
    edit(&mut c);
    std::fs::write(dir.path().join("adapter_config.json"), c.to_string()).unwrap();
    let mut t = candle_core::safetensors::load(src.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    tensors(&mut t);
    candle_core::safetensors::save(&t, dir.path().join("adapter_model.safetensors")).unwrap();
    dir
}

#[test]
fn adapters_it_cannot_apply_are_refused_by_name() {
    let d = base("tiny-qwen2");
    let err = |dir: &tempfile::TempDir| format!("{:#}", load_adapter(&d, dir.path()).unwrap_err());
    let q_a = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight";

    let e = err(&broken("dora", |c| c["use_dora"] = true.into(), |_| {}));
    assert!(e.contains("use_dora") && e.contains("adapter_config.json"), "{e}");

    let e = err(&broken("bias", |c| c["bias"] = "all".into(), |_| {}));
    assert!(e.contains("bias = `all`"), "{e}");

    let e = err(&broken(
        "shape",
        |_| {},
        |t| {
            t.insert(q_a.into(), Tensor::zeros((4, 48), DType::F32, &Device::Cpu).unwrap());
        },
    ));
    assert!(e.contains("layers.1.self_attn.q_proj") && e.contains("[4, 48]") && e.contains("expected [r, 32]"), "{e}");

    let e = err(&broken(
        "half",
        |_| {},
        |t| {
            t.remove(q_a);
        },
    ));
    assert!(e.contains("layers.1.self_attn.q_proj") && e.contains("no lora_A"), "{e}");

    let e = err(&broken(
        "layer",
        |_| {},
        |t| {
            let a = t[q_a].clone();
            t.insert(q_a.replace("layers.1", "layers.7"), a);
        },
    ));
    assert!(e.contains("layer 7") && e.contains("3 layers"), "{e}");

    let e = err(&broken(
        "head",
        |_| {},
        |t| {
            t.insert(
                "base_model.model.lm_head.weight".into(),
                Tensor::zeros((96, 32), DType::F32, &Device::Cpu).unwrap(),
            );
        },
    ));
    assert!(e.contains("base_model.model.lm_head.weight") && e.contains("modules_to_save"), "{e}");

    let e = err(&broken(
        "pattern",
        |c| c["rank_pattern"] = serde_json::json!({"q_proj": 4, "layers.1.self_attn.q_proj": 6}),
        |_| {},
    ));
    assert!(e.contains("both match") && e.contains("layers.1.self_attn.q_proj"), "{e}");

    let e = err(&broken(
        "dup",
        |_| {},
        |t| {
            let a = t[q_a].clone();
            t.insert(q_a.replace("self_attn", "cross_attn"), a);
        },
    ));
    assert!(e.contains("both map to layer 1"), "{e}");

    let e = err(&broken("rank", |c| c["r"] = 8.into(), |_| {}));
    assert!(e.contains("rank 4") && e.contains("adapter_config.json says 8 (`r`)"), "{e}");

    let e = format!("{:#}", load_adapter(&d, Path::new("/nonexistent/adapter")).unwrap_err());
    assert!(e.contains("/nonexistent/adapter/adapter_config.json"), "{e}");
}

// ---- smollm2: `probe route` and `run --adapter` end to end ----

fn run_cli(args: &[&str]) -> String {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_miniwob-steer")).args(args).output().unwrap();
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "miniwob-steer {args:?} failed:\n{out}\n{err}");
    format!("{out}{err}")
}

/// smollm2-135m: 30 layers, 576 wide, 9 heads and 3 kv heads of 64.
fn smollm2_adapter(dir: &Path, seed: u64) {
    common::random_adapter(dir, 30, 576, 576, 192, seed);
}

fn jsonl(p: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(p).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Issue 21.7: a router head trained on smollm2's layer-14 features routes "animal" prompts to an
/// adapter and "math" prompts to the base model; each routed output is what the model with that
/// adapter (`generate --adapter`) or without one gives alone, and batching does not change a byte.
#[test]
fn probe_route_on_smollm2() {
    let dir = tempfile::tempdir().unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let animals = ["cat", "dog", "horse", "whale", "owl", "tiger", "rabbit", "eagle", "shark", "fox"];
    let mut rows = Vec::new();
    for (i, a) in animals.iter().enumerate() {
        rows.push(serde_json::json!({"text": format!("Tell me a fact about the {a}."), "label": "animal"}));
        rows.push(serde_json::json!({"text": format!("What is {} plus {}?", i * 7 + 3, i * 5 + 11), "label": "math"}));
    }
    let data = dir.path().join("d.jsonl");
    std::fs::write(&data, rows.iter().map(|r| r.to_string() + "\n").collect::<String>()).unwrap();
    let (feats, head, ad) = (dir.path().join("f"), dir.path().join("h.safetensors"), dir.path().join("animal-lora"));
    smollm2_adapter(&ad, 1);
    let model = ["--model", "smollm2-135m", "--device", "cpu", "--dtype", "f32"];
    let mut a: Vec<String> = ["probe", "features"].iter().chain(&model).map(|x| x.to_string()).collect();
    a.extend(["--data", &s(&data), "--layers", "14", "--pool", "last", "--out", &s(&feats)].map(String::from));
    run_cli(&a.iter().map(String::as_str).collect::<Vec<_>>());
    run_cli(&[
        "probe",
        "train",
        "--features",
        &s(&feats),
        "--layer",
        "14",
        "--epochs",
        "40",
        "--lr",
        "0.01",
        "--out",
        &s(&head),
    ]);

    let route = |batch: &str, out: &Path| -> String {
        let mut a: Vec<String> = ["probe", "route"].iter().chain(&model).map(|x| x.to_string()).collect();
        a.extend(
            ["--head", &s(&head), "--adapters", &format!("animal={}", s(&ad)), "--data", &s(&data)].map(String::from),
        );
        a.extend(["--max-new-tokens", "6", "--batch-size", batch, "--out", &s(out)].map(String::from));
        run_cli(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let (r5, r1) = (dir.path().join("r5.jsonl"), dir.path().join("r1.jsonl"));
    let log = route("5", &r5);
    assert!(log.contains("routing accuracy (class = label): 20/20"), "{log}");
    route("1", &r1);
    assert_eq!(std::fs::read(&r5).unwrap(), std::fs::read(&r1).unwrap(), "batching changed a routed output");
    let lines = jsonl(&r5);
    assert_eq!(lines.len(), 20);
    for l in &lines {
        let routed = l["class"] == "animal";
        assert_eq!(l["adapter"].as_str(), routed.then_some("animal"), "{l}");
    }
    // Row 0 (animal) and row 1 (math) against generate with and without the adapter.
    let gen = |text: &str, adapter: Option<&Path>| -> String {
        let mut a: Vec<String> = ["generate"].iter().chain(&model).map(|x| x.to_string()).collect();
        a.extend(["--prompt", text, "--chat", "--max-new-tokens", "6", "--json"].map(String::from));
        if let Some(p) = adapter {
            a.extend(["--adapter".to_string(), format!("animal={}", s(p))]);
        }
        let out = run_cli(&a.iter().map(String::as_str).collect::<Vec<_>>());
        let j: serde_json::Value = serde_json::from_str(out.lines().find(|l| l.starts_with('{')).unwrap()).unwrap();
        j["text"].as_str().unwrap().to_string()
    };
    let t0 = rows[0]["text"].as_str().unwrap();
    assert_eq!(lines[0]["output"].as_str().unwrap(), gen(t0, Some(&ad)));
    assert_ne!(lines[0]["output"].as_str().unwrap(), gen(t0, None), "the adapter changed nothing");
    assert_eq!(lines[1]["output"].as_str().unwrap(), gen(rows[1]["text"].as_str().unwrap(), None));

    // An adapter name that is not a router class is refused, naming the classes.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_miniwob-steer"))
        .args(["probe", "route"])
        .args(model)
        .args(["--head", &s(&head), "--adapters", &format!("plants={}", s(&ad)), "--data", &s(&data)])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("plants") && e.contains("animal, math"), "{e}");
}

/// `run --adapter` on real Chromium: every line records the adapter, the outputs are the adapted
/// model's, the vector is computed on (and cached for) the adapted model, and the same `--out`
/// without the adapter is refused (the adapter is in the resume key).
#[test]
fn run_with_an_adapter_on_smollm2() {
    let dir = tempfile::tempdir().unwrap();
    let ad = dir.path().join("lora");
    smollm2_adapter(&ad, 2);
    let base = [
        "run",
        "--model",
        "smollm2-135m",
        "--dtype",
        "f32",
        "--tasks",
        "click-test,click-button",
        "--eval-steps",
        "2",
        "--train-steps",
        "2",
        "--coeff",
        "2",
        "--layer",
        "15",
        "--max-new-tokens",
        "10",
        "--no-progress",
    ];
    let go = |name: &str, adapter: bool| -> Vec<serde_json::Value> {
        let out = dir.path().join(format!("{name}.jsonl"));
        let mut a: Vec<String> = base.iter().map(|x| x.to_string()).collect();
        a.extend(["--out".to_string(), out.to_str().unwrap().to_string()]);
        if adapter {
            a.extend(["--adapter".to_string(), format!("mine={}", ad.display())]);
        }
        run_cli(&a.iter().map(String::as_str).collect::<Vec<_>>());
        jsonl(&out)
    };
    let plain = go("plain", false);
    let lora = go("lora", true);
    assert_eq!(lora.len(), 8);
    let id = lora[0]["adapter"].as_str().unwrap().to_string();
    assert!(id.starts_with("mine@"), "{id}");
    assert!(lora.iter().all(|l| l["adapter"] == id.as_str()));
    assert!(plain.iter().all(|l| l.get("adapter").is_none()));
    let outs =
        |ls: &[serde_json::Value]| ls.iter().map(|l| l["output"].as_str().unwrap().to_string()).collect::<Vec<_>>();
    assert_ne!(outs(&plain), outs(&lora), "the adapter changed no output");
    let vectors: Vec<String> = std::fs::read_dir(dir.path().join("vectors"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(vectors.len(), 2, "one vector per model: {vectors:?}");
    assert!(vectors.iter().any(|v| v.contains("mine")), "{vectors:?}");
    let v = miniwob_steer::steering::vector::SteeringVector::load(
        &dir.path().join("vectors").join(vectors.iter().find(|v| v.contains("mine")).unwrap()),
    )
    .unwrap();
    assert_eq!(v.meta.adapter.as_deref(), Some(id.as_str()));
    // Resuming the adapted file without the adapter is another configuration.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_miniwob-steer"))
        .args(base)
        .args(["--out", dir.path().join("lora.jsonl").to_str().unwrap()])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("adapter"), "{e}");
}
