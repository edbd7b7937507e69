//! Parquet cache of validated episodes (`analyze convert`), read back as an input like JSONL.
//! It holds the analysis columns only (not the raw output or actions) plus each row's source.

use std::fs::File;
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use polars::prelude::*;
use polars_io::prelude::*;

use crate::ingest::{push_episode, Episode, Ingested, Problem, ProblemKind, Rows};

/// Writes the rows (all validated rows, duplicates included) to a parquet file.
pub fn write_parquet(r: &Rows, out: &Path) -> Result<u64> {
    let n = r.len();
    fn s<'a>(d: &'a crate::ingest::Dict, codes: &[u32]) -> Vec<Option<&'a str>> {
        codes.iter().map(|&c| d.name(c)).collect()
    }
    let cols = vec![
        Column::new("experiment".into(), s(&r.experiments, &r.experiment)),
        Column::new("model".into(), s(&r.models, &r.model)),
        Column::new("layer".into(), r.layer.iter().map(|&c| r.layer_value(c)).collect::<Vec<_>>()),
        Column::new("coeff".into(), r.coeff.iter().map(|&c| r.coeff_value(c)).collect::<Vec<_>>()),
        Column::new("coeff_mode".into(), s(&r.coeff_modes, &r.coeff_mode)),
        Column::new("vector_hash".into(), s(&r.vector_hashes, &r.vector_hash)),
        Column::new("prompt_pair".into(), s(&r.prompt_pairs, &r.prompt_pair)),
        Column::new("vector_method".into(), s(&r.vector_methods, &r.vector_method)),
        Column::new("protocol".into(), s(&r.protocols, &r.protocol)),
        Column::new("task".into(), s(&r.tasks, &r.task)),
        Column::new("seed".into(), r.seed.clone()),
        Column::new(
            "condition".into(),
            (0..n).map(|i| if r.steered(i) { "steered" } else { "baseline" }).collect::<Vec<_>>(),
        ),
        Column::new("vlm".into(), r.flags.iter().map(|f| f & crate::ingest::F_VLM != 0).collect::<Vec<_>>()),
        Column::new("parse_failure".into(), (0..n).map(|i| r.parse_failure(i)).collect::<Vec<_>>()),
        Column::new("success".into(), (0..n).map(|i| r.success(i)).collect::<Vec<_>>()),
        Column::new("steps".into(), r.steps.iter().map(|&x| i64::from(x)).collect::<Vec<_>>()),
        Column::new("tokens_out".into(), r.tokens_out.iter().map(|&x| i64::from(x)).collect::<Vec<_>>()),
        Column::new(
            "source_file".into(),
            r.file.iter().map(|&f| r.files[f as usize].display().to_string()).collect::<Vec<_>>(),
        ),
        Column::new("source_line".into(), r.line.iter().map(|&l| i64::from(l)).collect::<Vec<_>>()),
    ];
    let mut df = DataFrame::new(n, cols)?;
    let f = File::create(out).with_context(|| format!("creating {}", out.display()))?;
    ParquetWriter::new(f).finish(&mut df).map_err(|e| anyhow!("writing {}: {e}", out.display()))?;
    Ok(n as u64)
}

