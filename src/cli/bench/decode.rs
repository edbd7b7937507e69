//! `bench decode`: prefill and decode tokens/s with no hook, a steering hook, and α = 0, side by
//! side with the transformers peer (scripts/peer/hf_decode.py) in the same invocation.
use crate::cli::models::ModelArgs;
use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use miniwob_steer::models::decoder::Decoder;
use miniwob_steer::models::generate::left_pad;
use miniwob_steer::models::hooks::{Captures, HookPoint, HookSpec, Positions, StepInfo};
use miniwob_steer::models::registry::{self, Location};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct BenchDecodeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    #[arg(long, default_value_t = 32)]
    pub new_tokens: usize,
    /// Timed repetitions per configuration (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// CPU threads for both implementations (sets RAYON_NUM_THREADS / torch threads).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    #[arg(long, default_value = "auto")]
    pub layer: String,
    #[arg(long, default_value_t = 4.0)]
    pub coeff: f32,
    /// Python with torch + transformers for the peer; default target/py/bin/python if present.
    #[arg(long)]
    pub python: Option<PathBuf>,
    /// Skip the Python peer.
    #[arg(long)]
    pub no_peer: bool,
    /// Batch sizes to measure (rows decoded together, as a paired episode's baseline and steered rows).
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub batch: Vec<usize>,
    /// Weight dtypes to measure in this invocation (default: --dtype), e.g. f32,gguf.
    #[arg(long, value_delimiter = ',')]
    pub dtypes: Vec<miniwob_steer::models::WeightDType>,
}

