//! Streaming ingestion: one serde pass per JSONL line (or one parquet file written by `analyze
//! convert`), validating every line and keeping only the compact analysis columns. Bad lines are
//! recorded with file and line and skipped; the raw model output is never kept.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Mutex};

use anyhow::{bail, Context, Result};
use miniwob_steer_schema::Condition;
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// Code 0 of every string dictionary is null (shown as "—").
pub const NULL_CODE: u32 = 0;

/// String dictionary: value ↔ dense u32 code, 0 reserved for null.
#[derive(Debug, Clone)]
pub struct Dict {
    map: HashMap<Box<str>, u32>,
    names: Vec<Option<Box<str>>>,
    last: u32,
}

impl Default for Dict {
    fn default() -> Self {
        Dict { map: HashMap::new(), names: vec![None], last: NULL_CODE }
    }
}

impl Dict {
    pub fn code(&mut self, s: Option<&str>) -> u32 {
        let Some(s) = s else { return NULL_CODE };
        if self.names[self.last as usize].as_deref() == Some(s) {
            return self.last;
        }
        let c = match self.map.get(s) {
            Some(&c) => c,
            None => {
                let c = self.names.len() as u32;
                self.names.push(Some(s.into()));
                self.map.insert(s.into(), c);
                c
            }
        };
        self.last = c;
        c
    }
    pub fn name(&self, code: u32) -> Option<&str> {
        self.names.get(code as usize).and_then(|n| n.as_deref())
    }
    pub fn len(&self) -> usize {
        self.names.len()
    }
    pub fn is_empty(&self) -> bool {
        self.names.len() <= 1
    }
}

/// Numeric dictionary for layer (nullable int) and coefficient (float, compared by bits).
#[derive(Debug, Clone, Default)]
pub struct NumDict<K: std::hash::Hash + Eq + Copy> {
    map: HashMap<K, u32>,
    pub values: Vec<K>,
}

impl<K: std::hash::Hash + Eq + Copy> NumDict<K> {
    pub fn code(&mut self, k: K) -> u32 {
        if let Some(&c) = self.map.get(&k) {
            return c;
        }
        let c = self.values.len() as u32;
        self.values.push(k);
        self.map.insert(k, c);
        c
    }
}

/// Row flags.
pub const F_STEERED: u8 = 1;
pub const F_SUCCESS: u8 = 2;
pub const F_PARSE_FAILURE: u8 = 4;
pub const F_VLM: u8 = 8;

/// The validated episodes, columnar and compact (≈ 60 bytes a row).
#[derive(Debug, Default, Clone)]
pub struct Rows {
    pub experiment: Vec<u32>,
    pub model: Vec<u32>,
    pub layer: Vec<u32>,
    pub coeff: Vec<u32>,
    pub coeff_mode: Vec<u32>,
    pub prompt_pair: Vec<u32>,
    pub vector_method: Vec<u32>,
    pub vector_hash: Vec<u32>,
    /// The protocol (`default`, or `name@hash` of another; docs/protocols.md).
    pub protocol: Vec<u32>,
    pub task: Vec<u32>,
    pub seed: Vec<i64>,
    pub flags: Vec<u8>,
    pub steps: Vec<u32>,
    pub tokens_out: Vec<u32>,
    pub file: Vec<u32>,
    pub line: Vec<u32>,
    // dictionaries
    pub experiments: Dict,
    pub models: Dict,
    pub layers: NumDict<Option<i64>>,
    pub coeffs: NumDict<u64>,
    pub coeff_modes: Dict,
    pub prompt_pairs: Dict,
    pub vector_methods: Dict,
    pub vector_hashes: Dict,
    pub protocols: Dict,
    pub tasks: Dict,
    pub files: Vec<PathBuf>,
}

impl Rows {
    pub fn len(&self) -> usize {
        self.seed.len()
    }
    pub fn is_empty(&self) -> bool {
        self.seed.is_empty()
    }
    pub fn layer_value(&self, code: u32) -> Option<i64> {
        self.layers.values[code as usize]
    }
    pub fn coeff_value(&self, code: u32) -> f64 {
        f64::from_bits(self.coeffs.values[code as usize])
    }
    pub fn steered(&self, i: usize) -> bool {
        self.flags[i] & F_STEERED != 0
    }
    pub fn success(&self, i: usize) -> bool {
        self.flags[i] & F_SUCCESS != 0
    }
    pub fn parse_failure(&self, i: usize) -> bool {
        self.flags[i] & F_PARSE_FAILURE != 0
    }
    /// "file:line" of row i.
    pub fn source(&self, i: usize) -> String {
        format!("{}:{}", self.files[self.file[i] as usize].display(), self.line[i])
    }

