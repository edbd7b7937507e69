//! Model aliases: checkpoint ids, where the weights come from, and the layer `--layer auto`
//! steers (50% depth). DESIGN.md §3 is the source of this table.
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

pub use miniwob_steer_schema::paths::assets_home;
pub use miniwob_steer_schema::registry::{lookup, Entry, Modality, Source, DEFAULT_MODEL, REGISTRY};

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