#[derive(Debug, Clone, Copy)]
struct Speed {
    prefill: f64,
    decode: f64,
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// One timed run: prefill and decode tokens/s over all rows of a batch of `batch` copies of
/// `prompt` (`adapters`: each row's LoRA adapter, empty = the decoder's default).
pub(crate) fn measure_once(
    d: &Decoder,
    prompt: &[u32],
    batch: usize,
    new_tokens: usize,
    spec: &HookSpec,
    adapters: &[Option<u16>],
) -> Result<(f64, f64)> {
    let prompts = vec![prompt.to_vec(); batch];
    let (ids, pads) = left_pad(&prompts, 0, d.device())?;
    let mut st = d.new_state(pads.clone());
    if !adapters.is_empty() {
        st.adapters = adapters.to_vec();
    }
    let mut caps = Captures::default();
    let t0 = Instant::now();
    let logits = d.forward(&ids, &mut st, &StepInfo::prefill(pads), spec, &mut caps, false)?;
    let mut next = logits.squeeze(1)?.argmax(1)?.reshape((batch, 1))?;
    next.to_vec2::<u32>()?;
    let t_pre = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    for _ in 0..new_tokens {
        let logits = d.forward(&next, &mut st, &StepInfo::decode(batch), spec, &mut caps, false)?;
        next = logits.squeeze(1)?.argmax(1)?.reshape((batch, 1))?;
        // Reading the ids back is part of every real decode step.
        next.to_vec2::<u32>()?;
    }
    let t_dec = t1.elapsed().as_secs_f64();
    Ok(((batch * prompt.len()) as f64 / t_pre, (batch * new_tokens) as f64 / t_dec))
}

/// Medians of `reps` timed runs of every configuration, interleaved rep by rep (after one
/// untimed warm-up each) so that the machine's drift hits every configuration alike.
fn measure_all(
    d: &Decoder,
    prompt: &[u32],
    batch: usize,
    new_tokens: usize,
    configs: &[(&str, HookSpec, Vec<Option<u16>>)],
    reps: usize,
) -> Result<Vec<Speed>> {
    let mut runs: Vec<(Vec<f64>, Vec<f64>)> = vec![(vec![], vec![]); configs.len()];
    for rep in 0..=reps {
        for (i, (_, spec, adapters)) in configs.iter().enumerate() {
            let (p, q) = measure_once(d, prompt, batch, new_tokens, spec, adapters)?;
            if rep > 0 {
                runs[i].0.push(p);
                runs[i].1.push(q);
            }
        }
    }
    Ok(runs.into_iter().map(|(p, q)| Speed { prefill: median(p), decode: median(q) }).collect())
}

fn peer(a: &BenchDecodeArgs, python: &PathBuf, location: &Location, layer: usize, hook: &str) -> Result<Speed> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/peer/hf_decode.py");
    let mut cmd = std::process::Command::new(python);
    cmd.arg(&script);
    match location {
        Location::Gguf(p) => cmd.arg("--gguf").arg(p),
        Location::Dir(p) => cmd.arg("--model-dir").arg(p),
    };
    cmd.args(["--prompt-tokens", &a.prompt_tokens.to_string(), "--new-tokens", &a.new_tokens.to_string()])
        .args(["--layer", &layer.to_string(), "--coeff", &a.coeff.to_string(), "--threads", &a.threads.to_string()])
        .args(["--hook", hook, "--reps", &a.reps.to_string()])
        .env("OMP_NUM_THREADS", a.threads.to_string());
    let out = cmd.output().with_context(|| format!("running {} {}", python.display(), script.display()))?;
    if !out.status.success() {
        anyhow::bail!("peer failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().rev().find(|l| l.trim_start().starts_with('{')).context("peer printed no JSON line")?;
    let v: serde_json::Value = serde_json::from_str(line)?;
    Ok(Speed {
        prefill: v["prefill_tok_s"].as_f64().context("peer JSON lacks prefill_tok_s")?,
        decode: v["decode_tok_s"].as_f64().context("peer JSON lacks decode_tok_s")?,
    })
}

pub fn run(a: BenchDecodeArgs) -> Result<()> {
    // Must happen before candle's first parallel kernel reads it.
    std::env::set_var("RAYON_NUM_THREADS", a.threads.to_string());
    let resolved = registry::resolve(&a.model.model)?;
    let device = miniwob_steer::device::parse_device(&a.model.device)?;
    let dtypes =
        if a.dtypes.is_empty() { vec![a.model.dtype.resolve_for(&device, &a.model.model)] } else { a.dtypes.clone() };
    let python = a.python.clone().or_else(|| {
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/py/bin/python");
        p.exists().then_some(p)
    });
    let mut peer_speeds: std::collections::HashMap<&str, Option<Speed>> = Default::default();
    let mut header = false;
    for dtype in dtypes {
        let args = ModelArgs { dtype: dtype.into(), adapter: None, ..a.model.clone() };
        let mut m = args.load()?;
        // `--adapter`: attached beside the plain model, so both are measured in this invocation.
        let lora = match &a.model.adapter {
            Some(spec) => {
                let (name, dir) = miniwob_steer::models::lora::parse_named(spec);
                let d = &m.decoder;
                let ad = miniwob_steer::models::lora::LoraAdapter::load(&name, &dir, &d.cfg, d.device(), d.dtype())?;
                Some(m.decoder.attach_adapter(ad)?)
            }
            None => None,
        };
        let d = &m.decoder;
        let layer = registry::parse_layer(&a.layer, d.cfg.num_layers)?;
        // A deterministic prompt of exactly `prompt_tokens` tokens.
        let base = "The quick brown fox jumps over the lazy dog while the web agent clicks the submit button. ";
        let mut ids = Vec::new();
        while ids.len() < a.prompt_tokens {
            ids.extend(m.tokenizer.encode(base, false)?);
        }
        ids.truncate(a.prompt_tokens);
        let v = Tensor::randn(0f32, 1f32, d.cfg.hidden_size, &Device::Cpu)?;
        let v = (&v / v.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()? as f64)?;
        if !header {
            println!(
                "model {} ({}) on {}, threads {}, prompt {} tokens, {} new tokens, hook {} coeff {}, median of {}",
                m.info.name,
                m.info.checkpoint,
                miniwob_steer::device::device_name(&device),
                a.threads,
                a.prompt_tokens,
                a.new_tokens,
                HookPoint::ResidPost(layer),
                a.coeff,
                a.reps
            );
            println!("tokens/s count every row of the batch; the peer (transformers f32, eager) runs batch 1");
            println!("| dtype | batch | hook | ours prefill tok/s | ours decode tok/s | peer prefill tok/s | peer decode tok/s | prefill ratio | decode ratio |");
            println!("|---|---|---|---|---|---|---|---|---|");
            header = true;
        }
        for &batch in &a.batch {
            let steer =
                HookSpec::none().add(HookPoint::ResidPost(layer), v.clone(), vec![a.coeff; batch], Positions::Last);
            let mut configs = vec![
                ("none", HookSpec::none(), vec![]),
                ("steer", steer.clone(), vec![]),
                (
                    "zero",
                    HookSpec::none().add(HookPoint::ResidPost(layer), v.clone(), vec![0.0; batch], Positions::Last),
                    vec![],
                ),
            ];
            if let Some(id) = lora {
                configs.push(("lora", HookSpec::none(), vec![Some(id); batch]));
                configs.push(("lora+steer", steer, vec![Some(id); batch]));
                if batch > 1 {
                    // One row adapted, the others plain: a routed batch.
                    let mut mixed = vec![None; batch];
                    mixed[0] = Some(id);
                    configs.push(("lora 1 row", HookSpec::none(), mixed));
                }
            }
            let speeds = measure_all(d, &ids, batch, a.new_tokens, &configs, a.reps)?;
            for ((name, _, adapters), s) in configs.iter().zip(speeds) {
                let p = match (&python, a.no_peer, batch) {
                    (Some(py), false, 1) if adapters.is_empty() => *peer_speeds.entry(name).or_insert_with(|| {
                        peer(&a, py, &resolved.location, layer, name).map_err(|e| eprintln!("peer skipped: {e:#}")).ok()
                    }),
                    _ => None,
                };
                let (pp, pd, rp, rd) = match p {
                    Some(p) => (
                        format!("{:.1}", p.prefill),
                        format!("{:.1}", p.decode),
                        format!("{:.2}x", s.prefill / p.prefill),
                        format!("{:.2}x", s.decode / p.decode),
                    ),
                    None => ("-".into(), "-".into(), "-".into(), "-".into()),
                };
                println!(
                    "| {} | {batch} | {name} | {:.1} | {:.1} | {pp} | {pd} | {rp} | {rd} |",
                    dtype.name(),
                    s.prefill,
                    s.decode
                );
            }
        }
    }
    if python.is_none() && !a.no_peer {
        println!("(peer not run: no target/py venv; create it with scripts/goldens/venv.sh)");
    }
    println!("steering overhead = `steer` row / `none` row of the same dtype and batch");
    if a.model.adapter.is_some() {
        println!(
            "LoRA overhead = `lora` row / `none` row (unmerged, every row adapted; `lora 1 row`: one row of the batch)"
        );
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct BenchMatmulArgs {
    /// Weight shapes `OUTxIN` (default: qwen-coder-0.5b's q, gate/up and down projections).
    #[arg(long, value_delimiter = ',', default_value = "896x896,4864x896,896x4864")]
    pub shapes: Vec<String>,
    /// Activation rows: 1 and 2 are decode (batch 1, a paired episode), more is prefill.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,128")]
    pub rows: Vec<usize>,
    /// candle GGUF types to compare with our kernel.
    #[arg(long, value_delimiter = ',', default_value = "q8_0,q5_0,q4k,q6k")]
    pub types: Vec<String>,
    #[arg(long, default_value_t = 20)]
    pub reps: usize,
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
}

/// Interleaves the implementations rep by rep, so machine noise hits them alike, and reports
/// medians. Shapes whose input size a type cannot block (k-quants need multiples of 256) are skipped.
pub fn run_matmul(a: BenchMatmulArgs) -> Result<()> {
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::Module;
    use miniwob_steer::models::q8::{Kernel, Q8Matrix};
    rayon::ThreadPoolBuilder::new().num_threads(a.threads).build_global().ok();
    std::env::set_var("RAYON_NUM_THREADS", a.threads.to_string());
    let parse_ty = |s: &str| -> Result<GgmlDType> {
        Ok(match s {
            "q8_0" => GgmlDType::Q8_0,
            "q4_0" => GgmlDType::Q4_0,
            "q5_0" => GgmlDType::Q5_0,
            "q4k" => GgmlDType::Q4K,
            "q6k" => GgmlDType::Q6K,
            other => anyhow::bail!("--types: unknown `{other}` (q8_0, q4_0, q5_0, q4k, q6k)"),
        })
    };
    println!("threads {}, median of {} reps; GFLOP/s = 2·rows·out·in / time", a.threads, a.reps);
    println!("| shape | rows | impl | ms | GFLOP/s | vs ours |");
    println!("|---|---|---|---|---|---|");
    for shape in &a.shapes {
        let (n, k) = shape
            .split_once('x')
            .and_then(|(o, i)| Some((o.parse::<usize>().ok()?, i.parse::<usize>().ok()?)))
            .with_context(|| format!("--shapes: expected OUTxIN, found `{shape}`"))?;
        let w = Tensor::randn(0f32, 0.05, (n, k), &Device::Cpu)?;
        let wv = w.flatten_all()?.to_vec1::<f32>()?;
        let ours = Q8Matrix::quantize(&wv, n, k)?;
        let mut theirs = Vec::new();
        for t in &a.types {
            let ty = parse_ty(t)?;
            if k % ty.block_size() == 0 {
                theirs.push((t.clone(), QMatMul::from_qtensor(QTensor::quantize(&w, ty)?)?));
            }
        }
        let wt = w.t()?;
        for &m in &a.rows {
            let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?;
            let xv = x.flatten_all()?.to_vec1::<f32>()?;
            // Our kernels: the one `matmul` picks for this row count first, then the other SIMD one.
            let best = Kernel::best(m);
            let kernels: Vec<Kernel> = std::iter::once(best)
                .chain([Kernel::Amx, Kernel::Vnni, Kernel::Avx2].into_iter().filter(|&k| k != best && k.available()))
                .collect();
            let nk = kernels.len();
            let mut times: Vec<Vec<f64>> = vec![Vec::new(); theirs.len() + nk + 2];
            for _ in 0..a.reps {
                for (i, &kernel) in kernels.iter().enumerate() {
                    let t0 = Instant::now();
                    std::hint::black_box(ours.matmul_with(&xv, m, kernel)?);
                    times[i].push(t0.elapsed().as_secs_f64());
                }
                for (i, (_, q)) in theirs.iter().enumerate() {
                    let t0 = Instant::now();
                    std::hint::black_box(q.forward(&x)?);
                    times[nk + i].push(t0.elapsed().as_secs_f64());
                }
                let t0 = Instant::now();
                std::hint::black_box(x.matmul(&wt)?);
                times[nk + theirs.len()].push(t0.elapsed().as_secs_f64());
                let t0 = Instant::now();
                std::hint::black_box(miniwob_steer::models::kernels::matmul_t(&xv, m, k, &wv, n));
                times[nk + theirs.len() + 1].push(t0.elapsed().as_secs_f64());
            }
            let med = |v: &mut Vec<f64>| {
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            let ours_t = med(&mut times[0]);
            let flop = 2.0 * (m * n * k) as f64;
            for (i, kernel) in kernels.iter().enumerate() {
                let t = med(&mut times[i]);
                let name = format!("ours q8 {kernel:?}{}", if i == 0 { " (picked)" } else { "" });
                println!("| {n}x{k} | {m} | {name} | {:.3} | {:.1} | {:.2}x |", t * 1e3, flop / t / 1e9, t / ours_t);
            }
            for (i, (name, _)) in theirs.iter().enumerate() {
                let t = med(&mut times[nk + i]);
                println!(
                    "| {n}x{k} | {m} | candle {name} | {:.3} | {:.1} | {:.2}x |",
                    t * 1e3,
                    flop / t / 1e9,
                    t / ours_t
                );
            }
            let t = med(&mut times[nk + theirs.len()]);
            let (ms, gf, rel) = (t * 1e3, flop / t / 1e9, t / ours_t);
            println!("| {n}x{k} | {m} | candle f32 dense | {ms:.3} | {gf:.1} | {rel:.2}x |");
            let t = med(&mut times[nk + theirs.len() + 1]);
            let (ms, gf, rel) = (t * 1e3, flop / t / 1e9, t / ours_t);
            println!("| {n}x{k} | {m} | ours f32 dense (batch invariant) | {ms:.3} | {gf:.1} | {rel:.2}x |");
        }
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct BenchDeterminismArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompts, one per line (default: twelve built-in prompts of mixed lengths).
    #[arg(long)]
    pub prompts_file: Option<PathBuf>,
    /// Wrap each prompt in the model's chat template (a user turn).
    #[arg(long)]
    pub chat: bool,
    #[arg(long, default_value_t = 6)]
    pub new_tokens: usize,
    /// Layer of the steered rows' random direction.
    #[arg(long, default_value = "auto")]
    pub layer: String,
    #[arg(long, default_value_t = 8.0)]
    pub coeff: f32,
    /// CPU threads (candle's pool reads RAYON_NUM_THREADS once): rerun with another count and
    /// compare the fingerprints.
    #[arg(long)]
    pub threads: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Prints one line per composition and exits non-zero when any row differs.
pub fn run_determinism(a: BenchDeterminismArgs) -> Result<()> {
    use miniwob_steer::models::determinism::{self, CheckConfig};
    use miniwob_steer::models::tokenizer::ChatMessage;
    if let Some(t) = a.threads {
        // Before candle's pool starts: it reads these once.
        std::env::set_var("RAYON_NUM_THREADS", t.to_string());
        std::env::set_var("CANDLE_NUM_THREADS", t.to_string());
    }
    let threads =
        std::env::var("CANDLE_NUM_THREADS").unwrap_or_else(|_| candle_core::utils::get_num_threads().to_string());
    let m = a.model.load()?;
    let d = &m.decoder;
    let texts: Vec<String> = match &a.prompts_file {
        Some(f) => std::fs::read_to_string(f)
            .with_context(|| format!("reading --prompts-file {}", f.display()))?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_owned)
            .collect(),
        None => determinism::PROMPTS.iter().map(|s| s.to_string()).collect(),
    };
    let prompts = texts
        .iter()
        .map(|t| {
            let t =
                if a.chat { m.tokenizer.apply_chat_template(&[ChatMessage::new("user", t)], true)? } else { t.clone() };
            m.tokenizer.encode(&t, false)
        })
        .collect::<Result<Vec<_>>>()?;
    let layer = registry::parse_layer(&a.layer, d.cfg.num_layers)?;
    let cfg = CheckConfig {
        gen: miniwob_steer::models::generate::GenerateConfig {
            max_new_tokens: a.new_tokens,
            stop_ids: m.tokenizer.stop_token_ids(),
            pad_id: m.tokenizer.pad_token_id().unwrap_or(0),
            ..Default::default()
        },
        layer,
        vector: determinism::random_direction(d.cfg.hidden_size, a.seed)?,
        coeff: a.coeff,
        seed: a.seed,
    };
    println!(
        "model {} ({}), dtype {}, {} threads, {} prompts, {} new tokens, steered rows α = {} at {}",
        m.info.name,
        m.info.checkpoint,
        m.info.dtype,
        threads,
        prompts.len(),
        a.new_tokens,
        a.coeff,
        HookPoint::ResidPost(layer)
    );
    if !d.batch_invariant() {
        println!("note: this device/dtype is not one of the batch-invariant paths (docs/determinism.md)");
    }
    let report = determinism::check(d, &prompts, &cfg)?;
    println!("| composition | rows | differing |");
    println!("|---|---|---|");
    for c in &report.compositions {
        println!("| {} | {} | {} |", c.name, c.rows, c.differing.len());
    }
    for c in &report.compositions {
        for (i, why) in &c.differing {
            println!("differs: {} — prompt {i}: {why}", c.name);
        }
    }
    println!(
        "prefix cache: {} prefix tokens served, {} computed",
        report.prefix_cache.hit_tokens, report.prefix_cache.computed_tokens
    );
    println!("fingerprint {:016x}", report.fingerprint);
    println!("{} of {} rows differ", report.differing(), report.rows_compared());
    if report.differing() > 0 {
        anyhow::bail!("{} rows are not batch invariant", report.differing());
    }
    Ok(())
}