    /// Appends rows parsed with their own dictionaries, re-coding them; `line_offset` is added to
    /// their line numbers.
    fn append(&mut self, o: Rows, line_offset: u32) {
        fn remap(g: &mut Dict, l: &Dict) -> Vec<u32> {
            (0..l.len() as u32).map(|c| g.code(l.name(c))).collect()
        }
        fn extend(dst: &mut Vec<u32>, src: &[u32], map: &[u32]) {
            dst.extend(src.iter().map(|&c| map[c as usize]));
        }
        let m = remap(&mut self.experiments, &o.experiments);
        extend(&mut self.experiment, &o.experiment, &m);
        let m = remap(&mut self.models, &o.models);
        extend(&mut self.model, &o.model, &m);
        let m: Vec<u32> = o.layers.values.iter().map(|&v| self.layers.code(v)).collect();
        extend(&mut self.layer, &o.layer, &m);
        let m: Vec<u32> = o.coeffs.values.iter().map(|&v| self.coeffs.code(v)).collect();
        extend(&mut self.coeff, &o.coeff, &m);
        let m = remap(&mut self.coeff_modes, &o.coeff_modes);
        extend(&mut self.coeff_mode, &o.coeff_mode, &m);
        let m = remap(&mut self.prompt_pairs, &o.prompt_pairs);
        extend(&mut self.prompt_pair, &o.prompt_pair, &m);
        let m = remap(&mut self.vector_methods, &o.vector_methods);
        extend(&mut self.vector_method, &o.vector_method, &m);
        let m = remap(&mut self.vector_hashes, &o.vector_hashes);
        extend(&mut self.vector_hash, &o.vector_hash, &m);
        let m = remap(&mut self.protocols, &o.protocols);
        extend(&mut self.protocol, &o.protocol, &m);
        let m = remap(&mut self.tasks, &o.tasks);
        extend(&mut self.task, &o.task, &m);
        self.seed.extend_from_slice(&o.seed);
        self.flags.extend_from_slice(&o.flags);
        self.steps.extend_from_slice(&o.steps);
        self.tokens_out.extend_from_slice(&o.tokens_out);
        self.file.extend_from_slice(&o.file);
        self.line.extend(o.line.iter().map(|&l| l + line_offset));
    }

    fn push(&mut self, r: &Episode<'_>, file: u32, line: u32) {
        self.experiment.push(self.experiments.code(Some(r.experiment)));
        self.model.push(self.models.code(Some(r.model)));
        self.layer.push(self.layers.code(r.layer));
        let c = if r.coeff == 0.0 { 0.0 } else { r.coeff }; // -0 == 0
        self.coeff.push(self.coeffs.code(c.to_bits()));
        self.coeff_mode.push(self.coeff_modes.code(r.coeff_mode));
        self.prompt_pair.push(self.prompt_pairs.code(r.prompt_pair));
        self.vector_method.push(self.vector_methods.code(r.vector_method));
        self.vector_hash.push(self.vector_hashes.code(r.vector_hash));
        self.protocol.push(self.protocols.code(Some(protocol_name(r.protocol))));
        self.task.push(self.tasks.code(Some(r.task)));
        self.seed.push(r.seed);
        let mut f = 0;
        if r.steered {
            f |= F_STEERED;
        }
        if r.success {
            f |= F_SUCCESS;
        }
        if r.parse_failure {
            f |= F_PARSE_FAILURE;
        }
        if r.vlm {
            f |= F_VLM;
        }
        self.flags.push(f);
        self.steps.push(r.steps.min(u64::from(u32::MAX)) as u32);
        self.tokens_out.push(r.tokens_out.min(u64::from(u32::MAX)) as u32);
        self.file.push(file);
        self.line.push(line);
    }
}

/// One validated episode, borrowing from the line buffer.
#[derive(Debug, Clone)]
pub struct Episode<'a> {
    pub experiment: &'a str,
    pub model: &'a str,
    pub layer: Option<i64>,
    pub coeff: f64,
    pub coeff_mode: Option<&'a str>,
    pub prompt_pair: Option<&'a str>,
    pub vector_method: Option<&'a str>,
    pub vector_hash: Option<&'a str>,
    /// As the line gives it (absent in lines of harnesses without protocols).
    pub protocol: Option<&'a str>,
    pub task: &'a str,
    pub seed: i64,
    pub steered: bool,
    pub vlm: bool,
    pub parse_failure: bool,
    pub success: bool,
    pub steps: u64,
    pub tokens_out: u64,
}

