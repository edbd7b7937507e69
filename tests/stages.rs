//! Issue 22, pipeline stages: `split` → `stage serve` on loopback → a driver over `--stages`
//! computes the single process's bits (f32 logits and greedy tokens, hooks on either side of a
//! split point), a killed stage is waited for and the run loses and doubles nothing, and bad
//! setups (wrong token, another model's stage, a split point of 0) are refused by name.
mod common;

use candle_core::{DType, Device, Tensor};
use miniwob_steer::models::decoder::Decoder;
use miniwob_steer::models::engine::Engine;
use miniwob_steer::models::generate;
use miniwob_steer::models::hooks::{Captures, HookPoint, HookSpec, Positions, StepInfo};
use miniwob_steer::models::load::LoadedModel;
use miniwob_steer::models::prefix_cache::PrefixCache;
use miniwob_steer::models::qwen2_vl::Qwen2Vl;
use miniwob_steer::models::weights::WeightDType;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;

const BIN: &str = env!("CARGO_BIN_EXE_miniwob-steer");

/// Stage processes and their models take memory and both cores: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

type Stage = common::Listening;

/// Serves `dir` on `listen` (port 0 = a free one) and waits for its "listening on" line.
fn serve(dir: &Path, listen: &str, extra: &[&str]) -> Stage {
    let dir = dir.to_str().unwrap();
    common::spawn_listening(
        BIN,
        &[&["stage", "serve", "--stage", dir, "--listen", listen, "--dtype", "f32"], extra].concat(),
    )
}

fn split(model: &str, at: &str, out: &Path) {
    let o = Command::new(BIN).args(["split", "--model", model, "--at", at, "--out"]).arg(out).output().unwrap();
    assert!(o.status.success(), "split {model} --at {at}: {}", String::from_utf8_lossy(&o.stderr));
}

/// Splits `model` at `at` under `tmp` and serves every stage.
fn pipeline(model: &str, at: &str, tmp: &Path) -> (Vec<Stage>, Vec<String>) {
    let out = tmp.join(format!("split-{}", at.replace(',', "-")));
    split(model, at, &out);
    let n = at.split(',').count() + 1;
    let stages: Vec<Stage> = (0..n).map(|k| serve(&out.join(format!("stage-{k}")), "127.0.0.1:0", &[])).collect();
    let addrs = stages.iter().map(|s| s.addr.clone()).collect();
    (stages, addrs)
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

fn unit_vector(hidden: usize, seed: u64) -> Tensor {
    let mut s = seed;
    let v: Vec<f32> = (0..hidden)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        })
        .collect();
    let t = Tensor::from_vec(v, hidden, &Device::Cpu).unwrap();
    let n = t.sqr().unwrap().sum_all().unwrap().sqrt().unwrap();
    t.broadcast_div(&n).unwrap()
}

/// Every position's logits of a left-padded batch, with `spec`.
fn all_logits(d: &Decoder, prompts: &[Vec<u32>], spec: &HookSpec) -> (Tensor, Captures) {
    let (ids, pads) = generate::left_pad(prompts, 0, &Device::Cpu).unwrap();
    let mut state = d.new_state(pads.clone());
    let mut caps = Captures::default();
    let l = d.forward(&ids, &mut state, &StepInfo::prefill(pads), spec, &mut caps, true).unwrap();
    (l, caps)
}

