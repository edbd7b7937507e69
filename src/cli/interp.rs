//! `extract` (images, MiniWoB screenshots, text) and `lens index|query|grounded` subcommands.
use crate::cli::models::{render_prompt, ModelArgs};
use anyhow::{bail, Context, Result};
use candle_core::DType;
use miniwob_steer::agent::AgentModel;
use miniwob_steer::device::parse_device;
use miniwob_steer::interp::extract::{self, ExtractWriter, Extracted};
use miniwob_steer::interp::grounded::{self, TextBox};
use miniwob_steer::interp::index::{self, Index, IndexMeta};
use miniwob_steer::interp::lens::{self, EmbeddingLens, Neighbour};
use miniwob_steer::models::engine::VisionEngine;
use miniwob_steer::models::hooks::{HookPoint, Positions};
use miniwob_steer::models::load::Loaded;
use miniwob_steer::models::tokenizer::Tokenizer;
use serde_json::{json, Value};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

/// `A..B` (B excluded), `A..=B`, or a comma-separated list.
pub fn parse_seeds(s: &str) -> Result<Vec<u64>> {
    let num = |x: &str| x.trim().parse::<u64>().with_context(|| format!("--seeds {s}: `{x}` is not a seed"));
    if let Some((a, b)) = s.split_once("..=") {
        return Ok((num(a)?..=num(b)?).collect());
    }
    if let Some((a, b)) = s.split_once("..") {
        let (a, b) = (num(a)?, num(b)?);
        if b <= a {
            bail!("--seeds {s}: empty range (B is excluded; write A..=B to include it)");
        }
        return Ok((a..b).collect());
    }
    s.split(',').map(num).collect()
}

#[derive(clap::Args, Debug)]
pub struct ExtractArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Image files (a Qwen2-VL model): one prompt per image.
    #[arg(long, num_args = 1..)]
    pub image: Vec<PathBuf>,
    /// A MiniWoB task: screenshots straight from the environment (with --seeds).
    #[arg(long)]
    pub task: Option<String>,
    /// Seeds of --task: `A..B` (B excluded), `A..=B` or a list.
    #[arg(long, default_value = "0..1")]
    pub seeds: String,
    /// Set-of-Marks screenshots (boxes and [ref] labels, the VLM agent's observation).
    #[arg(long)]
    pub som: bool,
    /// Device pixels per CSS pixel of the MiniWoB screenshot.
    #[arg(long, default_value_t = 2)]
    pub scale: u32,
    /// The text after the image in the user turn.
    #[arg(long, default_value = "Describe the picture.")]
    pub text: String,
    /// With --task: the VLM agent's own prompt (`run --vlm`: instruction, utterance, answer
    /// request) instead of --text, so the states are the ones the agent computes.
    #[arg(long, requires = "task")]
    pub agent_prompt: bool,
    /// One text prompt (text positions).
    #[arg(long, conflicts_with = "prompts_file")]
    pub prompt: Option<String>,
    /// Text prompts, one per line (plain text, or JSON objects with a `text` field).
    #[arg(long)]
    pub prompts_file: Option<PathBuf>,
    #[arg(long)]
    pub chat: bool,
    /// `all` (hook_embed + every block), layer indices `0,8,16` (blocks.{i}.hook_resid_post),
    /// hook point names, or transformers' numbering `hs:0,8,28` (hs:L = hook_final_norm).
    #[arg(long, default_value = "all")]
    pub layers: String,
    /// image, text or all (default: image with images, text without).
    #[arg(long)]
    pub positions: Option<Positions>,
    /// f16 or f32 on disk.
    #[arg(long, default_value = "f16")]
    pub save_dtype: String,
    /// An output directory; a `.safetensors` file with text prompts keeps the older one-file format.
    #[arg(long)]
    pub out: PathBuf,
}

fn peak_rss_mb() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let l = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    Some(l.split_whitespace().nth(1)?.parse::<f64>().ok()? / 1024.0)
}

