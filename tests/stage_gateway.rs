//! `stage gateway`: the HTTP JSON API over a model gives the tokens `generate --json` prints
//! (unsteered, and steered rows in one batch), refuses bad requests with a 400 naming the field,
//! a request without the token with a 401, serves a Qwen2-VL with an image, and gives the same
//! tokens through pipeline stages as over the local model.
mod common;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;

const BIN: &str = env!("CARGO_BIN_EXE_miniwob-steer");
const PROMPT: &str = "Name one primary colour.";

/// Model processes take memory and both cores: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

type Proc = common::Listening;

fn spawn(args: &[&str]) -> Proc {
    common::spawn_listening(BIN, args)
}

fn gateway(extra: &[&str]) -> Proc {
    let mut args = vec!["stage", "gateway", "--listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let p = spawn(&args);
    assert!(p.addr.starts_with("127.0.0.1:"), "gateway prints its address: {}", p.addr);
    p
}

/// One HTTP request: (status, the body as JSON, or as a string when it is not JSON).
fn request(addr: &str, method: &str, path: &str, body: Option<&[u8]>, token: Option<&str>) -> (u16, Value) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(hyper_util::client::legacy::connect::HttpConnector::new());
        let mut req = hyper::Request::builder().method(method).uri(format!("http://{addr}{path}"));
        if let Some(t) = token {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = req.body(Full::new(Bytes::from(body.unwrap_or_default().to_vec()))).unwrap();
        let resp = client.request(req).await.unwrap();
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let v =
            serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
        (status, v)
    })
}

fn post(addr: &str, body: &Value) -> (u16, Value) {
    request(addr, "POST", "/generate", Some(body.to_string().as_bytes()), None)
}