/// The driver over `addrs` computes `local`'s bits: logits at every position, captures, and
/// steered generations (the engine path, prefix sharing and forks included) with a hook on
/// each side of the first split point `at0`.
fn text_matches(local: &LoadedModel, addrs: &[String], at0: usize) {
    let remote = miniwob_steer::stage::connect_text(addrs).unwrap();
    assert_eq!(remote.info.weights_hash, local.info.weights_hash);
    assert_eq!(remote.info.name, local.info.name);
    let tok = &local.tokenizer;
    let prompts: Vec<Vec<u32>> = ["The capital of France is", "Click the button labelled OK, then"]
        .iter()
        .map(|p| tok.encode(p, true).unwrap())
        .collect();
    let hidden = local.decoder.cfg.hidden_size;
    let (before, after) = (HookPoint::ResidPost(at0 - 1), HookPoint::ResidPre(at0 + 1));
    let spec = HookSpec::none()
        .add(before, unit_vector(hidden, 1), vec![0.0, 4.0], Positions::All)
        .add(after, unit_vector(hidden, 2), vec![3.0, 0.0], Positions::All)
        .capture(HookPoint::ResidPost(at0))
        .capture(HookPoint::Embed);
    let (ll, lc) = all_logits(&local.decoder, &prompts, &spec);
    let (rl, rc) = all_logits(&remote.decoder, &prompts, &spec);
    assert_eq!(ll.dims(), rl.dims());
    let differ = bits(&ll).iter().zip(bits(&rl)).filter(|(a, b)| *a != b).count();
    assert_eq!(differ, 0, "logits at every position, steered on both sides of layer {at0}: {differ} differ");
    for p in [HookPoint::ResidPost(at0), HookPoint::Embed] {
        assert_eq!(bits(&lc.get(p).unwrap()), bits(&rc.get(p).unwrap()), "captured {p}");
    }
    // Generation through the engine (prefix sharing: baseline and steered rows fork one prefill).
    let cfg = local.generate_config(10);
    let rows: Vec<&Vec<u32>> = vec![&prompts[0], &prompts[0], &prompts[1], &prompts[1]];
    let steer = HookSpec::none().add(before, unit_vector(hidden, 3), vec![0.0, 6.0, 0.0, 6.0], Positions::Last).add(
        after,
        unit_vector(hidden, 4),
        vec![0.0, 5.0, 0.0, 5.0],
        Positions::Last,
    );
    let gen = |m: &LoadedModel, spec: &HookSpec| {
        let mut cache = PrefixCache::new(64);
        Engine::generate(m, &rows, &cfg, spec, &mut cache, None)
            .unwrap()
            .into_iter()
            .map(|g| g.generation)
            .collect::<Vec<_>>()
    };
    let (lg, rg) = (gen(local, &steer), gen(&remote, &steer));
    for (r, (a, b)) in lg.iter().zip(&rg).enumerate() {
        assert_eq!((&a.tokens, a.logits_hash), (&b.tokens, b.logits_hash), "row {r}");
    }
    assert!(lg[0].logits_hash != lg[1].logits_hash, "the steering changes the steered row");
    // α = 0 everywhere is the unhooked model.
    let zero = HookSpec::none().add(before, unit_vector(hidden, 3), vec![0.0; 4], Positions::Last);
    let (z, plain) = (gen(&remote, &zero), gen(&remote, &HookSpec::none()));
    for (a, b) in z.iter().zip(&plain) {
        assert_eq!((&a.tokens, a.logits_hash), (&b.tokens, b.logits_hash));
    }
    assert_eq!(plain[0].logits_hash, lg[0].logits_hash);
    // The CAA path: last states of prompts sharing a prefix.
    let caa = HookSpec::none().capture(HookPoint::ResidPost(at0 + 1));
    let pair = vec![prompts[1].clone(), [prompts[1].clone(), vec![prompts[0][1]]].concat()];
    let l = local.last_states(&pair, &caa, &mut PrefixCache::new(64)).unwrap();
    let r = remote.last_states(&pair, &caa, &mut PrefixCache::new(64)).unwrap();
    assert_eq!(bits(&l[&HookPoint::ResidPost(at0 + 1)]), bits(&r[&HookPoint::ResidPost(at0 + 1)]));
}

#[test]
fn smollm2_through_two_and_three_stages_is_bit_identical() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let local = LoadedModel::load("smollm2-135m", &Device::Cpu, WeightDType::F32).unwrap();
    for at in ["15", "8,20"] {
        let (_stages, addrs) = pipeline("smollm2-135m", at, tmp.path());
        text_matches(&local, &addrs, at.split(',').next().unwrap().parse().unwrap());
    }
}

