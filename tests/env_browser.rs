//! MiniWoB environment on real headless Chromium: scripted oracle policies, determinism, bad
//! inputs, screenshots. One pool of 2 browsers is shared by every test of this binary.
//! Needs `./scripts/setup.sh` (Chromium, chromedriver, the MiniWoB pages).
use miniwob_steer::env::{self, Action, EnvConfig, EnvError, Observation, Pool, PooledSession, StepResult};
use std::sync::OnceLock;

fn dom_text(elements: &[env::Element]) -> String {
    miniwob_steer::agent::PromptBuilder::default().dom_text(elements).unwrap()
}

fn rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap())
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        if let Err(e) = env::html_root() {
            panic!("{e}");
        }
        rt().block_on(Pool::new(2, EnvConfig::default()))
            .unwrap_or_else(|e| panic!("starting browsers failed: {e} (did ./scripts/setup.sh run?)"))
    })
}

fn with_session<T>(f: impl AsyncFnOnce(&mut PooledSession) -> T) -> T {
    let p = pool();
    rt().block_on(async {
        let mut s = p.acquire().await.expect("acquire");
        f(&mut s).await
    })
}

/// The text between the first pair of double quotes.
fn quoted(s: &str) -> &str {
    let a = s.find('"').expect("a quoted string in the utterance") + 1;
    let b = a + s[a..].find('"').expect("closing quote");
    &s[a..b]
}

/// All quoted strings.
fn all_quoted(s: &str) -> Vec<&str> {
    s.split('"').skip(1).step_by(2).collect()
}

fn find<'a>(obs: &'a Observation, what: &str, pred: impl Fn(&env::Element) -> bool) -> &'a env::Element {
    obs.elements
        .iter()
        .find(|e| pred(e))
        .unwrap_or_else(|| panic!("no {what} in {}:\n{}", obs.utterance, dom_text(&obs.elements)))
}

fn button(obs: &Observation, label: &str) -> i64 {
    find(obs, &format!("button {label:?}"), |e| e.tag == "BUTTON" && e.text.trim() == label).r#ref
}

/// The checkbox/radio whose label text is `name` (`<label><input>name</label>`).
fn labelled_input(obs: &Observation, kind: &str, name: &str) -> i64 {
    let label =
        find(obs, &format!("label {name:?}"), |e| e.tag == "t" && e.text.trim() == name).parent.expect("label parent");
    find(obs, &format!("{kind} in label {name:?}"), |e| e.tag == kind && e.parent == Some(label)).r#ref
}

async fn act(s: &mut PooledSession, a: Action) -> StepResult {
    let r = s.act(&a).await.unwrap_or_else(|e| panic!("{a}: {e}"));
    assert!(r.error.is_none(), "{a}: {:?}", r.error);
    r
}

/// Runs a scripted policy on `seeds` and asserts raw reward 1 for each.
fn solve(task: &str, seeds: &[u64], policy: impl AsyncFn(&mut PooledSession, &Observation) -> StepResult) {
    with_session(async |s| {
        for &seed in seeds {
            let obs = s.reset(task, seed).await.unwrap_or_else(|e| panic!("reset {task} {seed}: {e}"));
            assert!(!obs.done);
            let r = policy(s, &obs).await;
            assert!(r.done, "{task} seed {seed}: not done after the policy ({:?}); utterance {:?}", r, obs.utterance);
            assert_eq!(r.raw_reward, 1.0, "{task} seed {seed}: {r:?}; utterance {:?}", obs.utterance);
            assert!(r.reward > 0.0 && r.reward <= 1.0, "{r:?}");
        }
    })
}

const SEEDS: &[u64] = &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9];

#[test]
fn oracle_click_test() {
    solve("click-test", SEEDS, async |s, o| {
        let b = find(o, "button", |e| e.tag == "BUTTON").r#ref;
        act(s, Action::ClickRef(b)).await
    });
}

#[test]
fn oracle_click_button() {
    solve("click-button", SEEDS, async |s, o| {
        let b = button(o, quoted(&o.utterance));
        act(s, Action::ClickRef(b)).await
    });
}

#[test]
fn oracle_click_link() {
    solve("click-link", SEEDS, async |s, o| {
        let want = quoted(&o.utterance);
        let a = find(o, "link", |e| e.classes.split_whitespace().any(|c| c == "alink") && e.text.trim() == want).r#ref;
        act(s, Action::ClickRef(a)).await
    });
}

