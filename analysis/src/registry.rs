//! Family and size of the registry aliases (mirrors DESIGN.md §3). The analysis crate reads only
//! result files, so it keeps its own copy of this small table instead of depending on the main crate.

/// What the model table shows for one alias.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelInfo {
    pub family: &'static str,
    pub params: &'static str,
    pub layers: u32,
}

const TABLE: &[(&str, ModelInfo)] = &[
    ("qwen-coder-0.5b", ModelInfo { family: "Qwen2.5-Coder", params: "0.5B", layers: 24 }),
    ("qwen-coder-1.5b", ModelInfo { family: "Qwen2.5-Coder", params: "1.5B", layers: 28 }),
    ("smollm2-135m", ModelInfo { family: "SmolLM2", params: "135M", layers: 30 }),
    ("qwen-0.5b", ModelInfo { family: "Qwen2.5", params: "0.5B", layers: 24 }),
    ("qwen-1.5b", ModelInfo { family: "Qwen2.5", params: "1.5B", layers: 28 }),
    ("llama-1b", ModelInfo { family: "Llama-3.2", params: "1B", layers: 16 }),
    ("llama-3b", ModelInfo { family: "Llama-3.2", params: "3B", layers: 28 }),
    ("gemma-2b", ModelInfo { family: "Gemma-2", params: "2B", layers: 26 }),
    ("smollm-1.7b", ModelInfo { family: "SmolLM2", params: "1.7B", layers: 24 }),
    ("phi-3.8b", ModelInfo { family: "Phi-3.5-mini", params: "3.8B", layers: 32 }),
    ("qwen-vl-2b", ModelInfo { family: "Qwen2-VL (VLM)", params: "2B", layers: 28 }),
];

/// Registry entry for an alias; `None` for a path or an alias this table does not know
/// (the model table then shows "?").
pub fn lookup(alias: &str) -> Option<ModelInfo> {
    TABLE.iter().find(|(a, _)| *a == alias).map(|(_, m)| *m)
}

/// All known aliases, in registry order (used by the synthetic generator).
pub fn aliases() -> impl Iterator<Item = &'static str> {
    TABLE.iter().map(|(a, _)| *a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_and_unknown_models() {
        assert_eq!(lookup("qwen-coder-0.5b").unwrap().params, "0.5B");
        assert_eq!(lookup("llama-3b").unwrap().family, "Llama-3.2");
        assert_eq!(lookup("/models/custom").map(|m| m.family), None);
        assert_eq!(aliases().count(), 11);
    }
}