#[test]
fn qwen_coder_through_two_and_three_stages_is_bit_identical() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let local = LoadedModel::load("qwen-coder-0.5b", &Device::Cpu, WeightDType::F32).unwrap();
    for at in ["12", "6,18"] {
        let (_stages, addrs) = pipeline("qwen-coder-0.5b", at, tmp.path());
        text_matches(&local, &addrs, at.split(',').next().unwrap().parse().unwrap());
    }
}

#[test]
fn tiny_qwen2_vl_with_an_image_through_stages_is_bit_identical() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::fixture("tiny-qwen2-vl");
    let spec_dir = dir.display().to_string();
    let local = Qwen2Vl::load(&spec_dir, &Device::Cpu, WeightDType::F32).unwrap();
    let layers = local.cfg.text.num_layers;
    assert!(layers >= 3, "the tiny Qwen2-VL has {layers} layers");
    let img = image::open(dir.join("images/wide.png")).unwrap().to_rgb8();
    let input = local.user_prompt(&[img], "Click on the button.").unwrap();
    let hidden = local.cfg.text.hidden_size;
    for at in ["1", "1,2"] {
        let (stages, addrs) = pipeline(&spec_dir, at, tmp.path());
        let remote = miniwob_steer::stage::connect_vlm(&addrs).unwrap();
        assert!(remote.vision.is_none(), "the driver holds no vision tower");
        let spec = HookSpec::none()
            .add(HookPoint::ResidPost(0), unit_vector(hidden, 5), vec![2.0], Positions::Image)
            .add(HookPoint::ResidPost(1), unit_vector(hidden, 6), vec![3.0], Positions::Text)
            .capture(HookPoint::ResidPost(layers - 1));
        let run = |m: &Qwen2Vl| {
            let mut caps = Captures::default();
            let pre = m.prefill(std::slice::from_ref(&input), &spec, &mut caps, true).unwrap();
            (bits(&pre.logits), bits(&caps.get(HookPoint::ResidPost(layers - 1)).unwrap()))
        };
        assert_eq!(run(&local), run(&remote), "--at {at}: logits and states of an image prompt");
        // Generation with per-row steering, image states read at a layer of the last stage.
        let cfg = local.generate_config(8);
        let steer =
            HookSpec::none().add(HookPoint::ResidPost(0), unit_vector(hidden, 7), vec![0.0, 5.0], Positions::Last);
        let gen = |m: &Qwen2Vl| {
            let rows = vec![&input, &input];
            let out = Engine::generate(
                m,
                &rows,
                &cfg,
                &steer,
                &mut PrefixCache::new(0),
                Some(HookPoint::ResidPost(layers - 1)),
            );
            out.unwrap()
                .into_iter()
                .map(|g| (g.generation.tokens, g.generation.logits_hash, bits(&g.image_states.unwrap())))
                .collect::<Vec<_>>()
        };
        assert_eq!(gen(&local), gen(&remote), "--at {at}: steered generation");
        drop(stages);
    }
}

