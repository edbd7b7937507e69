//! `bench stages`: a model split into pipeline stages on loopback against the same model in one
//! process, in one invocation: prefill and decode tokens/s at each batch size, interleaved rep
//! by rep, and the bytes a token costs on the wire.
use super::decode::{measure_once, median};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use miniwob_steer::models::hooks::HookSpec;
use miniwob_steer::models::load::LoadedModel;
use miniwob_steer::stage::split::{split, SplitOptions};
use std::io::BufRead;
use std::process::{Child, Command, Stdio};

#[derive(clap::Args, Debug)]
pub struct BenchStagesArgs {
    /// Registry alias, transformers directory or .gguf file.
    #[arg(long, default_value = miniwob_steer::models::registry::DEFAULT_MODEL)]
    pub model: String,
    /// Split points (default: one, at half depth).
    #[arg(long, value_delimiter = ',')]
    pub at: Vec<usize>,
    /// Weight dtype of both sides: f32 (the bit-exact reference path) or gguf.
    #[arg(long, default_value = "f32")]
    pub dtype: miniwob_steer::models::WeightDType,
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    #[arg(long, default_value_t = 32)]
    pub new_tokens: usize,
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    pub batch: Vec<usize>,
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// CPU threads of each process (stages compute one after the other, so each may use all).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
}

struct Served(Child);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn run(a: BenchStagesArgs) -> Result<()> {
    std::env::set_var("RAYON_NUM_THREADS", a.threads.to_string());
    let local = LoadedModel::load(&a.model, &Device::Cpu, a.dtype)?;
    let layers = local.decoder.cfg.num_layers;
    let at = if a.at.is_empty() { vec![layers / 2] } else { a.at.clone() };
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("split");
    let stages = split(&SplitOptions { model: a.model.clone(), stages: None, at: at.clone(), out: out.clone() })?;
    let exe = std::env::current_exe()?;
    let mut served = Vec::new();
    let mut addrs = Vec::new();
    for (dir, _) in &stages {
        let mut c = Command::new(&exe)
            .args(["stage", "serve", "--listen", "127.0.0.1:0", "--dtype", a.dtype.name(), "--stage"])
            .arg(dir)
            .env("RAYON_NUM_THREADS", a.threads.to_string())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .context("starting a stage")?;
        let stdout = c.stdout.take().context("stage stdout")?;
        // Owned before anything can fail, so an early return kills it.
        served.push(Served(c));
        let mut line = String::new();
        std::io::BufReader::new(stdout).read_line(&mut line)?;
        if !line.contains("listening on") {
            bail!("{}: the stage did not start ({line:?})", dir.display());
        }
        addrs.push(line.trim().rsplit(' ').next().unwrap_or_default().to_string());
    }
    let remote = miniwob_steer::stage::connect_text(&addrs)?;
    let pipeline = remote.decoder.pipeline().context("a pipeline")?.clone();
    let base = "The quick brown fox jumps over the lazy dog while the web agent clicks the submit button. ";
    let mut ids = Vec::new();
    while ids.len() < a.prompt_tokens {
        ids.extend(local.tokenizer.encode(base, false)?);
    }
    ids.truncate(a.prompt_tokens);
    println!(
        "model {} ({}), {} stages split at {:?} on loopback vs one process, {} threads per process, prompt {} tokens, \
         {} new tokens, median of {}",
        local.info.name,
        a.dtype.name(),
        stages.len(),
        at,
        a.threads,
        a.prompt_tokens,
        a.new_tokens,
        a.reps
    );
    println!("| batch | one process prefill tok/s | stages prefill tok/s | ratio | one process decode tok/s | stages decode tok/s | ratio | wire bytes / prefill token | wire bytes / decode token |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let none = HookSpec::none();
    for &b in &a.batch {
        // Bytes on the wire: a prefill alone, then prefill + decode, per row-token.
        let t0 = pipeline.traffic();
        measure_once(&remote.decoder, &ids, b, 0, &none, &[])?;
        let t1 = pipeline.traffic();
        measure_once(&remote.decoder, &ids, b, a.new_tokens, &none, &[])?;
        let t2 = pipeline.traffic();
        let bytes = |x: (u64, u64), y: (u64, u64)| (y.0 - x.0 + y.1 - x.1) as f64;
        let pre_bytes = bytes(t0, t1) / (b * a.prompt_tokens) as f64;
        let dec_bytes = (bytes(t1, t2) - bytes(t0, t1)) / (b * a.new_tokens) as f64;
        let mut runs: [Vec<(f64, f64)>; 2] = [vec![], vec![]];
        for rep in 0..=a.reps {
            for (i, d) in [&local.decoder, &remote.decoder].into_iter().enumerate() {
                let s = measure_once(d, &ids, b, a.new_tokens, &none, &[])?;
                if rep > 0 {
                    runs[i].push(s);
                }
            }
        }
        let med =
            |i: usize| (median(runs[i].iter().map(|s| s.0).collect()), median(runs[i].iter().map(|s| s.1).collect()));
        let ((lp, ld), (rp, rd)) = (med(0), med(1));
        println!(
            "| {b} | {lp:.1} | {rp:.1} | {:.2}× | {ld:.1} | {rd:.1} | {:.2}× | {pre_bytes:.0} | {dec_bytes:.0} |",
            rp / lp,
            rd / ld
        );
    }
    drop(served);
    Ok(())
}
