//! Episode result lines (docs/results-format.md) and the append-only results file with resume.
use anyhow::{bail, Context, Result};
use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

pub use miniwob_steer_schema::line::{episode_key, fmt_coeff, EpisodeLine, RunConfig};

/// Takes an exclusive advisory lock on `file` for as long as it stays open, or fails at once.
fn lock_exclusive(file: &File, path: &Path) -> Result<()> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: flock(2) on a descriptor we own; no memory is passed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.kind() == std::io::ErrorKind::WouldBlock {
        bail!(
            "{} is in use by another run (it holds the file's lock); two runs on one results file would \
             run every episode twice: wait for the other to finish, or use another --out",
            path.display()
        );
    }
    Err(e).with_context(|| format!("locking {}", path.display()))
}

/// An append-only JSONL results file, locked for as long as it is open. Opening it reads the
/// keys already present (resume); a torn last line (no newline and not valid JSON: the writer was
/// killed mid-line) is cut off with a warning, so the next append starts on a clean line. Lines
/// of another [`RunConfig`] are an error unless `keep_other_configs`.
pub struct ResultsFile {
    path: PathBuf,
    file: File,
    /// Length of the file up to its last complete line: where a failed append is rolled back to.
    good_len: u64,
    config_id: String,
    keys: HashSet<String>,
    /// This configuration's lines, those found at open and those appended since (summaries).
    pub lines: Vec<EpisodeLine>,
    /// Lines of other configurations, kept in place and never counted.
    pub other_configs: usize,
    /// Lines found but not understood: (1-based line number, why); left in place, never counted.
    pub bad_lines: Vec<(usize, String)>,
    pub torn: bool,
    /// Lines appended since open.
    pub appended: usize,
}

