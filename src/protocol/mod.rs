//! Protocols (docs/protocols.md): every knob between an observation and a reward, in one TOML
//! file, so that another harness's protocol can be reproduced without its code. `default` is the
//! harness's own behaviour; `legacy` (the project's wording) has the structure of the original
//! Python exp12 loop. A protocol's name and content hash go into every result line and vector
//! file; a non-default protocol's hash is part of every resume key.
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;

/// The built-in protocols, by name.
pub const BUILTIN: &[(&str, &str)] = &[
    ("default", include_str!("../../experiments/protocols/default.toml")),
    ("legacy", include_str!("../../experiments/protocols/legacy.toml")),
];

/// How the user text reaches the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChatMode {
    /// One user turn through the chat template, with the generation prompt.
    #[serde(rename = "user")]
    User,
    /// `prompt.system` as a system turn, then the user turn.
    #[serde(rename = "system+user")]
    SystemUser,
    /// The user text as it is, no chat template.
    #[serde(rename = "none")]
    None,
}

/// How a model output becomes actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ParseMode {
    /// Every non-blank line (code fences aside) must be an action, else the output fails.
    Strict,
    /// Lines that are not actions are skipped; the output fails only when none parses.
    Lenient,
    /// Only the first non-blank line (fences aside) is read; it must be an action.
    FirstLine,
}

/// The CAA read point, relative to layer L where the vector is added (its output).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadPoint {
    /// Read where the vector is added: the output of layer L.
    ResidPost,
    /// Read the input of layer L (transformers' `hidden_states[L]`), add at its output.
    ResidPre,
}

impl ReadPoint {
    pub fn name(self) -> &'static str {
        match self {
            ReadPoint::ResidPost => "resid_post",
            ReadPoint::ResidPre => "resid_pre",
        }
    }

    /// The hook point read for a vector added at the output of `layer`.
    pub fn hook(self, layer: usize) -> crate::models::hooks::HookPoint {
        use crate::models::hooks::HookPoint;
        match self {
            ReadPoint::ResidPost => HookPoint::ResidPost(layer),
            ReadPoint::ResidPre => HookPoint::ResidPre(layer),
        }
    }
}

/// When an episode counts as a success.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SuccessRule {
    /// The raw task reward (no time penalty) is positive.
    Raw,
    /// The time-discounted reward the page computes is positive.
    Reward,
}

/// How `select ref=N option="…"` is executed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SelectMode {
    /// Set the matching option and fire `input` and `change`.
    #[default]
    Set,
    /// Click the `<select>`, then type the option text as keystrokes.
    Keystrokes,
}

/// `generation.repetition_penalty`: a number (1 = off) or `"model"` (the checkpoint's
/// `generation_config.json` when it has one, else off).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Penalty {
    Fixed(f32),
    Model,
}