pub fn run_extract(a: ExtractArgs) -> Result<()> {
    let images = !a.image.is_empty() || a.task.is_some();
    if !images && a.out.extension().is_some_and(|e| e == "safetensors") {
        let legacy = crate::cli::models::ExtractArgs {
            model: a.model,
            prompt: a.prompt,
            prompts_file: a.prompts_file,
            chat: a.chat,
            layers: a.layers,
            out: a.out,
        };
        return crate::cli::models::run_extract(legacy);
    }
    let save = match a.save_dtype.as_str() {
        "f16" => DType::F16,
        "f32" => DType::F32,
        o => bail!("--save-dtype {o}: expected f16 or f32"),
    };
    let positions = a.positions.unwrap_or(if images { Positions::Image } else { Positions::Text });
    // A graft directory (`graft init`) is the hybrid: its screenshots go through its own tower
    // and adapter; its text prompts are its LM's.
    let hybrid = if images && miniwob_steer::graft::is_graft_dir(Path::new(&a.model.model)) {
        let device = parse_device(&a.model.device)?;
        let dtype = a.model.dtype.resolve_for(&device, &a.model.model);
        let mut h = miniwob_steer::graft::Hybrid::load(Path::new(&a.model.model), &device, dtype)?;
        if let Some(ad) = &a.model.adapter {
            miniwob_steer::models::load::apply_adapter(&mut h.decoder, &mut h.info, ad)?;
        }
        Some(h)
    } else {
        None
    };
    let m = match &hybrid {
        Some(_) => None,
        None => Some(a.model.load_any()?),
    };
    let (dec, info) = match (&hybrid, &m) {
        (Some(h), _) => (&h.decoder, &h.info),
        (None, Some(m)) => (m.decoder(), m.info()),
        (None, None) => unreachable!("one of the two is loaded"),
    };
    let points = miniwob_steer::interp::parse_points(&a.layers, dec.cfg.num_layers)?;
    let common = json!({
        "model": info.name, "model_spec": a.model.spec(), "checkpoint": info.checkpoint,
        "weights_hash": info.weights_hash, "adapter": info.adapter, "dtype": info.dtype, "positions": positions.to_string(),
        "hook_points": points.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
        "harness": env!("CARGO_PKG_VERSION"),
    });
    let mut w = ExtractWriter::create(&a.out, save, common)?;
    let t0 = std::time::Instant::now();
    let mut n = 0usize;
    if images {
        n = match (&hybrid, &m) {
            (Some(h), _) => extract_images(h, &a, &points, positions, &mut w)?,
            (None, Some(Loaded::Vlm(vlm))) => extract_images(&**vlm, &a, &points, positions, &mut w)?,
            _ => bail!(
                "--image/--task need a vision-language model (Qwen2-VL or a graft directory); {} is a text model",
                a.model.spec()
            ),
        };
    } else {
        let prompts = match (&a.prompt, &a.prompts_file) {
            (Some(p), None) => vec![p.clone()],
            (None, Some(f)) => read_lines(f, true)?,
            _ => bail!("give --image F…, --task T, --prompt TEXT or --prompts-file FILE"),
        };
        if positions == Positions::Image {
            bail!("--positions image needs images (--image or --task)");
        }
        let m = m.as_ref().context("a text model")?;
        let (dec, tok) = (m.decoder(), m.tokenizer());
        let pb = miniwob_steer::interp::progress(prompts.len() as u64, "extract");
        for p in &prompts {
            let text = match m {
                Loaded::Text(lm) => render_prompt(lm, p, a.chat)?,
                Loaded::Vlm(_) if a.chat => {
                    bail!("--chat with a Qwen2-VL text prompt is not supported; give the rendered text")
                }
                Loaded::Vlm(_) => p.clone(),
            };
            let ids = tok.encode(&text, !a.chat)?;
            let e: Extracted = extract::extract_text(dec, &ids, tok.pad_token_id().unwrap_or(0), &points)?;
            let strings: Vec<String> = ids.iter().map(|&i| lens::token_string(tok, i)).collect();
            w.write(&e, json!({"source": "text", "prompt": p, "token_strings": strings}))?;
            n += 1;
            pb.inc(1);
        }
        pb.finish_and_clear();
    }
    let secs = t0.elapsed().as_secs_f64();
    let manifest = w.finish()?;
    tracing::info!(
        "extracted {n} inputs in {secs:.2}s ({:.2}/s), peak RSS {:.0} MB; {}",
        n as f64 / secs,
        peak_rss_mb().unwrap_or(f64::NAN),
        manifest.display()
    );
    Ok(())
}

