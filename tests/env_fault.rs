//! Fault tolerance on real Chromium: kill chromedriver, then Chromium, in the middle of a run;
//! the pool notices on the next call, reports a retryable error, replaces the browser, and the
//! next episode succeeds. Needs `./scripts/setup.sh`.
use miniwob_steer::env::{self, Action, EnvConfig, EnvError, Observation, Pool, PooledSession};

fn button(o: &Observation) -> i64 {
    o.elements.iter().find(|e| e.tag == "BUTTON").expect("a button").r#ref
}

async fn episode(s: &mut PooledSession, seed: u64) -> Result<f64, EnvError> {
    let o = s.reset("click-test", seed).await?;
    let r = s.act(&Action::ClickRef(button(&o))).await?;
    Ok(r.raw_reward)
}

fn kill(pid: u32) {
    // SAFETY: plain kill(2) on a pid this test's browser owns.
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map(|s| !s.contains(") Z ")).unwrap_or(false)
}

#[test]
fn pool_recovers_from_killed_chromedriver_and_chromium() {
    if let Err(e) = env::html_root() {
        panic!("{e}");
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let pool = Pool::new(1, EnvConfig::default()).await.expect("start a browser (./scripts/setup.sh)");

        // 1. chromedriver killed while a session is on loan, between reset and act.
        let mut s = pool.acquire().await.unwrap();
        assert_eq!(episode(&mut s, 1).await.unwrap(), 1.0);
        let o = s.reset("click-test", 2).await.unwrap();
        let driver = s.browser().pid();
        let profile = s.browser().profile_dir().to_path_buf();
        let chromium = s.browser().chromium_pids();
        assert!(!chromium.is_empty(), "Chromium runs in chromedriver's process group");
        kill(driver);
        std::thread::sleep(std::time::Duration::from_millis(200));
        let err = s.act(&Action::ClickRef(button(&o))).await.expect_err("the browser is gone");
        assert!(err.is_retryable(), "{err}");
        assert!(s.is_dead());
        drop(s); // discarded, not returned
        std::thread::sleep(std::time::Duration::from_millis(300));
        for p in &chromium {
            assert!(!alive(*p), "Chromium process {p} survived its dead session");
        }
        assert!(!profile.exists(), "temp profile {} not removed", profile.display());

        let mut s = pool.acquire().await.unwrap();
        assert_eq!(pool.replaced(), 1);
        assert_ne!(s.browser().pid(), driver);
        assert_eq!(episode(&mut s, 3).await.unwrap(), 1.0);

        // 2. Chromium killed (chromedriver still up): detected on the next call.
        let pids = s.browser().chromium_pids();
        for p in &pids {
            kill(*p);
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
        let err = episode(&mut s, 4).await.expect_err("Chromium is gone");
        assert!(err.is_retryable(), "{err}");
        drop(s);

        // 3. Pool::run retries the episode on a fresh browser, transparently.
        let mut attempts = 0;
        let reward = pool
            .run(2, |mut s| {
                attempts += 1;
                let first = attempts == 1;
                async move {
                    if first {
                        // Kill this browser before the episode: the attempt fails, the retry succeeds.
                        kill(s.browser().pid());
                        std::thread::sleep(std::time::Duration::from_millis(200));
                    }
                    episode(&mut s, 5).await
                }
            })
            .await
            .expect("retried episode");
        assert_eq!(reward, 1.0);
        assert_eq!(attempts, 2);
        assert_eq!(pool.replaced(), 3);
        pool.shutdown().await;
    });
}

#[test]
fn dropping_a_session_kills_the_browser() {
    if let Err(e) = env::html_root() {
        panic!("{e}");
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let s = env::Session::start(EnvConfig::default()).await.expect("start a browser (./scripts/setup.sh)");
        let mut pids = s.browser().chromium_pids();
        pids.push(s.browser().pid());
        let profile = s.browser().profile_dir().to_path_buf();
        assert!(profile.exists());
        drop(s);
        std::thread::sleep(std::time::Duration::from_millis(300));
        for p in pids {
            assert!(!alive(p), "process {p} survived the drop");
        }
        assert!(!profile.exists());
    });
}