/// `generate --json` rows for `PROMPT` (chat, 8 new tokens) with `extra` flags.
fn generate_cli(extra: &[&str]) -> Vec<Value> {
    let o = Command::new(BIN)
        .args(["generate", "--model", "smollm2-135m", "--dtype", "f32", "--prompt", PROMPT, "--chat"])
        .args(["--max-new-tokens", "8", "--json"])
        .args(extra)
        .env("RAYON_NUM_THREADS", "2")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(o.status.success(), "generate: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn ok_rows(addr: &str, body: &Value) -> Value {
    let (status, v) = post(addr, body);
    assert_eq!(status, 200, "{body}: {v}");
    v
}

/// The 400 of `body`, whose message must name `field` and contain `what`.
fn bad(addr: &str, body: &Value, field: &str, what: &str) {
    let (status, v) = post(addr, body);
    let msg = v["error"].as_str().unwrap_or_default();
    assert_eq!(status, 400, "{body}: {v}");
    assert!(msg.contains(field) && msg.contains(what), "{body}: {msg}");
}

/// A unit vector file for smollm2-135m's shape (576 wide, 30 layers) at layer 15.
fn vector_file(path: &Path, weights_hash: &str) {
    use miniwob_steer::steering::vector::{now, SteeringVector, VectorMeta};
    let v: Vec<f32> = (0..576).map(|i| if i % 7 == 0 { 1.0 } else { 0.0 }).collect();
    let n = (v.iter().map(|x| x * x).sum::<f32>()).sqrt();
    let v: Vec<f32> = v.iter().map(|x| x / n).collect();
    let sv = SteeringVector {
        layers: [(15, candle_core::Tensor::from_vec(v, 576, &candle_core::Device::Cpu).unwrap())].into_iter().collect(),
        meta: VectorMeta {
            model: "smollm2-135m".into(),
            checkpoint: "x".into(),
            weights_hash: weights_hash.into(),
            hidden_size: 576,
            num_layers: 30,
            method: "prompt".into(),
            pair: "test".into(),
            samples: 1,
            pre_norm: Default::default(),
            mean_resid_norm: Default::default(),
            created: now(),
            read: None,
            protocol: None,
            adapter: None,
        },
    };
    sv.save(path).unwrap();
}

#[test]
fn local_gateway_matches_generate_and_refuses_bad_requests() {
    let _g = serial();
    let want = generate_cli(&[]);
    assert_eq!(want.len(), 1);
    let gw = gateway(&["--model", "smollm2-135m", "--dtype", "f32"]);
    let v = ok_rows(&gw.addr, &json!({"prompt": PROMPT, "max_new_tokens": 8}));
    assert_eq!(v["model"], "smollm2-135m");
    assert_eq!(v["weights_hash"], want[0]["weights_hash"]);
    assert_eq!(v["layer"], Value::Null);
    assert_eq!(v["prompt_tokens"], want[0]["prompt_tokens"]);
    assert!(v["seconds"].as_f64().unwrap() > 0.0);
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["tokens"], want[0]["tokens"], "tokens of generate --json");
    assert_eq!(rows[0]["text"], want[0]["text"]);
    assert_eq!(rows[0]["stopped"], want[0]["stopped"]);
    assert_eq!(rows[0]["coeff"], 0.0);
    // The same request again (now through the prefix cache): the same tokens.
    let again = ok_rows(&gw.addr, &json!({"prompt": PROMPT, "max_new_tokens": 8, "chat": true}));
    assert_eq!(again["rows"], v["rows"]);
    // Without the template: another prompt, fewer tokens.
    let raw = ok_rows(&gw.addr, &json!({"prompt": PROMPT, "chat": false, "max_new_tokens": 2}));
    assert!(raw["prompt_tokens"].as_u64() < v["prompt_tokens"].as_u64());
    assert!(raw["rows"][0]["tokens"].as_array().unwrap().len() <= 2);

    let (status, info) = request(&gw.addr, "GET", "/info", None, None);
    assert_eq!(status, 200, "{info}");
    assert_eq!(info["name"], "smollm2-135m");
    assert_eq!(info["num_layers"], 30);
    assert_eq!(info["reads_images"], false);
    assert_eq!(info["layer"], Value::Null);
    assert_eq!(info["vector_hash"], Value::Null);

    bad(&gw.addr, &json!({"chat": true}), "\"prompt\"", "missing");
    bad(&gw.addr, &json!({"prompt": 5}), "\"prompt\"", "expected a string");
    bad(&gw.addr, &json!({"prompt": PROMPT, "coeffs": [0.0, 4.0]}), "\"coeffs\"", "no --vector loaded");
    bad(&gw.addr, &json!({"prompt": PROMPT, "image": png_base64()}), "\"image\"", "reads no images");
    bad(&gw.addr, &json!({"prompt": PROMPT, "max_new_tokens": 5000}), "\"max_new_tokens\"", "1 to 1024");
    bad(&gw.addr, &json!({"prompt": PROMPT, "positions": "image"}), "\"positions\"", "vision-language");
    bad(&gw.addr, &json!({"prompt": PROMPT, "top_k": 3}), "\"top_k\"", "unknown field");
    let (status, v) = request(&gw.addr, "POST", "/generate", Some(b"{\"prompt\": "), None);
    assert_eq!(status, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("not valid JSON"), "{v}");
    let (status, _) = request(&gw.addr, "GET", "/generate", None, None);
    assert_eq!(status, 405);
    let (status, _) = request(&gw.addr, "GET", "/nothing", None, None);
    assert_eq!(status, 404);
    let big = vec![b' '; (64 << 20) + 1];
    let (status, v) = request(&gw.addr, "POST", "/generate", Some(&big), None);
    assert_eq!(status, 413, "{v}");
    // Still serving after all that.
    let v = ok_rows(&gw.addr, &json!({"prompt": PROMPT, "max_new_tokens": 8}));
    assert_eq!(v["rows"][0]["tokens"], want[0]["tokens"]);
}

