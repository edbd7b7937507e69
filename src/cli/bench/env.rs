//! `bench env`: episodes/s of reset + observe + click + reward with 1 and 2 sessions.
use anyhow::{Context, Result};
use miniwob_steer::env::{Action, Pool};
use miniwob_steer::env::{EnvConfig, Observation};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct BenchEnvArgs {
    /// Episodes per configuration.
    #[arg(long, default_value_t = 200)]
    pub episodes: usize,
    /// Session counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub sessions: Vec<usize>,
    /// Task (its oracle clicks the first BUTTON of the page).
    #[arg(long, default_value = "click-test")]
    pub task: String,
}

/// The first button of the page: the oracle for click-test (and a click for any task).
pub fn first_button(obs: &Observation) -> Option<i64> {
    obs.elements.iter().find(|e| e.tag == "BUTTON").map(|e| e.r#ref)
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

pub fn run(a: BenchEnvArgs) -> Result<()> {
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().context("tokio runtime")?;
    rt.block_on(async move {
        miniwob_steer::env::browser::install_signal_cleanup();
        println!(
            "bench env: task {}, {} episodes per row, reset(+observe) + click + reward; cores: {}",
            a.task,
            a.episodes,
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
        );
        println!(
            "{:>8} {:>9} {:>8} {:>11} {:>10} {:>10} {:>10} {:>9} {:>9}",
            "sessions", "episodes", "wall_s", "episodes/s", "reset_ms", "act_ms", "p95_ep_ms", "success", "start_s"
        );
        for &k in &a.sessions {
            let t0 = Instant::now();
            let pool = Pool::new(k, EnvConfig::default()).await?;
            let start_s = t0.elapsed().as_secs_f64();
            // Warm up each session (page load, JIT).
            {
                let mut held = Vec::new();
                for _ in 0..k {
                    let mut s = pool.acquire().await?;
                    for seed in 0..3 {
                        let obs = s.reset(&a.task, 1_000_000 + seed).await?;
                        if let Some(r) = first_button(&obs) {
                            s.act(&Action::ClickRef(r)).await?;
                        }
                    }
                    held.push(s);
                }
            }
            let next = Arc::new(AtomicUsize::new(0));
            let times = Arc::new(Mutex::new((Vec::new(), Vec::new(), Vec::new(), 0usize)));
            let t1 = Instant::now();
            let mut workers = Vec::new();
            for _ in 0..k {
                let pool = pool.clone();
                let next = next.clone();
                let times = times.clone();
                let task = a.task.clone();
                let n = a.episodes;
                workers.push(tokio::spawn(async move {
                    let mut s = pool.acquire().await?;
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            break;
                        }
                        let e0 = Instant::now();
                        let obs = s.reset(&task, i as u64).await?;
                        let e1 = Instant::now();
                        let r = match first_button(&obs) {
                            Some(r) => s.act(&Action::ClickRef(r)).await?,
                            None => s.act(&Action::NoOp).await?,
                        };
                        let e2 = Instant::now();
                        let mut t = times.lock().unwrap_or_else(|p| p.into_inner());
                        t.0.push((e1 - e0).as_secs_f64() * 1e3);
                        t.1.push((e2 - e1).as_secs_f64() * 1e3);
                        t.2.push((e2 - e0).as_secs_f64() * 1e3);
                        t.3 += r.success() as usize;
                    }
                    anyhow::Ok(())
                }));
            }
            for w in workers {
                w.await??;
            }
            let wall = t1.elapsed().as_secs_f64();
            let (reset, act, mut ep, ok) = std::mem::take(&mut *times.lock().unwrap_or_else(|p| p.into_inner()));
            println!(
                "{:>8} {:>9} {:>8.2} {:>11.1} {:>10.1} {:>10.1} {:>10.1} {:>9} {:>9.2}",
                k,
                ep.len(),
                wall,
                ep.len() as f64 / wall,
                mean(&reset),
                mean(&act),
                pct(&mut ep, 0.95),
                format!("{ok}/{}", reset.len()),
                start_s
            );
            if k == a.sessions[0] {
                // Per-operation costs on one session.
                let mut s = pool.acquire().await?;
                let obs = s.reset(&a.task, 7).await?;
                let mut obs_ms = Vec::new();
                let mut shot_ms = Vec::new();
                let mut som_ms = Vec::new();
                for _ in 0..20 {
                    let t = Instant::now();
                    s.observe().await?;
                    obs_ms.push(t.elapsed().as_secs_f64() * 1e3);
                    let t = Instant::now();
                    s.screenshot().await?;
                    shot_ms.push(t.elapsed().as_secs_f64() * 1e3);
                    let t = Instant::now();
                    s.som_screenshot(&obs).await?;
                    som_ms.push(t.elapsed().as_secs_f64() * 1e3);
                }
                println!(
                    "  per op (1 session): observe {:.1} ms, screenshot {:.1} ms, screenshot+SoM {:.1} ms, {} elements",
                    mean(&obs_ms),
                    mean(&shot_ms),
                    mean(&som_ms),
                    obs.elements.len()
                );
            }
            pool.shutdown().await;
        }
        anyhow::Ok(())
    })
}
