//! The model registry's table (DESIGN.md §3): aliases, checkpoints, families, sizes, layers and
//! where the weights come from. The main crate resolves and loads them; `analyze` reads the
//! family and size for its tables. One table for both.

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
    /// The architecture family (`qwen2`, `llama`, …).
    pub family: &'static str,
    /// The model series as tables show it (`Qwen2.5-Coder`, `SmolLM2`, …).
    pub series: &'static str,
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
        series: "Qwen2.5-Coder",
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
        series: "Qwen2.5-Coder",
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
        series: "SmolLM2",
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
        series: "Qwen2.5",
        checkpoint: "Qwen/Qwen2.5-0.5B-Instruct",
        family: "qwen2",
        params: "0.5B",
        layers: 24,
        modality: Modality::Text,
        source: Source::Hub { repo: "Qwen/Qwen2.5-0.5B-Instruct" },
    },
    Entry {
        alias: "qwen-1.5b",
        series: "Qwen2.5",
        checkpoint: "Qwen/Qwen2.5-1.5B-Instruct",
        family: "qwen2",
        params: "1.5B",
        layers: 28,
        modality: Modality::Text,
        source: Source::Hub { repo: "Qwen/Qwen2.5-1.5B-Instruct" },
    },
    Entry {
        alias: "llama-1b",
        series: "Llama-3.2",
        checkpoint: "meta-llama/Llama-3.2-1B-Instruct",
        family: "llama",
        params: "1B",
        layers: 16,
        modality: Modality::Text,
        source: Source::Hub { repo: "meta-llama/Llama-3.2-1B-Instruct" },
    },
    Entry {
        alias: "llama-3b",
        series: "Llama-3.2",
        checkpoint: "meta-llama/Llama-3.2-3B-Instruct",
        family: "llama",
        params: "3B",
        layers: 28,
        modality: Modality::Text,
        source: Source::Hub { repo: "meta-llama/Llama-3.2-3B-Instruct" },
    },
    Entry {
        alias: "gemma-2b",
        series: "Gemma-2",
        checkpoint: "google/gemma-2-2b-it",
        family: "gemma2",
        params: "2B",
        layers: 26,
        modality: Modality::Text,
        source: Source::Hub { repo: "google/gemma-2-2b-it" },
    },
    Entry {
        alias: "smollm-1.7b",
        series: "SmolLM2",
        checkpoint: "HuggingFaceTB/SmolLM2-1.7B-Instruct",
        family: "llama",
        params: "1.7B",
        layers: 24,
        modality: Modality::Text,
        source: Source::Hub { repo: "HuggingFaceTB/SmolLM2-1.7B-Instruct" },
    },
    Entry {
        alias: "phi-3.8b",
        series: "Phi-3.5-mini",
        checkpoint: "microsoft/Phi-3.5-mini-instruct",
        family: "phi3",
        params: "3.8B",
        layers: 32,
        modality: Modality::Text,
        source: Source::Hub { repo: "microsoft/Phi-3.5-mini-instruct" },
    },
    Entry {
        alias: "qwen3-4b",
        series: "Qwen3",
        checkpoint: "Qwen/Qwen3-4B",
        family: "qwen3",
        params: "4B",
        layers: 36,
        modality: Modality::Text,
        source: Source::Hub { repo: "Qwen/Qwen3-4B" },
    },
    Entry {
        alias: "qwen-vl-2b",
        series: "Qwen2-VL (VLM)",
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
