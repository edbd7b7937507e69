//! `probe data|features|train|eval|sweep`: thin handlers over `miniwob_steer::probe` (docs/probes.md).
use crate::cli::models::ModelArgs;
use anyhow::{bail, Context, Result};
use miniwob_steer::probe::data::{self, LabelKind};
use miniwob_steer::probe::eval::{self, Which};
use miniwob_steer::probe::features::{self, FeatureSet, Pool};
use miniwob_steer::probe::train::{self, ClassWeights, TrainConfig};
use miniwob_steer::probe::{Head, HeadKind};
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct ProbeArgs {
    #[command(subcommand)]
    pub cmd: ProbeCmd,
}

#[derive(clap::Subcommand, Debug)]
pub enum ProbeCmd {
    /// Write a dataset from MiniWoB (labels: task, family, or an exp12 results file's success).
    Data(DataArgs),
    /// Run the frozen model once over a dataset; pool every selected layer; stream to disk.
    Features(FeaturesArgs),
    /// Train a linear or MLP head on one layer's features.
    Train(TrainArgs),
    /// Accuracy beside the majority baseline, macro-F1, per-class P/R, confusion matrix, collapse warning.
    Eval(EvalArgs),
    /// Train and evaluate a head per layer: one table and a plot.
    Sweep(SweepArgs),
    /// A gate's probability and decision on each prompt of a dataset (what `run --gate` decides per step).
    Gate(GateArgs),
    /// Route each prompt to a LoRA adapter with a router head and generate with it (rows of
    /// different adapters in one batch).
    Route(RouteArgs),
}

#[derive(clap::Args, Debug)]
pub struct RouteArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The router head (`probe train`); its classes are adapter names.
    #[arg(long)]
    pub head: PathBuf,
    /// `NAME=DIR,…`: a peft LoRA adapter per class (NAME = the class); classes without one run on
    /// the base model.
    #[arg(long, value_delimiter = ',', required = true)]
    pub adapters: Vec<String>,
    /// A text dataset (JSONL `{"text", "label"?}`; `text` is encoded as the head's features were).
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    /// Prompts per generation batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// One JSON line per prompt (class, probability, adapter, output) [default: stdout].
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct GateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A text dataset (JSONL, `text` = the user turn, as `probe data` writes it).
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long)]
    pub gate: PathBuf,
    #[arg(long)]
    pub gate_class: String,
    #[arg(long, default_value_t = 0.5)]
    pub gate_threshold: f32,
}

#[derive(clap::Args, Debug)]
pub struct DataArgs {
    /// task (route a page to its task), family (click/type/select/other) or success (needs --results).
    #[arg(long)]
    pub label: LabelKind,
    /// `all` = the exp12 set (25 tasks), `registered` = every task page found, or a list.
    #[arg(long, default_value = "all")]
    pub tasks: String,
    /// Episodes (seeds) per task.
    #[arg(long, default_value_t = 10)]
    pub seeds_per_task: usize,
    /// The first seed (`run` evaluates seeds from 0; keep probe data elsewhere).
    #[arg(long, default_value_t = 100_000)]
    pub seed0: u64,
    /// --label success: an exp12 results file (its baseline episodes).
    #[arg(long)]
    pub results: Option<PathBuf>,
    /// Set-of-Marks screenshots for a Qwen2-VL (`{"image", "text"}` rows, images beside --out).
    #[arg(long)]
    pub images: bool,
    /// Browser sessions.
    #[arg(long, default_value_t = 2)]
    pub concurrency: usize,
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(clap::Args, Debug)]
pub struct FeaturesArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// JSONL: {"text", "label"} or {"image", "text", "label"}.
    #[arg(long)]
    pub data: PathBuf,
    /// `all` (hook_embed + every block), layer indices (blocks.{i}.hook_resid_post), hook point names, or `hs:` indices.
    #[arg(long, default_value = "all")]
    pub layers: String,
    #[arg(long, default_value = "last")]
    pub pool: Pool,
    /// Feed text rows as they are, without the model's chat template (the agent's prompts use it).
    #[arg(long)]
    pub raw: bool,
    /// f32, f16 or bf16 on disk.
    #[arg(long, default_value = "f32")]
    pub save_dtype: String,
    /// Text prompts per forward pass (the values do not depend on it).
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 512)]
    pub shard_rows: usize,
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(clap::Args, Debug, Clone)]
pub struct HeadArgs {
    /// linear or mlp.
    #[arg(long, default_value = "linear")]
    pub head: String,
    /// Hidden width of the mlp head.
    #[arg(long, default_value_t = 256)]
    pub mlp_width: usize,
    #[arg(long, default_value_t = 100)]
    pub epochs: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 1e-2)]
    pub weight_decay: f64,
    /// none or balanced.
    #[arg(long, default_value = "none")]
    pub class_weights: ClassWeights,
    #[arg(long, default_value_t = 0.1)]
    pub val_split: f64,
    #[arg(long, default_value_t = 0.2)]
    pub test_split: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Early stopping: epochs without a lower validation loss.
    #[arg(long, default_value_t = 10)]
    pub patience: usize,
    /// L2 penalty l2/2·ΣW² in the loss (scikit-learn's LogisticRegression(C) on n rows: 1/(C·n)).
    #[arg(long, default_value_t = 0.0)]
    pub l2: f64,
}