/// Kind of a rejected input line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProblemKind {
    /// Not JSON (syntax error) or not an object.
    MalformedJson,
    /// A required field is absent.
    MissingField,
    /// A field has the wrong JSON type.
    WrongType,
    /// Well-typed but not allowed (e.g. `condition` other than baseline/steered).
    BadValue,
    /// The unterminated last line of a file does not parse (a write in progress or a crash).
    TornLastLine,
}

impl ProblemKind {
    pub fn label(self) -> &'static str {
        match self {
            ProblemKind::MalformedJson => "malformed JSON",
            ProblemKind::MissingField => "missing field",
            ProblemKind::WrongType => "wrong type",
            ProblemKind::BadValue => "bad value",
            ProblemKind::TornLastLine => "torn last line",
        }
    }
}

/// A rejected line.
#[derive(Debug, Clone)]
pub struct Problem {
    pub file: PathBuf,
    pub line: u64,
    pub kind: ProblemKind,
    pub message: String,
}

/// Everything read from the inputs.
#[derive(Debug, Default)]
pub struct Ingested {
    pub rows: Rows,
    pub problems: Vec<Problem>,
    pub files_read: usize,
    pub lines_read: u64,
}

// ---------------------------------------------------------------------------------------------
// serde

/// A string that borrows from the input when it has no escapes.
struct Str<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Str<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Str<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Str(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Str(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(V(std::marker::PhantomData))
    }
}

/// A field that must be present but may be null.
#[derive(Default)]
enum Field<T> {
    #[default]
    Missing,
    Null,
    Val(T),
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Field<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match Option::<T>::deserialize(d)? {
            None => Field::Null,
            Some(v) => Field::Val(v),
        })
    }
}

#[derive(Deserialize)]
struct RawLine<'a> {
    #[serde(borrow)]
    experiment: Str<'a>,
    #[serde(borrow)]
    model: Str<'a>,
    #[serde(default)]
    layer: Field<i64>,
    coeff: f64,
    #[serde(default, borrow)]
    coeff_mode: Option<Str<'a>>,
    #[serde(default, borrow)]
    vector_hash: Field<Str<'a>>,
    #[serde(default, borrow)]
    prompt_pair: Field<Str<'a>>,
    #[serde(default, borrow)]
    vector_method: Field<Str<'a>>,
    #[serde(default, borrow)]
    protocol: Option<Str<'a>>,
    #[serde(borrow)]
    task: Str<'a>,
    seed: i64,
    #[serde(borrow)]
    condition: Str<'a>,
    #[serde(default)]
    vlm: Option<bool>,
    parse_failure: bool,
    success: bool,
    steps: u64,
    tokens_out: u64,
}

fn field<'a>(name: &str, f: &'a Field<Str<'_>>) -> Result<Option<&'a str>, (ProblemKind, String)> {
    match f {
        Field::Missing => Err((ProblemKind::MissingField, format!("missing field `{name}`"))),
        Field::Null => Ok(None),
        Field::Val(s) => Ok(Some(&s.0)),
    }
}

/// Parses and validates one line; the error says what kind of problem it is.
pub fn parse_line(line: &[u8], f: impl FnOnce(&Episode<'_>)) -> Result<(), (ProblemKind, String)> {
    let raw: RawLine = serde_json::from_slice(line).map_err(|e| {
        use serde_json::error::Category;
        let msg = e.to_string();
        let kind = match e.classify() {
            Category::Data if msg.starts_with("missing field") => ProblemKind::MissingField,
            Category::Data if msg.starts_with("invalid type") => ProblemKind::WrongType,
            Category::Data => ProblemKind::BadValue,
            _ => ProblemKind::MalformedJson,
        };
        (kind, msg)
    })?;
    let layer = match raw.layer {
        Field::Missing => return Err((ProblemKind::MissingField, "missing field `layer`".into())),
        Field::Null => None,
        Field::Val(v) => Some(v),
    };
    let steered = match Condition::parse(&raw.condition.0) {
        Some(c) => c == Condition::Steered,
        None => {
            return Err((
                ProblemKind::BadValue,
                format!("`condition` is {:?}, expected \"baseline\" or \"steered\"", raw.condition.0),
            ))
        }
    };
    if !raw.coeff.is_finite() {
        return Err((ProblemKind::BadValue, "`coeff` is not finite".into()));
    }
    let ep = Episode {
        experiment: &raw.experiment.0,
        model: &raw.model.0,
        layer,
        coeff: raw.coeff,
        coeff_mode: raw.coeff_mode.as_ref().map(|s| &*s.0),
        prompt_pair: field("prompt_pair", &raw.prompt_pair)?,
        vector_method: field("vector_method", &raw.vector_method)?,
        vector_hash: field("vector_hash", &raw.vector_hash)?,
        protocol: raw.protocol.as_ref().map(|s| &*s.0),
        task: &raw.task.0,
        seed: raw.seed,
        steered,
        vlm: raw.vlm.unwrap_or(false),
        parse_failure: raw.parse_failure,
        success: raw.success,
        steps: raw.steps,
        tokens_out: raw.tokens_out,
    };
    f(&ep);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// files

/// Expands the inputs: directories recursively (sorted, `*.jsonl` and `*.parquet`), files as given.
pub fn expand_inputs(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("reading directory {}", dir.display()))?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()?;
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, out)?;
            } else if matches!(p.extension().and_then(|e| e.to_str()), Some("jsonl" | "parquet")) {
                out.push(p);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    for p in inputs {
        if p.is_dir() {
            walk(p, &mut out)?;
        } else if p.is_file() {
            out.push(p.clone());
        } else {
            bail!("input {} does not exist", p.display());
        }
    }
    Ok(out)
}