#[test]
fn steered_rows_are_one_batch_and_match_generate() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let hash = generate_cli(&[])[0]["weights_hash"].as_str().unwrap().to_string();
    let vec = dir.path().join("v.safetensors");
    vector_file(&vec, &hash);
    let vp = vec.to_str().unwrap();
    let want = generate_cli(&["--vector", vp, "--layer", "15", "--coeff", "0,60"]);
    assert_eq!(want.len(), 2);
    assert_ne!(want[0]["tokens"], want[1]["tokens"], "the vector changes the steered row (pick a larger coefficient)");
    let gw = gateway(&["--model", "smollm2-135m", "--dtype", "f32", "--vector", vp, "--layer", "15"]);
    let v = ok_rows(&gw.addr, &json!({"prompt": PROMPT, "max_new_tokens": 8, "coeffs": [0.0, 60.0]}));
    assert_eq!(v["layer"], 15);
    assert_eq!(v["positions"], "last");
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for (r, w) in rows.iter().zip(&want) {
        assert_eq!(r["coeff"], w["coeff"]);
        assert_eq!(r["tokens"], w["tokens"], "coeff {}", w["coeff"]);
        assert_eq!(r["text"], w["text"]);
    }
    // Without coeffs: the unsteered row.
    let plain = ok_rows(&gw.addr, &json!({"prompt": PROMPT, "max_new_tokens": 8}));
    assert_eq!(plain["layer"], Value::Null);
    assert_eq!(plain["rows"][0]["tokens"], want[0]["tokens"]);
    let (_, info) = request(&gw.addr, "GET", "/info", None, None);
    assert_eq!(info["layer"], 15);
    assert!(info["vector_hash"].as_str().is_some_and(|h| !h.is_empty()), "{info}");
    bad(&gw.addr, &json!({"prompt": PROMPT, "coeffs": [1.0, "x"]}), "\"coeffs\"[1]", "finite number");
}

#[test]
fn token_protected_gateway_refuses_requests_without_it() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    // A non-loopback bind without a token is refused before the model loads.
    let o = Command::new(BIN)
        .args(["stage", "gateway", "--model", "smollm2-135m", "--listen", "0.0.0.0:0"])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--token-file"), "{err}");

    let token = "s3cret-gateway-token-0123456789";
    let tf = dir.path().join("token");
    std::fs::write(&tf, format!("{token}\n")).unwrap();
    let gw = gateway(&["--model", "smollm2-135m", "--dtype", "f32", "--token-file", tf.to_str().unwrap()]);
    let body = json!({"prompt": PROMPT, "max_new_tokens": 2}).to_string();
    for t in [None, Some("wrong-token-of-the-same-len-xx"), Some("")] {
        let (status, v) = request(&gw.addr, "POST", "/generate", Some(body.as_bytes()), t);
        assert_eq!(status, 401, "token {t:?}: {v}");
        assert!(v["error"].as_str().unwrap().contains("token"), "{v}");
        let (status, _) = request(&gw.addr, "GET", "/info", None, t);
        assert_eq!(status, 401);
    }
    let (status, v) = request(&gw.addr, "POST", "/generate", Some(body.as_bytes()), Some(token));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["rows"].as_array().unwrap().len(), 1);
}