impl HeadArgs {
    fn config(&self) -> Result<TrainConfig> {
        let head = match self.head.as_str() {
            "linear" => HeadKind::Linear,
            "mlp" => HeadKind::Mlp { width: self.mlp_width },
            o => bail!("--head {o}: expected linear or mlp"),
        };
        Ok(TrainConfig {
            head,
            epochs: self.epochs,
            lr: self.lr,
            batch_size: self.batch_size,
            weight_decay: self.weight_decay,
            class_weights: self.class_weights,
            val_split: self.val_split,
            test_split: self.test_split,
            seed: self.seed,
            patience: self.patience,
            l2: self.l2,
        })
    }
}

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    #[arg(long)]
    pub features: PathBuf,
    /// A layer index (blocks.{i}.hook_resid_post) or a hook point name.
    #[arg(long)]
    pub layer: String,
    #[command(flatten)]
    pub head: HeadArgs,
    /// The head file (safetensors).
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    #[arg(long)]
    pub head: PathBuf,
    /// Default: the directory the head was trained on.
    #[arg(long)]
    pub features: Option<PathBuf>,
    /// Rows of the head's split: test, val, train or all.
    #[arg(long, default_value = "test")]
    pub split: Which,
    /// Writes eval.md, eval.json and confusion.png here.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct SweepArgs {
    #[arg(long)]
    pub features: PathBuf,
    /// `all` (every hook point of the features) or a list of layer indices / hook point names.
    #[arg(long, default_value = "all")]
    pub layers: String,
    #[command(flatten)]
    pub head: HeadArgs,
    /// Writes sweep.md, sweep.csv, sweep.json, sweep.png and heads/<hook point>.safetensors here.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(a: ProbeArgs) -> Result<()> {
    match a.cmd {
        ProbeCmd::Data(a) => run_data(a),
        ProbeCmd::Features(a) => run_features(a),
        ProbeCmd::Train(a) => run_train(a),
        ProbeCmd::Eval(a) => run_eval(a),
        ProbeCmd::Sweep(a) => run_sweep(a),
        ProbeCmd::Gate(a) => run_gate(a),
        ProbeCmd::Route(a) => run_route(a),
    }
}

fn write(path: &Path, bytes: impl AsRef<[u8]>) -> Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

