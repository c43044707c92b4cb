//! Tokenizer (`tokenizer.json`) plus what `tokenizer_config.json` says about it: the chat
//! template and the special tokens.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::LoadError;

/// Settings from `tokenizer_config.json` that the serving layer needs.
#[derive(Debug, Clone, Default)]
pub struct TokenizerConfig {
    /// The default chat template (Jinja source), if the model has one.
    pub chat_template: Option<String>,
    /// Named templates (e.g. `tool_use`) when the config holds a list.
    pub named_templates: Vec<(String, String)>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub unk_token: Option<String>,
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    pub config: TokenizerConfig,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer").field("path", &self.path).field("vocab_size", &self.vocab_size()).finish()
    }
}

/// A special token in tokenizer_config.json is either a string or `{"content": "..."}`.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

fn parse_tokenizer_config(path: &Path) -> Result<TokenizerConfig, LoadError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(TokenizerConfig::default()),
        Err(source) => return Err(LoadError::Io { path: path.to_owned(), source }),
    };
    let json: Value = serde_json::from_str(&text).map_err(|source| LoadError::Json { path: path.to_owned(), source })?;
    let mut config = TokenizerConfig {
        bos_token: token_text(json.get("bos_token")),
        eos_token: token_text(json.get("eos_token")),
        pad_token: token_text(json.get("pad_token")),
        unk_token: token_text(json.get("unk_token")),
        ..Default::default()
    };
    match json.get("chat_template") {
        Some(Value::String(t)) => config.chat_template = Some(t.clone()),
        Some(Value::Array(list)) => {
            for item in list {
                let name = item.get("name").and_then(Value::as_str);
                let template = item.get("template").and_then(Value::as_str);
                if let (Some(name), Some(template)) = (name, template) {
                    if name == "default" {
                        config.chat_template = Some(template.to_owned());
                    }
                    config.named_templates.push((name.to_owned(), template.to_owned()));
                }
            }
        }
        _ => {}
    }
    // Newer exports keep the template in its own file.
    if config.chat_template.is_none() {
        let jinja = path.with_file_name("chat_template.jinja");
        if let Ok(t) = std::fs::read_to_string(&jinja) {
            config.chat_template = Some(t);
        }
    }
    Ok(config)
}

impl Tokenizer {
    /// Loads `tokenizer.json` and `tokenizer_config.json` (optional) from a model directory.
    pub fn from_dir(dir: &Path) -> Result<Self, LoadError> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(LoadError::Tokenizer { path, message: "file not found".into() });
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| LoadError::Tokenizer { path: path.clone(), message: e.to_string() })?;
        let config = parse_tokenizer_config(&dir.join("tokenizer_config.json"))?;
        Ok(Self { inner, path, config })
    }

    /// Size of the id space, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, String> {
        self.inner.encode(text, add_special_tokens).map(|e| e.get_ids().to_vec()).map_err(|e| e.to_string())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> String {
        // Decoding ids of our own vocabulary cannot fail; unknown ids decode to nothing.
        self.inner.decode(ids, skip_special_tokens).unwrap_or_default()
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The text of one token as the model sees it (for logprobs), lossless for byte tokens.
    pub fn id_to_token_text(&self, id: u32) -> String {
        self.inner.decode(&[id], false).unwrap_or_default()
    }

    /// Ids of the added tokens marked special (skipped by `skip_special_tokens`).
    pub fn special_token_ids(&self) -> Vec<u32> {
        self.inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect()
    }
}
