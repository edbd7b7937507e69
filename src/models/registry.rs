//! Model aliases: checkpoint ids, where the weights come from, and the layer `--layer auto`
//! steers (50% depth). DESIGN.md §3 is the source of this table.
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Modality {
    Text,
    Vision,
}

#[derive(Debug, Clone, Copy)]
pub enum Source {
    /// A GGUF unpacked by `scripts/setup.sh` under `$MINIWOB_STEER_HOME/models/<dir>/<file>`.
    Local { dir: &'static str, file: &'static str, setup: &'static str },
    /// A Hugging Face repo id, read from the local hf-hub cache (offline).
    Hub { repo: &'static str },
}

#[derive(Debug, Clone, Copy)]
pub struct Entry {
    pub alias: &'static str,
    pub checkpoint: &'static str,
    pub family: &'static str,
    pub params: &'static str,
    pub layers: usize,
    pub modality: Modality,
    pub source: Source,
}

impl Entry {
    pub fn auto_layer(&self) -> usize {
        self.layers / 2
    }
}

/// The embedded default (DESIGN.md §3): the smallest model that shows a steering effect on exp12.
pub const DEFAULT_MODEL: &str = "qwen-coder-0.5b";

pub const REGISTRY: &[Entry] = &[
    Entry {
        alias: "qwen-coder-0.5b",
        checkpoint: "Qwen2.5-Coder-0.5B-Instruct (GGUF)",
        family: "qwen2",
        params: "0.5B",
        layers: 24,
        modality: Modality::Text,
        source: Source::Local {
            dir: "qwen-coder-0.5b",
            file: "qwen2.5-coder-0.5b-instruct.gguf",
            setup: "./scripts/setup.sh",
        },
    },
    Entry {
        alias: "qwen-coder-1.5b",
        checkpoint: "Qwen2.5-Coder-1.5B-Instruct Q4_K_M (GGUF)",
        family: "qwen2",
        params: "1.5B",
        layers: 28,
        modality: Modality::Text,
        source: Source::Local {
            dir: "qwen-coder-1.5b",
            file: "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            setup: "./scripts/setup.sh --models qwen-coder-1.5b",
        },
    },
    Entry {
        alias: "smollm2-135m",
        checkpoint: "SmolLM2-135M-Instruct Q4_1 (GGUF)",
        family: "llama",
        params: "135M",
        layers: 30,
        modality: Modality::Text,
        source: Source::Local {
            dir: "smollm2-135m",
            file: "SmolLM2-135M-Instruct.Q4_1.gguf",
            setup: "./scripts/setup.sh",
        },
    },
    Entry {
        alias: "qwen-0.5b",
        checkpoint: "Qwen/Qwen2.5-0.5B-Instruct",
        family: "qwen2",
        params: "0.5B",
        layers: 24,
        modality: Modality::Text,
        source: Source::Hub { repo: "Qwen/Qwen2.5-0.5B-Instruct" },
    },
    Entry {
        alias: "qwen-1.5b",
        checkpoint: "Qwen/Qwen2.5-1.5B-Instruct",
        family: "qwen2",
        params: "1.5B",
        layers: 28,
        modality: Modality::Text,
        source: Source::Hub { repo: "Qwen/Qwen2.5-1.5B-Instruct" },
    },
    Entry {
        alias: "llama-1b",
        checkpoint: "meta-llama/Llama-3.2-1B-Instruct",
        family: "llama",
        params: "1B",
        layers: 16,
        modality: Modality::Text,
        source: Source::Hub { repo: "meta-llama/Llama-3.2-1B-Instruct" },
    },
    Entry {
        alias: "llama-3b",
        checkpoint: "meta-llama/Llama-3.2-3B-Instruct",
        family: "llama",
        params: "3B",
        layers: 28,
        modality: Modality::Text,
        source: Source::Hub { repo: "meta-llama/Llama-3.2-3B-Instruct" },
    },
    Entry {
        alias: "gemma-2b",
        checkpoint: "google/gemma-2-2b-it",
        family: "gemma2",
        params: "2B",
        layers: 26,
        modality: Modality::Text,
        source: Source::Hub { repo: "google/gemma-2-2b-it" },
    },
    Entry {
        alias: "smollm-1.7b",
        checkpoint: "HuggingFaceTB/SmolLM2-1.7B-Instruct",
        family: "llama",
        params: "1.7B",
        layers: 24,
        modality: Modality::Text,
        source: Source::Hub { repo: "HuggingFaceTB/SmolLM2-1.7B-Instruct" },
    },
    Entry {
        alias: "phi-3.8b",
        checkpoint: "microsoft/Phi-3.5-mini-instruct",
        family: "phi3",
        params: "3.8B",
        layers: 32,
        modality: Modality::Text,
        source: Source::Hub { repo: "microsoft/Phi-3.5-mini-instruct" },
    },
    Entry {
        alias: "qwen-vl-2b",
        checkpoint: "Qwen/Qwen2-VL-2B-Instruct",
        family: "qwen2-vl",
        params: "2B",
        layers: 28,
        modality: Modality::Vision,
        source: Source::Hub { repo: "Qwen/Qwen2-VL-2B-Instruct" },
    },
];

pub fn lookup(alias: &str) -> Option<&'static Entry> {
    REGISTRY.iter().find(|e| e.alias.eq_ignore_ascii_case(alias) || e.checkpoint == alias)
}

/// `$MINIWOB_STEER_HOME`, default `~/.cache/miniwob-steer`: where setup.sh puts assets.
pub fn assets_home() -> PathBuf {
    if let Some(p) = std::env::var_os("MINIWOB_STEER_HOME") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("miniwob-steer")
}

/// Where a model's weights are on disk.
#[derive(Debug, Clone)]
pub enum Location {
    /// transformers layout: config.json, *.safetensors, tokenizer.json.
    Dir(PathBuf),
    Gguf(PathBuf),
}

#[derive(Debug, Clone)]
pub struct Resolved {
    /// The alias, or the path as given.
    pub name: String,
    pub checkpoint: String,
    pub location: Location,
    pub entry: Option<&'static Entry>,
}

/// Resolves an alias, a registry checkpoint id, a local directory or a `.gguf` file.
pub fn resolve(spec: &str) -> Result<Resolved> {
    let path = Path::new(spec);
    if path.is_file() {
        if path.extension().is_some_and(|e| e == "gguf") {
            return Ok(Resolved {
                name: spec.to_string(),
                checkpoint: path.file_name().unwrap_or_default().to_string_lossy().into_owned(),
                location: Location::Gguf(path.to_path_buf()),
                entry: None,
            });
        }
        bail!("{spec}: a model file must be a .gguf (or pass the directory of a transformers checkpoint)");
    }
    if path.is_dir() {
        if !path.join("config.json").exists() {
            bail!("{spec}: directory has no config.json (expected a transformers checkpoint: config.json, *.safetensors, tokenizer.json)");
        }
        return Ok(Resolved {
            name: spec.to_string(),
            checkpoint: path.file_name().unwrap_or_default().to_string_lossy().into_owned(),
            location: Location::Dir(path.to_path_buf()),
            entry: None,
        });
    }
    let entry = lookup(spec).with_context(|| {
        let names: Vec<&str> = REGISTRY.iter().map(|e| e.alias).collect();
        format!("unknown model `{spec}`: not a file, not a directory, not an alias ({})", names.join(", "))
    })?;
    let location = match entry.source {
        Source::Local { dir, file, setup } => {
            let p = assets_home().join("models").join(dir).join(file);
            if !p.exists() {
                bail!("model `{}` is not installed: {} is missing; run {setup}", entry.alias, p.display());
            }
            Location::Gguf(p)
        }
        Source::Hub { repo } => {
            let cache = hf_hub::Cache::from_env();
            let config = cache.model(repo.to_string()).get("config.json").with_context(|| {
                format!(
                    "model `{}` ({repo}) is not in the Hugging Face cache at {} (this tool never downloads; \
                     fetch it on a connected machine with `huggingface-cli download {repo}` and set HF_HOME, \
                     or pass a local directory)",
                    entry.alias,
                    cache.path().display()
                )
            })?;
            Location::Dir(config.parent().context("cache path has no parent")?.to_path_buf())
        }
    };
    Ok(Resolved {
        name: entry.alias.to_string(),
        checkpoint: entry.checkpoint.to_string(),
        location,
        entry: Some(entry),
    })
}

/// `the model has 24 layers (0..23)`, or `the model has no layers`.
pub fn layer_range(num_layers: usize) -> String {
    match num_layers.checked_sub(1) {
        Some(last) => format!("the model has {num_layers} layers (0..{last})"),
        None => "the model has no layers".into(),
    }
}

/// Parses `--layer auto|N` against a model's depth.
pub fn parse_layer(spec: &str, num_layers: usize) -> Result<usize> {
    if num_layers == 0 {
        bail!("--layer {spec}: {}", layer_range(0));
    }
    if spec == "auto" {
        return Ok(num_layers / 2);
    }
    let l: usize = spec.parse().with_context(|| format!("--layer must be `auto` or a layer index, found `{spec}`"))?;
    if l >= num_layers {
        bail!("--layer {l} is out of range: {}", layer_range(num_layers));
    }
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_layers_match_design_table() {
        for (alias, layer) in [
            ("qwen-coder-0.5b", 12),
            ("qwen-coder-1.5b", 14),
            ("smollm2-135m", 15),
            ("llama-1b", 8),
            ("gemma-2b", 13),
            ("phi-3.8b", 16),
            ("qwen-vl-2b", 14),
        ] {
            assert_eq!(lookup(alias).unwrap().auto_layer(), layer, "{alias}");
        }
        assert_eq!(parse_layer("auto", 28).unwrap(), 14);
        assert!(parse_layer("28", 28).is_err());
        assert!(parse_layer("x", 28).is_err());
        // Issue 18.8: a model without layers has no layer to pick (before: `auto` gave 0, and an
        // index underflowed `num_layers - 1`).
        for spec in ["auto", "0", "3"] {
            let e = parse_layer(spec, 0).unwrap_err().to_string();
            assert!(e.contains("the model has no layers"), "{e}");
        }
        assert!(parse_layer("30", 30).unwrap_err().to_string().contains("30 layers (0..29)"));
    }

    #[test]
    fn unknown_model_names_the_choices() {
        let e = resolve("no-such-model").unwrap_err().to_string();
        assert!(e.contains("unknown model `no-such-model`") && e.contains("qwen-coder-0.5b"), "{e}");
    }
}