/// One sentence a line, blank lines skipped; with `json`, lines starting with `{` are JSON
/// objects with a `text` field (prompt files; a corpus is plain text: DOM texts can start with `{`).
pub fn read_lines(path: &Path, json: bool) -> Result<Vec<String>> {
    let f = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.with_context(|| format!("{}:{}: not UTF-8", path.display(), i + 1))?;
        let t = line.trim();
        if t.is_empty() {
            continue;
        }
        if json && t.starts_with('{') {
            let v: Value =
                serde_json::from_str(t).with_context(|| format!("{}:{}: invalid JSON", path.display(), i + 1))?;
            let s = v.get("text").and_then(|x| x.as_str());
            out.push(
                s.with_context(|| format!("{}:{}: JSON line without a string `text`", path.display(), i + 1))?
                    .to_string(),
            );
        } else {
            out.push(t.to_string());
        }
    }
    if out.is_empty() {
        bail!("{}: no lines", path.display());
    }
    Ok(out)
}

#[derive(clap::Args, Debug)]
pub struct LensArgs {
    #[command(subcommand)]
    pub cmd: LensCmd,
}

#[derive(clap::Subcommand, Debug)]
pub enum LensCmd {
    /// Build a contextual (LatentLens) index from a text corpus.
    Index(IndexArgs),
    /// Top-k neighbours of every extracted token under the embedding, logit and contextual lenses.
    Query(QueryArgs),
    /// The grounded rate per lens × layer on MiniWoB extractions (table + PNG plot).
    Grounded(GroundedArgs),
    /// Write a corpus for `lens index`: WordNet glosses and examples, or MiniWoB texts.
    Corpus(CorpusArgs),
    /// Scale benchmark: a synthetic index of random unit vectors (no model), then exact queries.
    Bench(BenchArgs),
}

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Index directory (built here unless it exists with the same shape).
    #[arg(long)]
    pub index: PathBuf,
    #[arg(long, default_value_t = 1_000_000)]
    pub slots: usize,
    #[arg(long, default_value_t = 1536)]
    pub hidden: usize,
    /// Index layers.
    #[arg(long, default_value_t = 1)]
    pub layers: usize,
    /// Query vectors per batch (165 = one Set-of-Marks screenshot).
    #[arg(long, default_value_t = 165)]
    pub queries: usize,
    #[arg(long, default_value_t = 5)]
    pub k: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also write the queries and the top-k here (safetensors), for the torch peer's comparison.
    #[arg(long)]
    pub dump: Option<PathBuf>,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

pub fn run_bench(a: BenchArgs) -> Result<()> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(a.seed);
    let mut gauss = |n: usize| -> Vec<f32> {
        // Box–Muller: isotropic directions once normalised.
        (0..n)
            .map(|_| {
                let (u, v): (f32, f32) = (rng.random::<f32>().max(1e-12), rng.random());
                (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
            })
            .collect()
    };
    let fresh = Index::open(&a.index)
        .ok()
        .filter(|ix| ix.meta.slots == a.slots && ix.meta.hidden == a.hidden && ix.meta.hook_points.len() == a.layers);
    if fresh.is_none() {
        let meta = IndexMeta {
            model: "synthetic".into(),
            adapter: None,
            weights_hash: String::new(),
            hook_points: (0..a.layers).map(|l| HookPoint::ResidPost(l).to_string()).collect(),
            hidden: a.hidden,
            slots: 0,
            per_token: 20,
            min_position: 2,
            seed: a.seed,
            corpus: "synthetic".into(),
            sentences: 0,
            occurrences: 0,
            dtype: "f16".into(),
        };
        let t0 = std::time::Instant::now();
        let mut w = index::IndexWriter::create(&a.index, meta)?;
        w.add_sentence("synthetic")?;
        let pb = miniwob_steer::interp::progress(a.slots as u64, "synthetic index");
        for s in 0..a.slots {
            let rows: Vec<Vec<f32>> = (0..a.layers).map(|_| l2(gauss(a.hidden))).collect();
            let r: Vec<&[f32]> = rows.iter().map(|r| r.as_slice()).collect();
            w.push_slot(&format!("t{}", s % 50_000), (s % 50_000) as u32, 0, 2, &r)?;
            if s % 4096 == 0 {
                pb.set_position(s as u64);
            }
        }
        pb.finish_and_clear();
        w.finish()?;
        tracing::info!(
            "built {} slots × {} layers × {} in {:.1}s",
            a.slots,
            a.layers,
            a.hidden,
            t0.elapsed().as_secs_f64()
        );
    }
    let dev = parse_device(&a.device)?;
    let ix = Index::open(&a.index)?;
    let q: Vec<f32> = (0..a.queries).flat_map(|_| gauss(a.hidden)).collect();
    let qt = candle_core::Tensor::from_vec(q, (a.queries, a.hidden), &dev)?;
    let t0 = std::time::Instant::now();
    let hits = ix.query(&qt, a.k)?;
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({"slots": a.slots, "hidden": a.hidden, "layers": a.layers, "queries": a.queries, "k": a.k,
               "query_s": secs, "vision_tokens_per_s": a.queries as f64 / secs,
               "peak_rss_mb": peak_rss_mb(), "threads": rayon::current_num_threads()})
    );
    if let Some(p) = &a.dump {
        let mut t = std::collections::HashMap::new();
        t.insert("queries".to_string(), qt.to_device(&candle_core::Device::Cpu)?);
        let flat = |f: &dyn Fn(&index::Hit) -> i64| hits.iter().flat_map(|r| r.iter().map(f)).collect::<Vec<i64>>();
        let shape = (a.queries, a.k);
        t.insert(
            "layer".into(),
            candle_core::Tensor::from_vec(flat(&|h| h.layer as i64), shape, &candle_core::Device::Cpu)?,
        );
        t.insert(
            "slot".into(),
            candle_core::Tensor::from_vec(flat(&|h| h.slot as i64), shape, &candle_core::Device::Cpu)?,
        );
        let sc: Vec<f32> = hits.iter().flat_map(|r| r.iter().map(|h| h.score)).collect();
        t.insert("score".into(), candle_core::Tensor::from_vec(sc, shape, &candle_core::Device::Cpu)?);
        miniwob_steer::util::save_safetensors(&t, &Default::default(), p)?;
    }
    Ok(())
}

