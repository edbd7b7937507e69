//! Episode result lines (docs/results-format.md) and the append-only results file with resume.
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// One episode, one JSON line. Field order and names follow docs/results-format.md.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EpisodeLine {
    pub experiment: String,
    pub model: String,
    pub checkpoint: String,
    pub weights_hash: String,
    pub dtype: String,
    /// Whether the model path guarantees row outputs independent of batch composition
    /// (docs/determinism.md); absent in lines written before it was recorded.
    #[serde(default)]
    pub batch_invariant: bool,
    pub layer: Option<usize>,
    pub hook_point: Option<String>,
    pub coeff: f64,
    pub coeff_mode: String,
    pub vector_hash: Option<String>,
    pub prompt_pair: Option<String>,
    pub vector_method: Option<String>,
    pub task: String,
    pub seed: u64,
    pub condition: String,
    pub vlm: bool,
    pub prompt_hash: String,
    pub output: String,
    pub actions: Vec<String>,
    pub parse_failure: bool,
    pub raw_reward: f64,
    pub reward: f64,
    pub success: bool,
    pub steps: usize,
    pub wall_s: f64,
    pub tokens_in: usize,
    pub tokens_out: usize,
    pub harness_version: String,
    pub key: String,
}

/// A coefficient as JSON writes it (`3.0`, `0.0`, `-1.5`).
pub fn fmt_coeff(c: f64) -> String {
    serde_json::Number::from_f64(c).map(|n| n.to_string()).unwrap_or_else(|| format!("{c}"))
}

/// The resume key: `task/seed/condition/coeff/layer/prompt_pair/vector_method` (`null` for a
/// missing value).
pub fn episode_key(
    task: &str,
    seed: u64,
    condition: &str,
    coeff: f64,
    layer: Option<usize>,
    pair: Option<&str>,
    method: Option<&str>,
) -> String {
    format!(
        "{task}/{seed}/{condition}/{}/{}/{}/{}",
        fmt_coeff(coeff),
        layer.map_or("null".to_string(), |l| l.to_string()),
        pair.unwrap_or("null"),
        method.unwrap_or("null")
    )
}

/// An append-only JSONL results file. Opening it reads the keys already present (resume); a torn
/// last line (no newline and not valid JSON: the writer was killed mid-line) is cut off with a
/// warning, so the next append starts on a clean line.
pub struct ResultsFile {
    path: PathBuf,
    file: File,
    keys: HashSet<String>,
    /// Lines already in the file when it was opened (parsed), for summaries.
    pub existing: Vec<EpisodeLine>,
    /// Lines found but not understood (left in place, never counted).
    pub bad_lines: usize,
    pub torn: bool,
}

