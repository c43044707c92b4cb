//! The router's light look at a request body before anything is forwarded: it must be a
//! JSON object with a string `model`, a boolean `stream` if any, and a prompt (`prompt`
//! for completions, a non-empty `messages` array for chat). The engine validates the rest;
//! this only refuses what no engine could serve and extracts what routing needs.

use serde_json::{Map, Value};

use crate::api_error::ApiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    ChatCompletions,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Completions => "/v1/completions",
            Endpoint::ChatCompletions => "/v1/chat/completions",
        }
    }
}

/// What routing needs from a valid request.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestFacts {
    pub model: String,
    pub stream: bool,
    /// The prompt as text, for cache-aware routing; stable under appending turns.
    pub text: String,
    pub user: Option<String>,
    /// One prompt and one sample (`n` and `best_of` absent or 1): the only requests that
    /// may be split into a prefill and a decode hop.
    pub single_sequence: bool,
    /// The client sent its own `kv_transfer_params`; the router removes it before
    /// forwarding (only the router hands engines migration descriptors).
    pub has_kv_transfer_params: bool,
}

pub fn inspect(body: &[u8], endpoint: Endpoint) -> Result<RequestFacts, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid_request(format!("The request body is not valid JSON: {e}"), None))?;
    let Value::Object(object) = value else {
        return Err(ApiError::invalid_request("The request body must be a JSON object.", None));
    };
    let model = match object.get("model") {
        Some(Value::String(model)) if !model.is_empty() => model.clone(),
        Some(_) => return Err(ApiError::invalid_request("`model` must be a non-empty string.", Some("model"))),
        None => return Err(ApiError::invalid_request("`model` is required.", Some("model"))),
    };
    let stream = match object.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(stream)) => *stream,
        Some(_) => return Err(ApiError::invalid_request("`stream` must be a boolean.", Some("stream"))),
    };
    let user = object.get("user").and_then(Value::as_str).map(str::to_string);
    let text = match endpoint {
        Endpoint::Completions => prompt_text(&object)?,
        Endpoint::ChatCompletions => messages_text(&object)?,
    };
    let single_prompt = endpoint == Endpoint::ChatCompletions || is_single_prompt(&object);
    let single_sequence = single_prompt && at_most_one(object.get("n")) && at_most_one(object.get("best_of"));
    let has_kv_transfer_params = object.contains_key("kv_transfer_params");
    Ok(RequestFacts { model, stream, text, user, single_sequence, has_kv_transfer_params })
}

/// Absent, null or 1 (anything else, valid or not, is left to the engine).
fn at_most_one(value: Option<&Value>) -> bool {
    match value {
        None | Some(Value::Null) => true,
        Some(v) => v.as_u64() == Some(1),
    }
}

/// A completions `prompt` that is one prompt: a string, a list of token ids, or a list of
/// exactly one string or one token list.
fn is_single_prompt(object: &Map<String, Value>) -> bool {
    match object.get("prompt") {
        Some(Value::String(_)) => true,
        Some(Value::Array(items)) => items.iter().all(Value::is_u64) || items.len() == 1,
        _ => false,
    }
}

fn prompt_text(object: &Map<String, Value>) -> Result<String, ApiError> {
    let invalid = || {
        ApiError::invalid_request(
            "`prompt` must be a string, an array of strings, or an array of token ids (or of such arrays).",
            Some("prompt"),
        )
    };
    match object.get("prompt") {
        None | Some(Value::Null) => Err(ApiError::invalid_request("`prompt` is required.", Some("prompt"))),
        Some(Value::String(text)) => Ok(text.clone()),
        Some(Value::Array(items)) if !items.is_empty() => {
            let mut text = String::new();
            for item in items {
                match item {
                    Value::String(s) => text.push_str(s),
                    Value::Number(n) if n.is_u64() => {
                        text.push_str(&n.to_string());
                        text.push(' ');
                    }
                    Value::Array(tokens) if tokens.iter().all(|t| t.is_u64()) => {
                        tokens.iter().for_each(|t| {
                            text.push_str(&t.to_string());
                            text.push(' ');
                        });
                    }
                    _ => return Err(invalid()),
                }
                text.push('\n');
            }
            Ok(text)
        }
        Some(_) => Err(invalid()),
    }
}

fn messages_text(object: &Map<String, Value>) -> Result<String, ApiError> {
    let messages = match object.get("messages") {
        Some(Value::Array(messages)) if !messages.is_empty() => messages,
        Some(_) => return Err(ApiError::invalid_request("`messages` must be a non-empty array.", Some("messages"))),
        None => return Err(ApiError::invalid_request("`messages` is required.", Some("messages"))),
    };
    let mut text = String::new();
    for message in messages {
        let invalid = || ApiError::invalid_request("Each message must be an object with a string `role`.", Some("messages"));
        let message = message.as_object().ok_or_else(invalid)?;
        let role = message.get("role").and_then(Value::as_str).ok_or_else(invalid)?;
        text.push_str(role);
        text.push_str(": ");
        append_content(&mut text, message.get("content"))?;
        text.push('\n');
    }
    Ok(text)
}

