//! Steering vectors on the real SmolLM2-135M (f32): CAA has the intended effect, per-row
//! coefficients keep rows independent, vector files round-trip and refuse the wrong model.
mod common;

use candle_core::{Device, Tensor};
use miniwob_steer::models::generate::{self, GenerateConfig};
use miniwob_steer::models::load::LoadedModel;
use miniwob_steer::models::{HookSpec, Positions, WeightDType};
use miniwob_steer::steering::caa::{self, CaaOptions, CoeffMode, Method};
use miniwob_steer::steering::vector::SteeringVector;
use std::sync::OnceLock;

fn model() -> &'static LoadedModel {
    static M: OnceLock<LoadedModel> = OnceLock::new();
    M.get_or_init(|| {
        LoadedModel::load(common::gguf_path("smollm2-135m").to_str().unwrap(), &Device::Cpu, WeightDType::F32).unwrap()
    })
}

const POSITIVE: [&str; 16] = [
    "I love this movie, it was wonderful.",
    "What a fantastic day, everything went great.",
    "The food was delicious and the staff were kind.",
    "I am so happy with my new phone.",
    "This book is brilliant and inspiring.",
    "Our holiday was perfect, we had a lovely time.",
    "The concert was amazing, the band was superb.",
    "I feel great, the news is excellent.",
    "She did a beautiful job, I am delighted.",
    "The service was fast and the results are superb.",
    "This garden is gorgeous in the spring sunshine.",
    "My team won and I am thrilled.",
    "The hotel was clean, comfortable and charming.",
    "I adore this song, it makes me joyful.",
    "The lesson was clear, fun and very helpful.",
    "What a pleasant surprise, thank you so much.",
];

const NEGATIVE: [&str; 16] = [
    "I hate this movie, it was awful.",
    "What a terrible day, everything went wrong.",
    "The food was disgusting and the staff were rude.",
    "I am so unhappy with my new phone.",
    "This book is boring and depressing.",
    "Our holiday was a disaster, we had a miserable time.",
    "The concert was dreadful, the band was horrible.",
    "I feel awful, the news is terrible.",
    "She did an ugly job, I am disappointed.",
    "The service was slow and the results are poor.",
    "This garden is ugly in the cold grey rain.",
    "My team lost and I am furious.",
    "The hotel was dirty, uncomfortable and grim.",
    "I loathe this song, it makes me sad.",
    "The lesson was confusing, dull and useless.",
    "What a nasty surprise, this is unacceptable.",
];

fn sentiment_vector(method: Method, layer: usize) -> SteeringVector {
    let m = model();
    let pairs: Vec<(Vec<u32>, Vec<u32>)> = POSITIVE
        .iter()
        .zip(NEGATIVE)
        .map(|(p, n)| (m.tokenizer.encode(p, false).unwrap(), m.tokenizer.encode(n, false).unwrap()))
        .collect();
    let opts = CaaOptions {
        layers: vec![layer],
        method,
        batch_size: 8,
        response_tokens: 8,
        ..CaaOptions::of_protocol(&miniwob_steer::protocol::Protocol::default_protocol(), vec![], method, 1.0)
    };
    caa::compute(m, &pairs, "sentiment", &opts).unwrap()
}

fn word_ids(words: &[&str]) -> Vec<usize> {
    words
        .iter()
        .map(|w| {
            let ids = model().tokenizer.encode(w, false).unwrap();
            ids[0] as usize
        })
        .collect()
}

/// Mean logit of positive words minus mean logit of negative words after each prompt, averaged.
fn sentiment_margin(spec: &HookSpec, rows: usize) -> Vec<f32> {
    let m = model();
    let good = word_ids(&[" great", " wonderful", " good", " amazing", " excellent", " lovely"]);
    let bad = word_ids(&[" terrible", " awful", " bad", " horrible", " boring", " disappointing"]);
    let prompts = [
        "I watched the film yesterday and it was",
        "Honestly, the whole experience felt",
        "My review of the restaurant: the meal was",
    ];
    let mut out = vec![0f32; rows];
    for p in prompts {
        let ids = m.tokenizer.encode(p, false).unwrap();
        let batch = vec![ids; rows];
        let (logits, _, _) = generate::prefill(&m.decoder, &batch, 0, spec).unwrap();
        let logits: Vec<Vec<f32>> = logits.to_vec2().unwrap();
        for (r, row) in logits.iter().enumerate() {
            let g: f32 = good.iter().map(|&i| row[i]).sum::<f32>() / good.len() as f32;
            let b: f32 = bad.iter().map(|&i| row[i]).sum::<f32>() / bad.len() as f32;
            out[r] += (g - b) / prompts.len() as f32;
        }
    }
    out
}

