//! Function tools: what the client offers (`tools`, `tool_choice`) and what the model
//! called (`tool_calls`).

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One entry of `tools`. Kept close to the JSON so the chat template sees what the client
/// sent (key order included).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tool {
    #[serde(rename = "type")]
    pub kind: ToolKind,
    pub function: FunctionDefinition,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ToolKind {
    Function,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionDefinition {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

/// `tool_choice`: `"none"`, `"auto"`, `"required"` or `{"type": "function", "function": {"name": ...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged, expecting = "\"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}")]
pub enum ToolChoice {
    Mode(ToolChoiceMode),
    Named(NamedToolChoice),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ToolChoiceMode {
    None,
    Auto,
    Required,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NamedToolChoice {
    #[serde(rename = "type")]
    pub kind: ToolKind,
    pub function: FunctionName,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionName {
    pub name: String,
}

/// A call the model made, as returned in a message (`arguments` is a JSON string).
/// Lenient on input: clients replaying history sometimes omit `id`/`type` or send the
/// arguments as an object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    #[serde(default)]
    pub id: String,
    #[serde(rename = "type", default = "ToolKind::function")]
    pub kind: ToolKind,
    pub function: FunctionCall,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionCall {
    pub name: String,
    #[serde(deserialize_with = "json_text")]
    pub arguments: String,
}

impl ToolKind {
    fn function() -> Self {
        ToolKind::Function
    }
}

/// A JSON string as is, or any other JSON value as its text.
fn json_text<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    match Value::deserialize(deserializer)? {
        Value::String(s) => Ok(s),
        other => Ok(other.to_string()),
    }
}

/// A tool call inside a stream chunk: the first delta of a call carries id and name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCallDelta {
    pub index: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<ToolKind>,
    pub function: FunctionCallDelta,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionCallDelta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments: Option<String>,
}

impl ToolCall {
    pub fn function(id: String, name: String, arguments: String) -> Self {
        Self { id, kind: ToolKind::Function, function: FunctionCall { name, arguments } }
    }

    /// The whole call as one stream delta (clients concatenate argument fragments, so a
    /// complete call in one delta is valid).
    pub fn into_delta(self, index: usize) -> ToolCallDelta {
        ToolCallDelta {
            index,
            id: Some(self.id),
            kind: Some(self.kind),
            function: FunctionCallDelta { name: Some(self.function.name), arguments: Some(self.function.arguments) },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_choice_forms() {
        let auto: ToolChoice = serde_json::from_str(r#""auto""#).unwrap();
        assert_eq!(auto, ToolChoice::Mode(ToolChoiceMode::Auto));
        let named: ToolChoice = serde_json::from_str(r#"{"type": "function", "function": {"name": "f"}}"#).unwrap();
        assert!(matches!(named, ToolChoice::Named(n) if n.function.name == "f"));
        let err = serde_json::from_str::<ToolChoice>(r#""sometimes""#).unwrap_err();
        assert!(err.to_string().contains("\"required\""), "{err}");
    }
}