/// Content is a string, null (assistant tool calls), or an array of parts of which the
/// text parts matter for routing.
fn append_content(text: &mut String, content: Option<&Value>) -> Result<(), ApiError> {
    match content {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(s)) => {
            text.push_str(s);
            Ok(())
        }
        Some(Value::Array(parts)) => {
            for part in parts {
                if let Some(s) = part.get("text").and_then(Value::as_str) {
                    text.push_str(s);
                }
            }
            Ok(())
        }
        Some(_) => Err(ApiError::invalid_request("Message `content` must be a string or an array of parts.", Some("messages"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(body: &str, endpoint: Endpoint) -> Result<RequestFacts, ApiError> {
        inspect(body.as_bytes(), endpoint)
    }

    #[test]
    fn accepts_well_formed_requests() {
        let facts = check(r#"{"model":"m","prompt":"hi","stream":true,"user":"u1"}"#, Endpoint::Completions).unwrap();
        assert_eq!((facts.model.as_str(), facts.stream, facts.text.as_str(), facts.user.as_deref()), ("m", true, "hi", Some("u1")));
        let facts = check(r#"{"model":"m","prompt":[[1,2],[3]]}"#, Endpoint::Completions).unwrap();
        assert!(!facts.stream);
        assert_eq!(facts.text, "1 2 \n3 \n");
        let chat = r#"{"model":"m","messages":[{"role":"system","content":"be brief"},{"role":"user","content":[{"type":"text","text":"hi"}]}]}"#;
        assert_eq!(check(chat, Endpoint::ChatCompletions).unwrap().text, "system: be brief\nuser: hi\n");
    }

    #[test]
    fn only_one_prompt_and_one_sample_is_a_single_sequence() {
        let single = |body: &str, endpoint| check(body, endpoint).unwrap().single_sequence;
        assert!(single(r#"{"model":"m","prompt":"hi"}"#, Endpoint::Completions));
        assert!(single(r#"{"model":"m","prompt":"hi","n":1,"best_of":null}"#, Endpoint::Completions));
        assert!(single(r#"{"model":"m","prompt":[1,2,3]}"#, Endpoint::Completions));
        assert!(single(r#"{"model":"m","prompt":["a"]}"#, Endpoint::Completions));
        assert!(single(r#"{"model":"m","prompt":[[1,2]]}"#, Endpoint::Completions));
        assert!(!single(r#"{"model":"m","prompt":["a","b"]}"#, Endpoint::Completions));
        assert!(!single(r#"{"model":"m","prompt":[[1],[2]]}"#, Endpoint::Completions));
        assert!(!single(r#"{"model":"m","prompt":"hi","n":2}"#, Endpoint::Completions));
        assert!(!single(r#"{"model":"m","prompt":"hi","best_of":3}"#, Endpoint::Completions));
        assert!(!single(r#"{"model":"m","prompt":"hi","n":"2"}"#, Endpoint::Completions));
        assert!(single(r#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#, Endpoint::ChatCompletions));
        assert!(!single(r#"{"model":"m","messages":[{"role":"user","content":"x"}],"n":3}"#, Endpoint::ChatCompletions));
        let facts = check(r#"{"model":"m","prompt":"x","kv_transfer_params":{"lease_id":"l"}}"#, Endpoint::Completions).unwrap();
        assert!(facts.has_kv_transfer_params);
    }

    #[test]
    fn refuses_what_no_engine_could_serve() {
        let cases = [
            ("not json", Endpoint::Completions, None),
            ("[1,2]", Endpoint::Completions, None),
            (r#"{"prompt":"x"}"#, Endpoint::Completions, Some("model")),
            (r#"{"model":3,"prompt":"x"}"#, Endpoint::Completions, Some("model")),
            (r#"{"model":"m","prompt":"x","stream":"yes"}"#, Endpoint::Completions, Some("stream")),
            (r#"{"model":"m"}"#, Endpoint::Completions, Some("prompt")),
            (r#"{"model":"m","prompt":{"a":1}}"#, Endpoint::Completions, Some("prompt")),
            (r#"{"model":"m","messages":[]}"#, Endpoint::ChatCompletions, Some("messages")),
            (r#"{"model":"m","messages":[{"content":"x"}]}"#, Endpoint::ChatCompletions, Some("messages")),
            (r#"{"model":"m","prompt":"x"}"#, Endpoint::ChatCompletions, Some("messages")),
        ];
        for (body, endpoint, param) in cases {
            let error = check(body, endpoint).unwrap_err();
            assert_eq!(error.status, 400, "{body}");
            assert_eq!(error.param, param, "{body}");
        }
    }

    #[test]
    fn chat_text_grows_by_appending() {
        let one = check(r#"{"model":"m","messages":[{"role":"user","content":"a"}]}"#, Endpoint::ChatCompletions).unwrap();
        let two = check(
            r#"{"model":"m","messages":[{"role":"user","content":"a"},{"role":"assistant","content":"b"}]}"#,
            Endpoint::ChatCompletions,
        )
        .unwrap();
        assert!(two.text.starts_with(&one.text));
    }
}