#[test]
fn sentiment_vector_moves_the_logit_margin_both_ways() {
    let layer = 15; // auto: 50% of 30
    let v = sentiment_vector(Method::Prompt, layer);
    assert_eq!(v.meta.samples, 16);
    let norm = v.layers[&layer].sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
    assert!((norm - 1.0).abs() < 1e-5, "vector is not unit length ({norm})");
    assert!(v.meta.pre_norm[&layer] > 0.0 && v.meta.mean_resid_norm[&layer] > 0.0);
    // One batch: α = -0.5, 0, +0.5 of the mean residual norm, at every prompt position.
    let spec = caa::steering_spec(&v, layer, &[-0.5, 0.0, 0.5], CoeffMode::Relative, Positions::All).unwrap();
    let margins = sentiment_margin(&spec, 3);
    eprintln!("positive-minus-negative logit margin at α = -0.5, 0, +0.5 of the residual norm: {margins:?}");
    // Same batch shape without a hook: the α = 0 row must be bit-identical to it.
    let base = sentiment_margin(&HookSpec::none(), 3)[1];
    assert_eq!(margins[1].to_bits(), base.to_bits(), "the α = 0 row differs from no hook in the same batch");
    assert!(margins[2] > base + 0.5, "α > 0 did not raise the positive-minus-negative margin: {margins:?}");
    assert!(margins[0] < base - 0.5, "α < 0 did not lower the positive-minus-negative margin: {margins:?}");
}

#[test]
fn pca_agrees_in_sign_with_the_mean_difference() {
    let mean = sentiment_vector(Method::Prompt, 10);
    let pca = sentiment_vector(Method::Pca, 10);
    let cos = generate::cosine(&mean.layers[&10], &pca.layers[&10]).unwrap();
    assert!(cos > 0.5, "PCA direction should align with the mean difference, cosine {cos}");
    assert_eq!(pca.meta.method, "pca");
}

#[test]
fn mixed_batch_rows_generate_like_lone_runs() {
    let m = model();
    let v = sentiment_vector(Method::Prompt, 15);
    let ids = m.tokenizer.encode("The weather today is", false).unwrap();
    let cfg = GenerateConfig { max_new_tokens: 10, ..Default::default() };
    let run = |coeffs: &[f32]| {
        let spec = caa::steering_spec(&v, 15, coeffs, CoeffMode::Absolute, Positions::Last).unwrap();
        let prompts = vec![ids.clone(); coeffs.len()];
        generate::generate(&m.decoder, &prompts, &cfg, &spec, &mut Default::default()).unwrap()
    };
    let mixed = run(&[0.0, 8.0]);
    let alone0 =
        generate::generate(&m.decoder, std::slice::from_ref(&ids), &cfg, &HookSpec::none(), &mut Default::default())
            .unwrap();
    let alone8 = run(&[8.0]);
    assert_eq!(mixed[0].tokens, alone0[0].tokens, "α = 0 row of a mixed batch differs from unsteered generation");
    assert_eq!(mixed[1].tokens, alone8[0].tokens, "α = 8 row of a mixed batch differs from running it alone");
    assert_ne!(mixed[0].tokens, mixed[1].tokens, "α = 8 changed nothing: the test cannot tell rows apart");
}

#[test]
fn vector_files_round_trip_and_refuse_other_models() {
    let m = model();
    let v = sentiment_vector(Method::Prompt, 15);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.safetensors");
    v.save(&path).unwrap();
    let back = SteeringVector::load(&path).unwrap();
    assert_eq!(back.meta, v.meta);
    let a: Vec<f32> = v.layers[&15].to_vec1().unwrap();
    let b: Vec<f32> = back.layers[&15].to_vec1().unwrap();
    assert_eq!(a, b);
    back.check_model(&m.info, false).unwrap();

    let mut other = m.info.clone();
    other.hidden_size = 896;
    other.name = "qwen-coder-0.5b".into();
    let e = back.check_model(&other, true).unwrap_err().to_string();
    assert!(e.contains("hidden size 576") && e.contains("896"), "{e}");
    let mut other = m.info.clone();
    other.num_layers = 24;
    assert!(back.check_model(&other, true).unwrap_err().to_string().contains("24 layers"));
    let mut other = m.info.clone();
    other.weights_hash = "0000".into();
    let e = back.check_model(&other, false).unwrap_err().to_string();
    assert!(e.contains("--allow-foreign-vector"), "{e}");

    // A file whose tensor has the wrong hidden size is refused on load, naming the tensor.
    let bad = dir.path().join("bad.safetensors");
    let mut t = std::collections::HashMap::new();
    t.insert("layer.15".to_string(), Tensor::zeros(10, candle_core::DType::F32, &Device::Cpu).unwrap());
    let md: std::collections::HashMap<String, String> = [
        ("format".to_string(), miniwob_steer::steering::vector::FORMAT.to_string()),
        ("meta".to_string(), serde_json::to_string(&v.meta).unwrap()),
    ]
    .into_iter()
    .collect();
    miniwob_steer::util::save_safetensors(&t, &md, &bad).unwrap();
    let e = SteeringVector::load(&bad).unwrap_err().to_string();
    assert!(e.contains("layer.15") && e.contains("[10]") && e.contains("[576]"), "{e}");
}

