//! Family and size of the registry aliases, from the one model table (the schema crate's, which
//! the main crate loads models from).
use miniwob_steer_schema::registry::REGISTRY;

/// What the model table shows for one alias.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelInfo {
    pub family: &'static str,
    pub params: &'static str,
    pub layers: u32,
}

/// Registry entry for an alias; `None` for a path or an alias the table does not know
/// (the model table then shows "?").
pub fn lookup(alias: &str) -> Option<ModelInfo> {
    REGISTRY.iter().find(|e| e.alias == alias).map(|e| ModelInfo {
        family: e.series,
        params: e.params,
        layers: e.layers as u32,
    })
}

/// All known aliases, in registry order (used by the synthetic generator).
pub fn aliases() -> impl Iterator<Item = &'static str> {
    REGISTRY.iter().map(|e| e.alias)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_and_unknown_models() {
        assert_eq!(lookup("qwen-coder-0.5b").unwrap().params, "0.5B");
        assert_eq!(lookup("llama-3b").unwrap().family, "Llama-3.2");
        assert_eq!(lookup("/models/custom").map(|m| m.family), None);
        assert_eq!(aliases().count(), REGISTRY.len());
        assert!(aliases().any(|a| a == "qwen3-4b"));
    }
}