impl ResultsFile {
    pub fn open(path: &Path) -> Result<ResultsFile> {
        if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).with_context(|| format!("reading {}", path.display()))?;
        let mut keys = HashSet::new();
        let mut existing = Vec::new();
        let mut bad_lines = 0;
        let mut torn = false;
        let mut start = 0usize;
        while start < bytes.len() {
            let (end, terminated) = match bytes[start..].iter().position(|&b| b == b'\n') {
                Some(i) => (start + i, true),
                None => (bytes.len(), false),
            };
            let line = &bytes[start..end];
            let parsed: Option<EpisodeLine> = serde_json::from_slice(line).ok();
            match (parsed, terminated) {
                (Some(l), true) => {
                    keys.insert(l.key.clone());
                    existing.push(l);
                }
                (Some(l), false) => {
                    // Complete JSON, only the newline is missing: keep it, finish the line.
                    keys.insert(l.key.clone());
                    existing.push(l);
                    file.write_all(b"\n")?;
                    file.sync_data()?;
                }
                (None, false) => {
                    tracing::warn!(
                        "{}: ignoring a torn last line ({} bytes, no newline, not valid JSON); it will be rewritten",
                        path.display(),
                        line.len()
                    );
                    file.set_len(start as u64).with_context(|| format!("truncating {}", path.display()))?;
                    file.seek(SeekFrom::End(0))?;
                    file.sync_data()?;
                    torn = true;
                }
                (None, true) => {
                    if !line.iter().all(|b| b.is_ascii_whitespace()) {
                        bad_lines += 1;
                        tracing::warn!("{}: a line is not an episode result; ignored", path.display());
                    }
                }
            }
            start = end + 1;
        }
        Ok(ResultsFile { path: path.to_path_buf(), file, keys, existing, bad_lines, torn })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn contains(&self, key: &str) -> bool {
        self.keys.contains(key)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Appends one line (one `write` of the whole line) and fsyncs. A key already present is
    /// skipped (returns false).
    pub fn append(&mut self, line: &EpisodeLine) -> Result<bool> {
        if self.keys.contains(&line.key) {
            return Ok(false);
        }
        let mut s = serde_json::to_string(line)?;
        s.push('\n');
        self.file.write_all(s.as_bytes()).with_context(|| format!("appending to {}", self.path.display()))?;
        self.file.sync_data().with_context(|| format!("fsync {}", self.path.display()))?;
        self.keys.insert(line.key.clone());
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn line(task: &str, seed: u64, cond: &str, coeff: f64) -> EpisodeLine {
        let key = episode_key(task, seed, cond, coeff, Some(3), Some("accuracy"), Some("prompt"));
        EpisodeLine {
            experiment: "t".into(),
            model: "m".into(),
            checkpoint: "c".into(),
            weights_hash: "w".into(),
            dtype: "f32".into(),
            batch_invariant: true,
            layer: Some(3),
            hook_point: Some("blocks.3.hook_resid_post".into()),
            coeff,
            coeff_mode: "absolute".into(),
            vector_hash: Some("v".into()),
            prompt_pair: Some("accuracy".into()),
            vector_method: Some("prompt".into()),
            task: task.into(),
            seed,
            condition: cond.into(),
            vlm: false,
            prompt_hash: "p".into(),
            output: "click ref=\"4\"\n🙂".into(),
            actions: vec![],
            parse_failure: true,
            raw_reward: 0.0,
            reward: 0.0,
            success: false,
            steps: 1,
            wall_s: 0.1,
            tokens_in: 10,
            tokens_out: 3,
            harness_version: "x".into(),
            key,
        }
    }

    #[test]
    fn keys_match_the_contract() {
        assert_eq!(
            episode_key("click-test", 3, "steered", 3.0, Some(12), Some("accuracy"), Some("prompt")),
            "click-test/3/steered/3.0/12/accuracy/prompt"
        );
        assert_eq!(episode_key("a", 0, "baseline", 0.0, None, None, None), "a/0/baseline/0.0/null/null/null");
    }

    #[test]
    fn append_resume_and_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/r.jsonl");
        let mut f = ResultsFile::open(&p).unwrap();
        assert!(f.append(&line("a", 1, "baseline", 0.0)).unwrap());
        assert!(f.append(&line("a", 1, "steered", 2.0)).unwrap());
        assert!(!f.append(&line("a", 1, "steered", 2.0)).unwrap());
        drop(f);
        // A torn tail: half a line.
        let full = serde_json::to_string(&line("b", 2, "baseline", 0.0)).unwrap();
        let mut raw = OpenOptions::new().append(true).open(&p).unwrap();
        raw.write_all(&full.as_bytes()[..full.len() / 2]).unwrap();
        drop(raw);
        let mut f = ResultsFile::open(&p).unwrap();
        assert!(f.torn);
        assert_eq!(f.len(), 2);
        assert!(f.contains("a/1/steered/2.0/3/accuracy/prompt"));
        assert!(f.append(&line("b", 2, "baseline", 0.0)).unwrap());
        drop(f);
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(text.lines().count(), 3);
        for l in text.lines() {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert!(v.get("key").is_some());
        }
        // A complete last line that lost only its newline is kept.
        let mut raw = OpenOptions::new().append(true).open(&p).unwrap();
        raw.write_all(serde_json::to_string(&line("c", 3, "baseline", 0.0)).unwrap().as_bytes()).unwrap();
        drop(raw);
        let f = ResultsFile::open(&p).unwrap();
        assert!(!f.torn && f.len() == 4);
        assert!(std::fs::read_to_string(&p).unwrap().ends_with('\n'));
    }
}
