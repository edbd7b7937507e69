//! `tasks`, `observe` and `play` subcommands.
use anyhow::{bail, Context, Result};
use miniwob_steer::env::session::{EnvConfig, Session};
use miniwob_steer::env::{html_root, list_tasks, Action};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct TasksArgs {
    /// One JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Only the 25 tasks of the exp12 set.
    #[arg(long)]
    pub exp12: bool,
}

#[derive(clap::Args, Debug)]
pub struct ObserveArgs {
    #[arg(long)]
    pub task: String,
    /// Episode seed (a JS number: 0 ..= 2^53-1).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write a PNG of the task area here.
    #[arg(long)]
    pub screenshot: Option<PathBuf>,
    /// Draw Set-of-Marks boxes and [ref] labels on the screenshot.
    #[arg(long)]
    pub som: bool,
    /// Device pixels per CSS pixel of the screenshot (1 or 2).
    #[arg(long, default_value_t = 2)]
    pub scale: u32,
    /// Protocol (file or built-in name) whose DOM lines `dom_text` shows, and whose page clock
    /// and select execution the session uses.
    #[arg(long, default_value = "default")]
    pub protocol: String,
}

#[derive(clap::Args, Debug)]
pub struct PlayArgs {
    #[arg(long)]
    pub task: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// An action in the grammar of docs/env.md (`click ref=4`, `type ref=5 text="hi"`, ...);
    /// repeat for several, run in order.
    #[arg(long = "action", required = true)]
    pub actions: Vec<String>,
    /// Write a PNG of the task area after the last action.
    #[arg(long)]
    pub screenshot: Option<PathBuf>,
    #[arg(long)]
    pub som: bool,
    /// core.EPISODE_MAX_TIME in ms.
    #[arg(long, default_value_t = 60_000)]
    pub episode_max_time_ms: u64,
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

pub fn run_tasks(a: TasksArgs) -> Result<()> {
    let root = html_root()?;
    let tasks = list_tasks(&root).with_context(|| format!("listing {}", root.display()))?;
    let tasks: Vec<_> = tasks.into_iter().filter(|t| !a.exp12 || t.exp12).collect();
    if a.json {
        for t in &tasks {
            println!("{}", serde_json::to_string(t)?);
        }
        return Ok(());
    }
    println!("{:<34} {:>5} {:>10}", "task", "exp12", "steps");
    for t in &tasks {
        println!(
            "{:<34} {:>5} {:>10}",
            t.name,
            if t.exp12 { "*" } else { "" },
            if t.multi_step { "multi" } else { "1" }
        );
    }
    let n12 = tasks.iter().filter(|t| t.exp12).count();
    let multi = tasks.iter().filter(|t| t.multi_step).count();
    println!(
        "\n{} tasks; {} in the exp12 set (*); {} need more than one action (steps = multi)",
        tasks.len(),
        n12,
        multi
    );
    Ok(())
}

pub fn run_observe(a: ObserveArgs) -> Result<()> {
    if !(1..=2).contains(&a.scale) {
        bail!("--scale must be 1 or 2");
    }
    let protocol = std::sync::Arc::new(miniwob_steer::protocol::Protocol::load(&a.protocol)?);
    let prompts = miniwob_steer::agent::PromptBuilder::new(protocol.clone())?;
    let rt = runtime()?;
    rt.block_on(async move {
        miniwob_steer::env::browser::install_signal_cleanup();
        let mut cfg = miniwob_steer::experiment::evaluate::env_config(&protocol);
        cfg.browser.device_scale = a.scale;
        let mut s = Session::start(cfg).await?;
        let result = async {
            let obs = s.reset(&a.task, a.seed).await?;
            if let Some(path) = &a.screenshot {
                let png = if a.som { s.som_screenshot(&obs).await? } else { s.screenshot().await? };
                std::fs::write(path, png).with_context(|| format!("writing {}", path.display()))?;
            }
            let mut v = serde_json::to_value(&obs)?;
            v["dom_text"] = serde_json::Value::String(prompts.dom_text(&obs.elements)?);
            println!("{}", serde_json::to_string_pretty(&v)?);
            anyhow::Ok(())
        }
        .await;
        s.close().await;
        result
    })
}

pub fn run_play(a: PlayArgs) -> Result<()> {
    let rt = runtime()?;
    rt.block_on(async move {
        miniwob_steer::env::browser::install_signal_cleanup();
        let cfg = EnvConfig { episode_max_time_ms: a.episode_max_time_ms, ..EnvConfig::default() };
        let mut s = Session::start(cfg).await?;
        let result = async {
            let obs = s.reset(&a.task, a.seed).await?;
            eprintln!("utterance: {}", obs.utterance);
            let mut last = None;
            for text in &a.actions {
                match text.parse::<Action>() {
                    Err(e) => println!("{}", serde_json::json!({"action": text, "parse_error": e.to_string()})),
                    Ok(action) => {
                        let r = s.act(&action).await?;
                        println!("{}", serde_json::to_string(&r)?);
                        last = Some(r);
                    }
                }
            }
            if let Some(path) = &a.screenshot {
                let obs = s.observe().await?;
                let png = if a.som { s.som_screenshot(&obs).await? } else { s.screenshot().await? };
                std::fs::write(path, png).with_context(|| format!("writing {}", path.display()))?;
            }
            let (raw, reward, done) = last.map(|r| (r.raw_reward, r.reward, r.done)).unwrap_or((0.0, 0.0, false));
            println!("{}", serde_json::json!({"final": {"task": a.task, "seed": a.seed, "raw_reward": raw, "reward": reward, "done": done, "success": done && raw > 0.0}}));
            anyhow::Ok(())
        }
        .await;
        s.close().await;
        result
    })
}