#[test]
fn bad_setups_are_refused_by_name() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    // A split point of 0.
    let o = Command::new(BIN)
        .args(["split", "--model", "smollm2-135m", "--at", "0", "--out"])
        .arg(tmp.path().join("x"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--at 0") && err.contains("30 layers"), "{err}");
    // A non-loopback bind without a token is refused before loading.
    split("smollm2-135m", "15", &tmp.path().join("a"));
    let s0 = tmp.path().join("a/stage-0");
    let o = Command::new(BIN)
        .args(["stage", "serve", "--stage"])
        .arg(&s0)
        .args(["--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("needs --token-file"), "{err}");
    // A wrong token, and a missing one.
    let token = tmp.path().join("token");
    std::fs::write(&token, "a-long-enough-shared-secret\n").unwrap();
    let guarded = serve(&s0, "127.0.0.1:0", &["--token-file", token.to_str().unwrap()]);
    let s1 = serve(&tmp.path().join("a/stage-1"), "127.0.0.1:0", &["--token-file", token.to_str().unwrap()]);
    let addrs = format!("{},{}", guarded.addr, s1.addr);
    let wrong = tmp.path().join("wrong");
    std::fs::write(&wrong, "not-the-shared-secret-at-all").unwrap();
    for (file, what) in [(Some(&wrong), "a wrong token"), (None, "no token")] {
        let mut c = Command::new(BIN);
        c.args(["generate", "--stages", &addrs, "--prompt", "hi", "--max-new-tokens", "2"]);
        match file {
            Some(f) => c.env("MINIWOB_STEER_STAGE_TOKEN_FILE", f),
            None => c.env_remove("MINIWOB_STEER_STAGE_TOKEN_FILE"),
        };
        let o = c.output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{what} was accepted");
        assert!(err.contains(&format!("stage 0 ({})", guarded.addr)) && err.contains("401"), "{what}: {err}");
    }
    let o = Command::new(BIN)
        .args(["generate", "--stages", &addrs, "--prompt", "hi", "--max-new-tokens", "2"])
        .env("MINIWOB_STEER_STAGE_TOKEN_FILE", &token)
        .output()
        .unwrap();
    assert!(o.status.success(), "the right token: {}", String::from_utf8_lossy(&o.stderr));
    drop((guarded, s1));
    // Stage 1 of another model's split.
    split("qwen-coder-0.5b", "12", &tmp.path().join("b"));
    let a0 = serve(&s0, "127.0.0.1:0", &[]);
    let b1 = serve(&tmp.path().join("b/stage-1"), "127.0.0.1:0", &[]);
    let o = Command::new(BIN)
        .args(["generate", "--stages", &format!("{},{}", a0.addr, b1.addr), "--prompt", "hi"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a stage of another model was accepted");
    assert!(
        err.contains(&format!("stage 1 ({})", b1.addr)) && err.contains("qwen-coder-0.5b") && err.contains("refused"),
        "{err}"
    );
    // Stages given out of order.
    let a1 = serve(&tmp.path().join("a/stage-1"), "127.0.0.1:0", &[]);
    let o = Command::new(BIN)
        .args(["generate", "--stages", &format!("{},{}", a1.addr, a0.addr), "--prompt", "hi"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("is stage 1 of a 2-stage split, given as stage 0"), "{err}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// SIGKILL stage 1 during a run, restart it: the run waits, redoes the calls that failed and
/// finishes with every episode once.
#[test]
fn a_killed_stage_is_waited_for_and_the_run_loses_nothing() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("split");
    split("smollm2-135m", "15", &out_dir);
    let s0 = serve(&out_dir.join("stage-0"), "127.0.0.1:0", &[]);
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let s1 = serve(&out_dir.join("stage-1"), &listen, &[]);
    let out = tmp.path().join("r.jsonl");
    let mut run = Command::new(BIN)
        .args(["run", "--stages", &format!("{},{}", s0.addr, s1.addr), "--tasks", "click-test,click-button,click-link"])
        .args(["--eval-steps", "4", "--train-steps", "2", "--coeff", "3", "--max-new-tokens", "12", "--no-progress"])
        .args(["--name", "test", "--concurrency", "2", "--out"])
        .arg(&out)
        .env("RAYON_NUM_THREADS", "2")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(&out).map(|s| s.lines().count()).unwrap_or(0) < 2 {
        assert!(run.try_wait().unwrap().is_none(), "the run ended before the kill");
        assert!(t0.elapsed().as_secs() < 300, "no line after 300 s");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    drop(s1); // SIGKILL
    std::thread::sleep(std::time::Duration::from_secs(2));
    let s1 = serve(&out_dir.join("stage-1"), &listen, &[]);
    let status = run.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(run.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(status.success(), "{status:?}\n{err}");
    assert!(err.contains(&format!("stage 1 ({listen})")), "the failure names the stage: {err}");
    let keys: Vec<String> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["key"].as_str().unwrap().to_string())
        .collect();
    let unique: std::collections::HashSet<_> = keys.iter().collect();
    assert_eq!(keys.len(), 24, "3 tasks × 4 seeds × 2 conditions");
    assert_eq!(unique.len(), keys.len(), "no episode doubled");
    drop((s0, s1));
}