fn run_data(a: DataArgs) -> Result<()> {
    let (items, labels): (Vec<(String, u64)>, Vec<String>) = match a.label {
        LabelKind::Success => {
            let r = a.results.as_ref().context("--label success needs --results F.jsonl (an exp12 results file)")?;
            data::baseline_outcomes(r)?.into_iter().map(|(t, s, ok)| ((t, s), ok.to_string())).unzip()
        }
        kind => {
            let tasks: Vec<String> = if a.tasks == "registered" {
                miniwob_steer::env::list_tasks(&miniwob_steer::env::html_root()?)?.into_iter().map(|t| t.name).collect()
            } else {
                miniwob_steer::experiment::settings::parse_tasks(&a.tasks)?
            };
            let items = data::task_items(&tasks, a.seeds_per_task, a.seed0);
            let labels = items
                .iter()
                .map(|(t, _)| if kind == LabelKind::Task { t.clone() } else { data::family_of(t).to_string() })
                .collect();
            (items, labels)
        }
    };
    let pb = miniwob_steer::interp::progress(items.len() as u64, "probe data");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let obs = rt.block_on(async {
        miniwob_steer::env::browser::install_signal_cleanup();
        let cfg = miniwob_steer::env::EnvConfig { episode_max_time_ms: 600_000, ..Default::default() };
        let pool = miniwob_steer::env::Pool::new(a.concurrency.max(1), cfg).await?;
        let r = data::observe_items(&pool, &items, a.images, &pb).await;
        pool.shutdown().await;
        r
    })?;
    pb.finish_and_clear();
    let dir = a.out.parent().map(Path::to_path_buf).unwrap_or_default();
    let rows = data::rows_from_observations(&obs, &labels, a.images.then_some(dir.as_path()))?;
    data::write(&a.out, &rows)?;
    let classes: std::collections::BTreeSet<&str> = rows.iter().map(|r| r.label.as_str()).collect();
    eprintln!("wrote {} ({} rows, {} classes)", a.out.display(), rows.len(), classes.len());
    Ok(())
}

fn run_features(a: FeaturesArgs) -> Result<()> {
    let save_dtype = match a.save_dtype.as_str() {
        "f32" => candle_core::DType::F32,
        "f16" => candle_core::DType::F16,
        "bf16" => candle_core::DType::BF16,
        o => bail!("--save-dtype {o}: expected f32, f16 or bf16"),
    };
    let ds = data::read(&a.data)?;
    // Image rows on a graft directory go through the hybrid (its tower and adapter); text rows
    // through its LM (`load_any`).
    let graft = std::path::Path::new(&a.model.model);
    let hybrid = if miniwob_steer::graft::is_graft_dir(graft) && ds.rows.iter().any(|r| r.image.is_some()) {
        let device = miniwob_steer::device::parse_device(&a.model.device)?;
        let mut h =
            miniwob_steer::graft::Hybrid::load(graft, &device, a.model.dtype.resolve_for(&device, &a.model.model))?;
        if let Some(ad) = &a.model.adapter {
            miniwob_steer::models::load::apply_adapter(&mut h.decoder, &mut h.info, ad)?;
        }
        Some(h)
    } else {
        None
    };
    let m = if hybrid.is_none() { Some(a.model.load_any()?) } else { None };
    let layers = match (&hybrid, &m) {
        (Some(h), _) => h.decoder.cfg.num_layers,
        (None, Some(m)) => m.decoder().cfg.num_layers,
        (None, None) => unreachable!("one of the two is loaded"),
    };
    let points = miniwob_steer::interp::parse_points(&a.layers, layers)?;
    let opts = features::Options {
        points,
        pool: a.pool,
        chat: !a.raw,
        save_dtype,
        shard_rows: a.shard_rows,
        batch: a.batch_size,
        model_spec: a.model.spec(),
        dataset: a.data.display().to_string(),
    };
    let man = match (&hybrid, &m) {
        (Some(h), _) => features::compute_vision(h, &ds, &opts, &a.out)?,
        (None, Some(m)) => features::compute(m, &ds, &opts, &a.out)?,
        (None, None) => unreachable!("one of the two is loaded"),
    };
    eprintln!(
        "wrote {}: {} rows × {} hook points ({} classes) in {:.1}s: {:.2} rows/s, {:.0} tokens/s",
        a.out.display(),
        man.rows,
        man.hook_points.len(),
        man.classes.len(),
        man.seconds,
        man.rows as f64 / man.seconds,
        man.tokens as f64 / man.seconds
    );
    Ok(())
}

