//! A small typed table: markdown for people, CSV (through polars) for machines.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use polars::prelude::*;
use polars_io::prelude::*;

/// Typed column data (None = empty cell).
#[derive(Debug, Clone)]
pub enum Data {
    Str(Vec<Option<String>>),
    F64(Vec<Option<f64>>),
    I64(Vec<Option<i64>>),
}

/// One column; `md`/`csv` say where it appears (a CI is one markdown column but two CSV columns).
#[derive(Debug, Clone)]
pub struct TCol {
    pub name: String,
    pub title: String,
    pub data: Data,
    pub cells: Vec<String>,
    pub md: bool,
    pub csv: bool,
    pub right: bool,
}

/// A table.
#[derive(Debug, Clone, Default)]
pub struct Table {
    pub cols: Vec<TCol>,
}

impl Table {
    pub fn height(&self) -> usize {
        self.cols.first().map_or(0, |c| c.cells.len())
    }

    /// Adds a string column shown in both outputs.
    pub fn str(&mut self, name: &str, title: &str, v: Vec<Option<String>>) -> &mut TCol {
        let cells = v.iter().map(|x| x.clone().unwrap_or_default()).collect();
        self.push(name, title, Data::Str(v), cells, false)
    }

    /// Adds a float column with its markdown formatting.
    pub fn f64(&mut self, name: &str, title: &str, v: Vec<Option<f64>>, fmt: impl Fn(f64) -> String) -> &mut TCol {
        let cells = v.iter().map(|x| x.map(&fmt).unwrap_or_default()).collect();
        self.push(name, title, Data::F64(v), cells, true)
    }

    /// Adds an integer column.
    pub fn i64(&mut self, name: &str, title: &str, v: Vec<Option<i64>>) -> &mut TCol {
        let cells = v.iter().map(|x| x.map(|x| x.to_string()).unwrap_or_default()).collect();
        self.push(name, title, Data::I64(v), cells, true)
    }

    /// Adds a markdown-only column of ready cells.
    pub fn md_only(&mut self, title: &str, cells: Vec<String>) {
        let c = self.push(title, title, Data::Str(vec![]), cells, true);
        c.csv = false;
    }

    fn push(&mut self, name: &str, title: &str, data: Data, cells: Vec<String>, right: bool) -> &mut TCol {
        self.cols.push(TCol { name: name.into(), title: title.into(), data, cells, md: true, csv: true, right });
        self.cols.last_mut().unwrap()
    }

    /// GitHub markdown.
    pub fn to_markdown(&self) -> String {
        let cols: Vec<&TCol> = self.cols.iter().filter(|c| c.md).collect();
        let esc = |s: &str| s.replace('|', "\\|");
        let mut out = String::new();
        out.push_str("| ");
        out.push_str(&cols.iter().map(|c| esc(&c.title)).collect::<Vec<_>>().join(" | "));
        out.push_str(" |\n|");
        for c in &cols {
            out.push_str(if c.right { "---:|" } else { "---|" });
        }
        out.push('\n');
        for i in 0..self.height() {
            out.push_str("| ");
            out.push_str(&cols.iter().map(|c| esc(&c.cells[i])).collect::<Vec<_>>().join(" | "));
            out.push_str(" |\n");
        }
        out
    }

    /// The CSV columns as a polars DataFrame.
    pub fn to_dataframe(&self) -> Result<DataFrame> {
        let cols: Vec<Column> = self
            .cols
            .iter()
            .filter(|c| c.csv)
            .map(|c| match &c.data {
                Data::Str(v) => Column::new(c.name.as_str().into(), v.clone()),
                Data::F64(v) => Column::new(c.name.as_str().into(), v.clone()),
                Data::I64(v) => Column::new(c.name.as_str().into(), v.clone()),
            })
            .collect();
        Ok(DataFrame::new(self.height(), cols)?)
    }

    pub fn write_csv(&self, path: &Path) -> Result<()> {
        let mut df = self.to_dataframe()?;
        let f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
        CsvWriter::new(BufWriter::new(f)).finish(&mut df).map_err(|e| anyhow!("writing {}: {e}", path.display()))?;
        Ok(())
    }
}

/// 0.45 → "45.0%".
pub fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

/// 0.2 → "+20.0".
pub fn pp(x: f64) -> String {
    format!("{:+.1}", 100.0 * x)
}

/// p-values: three decimals, or scientific below 0.001.
pub fn pval(p: f64) -> String {
    if p >= 0.001 {
        format!("{p:.3}")
    } else {
        format!("{p:.1e}")
    }
}

pub fn dec1(x: f64) -> String {
    if x.is_nan() {
        String::new()
    } else {
        format!("{x:.1}")
    }
}