/// Bytes per block handed to a parser thread.
const BLOCK: usize = 4 << 20;

/// Parsed block: rows with their own dictionaries, line numbers relative to the block start.
struct Block {
    rows: Rows,
    problems: Vec<Problem>,
    lines: u64,
}

/// Parses whole lines; the last one may be unterminated only in the file's last block.
fn parse_block(block: &[u8], path: &Path, fid: u32) -> Block {
    let mut out = Block { rows: Rows::default(), problems: Vec::new(), lines: 0 };
    let mut pos = 0;
    while pos < block.len() {
        let (end, terminated) = match block[pos..].iter().position(|&b| b == b'\n') {
            Some(off) => (pos + off, true),
            None => (block.len(), false),
        };
        out.lines += 1;
        let line_no = out.lines;
        let mut line = &block[pos..end];
        pos = end + 1;
        while let Some((last, rest)) = line.split_last() {
            if matches!(last, b'\r' | b' ' | b'\t') {
                line = rest;
            } else {
                break;
            }
        }
        if line.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        let rows = &mut out.rows;
        let res = parse_line(line, |ep| rows.push(ep, fid, line_no as u32));
        if let Err((kind, message)) = res {
            let kind = if !terminated && kind == ProblemKind::MalformedJson { ProblemKind::TornLastLine } else { kind };
            out.problems.push(Problem { file: path.to_path_buf(), line: line_no, kind, message });
        }
    }
    out
}

/// Reads until `buf` grew by `want` bytes or the file ended; true at end of file.
fn fill(f: &mut File, buf: &mut Vec<u8>, want: usize) -> std::io::Result<bool> {
    let target = buf.len() + want;
    buf.reserve(want);
    while buf.len() < target {
        let n = f.by_ref().take((target - buf.len()) as u64).read_to_end(buf)?;
        if n == 0 {
            return Ok(true);
        }
    }
    Ok(false)
}

impl Ingested {
    fn merge(&mut self, b: Block) {
        let offset = self.lines_read;
        self.rows.append(b.rows, offset as u32);
        self.problems.extend(b.problems.into_iter().map(|mut p| {
            p.line += offset;
            p
        }));
        self.lines_read += b.lines;
    }
}

