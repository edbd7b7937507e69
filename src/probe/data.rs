//! Probe datasets: JSONL, one object a line: `{"text": …, "label": …}` (text models) or
//! `{"image": path, "text": …, "label": …}` (Qwen2-VL: the image first, then the text, in one user
//! turn). A label may be a string, a number or a boolean; classes are the distinct labels as
//! strings, sorted. Extra fields are kept as the row's metadata.
//!
//! [`miniwob_rows`] writes such datasets from MiniWoB with no labelling by hand:
//! - `task`: the row is a task's first observation, the label its task name (the router setting:
//!   as many rows per task, so balanced by construction);
//! - `family`: the grammar verb that the task needs ([`family_of`]: click / type / select / other);
//! - `success`: from an exp12 results file, whether the baseline episode of (task, seed) succeeded,
//!   read from the baseline prompt of its first step.
use crate::agent::PromptBuilder;
use crate::env::{Observation, Pool};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

/// One dataset row.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub text: String,
    /// Image file (Qwen2-VL rows), resolved against the dataset file's directory.
    pub image: Option<PathBuf>,
    pub label: String,
    /// Every other field of the line.
    pub meta: Value,
}

/// A dataset read whole (texts and image paths only: small next to the features).
#[derive(Debug, Clone)]
pub struct Dataset {
    pub rows: Vec<Row>,
    /// Distinct labels, sorted; a row's class index is its label's position here.
    pub classes: Vec<String>,
}

impl Dataset {
    pub fn class_of(&self, row: &Row) -> usize {
        self.classes.binary_search(&row.label).expect("classes hold every label")
    }
}

fn label_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Reads a JSONL dataset; errors name the file, the line and the field.
pub fn read(path: &Path) -> Result<Dataset> {
    let f = std::fs::File::open(path).with_context(|| format!("reading dataset {}", path.display()))?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut rows = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let at = || format!("{}:{}", path.display(), i + 1);
        let line = line.with_context(|| format!("{}: not UTF-8", at()))?;
        if line.trim().is_empty() {
            continue;
        }
        let mut v: Value = serde_json::from_str(&line).with_context(|| format!("{}: invalid JSON", at()))?;
        let obj = v.as_object_mut().with_context(|| format!("{}: expected a JSON object", at()))?;
        let text = match obj.remove("text") {
            Some(Value::String(s)) => s,
            Some(o) => bail!("{}: field `text` must be a string, found {o}", at()),
            None if obj.contains_key("image") => String::new(),
            None => bail!("{}: no field `text` (each line is {{\"text\": …, \"label\": …}})", at()),
        };
        let label = match obj.remove("label") {
            Some(l) => label_string(&l)
                .with_context(|| format!("{}: field `label` must be a string, number or boolean, found {l}", at()))?,
            None => bail!("{}: no field `label`", at()),
        };
        let image = match obj.remove("image") {
            Some(Value::String(s)) => {
                let p = PathBuf::from(&s);
                Some(if p.is_absolute() { p } else { base.join(p) })
            }
            Some(o) => bail!("{}: field `image` must be a path string, found {o}", at()),
            None => None,
        };
        rows.push(Row { text, image, label, meta: v });
    }
    if rows.is_empty() {
        bail!("{}: no rows", path.display());
    }
    let classes: Vec<String> = rows.iter().map(|r| r.label.clone()).collect::<BTreeSet<_>>().into_iter().collect();
    if classes.len() < 2 {
        bail!("{}: every row has the label `{}`; a probe needs at least two classes", path.display(), classes[0]);
    }
    Ok(Dataset { rows, classes })
}

/// Writes rows as JSONL (the format [`read`] reads); images as given (relative paths are
/// relative to the file).
pub fn write(path: &Path, rows: &[Row]) -> Result<()> {
    let mut f =
        std::io::BufWriter::new(std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?);
    for r in rows {
        let mut v = match &r.meta {
            Value::Object(m) => Value::Object(m.clone()),
            _ => json!({}),
        };
        v["text"] = json!(r.text);
        v["label"] = json!(r.label);
        if let Some(i) = &r.image {
            v["image"] = json!(i.display().to_string());
        }
        writeln!(f, "{v}")?;
    }
    f.flush()?;
    Ok(())
}

/// The label a MiniWoB dataset row gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelKind {
    Task,
    Family,
    Success,
}

