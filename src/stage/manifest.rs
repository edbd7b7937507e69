//! `stage.json`: what one stage directory of a split model holds, and where it came from.
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// The manifest's file name inside a stage directory.
pub const MANIFEST: &str = "stage.json";
/// Bumped when the layout of a stage directory changes.
pub const FORMAT: u32 = 1;

/// The model a split came from: what a result line records, so a run through stages writes the
/// same `model` / `weights_hash` as the single process (and can resume its results).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceModel {
    pub name: String,
    pub checkpoint: String,
    /// [`crate::models::weights::fingerprint`] of the source's weight files.
    pub weights_hash: String,
    /// `qwen2-vl` for a vision-language model, else the decoder family (`qwen2`, `llama`, …).
    pub family: String,
    /// `safetensors` or `gguf`.
    pub format: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageManifest {
    pub format: u32,
    /// This stage's index, 0-based, of `stages`.
    pub stage: usize,
    pub stages: usize,
    /// Global decoder layers `[start, end)` this stage holds.
    pub layers: [usize; 2],
    /// The source's decoder layer count.
    pub num_layers: usize,
    /// Holds the token embedding (the first stage; the last too when the LM head is tied to it).
    pub embed: bool,
    /// Holds the final norm and the LM head (the last stage).
    pub head: bool,
    /// Holds the vision tower (`visual.*`: the first stage of a Qwen2-VL).
    pub vision: bool,
    pub source: SourceModel,
    /// The weights file of this stage (`model.safetensors` or `model.gguf`).
    pub weights: String,
    /// sha256 (hex) of every other file of the directory, by file name.
    pub files: BTreeMap<String, String>,
}

impl StageManifest {
    pub fn read(dir: &Path) -> Result<Self> {
        let p = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&p)
            .with_context(|| format!("{}: not a stage directory (no {MANIFEST}; made by `split`)", dir.display()))?;
        let m: Self = serde_json::from_str(&text).with_context(|| format!("{}: not a stage manifest", p.display()))?;
        if m.format != FORMAT {
            bail!("{}: format {}, this harness reads format {FORMAT}", p.display(), m.format);
        }
        let [lo, hi] = m.layers;
        if lo >= hi || hi > m.num_layers || m.stage >= m.stages {
            bail!(
                "{}: layers {lo}..{hi} of {} / stage {} of {} are inconsistent",
                p.display(),
                m.num_layers,
                m.stage,
                m.stages
            );
        }
        Ok(m)
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        let p = dir.join(MANIFEST);
        std::fs::write(&p, serde_json::to_string_pretty(self)? + "\n")
            .with_context(|| format!("writing {}", p.display()))
    }

    /// Checks every listed file's sha256 (a stage directory copied to another machine, a
    /// truncated transfer); names the file and both hashes.
    pub fn verify(&self, dir: &Path) -> Result<()> {
        for (name, want) in &self.files {
            let got = crate::util::sha256_file(&dir.join(name))?;
            if &got != want {
                bail!(
                    "{}: sha256 {got}, the manifest says {want} (a damaged or replaced file)",
                    dir.join(name).display()
                );
            }
        }
        Ok(())
    }

    pub fn is_first(&self) -> bool {
        self.layers[0] == 0
    }
    pub fn is_last(&self) -> bool {
        self.layers[1] == self.num_layers
    }
}