impl<'de> Deserialize<'de> for Penalty {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(f64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(x) if x.is_finite() && x > 0.0 => Ok(Penalty::Fixed(x as f32)),
            Raw::N(x) => Err(serde::de::Error::custom(format!("repetition_penalty = {x}: expected a positive number"))),
            Raw::S(s) if s == "model" => Ok(Penalty::Model),
            Raw::S(s) => Err(serde::de::Error::custom(format!(
                "repetition_penalty = {s:?}: expected a positive number or \"model\""
            ))),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptSection {
    /// The user text (minijinja): `utterance`, `fields`, `dom`, `history`, `step`.
    pub template: String,
    /// The same for the screenshot observation (no `dom`).
    pub vlm_template: String,
    pub chat: ChatMode,
    /// The system turn of `chat = "system+user"`.
    #[serde(default)]
    pub system: Option<String>,
    pub add_special_tokens: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomSection {
    /// One element's line (minijinja over the element's fields).
    pub element: String,
    /// Which elements get a line (a minijinja expression over the same variables).
    pub keep: String,
    pub max_elements: usize,
    pub join: String,
    /// The line after the budget is spent (minijinja, `n` = elements left out); none when empty.
    #[serde(default)]
    pub omitted: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaaSection {
    /// Between the prompt's user text and the pair's instruction.
    pub join: String,
    pub method: crate::steering::caa::Method,
    pub read: ReadPoint,
    pub response_tokens: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParseSection {
    pub mode: ParseMode,
    /// Whether quoted strings take `\"`, `\\`, `\n`, `\t` escapes (else a string ends at the next `"`).
    pub escapes: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationSection {
    pub max_new_tokens: usize,
    pub repetition_penalty: Penalty,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvSection {
    pub success: SuccessRule,
    /// `core.EPISODE_MAX_TIME`: the page clock, which runs while the model generates.
    pub episode_max_time_ms: u64,
    pub select: SelectMode,
}

/// A parsed protocol file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProtocolFile {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub prompt: PromptSection,
    pub dom: DomSection,
    pub caa: CaaSection,
    pub parse: ParseSection,
    pub generation: GenerationSection,
    pub env: EnvSection,
}

/// A protocol and where it came from.
#[derive(Debug, Clone)]
pub struct Protocol {
    pub file: ProtocolFile,
    /// sha256 prefix (16 hex) of the file's bytes.
    pub hash: String,
    /// The file, or `built-in <name>`.
    pub origin: String,
}

impl Protocol {
    /// Parses and checks a protocol: every required key present, no unknown key (both named
    /// with the file), templates that compile.
    pub fn parse(text: &str, origin: &str) -> Result<Protocol> {
        let file: ProtocolFile = toml::from_str(text).map_err(|e| anyhow::anyhow!("{origin}: {e}"))?;
        if file.name.trim().is_empty() {
            bail!("{origin}: `name` is empty");
        }
        match (file.prompt.chat, &file.prompt.system) {
            (ChatMode::SystemUser, None) => {
                bail!("{origin}: prompt.chat = \"system+user\" needs `prompt.system` (the system turn's text)")
            }
            (ChatMode::User | ChatMode::None, Some(_)) => {
                bail!("{origin}: `prompt.system` is only read with prompt.chat = \"system+user\"")
            }
            _ => {}
        }
        if file.dom.max_elements == 0 {
            bail!("{origin}: dom.max_elements = 0: the model would see no element");
        }
        if file.generation.max_new_tokens == 0 {
            bail!("{origin}: generation.max_new_tokens = 0");
        }
        if file.caa.response_tokens == 0 && file.caa.method.needs_response() {
            bail!("{origin}: caa.response_tokens = 0 with caa.method = {:?}", file.caa.method.name());
        }
        let p = Protocol { hash: miniwob_steer_schema::hash16(text), origin: origin.to_string(), file };
        crate::agent::prompt::PromptBuilder::new(Arc::new(p.clone()))
            .with_context(|| format!("{origin}: templates"))?;
        Ok(p)
    }

    /// A protocol file, or a built-in one by name.
    pub fn load(spec: &str) -> Result<Protocol> {
        if let Some((name, text)) = BUILTIN.iter().find(|(n, _)| *n == spec) {
            return Self::parse(text, &format!("built-in protocol `{name}` (experiments/protocols/{name}.toml)"));
        }
        let p = Path::new(spec);
        if !p.is_file() {
            let names: Vec<&str> = BUILTIN.iter().map(|(n, _)| *n).collect();
            bail!("--protocol {spec}: no such file (built in: {})", names.join(", "));
        }
        let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        let proto = Self::parse(&text, &p.display().to_string())?;
        // A built-in's name means the built-in (result lines and keys go by it).
        if let Some((name, builtin)) = BUILTIN.iter().find(|(n, _)| *n == proto.name()) {
            if miniwob_steer_schema::hash16(builtin) != proto.hash {
                bail!("{}: name = {name:?} is the built-in protocol's; give your protocol another name", p.display());
            }
        }
        Ok(proto)
    }

    /// The built-in default protocol (today's behaviour).
    pub fn default_protocol() -> Arc<Protocol> {
        static DEFAULT: std::sync::OnceLock<Arc<Protocol>> = std::sync::OnceLock::new();
        DEFAULT.get_or_init(|| Arc::new(Self::load("default").expect("the built-in default protocol parses"))).clone()
    }

    pub fn name(&self) -> &str {
        &self.file.name
    }

    /// Whether this is the built-in default (its runs keep the resume keys of harnesses that
    /// had no protocols).
    pub fn is_default(&self) -> bool {
        self.hash == Self::default_protocol().hash
    }

    /// `name@hash`: what result lines, vector files and keys record.
    pub fn id(&self) -> String {
        format!("{}@{}", self.file.name, self.hash)
    }

    /// The parser settings (`parse`).
    pub fn parse_options(&self) -> crate::agent::parse::ParseOptions {
        crate::agent::parse::ParseOptions { mode: self.file.parse.mode, escapes: self.file.parse.escapes }
    }

    /// The repetition penalty for a model: the protocol's number, or with `"model"` the
    /// `generation_config.json` of the checkpoint directory it was loaded from (1 when it has
    /// none, or when it came from a GGUF file, which carries no generation config).
    pub fn repetition_penalty(&self, info: &crate::models::load::ModelInfo) -> Result<f32> {
        self.repetition_penalty_in(info.dir.as_deref())
    }

    fn repetition_penalty_in(&self, dir: Option<&Path>) -> Result<f32> {
        match self.file.generation.repetition_penalty {
            Penalty::Fixed(x) => Ok(x),
            Penalty::Model => {
                let Some(dir) = dir else {
                    tracing::info!("repetition_penalty = \"model\": a GGUF file has no generation config; penalty off");
                    return Ok(1.0);
                };
                let p = dir.join("generation_config.json");
                if !p.is_file() {
                    tracing::info!("{}: no generation_config.json; repetition penalty off", dir.display());
                    return Ok(1.0);
                }
                let v: serde_json::Value = serde_json::from_str(
                    &std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?,
                )
                .with_context(|| format!("{}: not JSON", p.display()))?;
                match v.get("repetition_penalty") {
                    None | Some(serde_json::Value::Null) => Ok(1.0),
                    Some(x) => match x.as_f64() {
                        Some(x) if x.is_finite() && x > 0.0 => Ok(x as f32),
                        _ => bail!("{}: repetition_penalty = {x}: expected a positive number", p.display()),
                    },
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_parse_and_differ() {
        let d = Protocol::load("default").unwrap();
        let l = Protocol::load("legacy").unwrap();
        assert!(d.is_default() && !l.is_default());
        assert_eq!((d.name(), l.name()), ("default", "legacy"));
        assert_ne!(d.hash, l.hash);
        assert_eq!(l.file.parse.mode, ParseMode::Lenient);
        assert_eq!(l.file.caa.read, ReadPoint::ResidPre);
    }

    fn edited(from: &str, to: &str) -> String {
        let text = BUILTIN[0].1;
        assert!(text.contains(from), "default.toml has no {from:?}");
        text.replacen(from, to, 1)
    }

    #[test]
    fn unknown_and_missing_keys_name_the_key_and_the_file() {
        let e = Protocol::parse(&edited("[parse]\n", "[parse]\nstrictness = 3\n"), "p.toml").unwrap_err();
        let e = format!("{e:#}");
        assert!(e.contains("p.toml") && e.contains("strictness"), "{e}");
        let e = format!("{:#}", Protocol::parse(&edited("escapes = true\n", ""), "p.toml").unwrap_err());
        assert!(e.contains("p.toml") && e.contains("escapes"), "{e}");
        let e =
            format!("{:#}", Protocol::parse(&edited("mode = \"strict\"", "mode = \"loose\""), "p.toml").unwrap_err());
        assert!(e.contains("p.toml") && e.contains("loose"), "{e}");
        let e = format!(
            "{:#}",
            Protocol::parse(&edited("repetition_penalty = 1.0", "repetition_penalty = \"auto\""), "p.toml")
                .unwrap_err()
        );
        assert!(e.contains("auto") && e.contains("model"), "{e}");
        let e = format!(
            "{:#}",
            Protocol::parse(&edited("chat = \"user\"", "chat = \"system+user\""), "p.toml").unwrap_err()
        );
        assert!(e.contains("prompt.system"), "{e}");
        let e = format!("{:#}", Protocol::parse(&edited("keep = '", "keep = '(("), "p.toml").unwrap_err());
        assert!(e.contains("p.toml") && e.contains("keep"), "{e}");
        assert!(Protocol::load("no-such-protocol").unwrap_err().to_string().contains("legacy"));
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("mine.toml");
        std::fs::write(&f, edited("join = \"\\n\\n\"", "join = \"\\n\"")).unwrap();
        let e = Protocol::load(f.to_str().unwrap()).unwrap_err().to_string();
        assert!(e.contains("mine.toml") && e.contains("another name"), "{e}");
        std::fs::write(&f, BUILTIN[0].1).unwrap();
        assert!(Protocol::load(f.to_str().unwrap()).unwrap().is_default(), "a copy of the default is the default");
    }

    #[test]
    fn penalty_from_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let p = Protocol::parse(&edited("repetition_penalty = 1.0", "repetition_penalty = \"model\""), "p").unwrap();
        assert_eq!(p.repetition_penalty_in(None).unwrap(), 1.0);
        assert_eq!(p.repetition_penalty_in(Some(dir.path())).unwrap(), 1.0, "no generation_config.json");
        std::fs::write(dir.path().join("generation_config.json"), r#"{"repetition_penalty": 1.05}"#).unwrap();
        assert_eq!(p.repetition_penalty_in(Some(dir.path())).unwrap(), 1.05);
        std::fs::write(dir.path().join("generation_config.json"), r#"{"repetition_penalty": "x"}"#).unwrap();
        assert!(p.repetition_penalty_in(Some(dir.path())).unwrap_err().to_string().contains("generation_config.json"));
    }
}