/// Reads one JSONL file: the calling thread reads blocks of whole lines, parser threads validate
/// them, and the blocks are merged back in file order (so line numbers and dictionary codes are the
/// same as a sequential read).
pub fn read_jsonl(path: &Path, fid: u32, ing: &mut Ingested) -> Result<()> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let base_lines = ing.lines_read;
    ing.lines_read = 0; // line numbers within this file; restored below
    let workers = std::env::var("ANALYZE_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .clamp(1, 8);
    let (job_tx, job_rx) = mpsc::sync_channel::<(usize, Vec<u8>)>(workers * 2);
    let job_rx = Mutex::new(job_rx);
    let (res_tx, res_rx) = mpsc::channel::<(usize, Block)>();
    let res = std::thread::scope(|scope| -> Result<()> {
        for _ in 0..workers {
            let (job_rx, res_tx) = (&job_rx, res_tx.clone());
            scope.spawn(move || loop {
                let job = job_rx.lock().expect("job queue").recv();
                let Ok((seq, buf)) = job else { break };
                if res_tx.send((seq, parse_block(&buf, path, fid))).is_err() {
                    break;
                }
            });
        }
        drop(res_tx);
        let mut pending: BTreeMap<usize, Block> = BTreeMap::new();
        let mut next = 0usize;
        let mut seq = 0usize;
        let mut carry: Vec<u8> = Vec::new();
        let mut merge_ready = |pending: &mut BTreeMap<usize, Block>, ing: &mut Ingested| {
            while let Some(b) = pending.remove(&next) {
                ing.merge(b);
                next += 1;
            }
        };
        loop {
            let mut buf = std::mem::take(&mut carry);
            let eof = fill(&mut f, &mut buf, BLOCK).with_context(|| format!("reading {}", path.display()))?;
            if !eof {
                match buf.iter().rposition(|&b| b == b'\n') {
                    Some(p) => {
                        carry = buf[p + 1..].to_vec();
                        buf.truncate(p + 1);
                    }
                    None => {
                        carry = buf; // a line longer than a block: read on
                        continue;
                    }
                }
            }
            if !buf.is_empty() {
                job_tx.send((seq, buf)).expect("parser threads alive");
                seq += 1;
            }
            while let Ok((s, b)) = res_rx.try_recv() {
                pending.insert(s, b);
            }
            merge_ready(&mut pending, ing);
            if eof {
                break;
            }
        }
        drop(job_tx);
        for (s, b) in res_rx {
            pending.insert(s, b);
        }
        merge_ready(&mut pending, ing);
        Ok(())
    });
    ing.lines_read += base_lines;
    res
}

/// Pushes an already validated episode (used by the parquet reader).
/// The protocol a line ran under, as analysis groups it: `default` for the built-in default
/// (whatever its hash in a given harness version) and for lines without one (harnesses without
/// protocols ran it); `name@hash` otherwise.
pub fn protocol_name(p: Option<&str>) -> &str {
    match p {
        None => "default",
        Some(id) if miniwob_steer_schema::line::is_default_protocol(id) => "default",
        Some(id) => id,
    }
}

pub fn push_episode(ing: &mut Ingested, ep: &Episode<'_>, fid: u32, line: u32) {
    ing.rows.push(ep, fid, line);
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"experiment":"e","model":"m","layer":12,"coeff":4.0,"vector_hash":"ab","prompt_pair":"accuracy","vector_method":"prompt","task":"click-button","seed":3,"condition":"steered","parse_failure":false,"success":true,"steps":2,"tokens_out":30,"output":"x \"quoted\"","actions":["click ref=4"],"extra":{"a":[1,2]}}"#;

    fn kind_of(s: &str) -> Option<ProblemKind> {
        parse_line(s.as_bytes(), |_| {}).err().map(|e| e.0)
    }

    #[test]
    fn good_line_and_unknown_fields() {
        let mut got = None;
        parse_line(GOOD.as_bytes(), |e| got = Some((e.layer, e.coeff, e.steered, e.task.to_string()))).unwrap();
        assert_eq!(got, Some((Some(12), 4.0, true, "click-button".to_string())));
    }

    #[test]
    fn problem_kinds() {
        assert_eq!(kind_of("{not json"), Some(ProblemKind::MalformedJson));
        assert_eq!(kind_of("[1,2]"), Some(ProblemKind::WrongType));
        assert_eq!(kind_of(&GOOD.replace(r#""success":true,"#, "")), Some(ProblemKind::MissingField));
        assert_eq!(kind_of(&GOOD.replace(r#""layer":12,"#, "")), Some(ProblemKind::MissingField));
        assert_eq!(kind_of(&GOOD.replace(r#""layer":12"#, r#""layer":null"#)), None);
        assert_eq!(kind_of(&GOOD.replace(r#""seed":3"#, r#""seed":"3""#)), Some(ProblemKind::WrongType));
        assert_eq!(kind_of(&GOOD.replace(r#""layer":12"#, r#""layer":"12""#)), Some(ProblemKind::WrongType));
        assert_eq!(kind_of(&GOOD.replace("steered", "other")), Some(ProblemKind::BadValue));
    }

    #[test]
    fn dict_codes() {
        let mut d = Dict::default();
        assert_eq!(d.code(None), 0);
        assert_eq!(d.code(Some("a")), 1);
        assert_eq!(d.code(Some("b")), 2);
        assert_eq!(d.code(Some("a")), 1);
        assert_eq!(d.name(2), Some("b"));
        assert_eq!(d.name(0), None);
    }
}