impl std::str::FromStr for LabelKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "task" => LabelKind::Task,
            "family" => LabelKind::Family,
            "success" => LabelKind::Success,
            o => bail!("--label {o}: expected task, family or success"),
        })
    }
}

/// The grammar verb a task needs, from its name: `select` for list/dropdown choices, `type` for
/// tasks that enter text, `click` for the other `click-*`/`focus-*` tasks, `other` for the rest
/// (counting, shapes, dragging, navigation). A rule on names, written down, not a hand label.
pub fn family_of(task: &str) -> &'static str {
    let t = task.strip_prefix("flight.").unwrap_or(task);
    const SELECT: &[&str] = &["choose-list", "choose-date", "click-option", "click-checkboxes", "use-autocomplete"];
    const TYPE: &[&str] = &["enter-", "type-", "login-user", "search-engine", "text-transform", "guess-number"];
    if SELECT.iter().any(|p| t.starts_with(p)) || t.contains("select") || t.contains("dropdown") {
        "select"
    } else if TYPE.iter().any(|p| t.starts_with(p)) || t.contains("-text-") || t.ends_with("-password") {
        "type"
    } else if t.starts_with("click-") || t.starts_with("focus-") || t.starts_with("email-inbox") {
        "click"
    } else {
        "other"
    }
}

/// (task, seed, success) of the baseline episodes of an exp12 results file, one per (task,
/// seed) (a file with several coefficients repeats the baseline rows; they are identical by batch
/// invariance, and a disagreement is an error).
pub fn baseline_outcomes(results: &Path) -> Result<Vec<(String, u64, bool)>> {
    let text = std::fs::read_to_string(results).with_context(|| format!("reading {}", results.display()))?;
    let mut out: Vec<(String, u64, bool)> = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let v: Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(_) if i + 1 == lines.len() => {
                tracing::warn!("{}: ignoring a torn last line", results.display());
                continue;
            }
            Err(e) => bail!("{}:{}: invalid JSON: {e}", results.display(), i + 1),
        };
        if v.get("condition").and_then(Value::as_str) != Some("baseline") {
            continue;
        }
        let at = |k: &str| format!("{}:{}: field `{k}`", results.display(), i + 1);
        let task = v["task"].as_str().with_context(|| at("task"))?.to_string();
        let seed = v["seed"].as_u64().with_context(|| at("seed"))?;
        let ok = v["success"].as_bool().with_context(|| at("success"))?;
        match out.iter().find(|(t, s, _)| *t == task && *s == seed) {
            Some((_, _, prev)) if *prev != ok => {
                bail!("{}: baseline episodes of {task} seed {seed} disagree on success", results.display())
            }
            Some(_) => {}
            None => out.push((task, seed, ok)),
        }
    }
    if out.is_empty() {
        bail!("{}: no baseline episode lines (`condition` = \"baseline\")", results.display());
    }
    Ok(out)
}

/// Observations (and Set-of-Marks screenshots when `screenshots`) of the first step of the
/// episodes `items` (task, seed), in order, over a pool of browser sessions.
pub async fn observe_items(
    pool: &Pool,
    items: &[(String, u64)],
    screenshots: bool,
    pb: &indicatif::ProgressBar,
) -> Result<Vec<(Observation, Option<Vec<u8>>)>> {
    let seen = pool.observe_all(items, screenshots).await?;
    pb.inc(seen.len() as u64);
    seen.into_iter()
        .map(|o| {
            let png = match o.screenshot {
                Some(img) => {
                    let mut buf = Vec::new();
                    image::DynamicImage::ImageRgb8(img)
                        .write_to(&mut std::io::Cursor::new(&mut buf), image::ImageFormat::Png)
                        .with_context(|| format!("encoding the screenshot of {} seed {}", o.obs.task, o.obs.seed))?;
                    Some(buf)
                }
                None => None,
            };
            Ok((o.obs, png))
        })
        .collect()
}

