//! Sampling fields common to completions and chat completions (OpenAI's plus vLLM's
//! extensions), exactly as the client sent them: absent stays `None` so the server can
//! tell "not given" (model defaults apply) from an explicit value.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingFields {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub best_of: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// vLLM: 0 or -1 disables the cut.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_k: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repetition_penalty: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<i64>,
    /// The chat API's newer name for `max_tokens`; wins when both are given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_tokens: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop: Option<Stop>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_token_ids: Option<Vec<u32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ignore_eos: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skip_special_tokens: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub include_stop_str_in_output: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logit_bias: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// `stop`: one string or a list of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged, expecting = "a string or a list of strings")]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

impl SamplingFields {
    /// The completion-length limit and the field name it came from (for error messages).
    pub fn max_tokens_field(&self) -> Option<(&'static str, i64)> {
        match (self.max_completion_tokens, self.max_tokens) {
            (Some(v), _) => Some(("max_completion_tokens", v)),
            (None, Some(v)) => Some(("max_tokens", v)),
            (None, None) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_accepts_a_string_or_a_list() {
        let one: SamplingFields = serde_json::from_str(r#"{"stop": "\n"}"#).unwrap();
        assert_eq!(one.stop.unwrap().into_vec(), vec!["\n"]);
        let many: SamplingFields = serde_json::from_str(r#"{"stop": ["a", "b"]}"#).unwrap();
        assert_eq!(many.stop.unwrap().into_vec(), vec!["a", "b"]);
        let err = serde_json::from_str::<SamplingFields>(r#"{"stop": 5}"#).unwrap_err();
        assert!(err.to_string().contains("a string or a list of strings"), "{err}");
    }

    #[test]
    fn max_completion_tokens_wins() {
        let f: SamplingFields = serde_json::from_str(r#"{"max_tokens": 5, "max_completion_tokens": 7}"#).unwrap();
        assert_eq!(f.max_tokens_field(), Some(("max_completion_tokens", 7)));
        let f: SamplingFields = serde_json::from_str(r#"{"max_tokens": 5}"#).unwrap();
        assert_eq!(f.max_tokens_field(), Some(("max_tokens", 5)));
    }
}
