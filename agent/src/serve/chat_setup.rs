//! Per-model chat configuration derived once at load: the compiled chat template and the
//! output parsers its conventions call for.

use dlengine_engine::tokenizer::TokenizerConfig;

use super::chat_template::ChatTemplate;
use super::output_parser::{detect_tool_parser, template_uses_reasoning, ToolParserKind};

pub struct ChatSetup {
    /// Err: why chat requests cannot be served (no template, or it does not compile).
    pub template: Result<ChatTemplate, String>,
    pub tool_parser: Option<&'static ToolParserKind>,
    /// Whether `<think>…</think>` is split off as reasoning.
    pub reasoning: bool,
}

impl ChatSetup {
    pub fn from_tokenizer_config(config: &TokenizerConfig) -> Self {
        let Some(source) = config.chat_template.clone() else {
            return Self {
                template: Err("this model has no chat template (tokenizer_config.json has no `chat_template`); \
                               use /v1/completions with a raw prompt"
                    .into()),
                tool_parser: None,
                reasoning: false,
            };
        };
        let tool_parser = detect_tool_parser(&source);
        let reasoning = template_uses_reasoning(&source);
        let template = ChatTemplate::new(source, special_tokens(config))
            .map_err(|e| format!("this model's chat template does not compile: {e:#}"));
        if let Err(e) = &template {
            tracing::warn!("{e}");
        }
        tracing::info!(
            tool_parser = tool_parser.map(|k| k.name).unwrap_or("none"),
            reasoning,
            "chat template loaded"
        );
        Self { template, tool_parser, reasoning }
    }
}

/// The special tokens transformers exposes to templates, only those that are set.
fn special_tokens(config: &TokenizerConfig) -> Vec<(&'static str, String)> {
    [
        ("bos_token", &config.bos_token),
        ("eos_token", &config.eos_token),
        ("pad_token", &config.pad_token),
        ("unk_token", &config.unk_token),
    ]
    .into_iter()
    .filter_map(|(name, token)| token.clone().map(|t| (name, t)))
    .collect()
}
