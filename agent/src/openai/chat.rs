//! `POST /v1/chat/completions`.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::logprobs::ChatLogprobs;
use super::sampling::SamplingFields;
use super::tools::{Tool, ToolCall, ToolCallDelta, ToolChoice};
use super::usage::{StreamOptions, Usage};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    pub messages: Vec<ChatMessage>,
    /// Return the sampled tokens' log-probabilities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_logprobs: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<Tool>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<ToolChoice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel_tool_calls: Option<bool>,
    /// `{"type": "text"}` only; structured output is not implemented.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_format: Option<Value>,
    /// Extra variables for the chat template (e.g. `enable_thinking`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template_kwargs: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub add_generation_prompt: Option<bool>,
    /// Continue the last (assistant) message instead of opening a new one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub continue_final_message: Option<bool>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    Developer,
    User,
    Assistant,
    Tool,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::Developer => "developer",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

/// A message of the conversation. Fields the server does not know are kept and handed to
/// the chat template unchanged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<MessageContent>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `content`: a string or a list of parts (only text parts are supported).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged, expecting = "a string or a list of content parts")]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionResponse {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_fingerprint: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatChoice {
    pub index: usize,
    pub message: ResponseMessage,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<String>,
    /// vLLM extension: the stop string or stop token id that ended the choice.
    #[serde(default)]
    pub stop_reason: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResponseMessage {
    pub role: Role,
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: ChatDelta,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatDelta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCallDelta>,
}

impl ChatDelta {
    pub fn is_empty(&self) -> bool {
        self.role.is_none() && self.content.is_none() && self.reasoning_content.is_none() && self.tool_calls.is_empty()
    }
}

pub const CHAT_COMPLETION_OBJECT: &str = "chat.completion";
pub const CHAT_COMPLETION_CHUNK_OBJECT: &str = "chat.completion.chunk";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_message_fields_are_kept_for_the_template() {
        let m: ChatMessage = serde_json::from_str(r#"{"role": "user", "content": "hi", "x_note": 1}"#).unwrap();
        assert_eq!(m.extra.get("x_note"), Some(&Value::from(1)));
        let back = serde_json::to_value(&m).unwrap();
        assert_eq!(back, serde_json::json!({"role": "user", "content": "hi", "x_note": 1}));
    }

    #[test]
    fn content_parts_parse() {
        let m: ChatMessage =
            serde_json::from_str(r#"{"role": "user", "content": [{"type": "text", "text": "a"}]}"#).unwrap();
        let Some(MessageContent::Parts(parts)) = m.content else { panic!("not parts") };
        assert_eq!(parts[0].text.as_deref(), Some("a"));
    }

    #[test]
    fn an_unknown_role_names_the_choices() {
        let err = serde_json::from_str::<ChatMessage>(r#"{"role": "wizard", "content": "x"}"#).unwrap_err();
        assert!(err.to_string().contains("unknown variant `wizard`"), "{err}");
    }

    #[test]
    fn empty_deltas_are_omitted_from_json() {
        let chunk = ChatChunkChoice { index: 0, delta: ChatDelta::default(), logprobs: None, finish_reason: None, stop_reason: None };
        assert_eq!(serde_json::to_string(&chunk).unwrap(), r#"{"index":0,"delta":{},"finish_reason":null}"#);
    }
}