fn l2(mut v: Vec<f32>) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-30);
    v.iter_mut().for_each(|x| *x /= n);
    v
}

#[derive(clap::Args, Debug)]
pub struct CorpusArgs {
    /// wordnet or miniwob.
    #[arg(long)]
    pub kind: String,
    /// miniwob: `all` or a comma-separated task list.
    #[arg(long, default_value = "all")]
    pub tasks: String,
    /// miniwob: seeds per task (`A..B`, `A..=B` or a list).
    #[arg(long, default_value = "0..20")]
    pub seeds: String,
    /// wordnet: the database directory.
    #[arg(long, default_value = miniwob_steer::interp::corpus::WORDNET_DIR)]
    pub wordnet_dir: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run_corpus(a: CorpusArgs) -> Result<()> {
    let lines = match a.kind.as_str() {
        "wordnet" => miniwob_steer::interp::corpus::wordnet_corpus(&a.wordnet_dir)?,
        "miniwob" => {
            let root = miniwob_steer::env::html_root()?;
            let tasks: Vec<String> = if a.tasks == "all" {
                miniwob_steer::env::list_tasks(&root)?.into_iter().map(|t| t.name).collect()
            } else {
                a.tasks.split(',').map(|t| t.trim().to_string()).collect()
            };
            let seeds = parse_seeds(&a.seeds)?;
            let pb = miniwob_steer::interp::progress((tasks.len() * seeds.len()) as u64, "miniwob corpus");
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            let v = rt.block_on(async {
                miniwob_steer::env::browser::install_signal_cleanup();
                miniwob_steer::interp::corpus::miniwob_corpus(&tasks, &seeds, &pb).await
            })?;
            pb.finish_and_clear();
            v
        }
        o => bail!("--kind {o}: expected wordnet or miniwob"),
    };
    std::fs::write(&a.out, lines.join("\n") + "\n").with_context(|| format!("writing {}", a.out.display()))?;
    tracing::info!("{}: {} sentences ({})", a.out.display(), lines.len(), a.kind);
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct IndexArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Text file, one sentence a line.
    #[arg(long)]
    pub corpus: PathBuf,
    /// Layers to store (same syntax as extract --layers); default 1,2,4,8,16,24,L-2,L-1 where they exist.
    #[arg(long)]
    pub layers: Option<String>,
    #[arg(long, default_value_t = 20)]
    pub per_token: usize,
    #[arg(long, default_value_t = 2)]
    pub min_position: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Use only the first N sentences.
    #[arg(long)]
    pub max_sentences: Option<usize>,
    /// Sentences per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    #[arg(long)]
    pub out: PathBuf,
}

/// LatentLens's layers 1,2,4,8,16,24,L-2,L-1 that the model has.
pub fn default_index_layers(n: usize) -> String {
    let mut v: Vec<usize> = [1, 2, 4, 8, 16, 24].into_iter().filter(|&l| l < n).collect();
    v.extend([n.saturating_sub(2), n - 1]);
    v.sort();
    v.dedup();
    v.iter().map(|l| l.to_string()).collect::<Vec<_>>().join(",")
}

pub fn run_index(a: IndexArgs) -> Result<()> {
    let mut sentences = read_lines(&a.corpus, false)?;
    if let Some(n) = a.max_sentences {
        sentences.truncate(n);
    }
    let m = a.model.load_any()?;
    let n = m.decoder().cfg.num_layers;
    let points = miniwob_steer::interp::parse_points(a.layers.as_deref().unwrap_or(&default_index_layers(n)), n)?;
    let meta = IndexMeta {
        model: m.info().name.clone(),
        adapter: m.info().adapter.clone(),
        weights_hash: m.info().weights_hash.clone(),
        hook_points: points.iter().map(|p| p.to_string()).collect(),
        hidden: m.decoder().cfg.hidden_size,
        slots: 0,
        per_token: a.per_token,
        min_position: a.min_position,
        seed: a.seed,
        corpus: a.corpus.display().to_string(),
        sentences: 0,
        occurrences: 0,
        dtype: "f16".into(),
    };
    let t0 = std::time::Instant::now();
    let meta = index::build(m.decoder(), m.tokenizer(), &sentences, &points, meta, &a.out, a.batch)?;
    let secs = t0.elapsed().as_secs_f64();
    tracing::info!(
        "index {}: {} slots from {} token occurrences of {} sentences in {secs:.2}s ({:.0} tokens/s), layers {:?}",
        a.out.display(),
        meta.slots,
        meta.occurrences,
        meta.sentences,
        meta.occurrences as f64 / secs,
        meta.hook_points
    );
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct QueryArgs {
    /// An `extract` output directory.
    #[arg(long)]
    pub extracted: PathBuf,
    /// embedding, logit, contextual (comma-separated).
    #[arg(long, default_value = "embedding,logit,contextual")]
    pub lens: String,
    /// The contextual index (`lens index --out`).
    #[arg(long)]
    pub index: Option<PathBuf>,
    /// The model for the embedding and logit lenses (default: the one the extraction names).
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long, default_value = "auto")]
    pub dtype: miniwob_steer::models::dtype::DTypeChoice,
    #[arg(long, default_value = "auto")]
    pub device: String,
    #[arg(long, default_value_t = 5)]
    pub k: usize,
    /// JSON lines out: one per item × hook point × token × lens.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run_query(a: QueryArgs) -> Result<()> {
    let lenses: Vec<String> = a.lens.split(',').map(|s| s.trim().to_string()).collect();
    for l in &lenses {
        if !["embedding", "logit", "contextual"].contains(&l.as_str()) {
            bail!("--lens {l}: expected embedding, logit or contextual");
        }
    }
    let files = extract::item_files(&a.extracted)?;
    let need_model = lenses.iter().any(|l| l != "contextual");
    let model = if need_model {
        let spec = match &a.model {
            Some(m) => m.clone(),
            None => {
                let mp = a.extracted.join("manifest.json");
                let v: Value = serde_json::from_str(
                    &std::fs::read_to_string(&mp).with_context(|| format!("reading {}", mp.display()))?,
                )?;
                v["model_spec"]
                    .as_str()
                    .with_context(|| format!("{}: no `model_spec`; give --model", mp.display()))?
                    .to_string()
            }
        };
        Some(
            ModelArgs { model: spec, dtype: a.dtype, device: a.device.clone(), adapter: None, stages: None }
                .load_any()?,
        )
    } else {
        None
    };
    let mut idx = if lenses.iter().any(|l| l == "contextual") {
        let p = a.index.as_ref().context("--lens contextual needs --index IDX")?;
        Some(Index::open(p)?)
    } else {
        None
    };
    let emb = match &model {
        Some(m) if lenses.iter().any(|l| l == "embedding") => Some(EmbeddingLens::new(m.decoder())?),
        _ => None,
    };
    let dev = match &model {
        Some(m) => m.decoder().device().clone(),
        None => parse_device(&a.device)?,
    };
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(&a.out).with_context(|| format!("creating {}", a.out.display()))?,
    );
    let t0 = std::time::Instant::now();
    let mut ctx_secs = 0.0;
    let mut queried = 0usize;
    let pb = miniwob_steer::interp::progress(files.len() as u64, "lens query");
    for f in &files {
        let item = extract::read_item(f)?;
        for (p, x) in item.points.iter().zip(&item.states) {
            let x = x.to_device(&dev)?;
            let mut per_lens: Vec<(&str, Vec<Vec<Neighbour>>)> = Vec::new();
            let plain = |tok: &Tokenizer, v: Vec<Vec<(u32, f32)>>| -> Vec<Vec<Neighbour>> {
                v.into_iter()
                    .map(|r| {
                        r.into_iter()
                            .map(|(id, score)| Neighbour {
                                token: lens::token_string(tok, id),
                                id,
                                score,
                                source: None,
                            })
                            .collect()
                    })
                    .collect()
            };
            if let (Some(e), Some(m)) = (&emb, &model) {
                per_lens.push(("embedding", plain(m.tokenizer(), e.topk(&x, a.k)?)));
            }
            if let Some(m) = model.as_ref().filter(|_| lenses.iter().any(|l| l == "logit")) {
                per_lens.push(("logit", plain(m.tokenizer(), lens::logit_lens(m.decoder(), *p, &x, a.k)?)));
            }
            if let Some(ix) = idx.as_mut() {
                let tq = std::time::Instant::now();
                let hits = ix.query(&x, a.k)?;
                ctx_secs += tq.elapsed().as_secs_f64();
                queried += hits.len();
                let v = hits
                    .iter()
                    .map(|r| r.iter().map(|h| ix.neighbour(h)).collect::<Result<Vec<_>>>())
                    .collect::<Result<Vec<_>>>()?;
                per_lens.push(("contextual", v));
            }
            for (lname, rows) in per_lens {
                for (t, nb) in rows.into_iter().enumerate() {
                    let mut line = json!({
                        "item": item.name, "hook_point": p.to_string(), "token_index": t,
                        "position": item.positions[t], "token_id": item.token_ids[t], "lens": lname, "neighbours": nb,
                    });
                    if let Some(g) = item.grid.get(t) {
                        line["grid"] = json!(g);
                        line["box"] = json!(item.boxes[t]);
                    }
                    writeln!(out, "{line}")?;
                }
            }
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    out.flush()?;
    tracing::info!(
        "lens query: {} items in {:.2}s; contextual: {queried} token-layer queries in {ctx_secs:.2}s ({:.0}/s); {}",
        files.len(),
        t0.elapsed().as_secs_f64(),
        queried as f64 / ctx_secs.max(1e-9),
        a.out.display()
    );
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct GroundedArgs {
    /// An `extract --task` output directory (the items carry the DOM text boxes).
    #[arg(long)]
    pub extracted: PathBuf,
    /// `lens query --out` of that directory.
    #[arg(long)]
    pub lens_results: PathBuf,
    /// Neighbours that count (top-k).
    #[arg(long, default_value_t = 5)]
    pub k: usize,
    /// Writes grounded.md, grounded.csv and grounded.png here.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run_grounded(a: GroundedArgs) -> Result<()> {
    let tally = grounded::tally_lens_results(&a.extracted, &a.lens_results, a.k)?;
    if tally.counts.is_empty() {
        bail!("no vision token overlaps a DOM text box in {}", a.extracted.display());
    }
    std::fs::create_dir_all(&a.out)?;
    let md = tally.markdown();
    std::fs::write(a.out.join("grounded.md"), &md)?;
    std::fs::write(a.out.join("grounded.csv"), tally.csv())?;
    let series: Vec<(String, Vec<Option<f64>>)> = tally
        .lenses()
        .into_iter()
        .map(|l| (l.clone(), tally.points.iter().map(|p| tally.rate(&l, p)).collect()))
        .collect();
    let png = miniwob_steer::interp::plot::line_plot(
        &format!("grounded rate (top-{}) per layer", a.k),
        &tally.points,
        &series,
    )?;
    std::fs::write(a.out.join("grounded.png"), png)?;
    println!("{md}");
    tracing::info!("wrote {}/grounded.{{md,csv,png}}", a.out.display());
    Ok(())
}

pub fn run_lens(a: LensArgs) -> Result<()> {
    match a.cmd {
        LensCmd::Index(a) => run_index(a),
        LensCmd::Query(a) => run_query(a),
        LensCmd::Grounded(a) => run_grounded(a),
        LensCmd::Corpus(a) => run_corpus(a),
        LensCmd::Bench(a) => run_bench(a),
    }
}

/// `extract --image/--task` on a VLM (Qwen2-VL or the graft hybrid): one item per image, streamed
/// to `w`; returns the number written.
fn extract_images<E: VisionEngine + AgentModel>(
    vlm: &E,
    a: &ExtractArgs,
    points: &[HookPoint],
    positions: Positions,
    w: &mut ExtractWriter,
) -> Result<usize> {
    let mut n = 0usize;
    let one = |img: image::RgbImage, meta: Value, w: &mut ExtractWriter, input: Option<E::Input>| -> Result<()> {
        let size = (img.width() as usize, img.height() as usize);
        let input = match input {
            Some(i) => i,
            None => vlm.image_prompt(&[img], &a.text)?,
        };
        let e = extract::extract_vlm(vlm, &input, &[size], points, positions)?;
        let mut meta = meta;
        meta["image_size"] = json!([size.0, size.1]);
        meta["grid_thw"] = json!(E::grids(&input).first());
        w.write(&e, meta)?;
        Ok(())
    };
    if let Some(task) = &a.task {
        let seeds = parse_seeds(&a.seeds)?;
        let pb = miniwob_steer::interp::progress(seeds.len() as u64, "extract");
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        rt.block_on(async {
            miniwob_steer::env::browser::install_signal_cleanup();
            let mut cfg = miniwob_steer::env::session::EnvConfig::default();
            cfg.browser.device_scale = a.scale;
            let mut s = miniwob_steer::env::Session::start(cfg).await?;
            let r = async {
                for &seed in &seeds {
                    let obs = s.reset(task, seed).await?;
                    let (img, px) = if a.som {
                        let sc = s.device_scale() as f32;
                        (s.som_image(&obs).await?, sc * miniwob_steer::env::som::enlargement(sc) as f32)
                    } else {
                        let img = image::DynamicImage::ImageRgba8(s.screenshot_image().await?).to_rgb8();
                        (img, s.device_scale() as f32)
                    };
                    let texts: Vec<TextBox> = obs
                        .elements
                        .iter()
                        .filter(|e| !e.text.trim().is_empty())
                        .map(|e| TextBox {
                            text: e.text.clone(),
                            bbox: [e.left, e.top, e.left + e.width, e.top + e.height].map(|v| v as f32 * px),
                        })
                        .collect();
                    let meta = json!({"source": "miniwob", "task": task, "seed": seed, "som": a.som,
                        "utterance": obs.utterance, "pixels_per_css_px": px, "text_boxes": texts,
                        "prompt": if a.agent_prompt { "agent" } else { a.text.as_str() }});
                    let input = if a.agent_prompt {
                        let view =
                            miniwob_steer::agent::View { obs: &obs, screenshot: Some(&img), history: &[], step: 1 };
                        Some(vlm.turn(&miniwob_steer::agent::PromptBuilder::default(), &view, None)?.input)
                    } else {
                        None
                    };
                    one(img, meta, w, input)?;
                    n += 1;
                    pb.inc(1);
                }
                anyhow::Ok(())
            }
            .await;
            s.close().await;
            r
        })?;
        pb.finish_and_clear();
    }
    let pb = miniwob_steer::interp::progress(a.image.len() as u64, "extract");
    for f in &a.image {
        let img = image::open(f).with_context(|| format!("reading image {}", f.display()))?.to_rgb8();
        one(img, json!({"source": "file", "file": f.display().to_string(), "prompt": a.text}), w, None)?;
        n += 1;
        pb.inc(1);
    }
    pb.finish_and_clear();
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_and_default_layers() {
        assert_eq!(parse_seeds("3..6").unwrap(), [3, 4, 5]);
        assert_eq!(parse_seeds("3..=4").unwrap(), [3, 4]);
        assert_eq!(parse_seeds("1,7").unwrap(), [1, 7]);
        assert!(parse_seeds("5..5").is_err());
        assert_eq!(default_index_layers(28), "1,2,4,8,16,24,26,27");
        assert_eq!(default_index_layers(3), "1,2");
    }
}