/// Reads a parquet file written by `write_parquet`; a null in a required column rejects that row.
pub fn read_parquet(path: &Path, fid: u32, ing: &mut Ingested) -> Result<()> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let df = ParquetReader::new(f).finish().map_err(|e| anyhow!("reading parquet {}: {e}", path.display()))?;
    let get = |name: &str, dt: DataType| -> Result<Series> {
        let c = df.column(name).map_err(|_| anyhow!("{}: no column `{name}`", path.display()))?;
        c.as_materialized_series().cast(&dt).map_err(|e| anyhow!("{}: column `{name}`: {e}", path.display()))
    };
    let strs = |name: &str| get(name, DataType::String);
    let (experiment, model, coeff_mode, vector_hash, prompt_pair, vector_method, task, condition) = (
        strs("experiment")?,
        strs("model")?,
        strs("coeff_mode")?,
        strs("vector_hash")?,
        strs("prompt_pair")?,
        strs("vector_method")?,
        strs("task")?,
        strs("condition")?,
    );
    let (layer, seed, steps, tokens_out) = (
        get("layer", DataType::Int64)?,
        get("seed", DataType::Int64)?,
        get("steps", DataType::Int64)?,
        get("tokens_out", DataType::Int64)?,
    );
    let coeff = get("coeff", DataType::Float64)?;
    // Parquet caches written before protocols have no column: every row ran the default.
    let protocol = match df.column("protocol") {
        Ok(_) => Some(strs("protocol")?),
        Err(_) => None,
    };
    let protocol = protocol.as_ref().map(|p| p.str()).transpose()?;
    let (vlm, pf, success) =
        (get("vlm", DataType::Boolean)?, get("parse_failure", DataType::Boolean)?, get("success", DataType::Boolean)?);
    let (experiment, model, coeff_mode, vector_hash, prompt_pair, vector_method, task, condition) = (
        experiment.str()?,
        model.str()?,
        coeff_mode.str()?,
        vector_hash.str()?,
        prompt_pair.str()?,
        vector_method.str()?,
        task.str()?,
        condition.str()?,
    );
    let (layer, seed, steps, tokens_out, coeff) =
        (layer.i64()?, seed.i64()?, steps.i64()?, tokens_out.i64()?, coeff.f64()?);
    let (vlm, pf, success) = (vlm.bool()?, pf.bool()?, success.bool()?);
    let cols = Cols {
        experiment,
        model,
        coeff_mode,
        vector_hash,
        prompt_pair,
        vector_method,
        protocol,
        task,
        condition,
        layer,
        seed,
        steps,
        tokens_out,
        coeff,
        vlm,
        pf,
        success,
    };
    for i in 0..df.height() {
        ing.lines_read += 1;
        let line = i as u64 + 1;
        match cols.episode(i) {
            Ok(ep) => push_episode(ing, &ep, fid, line as u32),
            Err(message) => {
                ing.problems.push(Problem { file: path.to_path_buf(), line, kind: ProblemKind::MissingField, message })
            }
        }
    }
    Ok(())
}

struct Cols<'a> {
    experiment: &'a StringChunked,
    model: &'a StringChunked,
    coeff_mode: &'a StringChunked,
    vector_hash: &'a StringChunked,
    prompt_pair: &'a StringChunked,
    vector_method: &'a StringChunked,
    protocol: Option<&'a StringChunked>,
    task: &'a StringChunked,
    condition: &'a StringChunked,
    layer: &'a Int64Chunked,
    seed: &'a Int64Chunked,
    steps: &'a Int64Chunked,
    tokens_out: &'a Int64Chunked,
    coeff: &'a Float64Chunked,
    vlm: &'a BooleanChunked,
    pf: &'a BooleanChunked,
    success: &'a BooleanChunked,
}

fn req<T>(v: Option<T>, name: &str) -> std::result::Result<T, String> {
    v.ok_or_else(|| format!("null `{name}`"))
}

impl<'a> Cols<'a> {
    fn episode(&self, i: usize) -> std::result::Result<Episode<'a>, String> {
        let steered = match req(self.condition.get(i), "condition")? {
            "baseline" => false,
            "steered" => true,
            other => return Err(format!("`condition` is {other:?}")),
        };
        Ok(Episode {
            experiment: req(self.experiment.get(i), "experiment")?,
            model: req(self.model.get(i), "model")?,
            layer: self.layer.get(i),
            coeff: req(self.coeff.get(i), "coeff")?,
            coeff_mode: self.coeff_mode.get(i),
            prompt_pair: self.prompt_pair.get(i),
            vector_method: self.vector_method.get(i),
            vector_hash: self.vector_hash.get(i),
            protocol: self.protocol.and_then(|p| p.get(i)),
            task: req(self.task.get(i), "task")?,
            seed: req(self.seed.get(i), "seed")?,
            steered,
            vlm: self.vlm.get(i).unwrap_or(false),
            parse_failure: req(self.pf.get(i), "parse_failure")?,
            success: req(self.success.get(i), "success")?,
            steps: req(self.steps.get(i), "steps")?.max(0) as u64,
            tokens_out: req(self.tokens_out.get(i), "tokens_out")?.max(0) as u64,
        })
    }
}