fn run_train(a: TrainArgs) -> Result<()> {
    let fs = FeatureSet::open(&a.features)?;
    let point = fs.point(&a.layer)?;
    let (x, labels) = fs.load(point)?;
    let cfg = a.head.config()?;
    let (head, rep) = train::train(&x, &labels, &cfg, eval::base_meta(&fs, &point.to_string()))?;
    head.save(&a.out)?;
    let m = eval::evaluate(&head, &fs, if head.split.test.is_empty() { Which::Val } else { Which::Test })?;
    if let Some(w) = eval::collapse_warning(&m) {
        tracing::warn!("{w}");
    }
    eprintln!(
        "wrote {}: {point}, {} epochs run, best epoch {} (val loss {}), {:.4}s/epoch; held-out accuracy {:.1}% (majority baseline {:.1}%), macro-F1 {:.3}",
        a.out.display(),
        rep.epochs.len(),
        rep.best_epoch,
        head.meta.best_val_loss.map(|v| format!("{v:.4}")).unwrap_or_else(|| "none".into()),
        rep.seconds_per_epoch,
        100.0 * m.accuracy,
        100.0 * m.majority_baseline,
        m.macro_f1
    );
    Ok(())
}

fn run_eval(a: EvalArgs) -> Result<()> {
    let head = Head::load(&a.head)?;
    let dir = a.features.clone().unwrap_or_else(|| PathBuf::from(&head.meta.features));
    let fs = FeatureSet::open(&dir)?;
    let m = eval::evaluate(&head, &fs, a.split)?;
    let title = format!("{} at {} ({:?} split)", a.head.display(), head.meta.hook_point, a.split);
    let md = eval::markdown(&title, &m);
    println!("{md}");
    if let Some(w) = eval::collapse_warning(&m) {
        tracing::warn!("{w}");
    }
    if let Some(out) = &a.out {
        std::fs::create_dir_all(out)?;
        write(&out.join("eval.md"), &md)?;
        write(&out.join("eval.json"), serde_json::to_string_pretty(&m)? + "\n")?;
        write(&out.join("confusion.png"), eval::confusion_png(&m, &title)?)?;
        eprintln!("wrote {}/eval.{{md,json}}, confusion.png", out.display());
    }
    Ok(())
}

fn run_sweep(a: SweepArgs) -> Result<()> {
    let fs = FeatureSet::open(&a.features)?;
    let points: Vec<String> = if a.layers == "all" {
        fs.manifest.hook_points.clone()
    } else {
        a.layers.split(',').map(|s| fs.point(s.trim()).map(|p| p.to_string())).collect::<Result<_>>()?
    };
    let cfg = a.head.config()?;
    let rows = eval::sweep(&fs, &points, &cfg, Some(&a.out.join("heads")))?;
    std::fs::create_dir_all(&a.out)?;
    let md = eval::sweep_markdown(&rows);
    println!("{md}");
    write(&a.out.join("sweep.md"), &md)?;
    write(&a.out.join("sweep.csv"), eval::sweep_csv(&rows))?;
    write(&a.out.join("sweep.json"), serde_json::to_string_pretty(&rows)? + "\n")?;
    let title = format!(
        "{} probe accuracy per layer ({} classes, pool {})",
        fs.manifest.model,
        fs.manifest.classes.len(),
        fs.manifest.pool
    );
    write(&a.out.join("sweep.png"), eval::sweep_png(&rows, &title)?)?;
    eprintln!("wrote {}/sweep.{{md,csv,json,png}}", a.out.display());
    Ok(())
}