#[test]
fn combine_is_normalised() {
    let a = sentiment_vector(Method::Prompt, 12);
    let mut b = a.clone();
    b.layers.insert(12, Tensor::randn(0f32, 1f32, 576, &Device::Cpu).unwrap());
    let c = SteeringVector::combine(&[a.clone(), b.clone()], "both").unwrap();
    let n = c.layers[&12].sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
    assert!((n - 1.0).abs() < 1e-5);
    // The sum of two unit vectors bisects them.
    let ca = generate::cosine(&c.layers[&12], &a.layers[&12]).unwrap();
    let cb = generate::cosine(&c.layers[&12], &b.layers[&12]).unwrap();
    assert!((ca - cb).abs() < 1e-4, "{ca} vs {cb}");
    assert_eq!(c.meta.method, "combine");
}

#[test]
fn llama_cpp_control_vector_round_trip() {
    let m = model();
    let v = sentiment_vector(Method::Prompt, 15);
    let dir = tempfile::tempdir().unwrap();
    let g = dir.path().join("v.gguf");
    v.export_gguf(&g, "llama").unwrap();
    let back = SteeringVector::import_gguf(&g, &m.info).unwrap();
    let a: Vec<f32> = v.layers[&15].to_vec1().unwrap();
    let b: Vec<f32> = back.layers[&15].to_vec1().unwrap();
    assert_eq!(a, b);
    // Read back with the reference `gguf` Python package when the dev venv exists.
    let py = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/py/bin/python");
    if py.exists() {
        let script = r#"
import sys, gguf
r = gguf.GGUFReader(sys.argv[1])
f = r.fields
arch = bytes(f["general.architecture"].parts[-1]).decode()
hint = bytes(f["controlvector.model_hint"].parts[-1]).decode()
count = int(f["controlvector.layer_count"].parts[-1][0])
t = {x.name: x for x in r.tensors}
d = t["direction.15"]
print(arch, hint, count, d.tensor_type.name, len(d.data), float(d.data[0]))
"#;
        let out = std::process::Command::new(&py).arg("-c").arg(script).arg(&g).output().unwrap();
        assert!(out.status.success(), "gguf reader failed: {}", String::from_utf8_lossy(&out.stderr));
        let s = String::from_utf8_lossy(&out.stdout);
        let f: Vec<&str> = s.split_whitespace().collect();
        assert_eq!(&f[..5], ["controlvector", "llama", "1", "F32", "576"], "{s}");
        assert!((f[5].parse::<f32>().unwrap() - a[0]).abs() < 1e-6);
    } else {
        eprintln!("skipping the gguf Python read-back: no target/py venv (scripts/goldens/venv.sh makes it)");
    }
    // direction.0 and a wrong layer count are refused with clear errors.
    let mut zero = v.clone();
    zero.layers.insert(0, v.layers[&15].clone());
    assert!(zero.export_gguf(&dir.path().join("z.gguf"), "llama").unwrap_err().to_string().contains("direction.1"));
    let d0 = dir.path().join("d0.gguf");
    {
        use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
        let q = QTensor::quantize(&v.layers[&15], GgmlDType::F32).unwrap();
        let arch = gguf_file::Value::String("controlvector".into());
        let mut f = std::fs::File::create(&d0).unwrap();
        gguf_file::write(&mut f, &[("general.architecture", &arch)], &[("direction.0", &q)]).unwrap();
    }
    let e = SteeringVector::import_gguf(&d0, &m.info).unwrap_err().to_string();
    assert!(e.contains("direction.0") && e.contains("d0.gguf"), "{e}");
    let mut info = m.info.clone();
    info.num_layers = 10;
    let e = SteeringVector::import_gguf(&g, &info).unwrap_err().to_string();
    assert!(e.contains("direction.15") && e.contains("10 layers"), "{e}");
}

#[test]
fn vector_from_miniwob_episodes_via_the_cli() {
    // Real Chromium: 4 training episodes over two tasks, prompts from the runner's prompt builder.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ep.safetensors");
    let gguf = common::gguf_path("smollm2-135m");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_miniwob-steer"))
        .args(["vector", "--model", gguf.to_str().unwrap(), "--pair", "accuracy", "--layer", "15"])
        .args(["--tasks", "click-test,click-button", "--train-steps", "4", "--seed", "3", "--out"])
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success(), "vector --tasks failed");
    let v = SteeringVector::load(&out).unwrap();
    assert_eq!(v.meta.samples, 4);
    assert_eq!(v.meta.pair, "accuracy");
    let n = v.layers[&15].sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
    assert!((n - 1.0).abs() < 1e-5);
    // Different training prompts (the built-in texts) give a different direction.
    let texts = dir.path().join("texts.safetensors");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_miniwob-steer"))
        .args([
            "vector",
            "--model",
            gguf.to_str().unwrap(),
            "--pair",
            "accuracy",
            "--layer",
            "15",
            "--train-steps",
            "4",
        ])
        .arg("--out")
        .arg(&texts)
        .status()
        .unwrap();
    assert!(status.success());
    let w = SteeringVector::load(&texts).unwrap();
    let cos = generate::cosine(&v.layers[&15], &w.layers[&15]).unwrap();
    assert!(cos < 0.9999, "episode prompts gave the same vector as the text prompts (cosine {cos})");
}
