//! Helpers shared by the integration tests.
#![allow(dead_code)]
use std::path::PathBuf;

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

pub fn fixture_json(dir: &str, file: &str) -> serde_json::Value {
    let p = fixture(dir).join(file);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The GGUF of a locally installed registry model. The test suite runs scripts/setup.sh first,
/// so a missing file is a broken setup, not a reason to skip.
pub fn gguf_path(alias: &str) -> PathBuf {
    match miniwob_steer::models::registry::resolve(alias) {
        Ok(r) => match r.location {
            miniwob_steer::models::registry::Location::Gguf(p) => p,
            other => panic!("{alias}: expected a GGUF, found {other:?}"),
        },
        Err(e) => panic!("{alias}: {e:#} (the tests need ./scripts/setup.sh to have run)"),
    }
}

/// Process-group ids of the chromedriver children of `pid`: children that lead their own group
/// (other children, such as `git describe`, share the caller's group and are not counted).
pub fn child_groups(pid: u32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(own) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { continue };
        // pid (comm) state ppid pgrp ...
        let Some(rest) = stat.rsplit_once(')').map(|r| r.1) else { continue };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.len() > 2 && f[1] == pid.to_string() && f[2].parse::<i32>() == Ok(own) && own > 1 {
            out.push(own);
        }
    }
    out
}

/// Does any live (not zombie) process of group `pgid` exist? Waits up to 5 s for a group that
/// was just SIGKILLed to die.
pub fn group_alive(pgid: i32) -> bool {
    let t0 = std::time::Instant::now();
    loop {
        let alive = std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
            let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { return false };
            let Some(rest) = stat.rsplit_once(')').map(|r| r.1) else { return false };
            let f: Vec<&str> = rest.split_whitespace().collect();
            f.len() > 2 && f[0] != "Z" && f[2].parse::<i32>() == Ok(pgid)
        });
        if !alive || t0.elapsed() > std::time::Duration::from_secs(5) {
            return alive;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Head metadata for synthetic heads: a linear head over `hidden` features, `classes` classes.
pub fn head_meta(hidden: usize, classes: usize) -> miniwob_steer::probe::head::HeadMeta {
    miniwob_steer::probe::head::HeadMeta {
        head: miniwob_steer::probe::HeadKind::Linear,
        classes: (0..classes).map(|c| format!("c{c}")).collect(),
        hook_point: "blocks.0.hook_resid_post".into(),
        pool: miniwob_steer::probe::Pool::Last,
        chat: true,
        hidden_size: hidden,
        num_layers: 1,
        model: "synthetic".into(),
        checkpoint: "none".into(),
        weights_hash: "0".into(),
        adapter: None,
        features: "none".into(),
        mean_resid_norm: 0.0,
        train: serde_json::Value::Null,
        best_epoch: 0,
        best_val_loss: None,
        epochs_run: 0,
        created: String::new(),
    }
}

/// A head whose p(`on`) is ≈1 (`on`) or ≈0 for every input: a gate that is always on or off.
pub fn constant_head(path: &std::path::Path, hidden: usize, layer: usize, on: bool, pool: miniwob_steer::probe::Pool) {
    let mut m = head_meta(hidden, 2);
    m.pool = pool;
    m.classes = vec!["on".into(), "off".into()];
    m.hook_point = format!("blocks.{layer}.hook_resid_post");
    m.model = "smollm2-135m".into();
    let b = if on { vec![10.0, -10.0] } else { vec![-10.0, 10.0] };
    let head = miniwob_steer::probe::Head {
        meta: m,
        mean: vec![0.0; hidden],
        std: vec![1.0; hidden],
        params: vec![vec![0.0; 2 * hidden], b],
        split: miniwob_steer::probe::head::Split { train: vec![0], val: vec![], test: vec![] },
    };
    head.save(path).unwrap();
}

/// A seeded random peft-format LoRA adapter on the q/v projections of every layer of a decoder
/// (`q` and `kv` output widths), rank 4, strong enough to change greedy outputs.
pub fn random_adapter(dir: &std::path::Path, layers: usize, hidden: usize, q: usize, kv: usize, seed: u64) {
    use candle_core::{Device, Tensor};
    use rand::{Rng, SeedableRng};
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut normal = |n: usize, scale: f32| -> Vec<f32> {
        (0..n)
            .map(|_| {
                let (u, v): (f32, f32) = (rng.random::<f32>().max(1e-7), rng.random());
                (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos() * scale
            })
            .collect()
    };
    let mut t = std::collections::HashMap::new();
    let a_scale = 1.0 / (hidden as f32).sqrt();
    for l in 0..layers {
        for (proj, out) in [("q_proj", q), ("v_proj", kv)] {
            let k = format!("base_model.model.model.layers.{l}.self_attn.{proj}");
            t.insert(
                format!("{k}.lora_A.weight"),
                Tensor::from_vec(normal(4 * hidden, a_scale), (4, hidden), &Device::Cpu).unwrap(),
            );
            t.insert(
                format!("{k}.lora_B.weight"),
                Tensor::from_vec(normal(out * 4, 0.5), (out, 4), &Device::Cpu).unwrap(),
            );
        }
    }
    candle_core::safetensors::save(&t, dir.join("adapter_model.safetensors")).unwrap();
    let c = serde_json::json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
        "bias": "none", "use_dora": false, "use_rslora": false, "modules_to_save": null, "fan_in_fan_out": false});
    std::fs::write(dir.join("adapter_config.json"), c.to_string()).unwrap();
}

/// A `miniwob-steer` child that printed `… listening on ADDR` (`stage serve`, `stage gateway`),
/// killed when dropped.
pub struct Listening {
    pub child: std::process::Child,
    pub addr: String,
}

impl Drop for Listening {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `miniwob-steer ARGS` (2 threads, warnings only) and waits for its "listening on" line.
pub fn spawn_listening(bin: &str, args: &[&str]) -> Listening {
    use std::io::BufRead;
    let mut child = std::process::Command::new(bin)
        .args(args)
        .env("RAYON_NUM_THREADS", "2")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.trim().rsplit(' ').next().unwrap_or("").to_string();
    let p = Listening { child, addr };
    assert!(line.contains("listening on"), "{args:?}: {line:?}");
    p
}
