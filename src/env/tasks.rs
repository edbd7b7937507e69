//! Task names, the exp12 task set and which tasks need more than one action.
use std::path::Path;

/// The 25 tasks of the exp12 evaluation (`run --tasks all`).
///
/// How they were chosen (no list came with the project): MiniWoB++ tasks registered in the
/// `miniwob` 1.1.0 wheel that a text agent can finish from the *first* observation in one model
/// turn with the DOM grammar of DESIGN.md §5 (`click ref=N`, `type ref=N text=...`,
/// `select ref=N option=...`): no coordinates, dragging, hovering, scrolling, or targets that only
/// appear after an earlier action. That gives 22 tasks solved by a single click; the set is filled
/// to 25 with the three simplest two-action tasks, one per remaining grammar verb or widget
/// (`enter-text`: type + Submit, `choose-list`: select + Submit, `click-option`: radio + Submit).
/// Those three are marked multi-step ([`is_multi_step`]): a runner must execute every action line
/// of the one model turn for them. Every name is checked against the unpacked wheel in the tests,
/// and `tests/env_exp12.rs` (ignored by default) checks by brute force that one click solves each
/// single-action task (it rejected `social-media`, whose buttons hide in a menu, for
/// `click-tab-2-easy`).
pub const EXP12_TASKS: [&str; 25] = [
    "click-test",
    "click-test-2",
    "click-test-transfer",
    "click-button",
    "click-link",
    "click-color",
    "click-dialog",
    "click-dialog-2",
    "click-tab",
    "click-widget",
    "click-shape",
    "focus-text",
    "focus-text-2",
    "identify-shape",
    "unicode-test",
    "grid-coordinate",
    "count-sides",
    "count-shape",
    "buy-ticket",
    "email-inbox-delete",
    "email-inbox-important",
    "click-tab-2-easy",
    "enter-text",
    "choose-list",
    "click-option",
];

/// Tasks that one grammar action can finish (every other task needs several): the exp12 set
/// lists them first, so this is its first 22 names rather than a second list to keep in sync.
pub const SINGLE_ACTION_TASKS: &[&str] = EXP12_TASKS.split_at(22).0;

/// True when the task needs more than one action (login-user, click-button-sequence, enter-text...).
pub fn is_multi_step(task: &str) -> bool {
    !SINGLE_ACTION_TASKS.contains(&task)
}

pub fn is_exp12(task: &str) -> bool {
    EXP12_TASKS.contains(&task)
}

/// One task found on disk.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TaskInfo {
    pub name: String,
    pub exp12: bool,
    pub multi_step: bool,
    /// FlightWoB task (`flight.X`): a wrapper page with the site in an iframe.
    pub flight: bool,
}

/// A task name is letters, digits, `-`, `_` and (for flight tasks) one `.`; nothing that could
/// leave the html tree.
pub fn valid_name(task: &str) -> bool {
    !task.is_empty()
        && task.len() <= 64
        && task.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !task.starts_with('.')
        && !task.contains("..")
}

/// Path of the task page relative to the html root: `miniwob/T.html` or `flight/X/wrapper.html`.
pub fn page_path(task: &str) -> Option<String> {
    if !valid_name(task) {
        return None;
    }
    match task.strip_prefix("flight.") {
        Some(site) if !site.contains('.') => Some(format!("flight/{site}/wrapper.html")),
        Some(_) => None,
        None if !task.contains('.') => Some(format!("miniwob/{task}.html")),
        None => None,
    }
}

/// True when the page of `task` exists under `root`.
pub fn task_exists(root: &Path, task: &str) -> bool {
    page_path(task).is_some_and(|p| root.join(p).is_file())
}

/// All tasks under the html root, sorted by name.
pub fn list_tasks(root: &Path) -> std::io::Result<Vec<TaskInfo>> {
    let mut names = Vec::new();
    for e in std::fs::read_dir(root.join("miniwob"))? {
        let e = e?;
        let n = e.file_name().to_string_lossy().into_owned();
        if let Some(t) = n.strip_suffix(".html") {
            if valid_name(t) && !t.contains('.') {
                names.push(t.to_string());
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir(root.join("flight")) {
        for e in rd.flatten() {
            let site = e.file_name().to_string_lossy().into_owned();
            if e.path().join("wrapper.html").is_file() && valid_name(&site) && !site.contains('.') {
                names.push(format!("flight.{site}"));
            }
        }
    }
    names.sort();
    Ok(names
        .into_iter()
        .map(|name| TaskInfo {
            exp12: is_exp12(&name),
            multi_step: is_multi_step(&name),
            flight: name.starts_with("flight."),
            name,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp12_is_25_distinct_names() {
        let mut v = EXP12_TASKS.to_vec();
        v.sort();
        v.dedup();
        assert_eq!(v.len(), 25);
        for t in SINGLE_ACTION_TASKS {
            assert!(is_exp12(t), "{t}");
        }
        assert!(is_multi_step("login-user") && is_multi_step("click-button-sequence") && !is_multi_step("click-test"));
    }

    #[test]
    fn names_cannot_escape() {
        assert_eq!(page_path("click-test").as_deref(), Some("miniwob/click-test.html"));
        assert_eq!(page_path("flight.AA").as_deref(), Some("flight/AA/wrapper.html"));
        for bad in ["", "../etc/passwd", "..", "a/b", "flight..", "flight.a.b", "x.y", ".hidden", "a b", "é"] {
            assert!(page_path(bad).is_none(), "{bad:?}");
        }
    }
}