#[test]
fn gateway_over_stages_matches_the_local_model() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let split = dir.path().join("split");
    let o = Command::new(BIN)
        .args(["split", "--model", "smollm2-135m", "--at", "15", "--out"])
        .arg(&split)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(o.status.success(), "split: {}", String::from_utf8_lossy(&o.stderr));
    let stages: Vec<Proc> = (0..2)
        .map(|k| {
            let d = split.join(format!("stage-{k}"));
            spawn(&["stage", "serve", "--stage", d.to_str().unwrap(), "--listen", "127.0.0.1:0", "--dtype", "f32"])
        })
        .collect();
    let addrs = stages.iter().map(|s| s.addr.as_str()).collect::<Vec<_>>().join(",");
    let hash = generate_cli(&[])[0]["weights_hash"].as_str().unwrap().to_string();
    let vec = dir.path().join("v.safetensors");
    vector_file(&vec, &hash);
    let vp = vec.to_str().unwrap();
    let body = json!({"prompt": PROMPT, "max_new_tokens": 8, "coeffs": [0.0, 60.0]});
    let local = {
        let gw = gateway(&["--model", "smollm2-135m", "--dtype", "f32", "--vector", vp, "--layer", "15"]);
        ok_rows(&gw.addr, &body)
    };
    assert_ne!(local["rows"][0]["tokens"], local["rows"][1]["tokens"], "the steered row differs");
    let remote_gw = gateway(&["--stages", &addrs, "--vector", vp, "--layer", "15"]);
    let remote = ok_rows(&remote_gw.addr, &body);
    assert_eq!(remote["model"], local["model"]);
    assert_eq!(remote["weights_hash"], local["weights_hash"]);
    assert_eq!(remote["prompt_tokens"], local["prompt_tokens"]);
    assert_eq!(remote["rows"], local["rows"], "the stages (steered at layer 15, on stage 1) give the local rows");
    let plain = ok_rows(&remote_gw.addr, &json!({"prompt": PROMPT, "max_new_tokens": 8}));
    assert_eq!(plain["rows"][0]["tokens"], local["rows"][0]["tokens"]);
    drop(remote_gw);
    drop(stages);
}

/// A small PNG (a gradient) as base64.
fn png_base64() -> String {
    use base64::Engine as _;
    let img = image::RgbImage::from_fn(56, 42, |x, y| image::Rgb([(x * 4) as u8, (y * 6) as u8, 128]));
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
    base64::engine::general_purpose::STANDARD.encode(png)
}

#[test]
fn qwen2_vl_gateway_reads_an_image() {
    use miniwob_steer::models::engine::Engine;
    let _g = serial();
    let dir = common::fixture("tiny-qwen2-vl");
    let spec = dir.to_str().unwrap();
    let gw = gateway(&["--model", spec, "--dtype", "f32", "--device", "cpu"]);
    let (_, info) = request(&gw.addr, "GET", "/info", None, None);
    assert_eq!(info["reads_images"], true, "{info}");
    let b64 = png_base64();
    let v = ok_rows(&gw.addr, &json!({"prompt": "What is in the picture?", "image": b64, "max_new_tokens": 6}));
    // The same through the library: the image is one user turn before the text.
    let m = miniwob_steer::models::qwen2_vl::Qwen2Vl::load(
        spec,
        &candle_core::Device::Cpu,
        miniwob_steer::models::WeightDType::F32,
    )
    .unwrap();
    use base64::Engine as _;
    let png = base64::engine::general_purpose::STANDARD.decode(&b64).unwrap();
    let img = image::load_from_memory(&png).unwrap().to_rgb8();
    let input = m.user_prompt(&[img], "What is in the picture?").unwrap();
    assert!(input.ids.iter().filter(|&&t| t == m.cfg.image_token_id).count() > 0);
    let cfg = m.generate_config(6);
    let out = Engine::generate(
        &m,
        &[&input],
        &cfg,
        &miniwob_steer::models::hooks::HookSpec::none(),
        &mut miniwob_steer::models::prefix_cache::PrefixCache::new(0),
        None,
    )
    .unwrap();
    assert_eq!(v["prompt_tokens"], input.ids.len());
    assert_eq!(v["rows"][0]["tokens"], json!(out[0].generation.tokens));
    // Text only, and with the data-URL header.
    ok_rows(&gw.addr, &json!({"prompt": "Hello", "max_new_tokens": 2}));
    ok_rows(&gw.addr, &json!({"prompt": "Hi", "image": format!("data:image/png;base64,{b64}"), "max_new_tokens": 1}));
    bad(&gw.addr, &json!({"prompt": "x", "image": b64, "chat": false}), "\"image\"", "\"chat\": true");
    bad(&gw.addr, &json!({"prompt": "x", "image": "aGVsbG8gdGhlcmU="}), "\"image\"", "not a PNG");
    bad(&gw.addr, &json!({"prompt": "x", "coeffs": [1.0]}), "\"coeffs\"", "no --vector loaded");
}
