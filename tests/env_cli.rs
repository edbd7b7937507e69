//! The `tasks`, `observe` and `play` subcommands end to end (real Chromium for the last two),
//! and the setup messages when assets or binaries are missing.
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_miniwob-steer"))
}

fn run(c: &mut Command) -> (bool, String, String) {
    let o = c.output().expect("run miniwob-steer");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn tasks_marks_exp12_and_multi_step() {
    let (ok, out, err) = run(bin().arg("tasks"));
    assert!(ok, "{err}");
    let marked: Vec<&str> = out.lines().filter(|l| l.split_whitespace().nth(1) == Some("*")).collect();
    assert_eq!(marked.len(), 25, "{out}");
    let line = |t: &str| {
        out.lines()
            .find(|l| l.split_whitespace().next() == Some(t))
            .unwrap_or_else(|| panic!("{t} missing"))
            .to_string()
    };
    assert!(line("login-user").ends_with("multi"));
    assert!(line("click-button-sequence").ends_with("multi"));
    assert!(line("click-test").contains('*') && line("click-test").trim_end().ends_with('1'));
    let (ok, out, _) = run(bin().args(["tasks", "--exp12", "--json"]));
    assert!(ok);
    assert_eq!(out.lines().count(), 25);
    for l in out.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert_eq!(v["exp12"], true);
    }
}

#[test]
fn observe_then_play_solves_click_button() {
    let png = tempfile::NamedTempFile::new().unwrap();
    let (ok, out, err) =
        run(bin().args(["observe", "--task", "click-button", "--seed", "5", "--som", "--screenshot"]).arg(png.path()));
    assert!(ok, "observe failed: {err}");
    let obs: serde_json::Value = serde_json::from_str(&out).unwrap();
    let utterance = obs["utterance"].as_str().unwrap();
    let want = utterance.split('"').nth(1).unwrap();
    let target = obs["elements"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["tag"] == "BUTTON" && e["text"].as_str() == Some(want))
        .unwrap_or_else(|| panic!("no button {want:?}"));
    assert!(obs["dom_text"].as_str().unwrap().contains(&format!("<button ref={}>", target["ref"])));
    let img = image::load_from_memory(&std::fs::read(png.path()).unwrap()).unwrap();
    assert_eq!((img.width(), img.height()), (320, 420));

    let action = format!("click ref={}", target["ref"]);
    let (ok, out, err) = run(bin().args([
        "play",
        "--task",
        "click-button",
        "--seed",
        "5",
        "--action",
        "jump ref=1",
        "--action",
        &action,
    ]));
    assert!(ok, "play failed: {err}");
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(lines[0]["parse_error"].as_str().unwrap().contains("unknown action"));
    assert_eq!(lines[1]["raw_reward"], 1.0);
    assert_eq!(lines[1]["done"], true);
    assert_eq!(lines[2]["final"]["success"], true);
}

#[test]
fn missing_assets_and_binaries_name_the_setup_script() {
    let empty = tempfile::tempdir().unwrap();
    let (ok, _, err) = run(bin().arg("tasks").env("MINIWOB_STEER_HOME", empty.path()));
    assert!(!ok);
    assert!(err.contains("./scripts/setup.sh"), "{err}");
    let (ok, _, err) = run(bin()
        .args(["observe", "--task", "click-test"])
        .env("MINIWOB_STEER_CHROMEDRIVER", "/nonexistent/chromedriver"));
    assert!(!ok);
    assert!(err.contains("chromedriver") && err.contains("./scripts/setup.sh"), "{err}");
    let (ok, _, err) =
        run(bin().args(["observe", "--task", "click-test"]).env("MINIWOB_STEER_CHROMIUM", "/nonexistent/chromium"));
    assert!(!ok);
    assert!(err.contains("Chromium") && err.contains("./scripts/setup.sh"), "{err}");
}