impl ResultsFile {
    pub fn open(path: &Path, config: &RunConfig, keep_other_configs: bool) -> Result<ResultsFile> {
        if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        // Locked before reading: the torn-line repair below must never cut a line that another
        // process is still writing.
        lock_exclusive(&file, path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).with_context(|| format!("reading {}", path.display()))?;
        let config_id = config.id();
        let mut keys = HashSet::new();
        let mut lines = Vec::new();
        let mut others: Vec<(RunConfig, usize)> = Vec::new();
        let mut bad_lines = Vec::new();
        let mut torn = false;
        let mut good_len = bytes.len() as u64;
        let mut start = 0usize;
        let mut line_no = 0usize;
        while start < bytes.len() {
            line_no += 1;
            let (end, terminated) = match bytes[start..].iter().position(|&b| b == b'\n') {
                Some(i) => (start + i, true),
                None => (bytes.len(), false),
            };
            let line = &bytes[start..end];
            let parsed = serde_json::from_slice::<EpisodeLine>(line);
            let parsed = match (parsed, terminated) {
                (Ok(l), true) => Some(l),
                (Ok(l), false) => {
                    // Complete JSON, only the newline is missing: keep it, finish the line.
                    file.write_all(b"\n")?;
                    file.sync_data()?;
                    good_len += 1;
                    Some(l)
                }
                (Err(_), false) => {
                    tracing::warn!(
                        "{}:{line_no}: ignoring a torn last line ({} bytes, no newline, not valid JSON); it will be rewritten",
                        path.display(),
                        line.len()
                    );
                    file.set_len(start as u64).with_context(|| format!("truncating {}", path.display()))?;
                    file.seek(SeekFrom::End(0))?;
                    file.sync_data()?;
                    good_len = start as u64;
                    torn = true;
                    None
                }
                (Err(e), true) => {
                    if !line.iter().all(|b| b.is_ascii_whitespace()) {
                        tracing::warn!("{}:{line_no}: not an episode result ({e}); ignored", path.display());
                        bad_lines.push((line_no, e.to_string()));
                    }
                    None
                }
            };
            if let Some(l) = parsed {
                let c = RunConfig::of_line(&l);
                if c == *config {
                    lines.push(l.clone());
                } else {
                    match others.iter_mut().find(|(o, _)| *o == c) {
                        Some((_, n)) => *n += 1,
                        None => others.push((c, 1)),
                    }
                }
                keys.insert(l.key);
            }
            start = end + 1;
        }
        let other_configs = others.iter().map(|(_, n)| n).sum();
        if !others.is_empty() && !keep_other_configs {
            let what: Vec<String> = others
                .iter()
                .take(3)
                .map(|(c, n)| format!("{n} lines: {}", c.differences(config).join("; ")))
                .collect();
            bail!(
                "{} holds {other_configs} result lines of another configuration than this run ({}{}); resuming \
                 would skip episodes this configuration never ran. Use another --out, or pass \
                 --keep-other-configs to keep those lines and run this configuration's episodes beside them",
                path.display(),
                what.join(" | "),
                if others.len() > 3 {
                    format!(" | and {} more configurations", others.len() - 3)
                } else {
                    String::new()
                }
            );
        }
        if other_configs > 0 {
            tracing::info!("{}: {other_configs} lines of other configurations kept", path.display());
        }
        Ok(ResultsFile {
            path: path.to_path_buf(),
            file,
            good_len,
            config_id,
            keys,
            lines,
            other_configs,
            bad_lines,
            torn,
            appended: 0,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The last component of this configuration's keys ([`RunConfig::id`]).
    pub fn config_id(&self) -> &str {
        &self.config_id
    }

    pub fn contains(&self, key: &str) -> bool {
        self.keys.contains(key)
    }

    /// Keys in the file, every configuration.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Appends one line (one `write` of the whole line) and fsyncs. A key already present is
    /// skipped (returns false). On a write error the partial line is cut off again before the
    /// error is returned, so the file still ends with a complete line.
    pub fn append(&mut self, line: &EpisodeLine) -> Result<bool> {
        self.append_with(line, |f, b| f.write_all(b))
    }

    /// [`ResultsFile::append`] with the write itself given (tests inject failing writers).
    fn append_with(
        &mut self,
        line: &EpisodeLine,
        write: impl FnOnce(&mut File, &[u8]) -> std::io::Result<()>,
    ) -> Result<bool> {
        if self.keys.contains(&line.key) {
            return Ok(false);
        }
        let mut s = serde_json::to_string(line)?;
        s.push('\n');
        let file = &mut self.file;
        let written = crate::util::uninterrupted(|| {
            let r = write(file, s.as_bytes()).and_then(|()| file.sync_data());
            // Roll back a partial write now: a fragment left behind would be glued onto the next
            // line and make it permanently unreadable.
            r.map_err(|e| (e, file.set_len(self.good_len).and_then(|()| file.sync_data())))
        });
        match written {
            Ok(()) => {}
            Err((e, Ok(()))) => {
                return Err(anyhow::Error::new(e).context(format!(
                    "appending to {} (the partial line was removed; the file ends with its last complete line)",
                    self.path.display()
                )))
            }
            Err((e, Err(e2))) => {
                return Err(anyhow::Error::new(e).context(format!(
                    "appending to {} (removing the partial line failed too: {e2}; the next run cuts it off)",
                    self.path.display()
                )))
            }
        }
        self.good_len += s.len() as u64;
        self.keys.insert(line.key.clone());
        self.lines.push(line.clone());
        self.appended += 1;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(model: &str) -> RunConfig {
        RunConfig {
            experiment: "t".into(),
            model: model.into(),
            weights_hash: "w".into(),
            dtype: "f32".into(),
            vlm: false,
            coeff_mode: "absolute".into(),
            vector_source: Some("caa:n=2,seed=0".into()),
            max_steps: Some(1),
            max_new_tokens: Some(12),
            protocol: None,
            gate: None,
            adapter: None,
        }
    }

    pub fn line_of(c: &RunConfig, task: &str, seed: u64, cond: &str, coeff: f64) -> EpisodeLine {
        let key = episode_key(task, seed, cond, coeff, Some(3), Some("accuracy"), Some("prompt"), &c.id());
        EpisodeLine {
            experiment: c.experiment.clone(),
            model: c.model.clone(),
            checkpoint: "c".into(),
            weights_hash: c.weights_hash.clone(),
            dtype: c.dtype.clone(),
            batch_invariant: true,
            layer: Some(3),
            hook_point: Some("blocks.3.hook_resid_post".into()),
            coeff,
            coeff_mode: c.coeff_mode.clone(),
            vector_hash: Some("v".into()),
            prompt_pair: Some("accuracy".into()),
            vector_method: Some("prompt".into()),
            task: task.into(),
            seed,
            condition: miniwob_steer_schema::Condition::parse(cond).expect("baseline or steered"),
            vlm: c.vlm,
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
            vector_source: c.vector_source.clone(),
            max_steps: c.max_steps,
            max_new_tokens: c.max_new_tokens,
            protocol: c.protocol.clone(),
            harness_version: "x".into(),
            key,
            lens: None,
            gate: None,
            gate_config: c.gate.clone(),
            adapter: c.adapter.clone(),
        }
    }

    pub fn line(task: &str, seed: u64, cond: &str, coeff: f64) -> EpisodeLine {
        line_of(&config("m"), task, seed, cond, coeff)
    }

    fn open(p: &Path) -> Result<ResultsFile> {
        ResultsFile::open(p, &config("m"), false)
    }

    #[test]
    fn keys_match_the_contract() {
        assert_eq!(
            episode_key("click-test", 3, "steered", 3.0, Some(12), Some("accuracy"), Some("prompt"), "abc"),
            "click-test/3/steered/3.0/12/accuracy/prompt/abc"
        );
        assert_eq!(episode_key("a", 0, "baseline", 0.0, None, None, None, "c"), "a/0/baseline/0.0/null/null/null/c");
        // Every configuration field changes the id.
        let base = config("m");
        let mut variants = vec![];
        for f in 0..9 {
            let mut c = base.clone();
            match f {
                0 => c.experiment = "u".into(),
                1 => c.model = "n".into(),
                2 => c.weights_hash = "x".into(),
                3 => c.dtype = "gguf".into(),
                4 => c.vlm = true,
                5 => c.coeff_mode = "relative".into(),
                6 => c.vector_source = Some("caa:n=50,seed=0".into()),
                7 => c.max_steps = Some(2),
                _ => c.max_new_tokens = None,
            }
            variants.push(c.id());
        }
        variants.push(base.id());
        let n = variants.len();
        variants.sort();
        variants.dedup();
        assert_eq!(variants.len(), n);
    }

    #[test]
    fn append_resume_and_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/r.jsonl");
        let mut f = open(&p).unwrap();
        assert!(f.append(&line("a", 1, "baseline", 0.0)).unwrap());
        assert!(f.append(&line("a", 1, "steered", 2.0)).unwrap());
        assert!(!f.append(&line("a", 1, "steered", 2.0)).unwrap());
        assert_eq!(f.appended, 2);
        drop(f);
        // A torn tail: half a line.
        let full = serde_json::to_string(&line("b", 2, "baseline", 0.0)).unwrap();
        let mut raw = OpenOptions::new().append(true).open(&p).unwrap();
        raw.write_all(&full.as_bytes()[..full.len() / 2]).unwrap();
        drop(raw);
        let mut f = open(&p).unwrap();
        assert!(f.torn);
        assert_eq!(f.len(), 2);
        assert!(f.contains(&line("a", 1, "steered", 2.0).key));
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
        let f = open(&p).unwrap();
        assert!(!f.torn && f.len() == 4 && f.lines.len() == 4);
        assert!(std::fs::read_to_string(&p).unwrap().ends_with('\n'));
    }

    /// Issue 18.1: a file holding lines of another configuration is an error naming what differs;
    /// with `keep_other_configs` those lines stay and this configuration's episodes are pending.
    #[test]
    fn another_configuration_is_refused_or_kept_apart() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.jsonl");
        let small = config("smollm2-135m");
        let mut f = ResultsFile::open(&p, &small, false).unwrap();
        for seed in 0..4 {
            f.append(&line_of(&small, "a", seed, "baseline", 0.0)).unwrap();
        }
        drop(f);
        let mut big = config("qwen-coder-0.5b");
        big.dtype = "gguf".into();
        let e = format!("{:#}", ResultsFile::open(&p, &big, false).err().expect("another model must be refused"));
        assert!(e.contains("4 result lines of another configuration"), "{e}");
        assert!(e.contains(r#"model: "smollm2-135m" in the file, "qwen-coder-0.5b" in this run"#), "{e}");
        assert!(e.contains(r#"dtype: "f32" in the file, "gguf" in this run"#), "{e}");
        assert!(e.contains("--keep-other-configs") && e.contains(p.to_str().unwrap()), "{e}");
        // The refusal left the file alone.
        assert_eq!(std::fs::read_to_string(&p).unwrap().lines().count(), 4);

        let mut f = ResultsFile::open(&p, &big, true).unwrap();
        assert_eq!((f.other_configs, f.lines.len()), (4, 0));
        let same_episode = line_of(&big, "a", 0, "baseline", 0.0);
        assert!(!f.contains(&same_episode.key), "the other model's episode is not this run's");
        assert!(f.append(&same_episode).unwrap());
        drop(f);
        let f = ResultsFile::open(&p, &small, true).unwrap();
        assert_eq!((f.other_configs, f.lines.len()), (1, 4));

        // Lines of an older harness (no max_steps etc.) are another configuration, said so.
        let mut old: serde_json::Value = serde_json::to_value(line_of(&small, "b", 9, "baseline", 0.0)).unwrap();
        for k in ["vector_source", "max_steps", "max_new_tokens"] {
            old.as_object_mut().unwrap().remove(k);
        }
        let q = dir.path().join("old.jsonl");
        std::fs::write(&q, format!("{old}\n")).unwrap();
        let e = format!("{:#}", ResultsFile::open(&q, &small, false).err().unwrap());
        assert!(e.contains("max_steps: not recorded (an older harness) in the file, 1 in this run"), "{e}");
    }

    /// Issue 18.2: a second open of a file in use fails at once, naming it, and leaves it alone.
    #[test]
    fn a_second_run_on_a_locked_file_fails_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.jsonl");
        let mut first = open(&p).unwrap();
        first.append(&line("a", 1, "baseline", 0.0)).unwrap();
        // The first run is mid-line: a torn tail that the second open must not cut.
        let full = serde_json::to_string(&line("a", 2, "baseline", 0.0)).unwrap();
        let mut raw = OpenOptions::new().append(true).open(&p).unwrap();
        raw.write_all(&full.as_bytes()[..10]).unwrap();
        let before = std::fs::read(&p).unwrap();
        let t0 = std::time::Instant::now();
        let e = format!("{:#}", open(&p).err().expect("a locked file must be refused"));
        assert!(t0.elapsed() < std::time::Duration::from_secs(1), "refused at once");
        assert!(e.contains("in use by another run") && e.contains(p.to_str().unwrap()), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), before, "nothing cut");
        drop(first);
        raw.write_all(&full.as_bytes()[10..]).unwrap();
        raw.write_all(b"\n").unwrap();
        let f = open(&p).unwrap();
        assert_eq!(f.lines.len(), 2);
    }

    /// Issue 18.3: a write that fails halfway (disk full) leaves no fragment, so the next append
    /// (space is back) writes a readable line.
    #[test]
    fn a_failed_append_is_rolled_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.jsonl");
        let mut f = open(&p).unwrap();
        f.append(&line("a", 1, "baseline", 0.0)).unwrap();
        let good = std::fs::read(&p).unwrap();
        let l2 = line("a", 2, "baseline", 0.0);
        let e = f
            .append_with(&l2, |file, bytes| {
                file.write_all(&bytes[..bytes.len() / 3])?;
                Err(std::io::Error::from_raw_os_error(libc::ENOSPC))
            })
            .unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("partial line was removed") && msg.contains(p.to_str().unwrap()), "{msg}");
        assert_eq!(std::fs::read(&p).unwrap(), good, "rolled back to the last complete line");
        assert!(!f.contains(&l2.key) && f.appended == 1, "a failed line is not counted");
        // Space is back: the same line goes in whole.
        assert!(f.append(&l2).unwrap());
        assert!(f.append(&line("a", 3, "baseline", 0.0)).unwrap());
        drop(f);
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(text.lines().count(), 3);
        for l in text.lines() {
            serde_json::from_str::<EpisodeLine>(l).unwrap();
        }
        let f = open(&p).unwrap();
        assert!(f.bad_lines.is_empty() && !f.torn && f.lines.len() == 3);
    }

    /// Issue 18.4: bad lines are reported with their line number and the reason.
    #[test]
    fn bad_lines_have_numbers_and_reasons() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.jsonl");
        let good = serde_json::to_string(&line("a", 1, "baseline", 0.0)).unwrap();
        std::fs::write(&p, format!("{good}\n{{\"experiment\": 1}}\nnot json\n")).unwrap();
        let f = open(&p).unwrap();
        assert_eq!(f.lines.len(), 1);
        assert_eq!(f.bad_lines.iter().map(|b| b.0).collect::<Vec<_>>(), vec![2, 3]);
        assert!(f.bad_lines[0].1.contains("invalid type"), "{:?}", f.bad_lines);
        assert!(f.bad_lines[1].1.contains("expected ident"), "{:?}", f.bad_lines);
    }
}
