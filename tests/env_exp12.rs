//! Checks the claim behind `EXP12_TASKS`: for each task marked single-action, some single
//! `click ref=N` on the first observation earns raw reward 1 (brute force over the elements,
//! resetting before each try). Slow (≈ 1 min per seed), so ignored by default:
//! `cargo test --release -p miniwob-steer --test env_exp12 -- --ignored --nocapture`.
use miniwob_steer::env::{self, Action, EnvConfig, Session};

#[test]
#[ignore]
fn every_single_action_task_has_a_one_click_solution() {
    if let Err(e) = env::html_root() {
        panic!("{e}");
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let mut s = Session::start(EnvConfig::default()).await.expect("browser (./scripts/setup.sh)");
        let mut failures = Vec::new();
        // MINIWOB_STEER_CANDIDATES=a,b,c checks other tasks instead (to choose new members).
        let list: Vec<String> = match std::env::var("MINIWOB_STEER_CANDIDATES") {
            Ok(v) => v.split(',').map(str::to_string).collect(),
            Err(_) => env::tasks::SINGLE_ACTION_TASKS.iter().map(|t| t.to_string()).collect(),
        };
        for task in &list {
            let task = task.as_str();
            for seed in [1u64, 2, 3] {
                let o = s.reset(task, seed).await.unwrap();
                let refs: Vec<i64> = o.elements.iter().map(|e| e.r#ref).filter(|r| *r > 1).collect();
                let mut solved = None;
                for r in refs {
                    s.reset(task, seed).await.unwrap();
                    let res = s.act(&Action::ClickRef(r)).await.unwrap();
                    if res.done && res.raw_reward >= 1.0 {
                        solved = Some(r);
                        break;
                    }
                }
                println!(
                    "{task:<24} seed {seed}: {}",
                    solved.map(|r| format!("click ref={r}")).unwrap_or("NO single click".into())
                );
                if solved.is_none() {
                    failures.push(format!("{task} seed {seed}: {}", o.utterance));
                }
            }
        }
        s.close().await;
        assert!(failures.is_empty(), "no one-click solution:\n{}", failures.join("\n"));
    });
}
