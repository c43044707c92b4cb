//! `POST /v1/completions`.

use serde::{Deserialize, Deserializer, Serialize};

use super::logprobs::CompletionLogprobs;
use super::sampling::SamplingFields;
use super::usage::{StreamOptions, Usage};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    pub prompt: Prompt,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suffix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub echo: Option<bool>,
    /// Number of top alternatives per token (0: just the sampled token's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

/// `prompt`: text, a batch of texts, token ids, or a batch of token-id lists.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenBatches(Vec<Vec<u32>>),
}

/// One prompt of a (possibly batched) request.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    Text(String),
    Tokens(Vec<u32>),
}

impl Prompt {
    pub fn into_inputs(self) -> Vec<PromptInput> {
        match self {
            Prompt::Text(t) => vec![PromptInput::Text(t)],
            Prompt::Texts(ts) => ts.into_iter().map(PromptInput::Text).collect(),
            Prompt::Tokens(ids) => vec![PromptInput::Tokens(ids)],
            Prompt::TokenBatches(batches) => batches.into_iter().map(PromptInput::Tokens).collect(),
        }
    }
}

// Hand-written so a wrong shape gets one clear message instead of serde's "did not match
// any variant", and an empty list is told apart from a list of the wrong thing.
impl<'de> Deserialize<'de> for Prompt {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        use serde_json::Value;
        const EXPECTED: &str =
            "prompt must be a string, a list of strings, a list of token ids or a list of token-id lists";
        let value = Value::deserialize(deserializer)?;
        let parsed = match &value {
            Value::String(s) => Some(Prompt::Text(s.clone())),
            Value::Array(items) if items.first().is_some_and(Value::is_string) => {
                serde_json::from_value(value.clone()).ok().map(Prompt::Texts)
            }
            Value::Array(items) if items.first().is_some_and(Value::is_array) => {
                serde_json::from_value(value.clone()).ok().map(Prompt::TokenBatches)
            }
            Value::Array(_) => serde_json::from_value(value.clone()).ok().map(Prompt::Tokens),
            _ => None,
        };
        parsed.ok_or_else(|| D::Error::custom(EXPECTED))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionResponse {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    pub usage: Usage,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_fingerprint: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<String>,
    /// vLLM extension: the stop string or stop token id that ended the choice.
    #[serde(default)]
    pub stop_reason: Option<serde_json::Value>,
}

/// One `data:` event of a streamed completion (same `object` as the full response).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionChunk {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

pub const COMPLETION_OBJECT: &str = "text_completion";

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt(json: &str) -> Result<Prompt, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn every_prompt_form_parses() {
        assert_eq!(prompt(r#""hi""#).unwrap(), Prompt::Text("hi".into()));
        assert_eq!(prompt(r#"["a", "b"]"#).unwrap(), Prompt::Texts(vec!["a".into(), "b".into()]));
        assert_eq!(prompt("[1, 2]").unwrap(), Prompt::Tokens(vec![1, 2]));
        assert_eq!(prompt("[[1], [2, 3]]").unwrap(), Prompt::TokenBatches(vec![vec![1], vec![2, 3]]));
        assert_eq!(prompt("[]").unwrap(), Prompt::Tokens(vec![]));
    }

    #[test]
    fn wrong_prompt_shapes_are_named() {
        for bad in ["5", "[-1]", r#"["a", 1]"#, "[[1], 2]", "{}", "null", "[1.5]"] {
            let err = prompt(bad).unwrap_err().to_string();
            assert!(err.contains("prompt must be"), "{bad}: {err}");
        }
    }

    #[test]
    fn batches_become_one_input_each() {
        let inputs = Prompt::TokenBatches(vec![vec![1], vec![2]]).into_inputs();
        assert_eq!(inputs, vec![PromptInput::Tokens(vec![1]), PromptInput::Tokens(vec![2])]);
    }
}