/// Dataset rows from observations: the text agent's user turn (the prompt builder of `run`), or
/// with images the VLM agent's text beside the screenshot file `images/<task>-<seed>.png` under
/// `dir`.
pub fn rows_from_observations(
    obs: &[(Observation, Option<Vec<u8>>)],
    labels: &[String],
    dir: Option<&Path>,
) -> Result<Vec<Row>> {
    let pb = PromptBuilder::default();
    let mut rows = Vec::with_capacity(obs.len());
    for ((o, png), label) in obs.iter().zip(labels) {
        let meta = json!({"task": o.task, "seed": o.seed, "family": family_of(&o.task)});
        let (text, image) = match (png, dir) {
            (Some(png), Some(dir)) => {
                let rel = PathBuf::from("images").join(format!("{}-{}.png", o.task, o.seed));
                std::fs::create_dir_all(dir.join("images"))?;
                std::fs::write(dir.join(&rel), png).with_context(|| format!("writing {}", dir.join(&rel).display()))?;
                (pb.user_text(o, &[], 1, true, None)?, Some(rel))
            }
            _ => (pb.user_text(o, &[], 1, false, None)?, None),
        };
        rows.push(Row { text, image, label: label.clone(), meta });
    }
    Ok(rows)
}

/// `seeds_per_task` episodes of every task, seeds `seed0 + k` (the evaluation seeds of `run` start
/// at 0; pass another range to keep a probe's data apart from evaluation episodes).
pub fn task_items(tasks: &[String], seeds_per_task: usize, seed0: u64) -> Vec<(String, u64)> {
    tasks.iter().flat_map(|t| (0..seeds_per_task as u64).map(move |k| (t.clone(), seed0 + k))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_labels_of_any_json_type_and_names_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl");
        std::fs::write(
            &p,
            "{\"text\": \"a\", \"label\": true}\n\n{\"text\": \"b\", \"label\": 3, \"x\": 1}\n{\"image\": \"i.png\", \"text\": \"c\", \"label\": \"z\"}\n",
        )
        .unwrap();
        let d = read(&p).unwrap();
        assert_eq!(d.classes, ["3", "true", "z"]);
        assert_eq!(d.rows[1].meta["x"], 1);
        assert_eq!(d.rows[2].image.as_deref(), Some(dir.path().join("i.png").as_path()));
        assert_eq!(d.class_of(&d.rows[0]), 1);
        std::fs::write(&p, "{\"text\": \"a\", \"label\": 1}\n{\"text\": \"b\"}\n").unwrap();
        let e = read(&p).unwrap_err().to_string();
        assert!(e.contains("d.jsonl:2") && e.contains("`label`"), "{e}");
        std::fs::write(&p, "{\"text\": \"a\", \"label\": 1}\n{\"text\": \"b\", \"label\": 1}\n").unwrap();
        assert!(read(&p).unwrap_err().to_string().contains("at least two classes"));
        // Round trip through write.
        let rows = vec![
            Row { text: "t".into(), image: None, label: "a".into(), meta: json!({"task": "x"}) },
            Row { text: "u".into(), image: None, label: "b".into(), meta: json!({}) },
        ];
        write(&p, &rows).unwrap();
        let d = read(&p).unwrap();
        assert_eq!(d.rows, rows);
    }

    #[test]
    fn families_of_the_exp12_tasks() {
        assert_eq!(family_of("click-button"), "click");
        assert_eq!(family_of("focus-text"), "click");
        assert_eq!(family_of("enter-text"), "type");
        assert_eq!(family_of("login-user"), "type");
        assert_eq!(family_of("choose-list"), "select");
        assert_eq!(family_of("click-option"), "select");
        assert_eq!(family_of("count-shape"), "other");
        assert_eq!(family_of("identify-shape"), "other");
    }

    #[test]
    fn baseline_outcomes_dedupe_and_check() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.jsonl");
        let l = |t: &str, s: u64, c: &str, ok: bool| {
            json!({"task": t, "seed": s, "condition": c, "success": ok}).to_string()
        };
        std::fs::write(
            &p,
            [
                l("a", 1, "baseline", true),
                l("a", 1, "steered", false),
                l("a", 1, "baseline", true),
                l("b", 2, "baseline", false),
            ]
            .join("\n")
                + "\n{\"torn",
        )
        .unwrap();
        assert_eq!(baseline_outcomes(&p).unwrap(), [("a".into(), 1, true), ("b".into(), 2, false)]);
        std::fs::write(&p, [l("a", 1, "baseline", true), l("a", 1, "baseline", false)].join("\n")).unwrap();
        assert!(baseline_outcomes(&p).unwrap_err().to_string().contains("disagree"));
    }
}