#[test]
fn oracle_click_dialog() {
    solve("click-dialog", SEEDS, async |s, o| {
        let x = find(o, "dialog close button", |e| {
            e.tag == "BUTTON" && e.classes.split_whitespace().any(|c| c == "ui-dialog-titlebar-close")
        })
        .r#ref;
        act(s, Action::ClickRef(x)).await
    });
}

#[test]
fn oracle_focus_text() {
    solve("focus-text", SEEDS, async |s, o| {
        let i = find(o, "text input", |e| e.tag == "INPUT_text").r#ref;
        act(s, Action::ClickRef(i)).await
    });
}

#[test]
fn oracle_enter_text() {
    solve("enter-text", SEEDS, async |s, o| {
        let text = quoted(&o.utterance).to_string();
        let i = find(o, "text input", |e| e.tag == "INPUT_text").r#ref;
        let r = act(s, Action::TypeRef { r#ref: i, text }).await;
        assert!(!r.done);
        act(s, Action::ClickRef(button(o, "Submit"))).await
    });
}

#[test]
fn oracle_click_checkboxes() {
    solve("click-checkboxes", SEEDS, async |s, o| {
        let list = o
            .utterance
            .strip_prefix("Select ")
            .and_then(|u| u.strip_suffix(" and click Submit."))
            .expect("utterance form");
        if list != "nothing" {
            for name in list.split(", ") {
                let c = labelled_input(o, "INPUT_checkbox", name);
                act(s, Action::ClickRef(c)).await;
            }
        }
        act(s, Action::ClickRef(button(o, "Submit"))).await
    });
}

#[test]
fn oracle_click_option() {
    solve("click-option", SEEDS, async |s, o| {
        let name = o
            .utterance
            .strip_prefix("Select ")
            .and_then(|u| u.strip_suffix(" and click Submit."))
            .expect("utterance form");
        act(s, Action::ClickRef(labelled_input(o, "INPUT_radio", name))).await;
        act(s, Action::ClickRef(button(o, "Submit"))).await
    });
}

#[test]
fn oracle_choose_list() {
    solve("choose-list", SEEDS, async |s, o| {
        let name = o
            .utterance
            .strip_prefix("Select ")
            .and_then(|u| u.strip_suffix(" from the list and click Submit."))
            .expect("utterance form");
        let sel = find(o, "select", |e| e.tag == "SELECT");
        assert!(sel.options.iter().any(|x| x == name), "{:?} not in {:?}", name, sel.options);
        let r = act(s, Action::SelectRef { r#ref: sel.r#ref, option: name.to_string() }).await;
        assert!(!r.done);
        let after = s.observe().await.unwrap();
        assert_eq!(after.element(sel.r#ref).unwrap().value.as_deref(), Some(name));
        act(s, Action::ClickRef(button(o, "Submit"))).await
    });
}

#[test]
fn oracle_login_user_multi_step() {
    solve("login-user", SEEDS, async |s, o| {
        let q = all_quoted(&o.utterance);
        let (user, pass) = (q[0].to_string(), q[1].to_string());
        let u = find(o, "username", |e| e.id == "username").r#ref;
        let p = find(o, "password", |e| e.id == "password").r#ref;
        act(s, Action::TypeRef { r#ref: u, text: user.clone() }).await;
        // Second half through the focused-element variant: click, then type.
        act(s, Action::ClickRef(p)).await;
        act(s, Action::TypeFocused { text: pass.clone() }).await;
        let mid = s.observe().await.unwrap();
        assert_eq!(mid.element(u).unwrap().value.as_deref(), Some(user.as_str()));
        assert!(mid.element(p).unwrap().focused);
        act(s, Action::ClickRef(button(o, "Login"))).await
    });
}

#[test]
fn same_seed_same_episode_other_seed_differs() {
    with_session(async |s| {
        for task in ["click-button", "click-checkboxes", "choose-list", "login-user", "click-dialog"] {
            let a = s.reset(task, 42).await.unwrap();
            // Disturb the page in between: a wrong click, then a reset to another seed.
            let _ = s.act(&Action::ClickRef(a.elements.last().unwrap().r#ref)).await.unwrap();
            let other = s.reset(task, 43).await.unwrap();
            let b = s.reset(task, 42).await.unwrap();
            assert_eq!(a.utterance, b.utterance, "{task}");
            assert_eq!(a.elements, b.elements, "{task}");
            assert_eq!(dom_text(&a.elements), dom_text(&b.elements));
            assert!(
                a.utterance != other.utterance || a.elements != other.elements,
                "{task}: seeds 42 and 43 gave the same episode"
            );
        }
    })
}

#[test]
fn every_exp12_task_resets_and_observes() {
    with_session(async |s| {
        for task in env::EXP12_TASKS {
            let o = s.reset(task, 3).await.unwrap_or_else(|e| panic!("{task}: {e}"));
            assert!(!o.utterance.is_empty(), "{task}: empty utterance");
            assert!(o.elements.iter().any(|e| e.r#ref > 0 && e.tag != "BODY"), "{task}: no elements");
            let text = dom_text(&o.elements);
            assert!(!text.is_empty(), "{task}");
        }
    })
}

#[test]
fn unknown_task_is_an_error_not_a_panic() {
    with_session(async |s| {
        for bad in ["no-such-task", "../core/core", "miniwob/click-test", "", "click-test.html", "flight.Nope"] {
            match s.reset(bad, 0).await {
                Err(EnvError::UnknownTask(_)) => {}
                other => panic!("{bad:?}: expected UnknownTask, got {other:?}"),
            }
        }
        // The session still works afterwards.
        s.reset("click-test", 0).await.unwrap();
    })
}

#[test]
fn bad_refs_and_actions_report_errors() {
    with_session(async |s| {
        let o = s.reset("enter-text", 1).await.unwrap();
        for a in [
            Action::ClickRef(9999),
            Action::TypeRef { r#ref: 9999, text: "x".into() },
            Action::SelectRef { r#ref: 9999, option: "x".into() },
            Action::ClickRef(-9999),
        ] {
            let r = s.act(&a).await.unwrap();
            assert!(r.error.as_deref().unwrap_or("").contains("unknown ref"), "{a}: {r:?}");
            assert!(!r.done);
        }
        let b = button(&o, "Submit");
        let r = s.act(&Action::SelectRef { r#ref: b, option: "x".into() }).await.unwrap();
        assert!(r.error.as_deref().unwrap_or("").contains("not a SELECT"), "{r:?}");
        let r = s.act(&Action::ClickAt { x: 5000.0, y: 5.0 }).await.unwrap();
        assert!(r.error.is_some(), "{r:?}");
        let r = s.act(&Action::NoOp).await.unwrap();
        assert!(r.error.is_none() && !r.done);
        // After the episode ends, further actions are refused with a message.
        let r = s.act(&Action::ClickRef(b)).await.unwrap();
        assert!(r.done && r.error.is_none());
        let r = s.act(&Action::ClickRef(b)).await.unwrap();
        assert!(r.done && r.error.as_deref().unwrap_or("").contains("already over"), "{r:?}");
    })
}

const NASTY: &str = "a \"q\" 'single' back\\slash \\\" </script><script>window.PWNED=1</script> ${x} `tick` é中ü Ωμ";

#[test]
fn typed_text_lands_literally_in_an_input() {
    with_session(async |s| {
        let o = s.reset("enter-text", 2).await.unwrap();
        let i = find(&o, "input", |e| e.tag == "INPUT_text").r#ref;
        // Through the grammar, to exercise the escapes too.
        let line = Action::TypeRef { r#ref: i, text: NASTY.into() }.to_string();
        let a: Action = line.parse().unwrap();
        act(s, a).await;
        let after = s.observe().await.unwrap();
        assert_eq!(after.element(i).unwrap().value.as_deref(), Some(NASTY));
        // Typing appends at the caret; press keys work.
        act(s, Action::PressKey { key: "End".into() }).await;
        act(s, Action::TypeFocused { text: "!".into() }).await;
        act(s, Action::PressKey { key: "Backspace".into() }).await;
        act(s, Action::PressKey { key: "Backspace".into() }).await;
        let after = s.observe().await.unwrap();
        let mut expect = NASTY.to_string();
        expect.pop();
        assert_eq!(after.element(i).unwrap().value.as_deref(), Some(expect.as_str()));
    })
}

#[test]
fn typed_newlines_and_emoji_land_literally_in_a_textarea() {
    with_session(async |s| {
        let o = s.reset("resize-textarea", 1).await.unwrap();
        let t = find(&o, "textarea", |e| e.tag == "TEXTAREA").r#ref;
        let text = format!("line one\n{NASTY}\nthree\ttab 🙂 end");
        act(s, Action::TypeRef { r#ref: t, text: text.clone() }).await;
        let after = s.observe().await.unwrap();
        assert_eq!(after.element(t).unwrap().value.as_deref(), Some(text.as_str()));
    })
}

#[test]
fn click_by_coordinates_hits_the_button() {
    with_session(async |s| {
        let o = s.reset("click-test", 11).await.unwrap();
        let (x, y) = find(&o, "button", |e| e.tag == "BUTTON").center();
        let r = act(s, Action::ClickAt { x, y }).await;
        assert!(r.done && r.raw_reward == 1.0, "{r:?}");
    })
}

#[test]
fn screenshots_and_set_of_marks() {
    with_session(async |s| {
        let o = s.reset("click-checkboxes", 4).await.unwrap();
        let png = s.screenshot().await.unwrap();
        let img = image::load_from_memory(&png).unwrap().to_rgba8();
        assert_eq!((img.width(), img.height()), (160, 210));
        // The yellow query box is at the top of the task area.
        let p = img.get_pixel(80, 5).0;
        assert!(p[0] > 200 && p[1] > 200 && p[2] < 100, "expected the yellow #query at the top, got {p:?}");
        let som = s.som_screenshot(&o).await.unwrap();
        let simg = image::load_from_memory(&som).unwrap().to_rgba8();
        assert_eq!((simg.width(), simg.height()), (320, 420));
        let up = image::imageops::resize(&img, 320, 420, image::imageops::FilterType::Nearest);
        let changed = simg.pixels().zip(up.pixels()).filter(|(a, b)| a != b).count();
        assert!(changed > 500, "Set-of-Marks drew only {changed} pixels");
        let marks = env::som::marked(&o.elements, 160.0, 210.0);
        assert!(marks.iter().any(|e| e.tag == "INPUT_checkbox"), "checkboxes get marks");
        let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("som-click-checkboxes.png");
        std::fs::write(&out, &som).unwrap();
    })
}

#[test]
fn flight_task_gives_fields() {
    with_session(async |s| {
        let o = s.reset("flight.AA", 1).await.unwrap();
        assert!(o.fields.iter().any(|(k, v)| k == "Departure City" && !v.is_empty()), "{:?}", o.fields);
        assert!(o.elements.len() > 20);
        let again = s.reset("flight.AA", 1).await.unwrap();
        assert_eq!(o.fields, again.fields);
    })
}

/// Issue 18.12: U+E000–U+F8FF are WebDriver key codes (U+E003 is Backspace); text holding them
/// arrives as those characters, and presses no key.
#[test]
fn private_use_characters_are_typed_as_text_not_keys() {
    with_session(async |s| {
        let o = s.reset("enter-text", 3).await.unwrap();
        let i = find(&o, "input", |e| e.tag == "INPUT_text").r#ref;
        let text = "abc\u{E003}\u{E003}d\u{E007}\u{F8FF}e";
        act(s, Action::TypeRef { r#ref: i, text: text.into() }).await;
        let after = s.observe().await.unwrap();
        assert_eq!(after.element(i).unwrap().value.as_deref(), Some(text));
        assert!(!after.done, "U+E007 (Enter) must not have submitted the form");
    })
}

/// Issue 18.6: typing long text takes longer than one call timeout; that is not a dead browser.
#[test]
fn long_text_is_not_a_dead_browser() {
    rt().block_on(async {
        let cfg = EnvConfig { call_timeout: std::time::Duration::from_secs(2), ..EnvConfig::default() };
        let mut s = env::Session::start(cfg).await.expect("starting a browser");
        let o = s.reset("enter-text", 4).await.unwrap();
        let i = find(&o, "input", |e| e.tag == "INPUT_text").r#ref;
        let text: String = (0..4000).map(|k| char::from(b'a' + (k % 26) as u8)).collect();
        let t0 = std::time::Instant::now();
        let r = s.act(&Action::TypeRef { r#ref: i, text: text.clone() }).await;
        let took = t0.elapsed();
        let r = r.unwrap_or_else(|e| panic!("typing 4000 characters in {took:?}: {e}"));
        assert!(r.error.is_none(), "{r:?}");
        assert!(!s.is_dead());
        let after = s.observe().await.unwrap();
        assert_eq!(after.element(i).unwrap().value.as_deref(), Some(text.as_str()));
        eprintln!("typed 4000 characters in {took:?} (call timeout 2 s)");
        assert!(took > std::time::Duration::from_secs(2), "the text must outlast one call timeout to test this");
        s.close().await;
    })
}
