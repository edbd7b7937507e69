//! Tokenizers (from tokenizer.json, or built from GGUF metadata) and chat templates rendered
//! with minijinja the way transformers renders them (trim_blocks, lstrip_blocks).
use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use serde_json::Value as Json;
use std::path::Path;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

/// ChatML, used (with a warning) when a model ships no template.
const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// The harness's one template environment (chat templates and protocol templates): what
/// transformers renders chat templates with (trim_blocks, lstrip_blocks, Python string methods,
/// `raise_exception`, `strftime_now`).
pub fn template_env() -> minijinja::Environment<'static> {
    let mut env = minijinja::Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
        Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
    });
    env.add_function("strftime_now", |fmt: String| chrono::Local::now().format(&fmt).to_string());
    env
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: String,
    bos: Option<(String, u32)>,
    eos: Option<(String, u32)>,
    pad: Option<u32>,
    add_bos: bool,
}

// Pre-tokenizer regexes as llama.cpp and transformers use them for each `tokenizer.ggml.pre`.
const QWEN2_RE: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LLAMA3_RE: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn split_then_bytes(re: &str) -> Result<PreTokenizerWrapper> {
    let split = Split::new(SplitPattern::Regex(re.into()), SplitDelimiterBehavior::Isolated, false)
        .map_err(|e| anyhow::anyhow!("building pre-tokenizer regex: {e}"))?;
    Ok(Sequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()]).into())
}

fn pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper> {
    Ok(match pre {
        // GPT-2 regex, byte-level, no prefix space. SmolLM additionally isolates digits.
        "default" | "gpt2" | "gpt-2" => ByteLevel::new(false, true, true).into(),
        "smollm" => Sequence::new(vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()]).into(),
        "qwen2" | "deepseek-coder" => split_then_bytes(QWEN2_RE)?,
        "llama-bpe" | "llama3" | "smaug-bpe" => split_then_bytes(LLAMA3_RE)?,
        other => bail!(
            "GGUF tokenizer.ggml.pre `{other}` is not supported (supported: default/gpt2, smollm, qwen2, llama-bpe)"
        ),
    })
}

fn meta_u32(c: &Content, key: &str) -> Option<u32> {
    c.metadata.get(key).and_then(|v| v.to_u32().ok().or_else(|| v.to_u64().ok().map(|x| x as u32)))
}

fn json_token(v: Option<&Json>) -> Option<String> {
    match v {
        Some(Json::String(s)) => Some(s.clone()),
        Some(Json::Object(o)) => o.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    }
}

impl Tokenizer {
    /// tokenizer.json plus tokenizer_config.json (chat template, special tokens) when present.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let tj = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&tj)
            .map_err(|e| anyhow::anyhow!("{}: cannot load tokenizer: {e}", tj.display()))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Json = if cfg_path.exists() {
            serde_json::from_str(&std::fs::read_to_string(&cfg_path)?)
                .with_context(|| format!("{}: not valid JSON", cfg_path.display()))?
        } else {
            Json::Null
        };
        let template = match cfg.get("chat_template") {
            Some(Json::String(s)) => Some(s.clone()),
            Some(Json::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(String::from),
            Some(Json::Null) | None => {
                // Newer checkpoints keep it in chat_template.jinja.
                std::fs::read_to_string(dir.join("chat_template.jinja")).ok()
            }
            Some(other) => bail!("{}: `chat_template` must be a string or a list, found {other}", cfg_path.display()),
        };
        let id_of = |s: Option<String>| s.and_then(|s| inner.token_to_id(&s).map(|id| (s, id)));
        let bos = id_of(json_token(cfg.get("bos_token")));
        let eos = id_of(json_token(cfg.get("eos_token")));
        let pad = id_of(json_token(cfg.get("pad_token"))).map(|p| p.1);
        let add_bos = cfg.get("add_bos_token").and_then(|b| b.as_bool()).unwrap_or(false);
        Ok(Self::finish(inner, template, bos, eos, pad, add_bos))
    }