fn run_gate(a: GateArgs) -> Result<()> {
    let gate = miniwob_steer::probe::gate::Gate::load(&a.gate, &a.gate_class, a.gate_threshold)?;
    let ds = data::read(&a.data)?;
    let m = a.model.load()?;
    gate.check_model(&m.info)?;
    let tok = &m.tokenizer;
    let pad = tok.pad_token_id().unwrap_or(0);
    let mut on = 0usize;
    let pb = miniwob_steer::interp::progress(ds.rows.len() as u64, "probe gate");
    for (i, r) in ds.rows.iter().enumerate() {
        let ids = features::encode_text(tok, &r.text, gate.chat())?;
        let d = gate.read_prompts(&m.decoder, &[ids], pad)?[0];
        on += usize::from(d.on);
        println!(
            "{}",
            serde_json::json!({"row": i, "label": r.label, "meta": r.meta, "probability": d.probability, "on": d.on})
        );
        pb.inc(1);
    }
    pb.finish_and_clear();
    eprintln!(
        "gate `{}` ≥ {} at {}: on for {on} of {} prompts ({:.1}%)",
        a.gate_class,
        a.gate_threshold,
        gate.point,
        ds.rows.len(),
        100.0 * on as f64 / ds.rows.len() as f64
    );
    Ok(())
}

fn run_route(a: RouteArgs) -> Result<()> {
    use miniwob_steer::models::engine::Engine;
    use std::io::Write;
    if a.model.adapter.is_some() {
        bail!("probe route reads the router on the base model: give the adapters in --adapters, not --adapter");
    }
    let head = Head::load(&a.head)?;
    let ds = data::read(&a.data)?;
    if let Some(r) = ds.rows.iter().find(|r| r.image.is_some()) {
        bail!("{}: row `{}` has an image; probe route takes text models and text rows", a.data.display(), r.text);
    }
    let mut m = a.model.load()?;
    head.check_model(&m.info).with_context(|| format!("--head {}", a.head.display()))?;
    let router = miniwob_steer::probe::route::Router::new(head, &mut m.decoder, &a.adapters)?;
    let cfg = m.generate_config(a.max_new_tokens);
    let mut out: Box<dyn Write> = match &a.out {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => Box::new(std::io::stdout().lock()),
    };
    let classes = router.head.meta.classes.clone();
    let labelled = ds.rows.iter().all(|r| classes.contains(&r.label));
    let (mut right, mut per_route) = (0usize, std::collections::BTreeMap::<String, usize>::new());
    let pb = miniwob_steer::interp::progress(ds.rows.len() as u64, "probe route");
    for (b, rows) in ds.rows.chunks(a.batch_size.max(1)).enumerate() {
        let prompts = rows
            .iter()
            .map(|r| features::encode_text(&m.tokenizer, &r.text, router.head.meta.chat))
            .collect::<Result<Vec<_>>>()?;
        let routed = router.route(&m.decoder, &prompts, &cfg)?;
        for (i, (r, x)) in rows.iter().zip(routed).enumerate() {
            let class = &classes[x.class];
            let adapter = router.names[x.class].clone();
            right += usize::from(*class == r.label);
            *per_route.entry(adapter.clone().unwrap_or_else(|| "(base)".into())).or_default() += 1;
            let line = serde_json::json!({
                "row": b * a.batch_size.max(1) + i, "label": r.label, "meta": r.meta,
                "class": class, "probability": x.probability, "adapter": adapter,
                "output": m.tokenizer.decode(&x.generation.tokens, true)?, "tokens": x.generation.tokens.len(),
            });
            writeln!(out, "{line}")?;
        }
        pb.inc(rows.len() as u64);
    }
    out.flush()?;
    pb.finish_and_clear();
    let n = ds.rows.len().max(1);
    let routes: Vec<String> = per_route.iter().map(|(k, v)| format!("{k} {v}")).collect();
    eprintln!("routed {} prompts: {}", ds.rows.len(), routes.join(", "));
    if labelled {
        eprintln!(
            "routing accuracy (class = label): {right}/{} = {:.1}%",
            ds.rows.len(),
            100.0 * right as f64 / n as f64
        );
    }
    Ok(())
}