    /// Builds a byte-level BPE tokenizer from GGUF metadata (`tokenizer.ggml.*`).
    pub fn from_gguf(c: &Content) -> Result<Self> {
        let model = crate::models::gguf::meta_str(c, "tokenizer.ggml.model").unwrap_or("");
        if model != "gpt2" {
            bail!("GGUF tokenizer.ggml.model `{model}` is not supported (only gpt2-style byte-level BPE)");
        }
        let tokens: Vec<String> = match c.metadata.get("tokenizer.ggml.tokens") {
            Some(Value::Array(a)) => {
                a.iter().map(|v| v.to_string().cloned().map_err(anyhow::Error::from)).collect::<Result<_>>()?
            }
            _ => bail!("GGUF: missing string array `tokenizer.ggml.tokens`"),
        };
        let merges: Vec<(String, String)> = match c.metadata.get("tokenizer.ggml.merges") {
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    let s = v.to_string()?;
                    s.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())).with_context(|| {
                        format!("GGUF: malformed merge `{s}` (expected two tokens separated by a space)")
                    })
                })
                .collect::<Result<_>>()?,
            _ => bail!("GGUF: missing string array `tokenizer.ggml.merges`"),
        };
        let types: Vec<i32> = match c.metadata.get("tokenizer.ggml.token_type") {
            Some(Value::Array(a)) => a.iter().map(|v| v.to_i32().unwrap_or(1)).collect(),
            _ => vec![1; tokens.len()],
        };
        let vocab: ahash::AHashMap<String, u32> =
            tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| anyhow::anyhow!("GGUF: building the BPE model: {e}"))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let pre = crate::models::gguf::meta_str(c, "tokenizer.ggml.pre").unwrap_or("default");
        inner.with_pre_tokenizer(Some(pre_tokenizer(pre)?));
        if pre == "qwen2" {
            // Qwen2's published tokenizer NFC-normalises; the GGUF metadata does not say so.
            inner
                .with_normalizer(Some(tokenizers::normalizers::unicode::NFC))
                .map_err(|e| anyhow::anyhow!("GGUF: setting the NFC normalizer: {e}"))?;
        }
        inner.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
        // Control tokens (type 3) are special; user-defined ones (type 4) are matched verbatim.
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &t)| t == 3 || t == 4)
            .map(|(s, &t)| AddedToken::from(s.clone(), t == 3).normalized(false))
            .collect();
        inner.add_special_tokens(specials).map_err(|e| anyhow::anyhow!("GGUF: adding special tokens: {e}"))?;
        let tok = |key: &str| meta_u32(c, key).and_then(|id| tokens.get(id as usize).map(|s| (s.clone(), id)));
        let template = crate::models::gguf::meta_str(c, "tokenizer.chat_template").map(String::from);
        let add_bos = c.metadata.get("tokenizer.ggml.add_bos_token").and_then(|v| v.to_bool().ok()).unwrap_or(false);
        Ok(Self::finish(
            inner,
            template,
            tok("tokenizer.ggml.bos_token_id"),
            tok("tokenizer.ggml.eos_token_id"),
            meta_u32(c, "tokenizer.ggml.padding_token_id"),
            add_bos,
        ))
    }

    fn finish(
        inner: tokenizers::Tokenizer,
        template: Option<String>,
        bos: Option<(String, u32)>,
        eos: Option<(String, u32)>,
        pad: Option<u32>,
        add_bos: bool,
    ) -> Self {
        let chat_template = template.unwrap_or_else(|| {
            tracing::warn!("the model has no chat template; using ChatML");
            CHATML.to_string()
        });
        Self { inner, chat_template, bos, eos, pad, add_bos }
    }

    /// `add_special_tokens` adds BOS where the model asks for it (transformers' semantics).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_special_tokens && self.add_bos {
            if let Some((_, b)) = &self.bos {
                ids.push(*b);
            }
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner.decode(ids, skip_special_tokens).map_err(|e| anyhow::anyhow!("decoding: {e}"))
    }

    pub fn chat_template(&self) -> &str {
        &self.chat_template
    }

    pub fn apply_chat_template(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.apply_chat_template_thinking(messages, add_generation_prompt, None)
    }

    /// [`apply_chat_template`](Self::apply_chat_template) with Qwen3's `enable_thinking` switch:
    /// `None` leaves the variable undefined (the template's default: thinking on for Qwen3),
    /// `Some(false)` makes Qwen3's template close an empty `<think>` block after the
    /// generation prompt. Templates that do not read the variable render the same either way.
    pub fn apply_chat_template_thinking(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        enable_thinking: Option<bool>,
    ) -> Result<String> {
        let extra: Vec<(&str, minijinja::Value)> =
            enable_thinking.map(|t| ("enable_thinking", minijinja::Value::from(t))).into_iter().collect();
        self.render_template(
            &self.chat_template,
            minijinja::Value::from_serialize(messages),
            add_generation_prompt,
            &extra,
        )
    }

    /// Renders a chat template the way transformers does (trim_blocks, lstrip_blocks, Python
    /// string methods, `raise_exception`, `strftime_now`, `bos_token` / `eos_token`), with
    /// `extra` variables beside `messages` and `add_generation_prompt`. The one template
    /// environment of the harness (text models and Qwen2-VL).
    pub fn render_template(
        &self,
        template: &str,
        messages: minijinja::Value,
        add_generation_prompt: bool,
        extra: &[(&str, minijinja::Value)],
    ) -> Result<String> {
        let mut env = template_env();
        env.add_template("chat", template).context("compiling the chat template")?;
        let mut ctx: std::collections::BTreeMap<&str, minijinja::Value> = extra.iter().cloned().collect();
        ctx.insert("messages", messages);
        ctx.insert("add_generation_prompt", add_generation_prompt.into());
        ctx.insert("bos_token", self.bos.as_ref().map(|b| b.0.clone()).unwrap_or_default().into());
        ctx.insert("eos_token", self.eos.as_ref().map(|e| e.0.clone()).unwrap_or_default().into());
        env.get_template("chat")?.render(ctx).context("rendering the chat template")
    }

    /// Tokens that end a generation: EOS plus the chat-turn terminators the vocabulary has.
    pub fn stop_token_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.eos.iter().map(|e| e.1).collect();
        for s in ["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>", "<|end|>"] {
            if let Some(id) = self.inner.token_to_id(s) {
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
        }
        ids
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos.as_ref().map(|b| b.1)
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos.as_ref().map(|e| e.1)
    }

    pub fn pad_token_id(&self) -> Option<u32> {
        self.pad.or(self.eos_token_id())
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, s: &str) -> Option<u32> {
        self.inner.token_to_id(s)
    }
}
