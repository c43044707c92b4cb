//! Request bodies: raw bytes (size-limited by the router) to typed requests, with errors
//! that name the offending field the way clients spell it (`messages[0].role`).

use axum::extract::{FromRequest, Request};
use axum::body::Bytes;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::openai::sampling::SamplingFields;
use crate::openai::ApiError;

/// The body of a POST, refused with an OpenAI-shaped 413 when over the configured limit.
pub struct RawBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let limit = req.extensions().get::<BodyLimit>().map(|l| l.0).unwrap_or(usize::MAX);
        match Bytes::from_request(req, state).await {
            Ok(bytes) => Ok(RawBody(bytes)),
            Err(rejection) if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE => {
                Err(ApiError::payload_too_large(limit))
            }
            Err(rejection) => Err(ApiError::bad_request(format!("cannot read the request body: {}", rejection.body_text()))),
        }
    }
}

/// The configured body limit, put into request extensions so the 413 can say it.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit(pub usize);

/// Parses a request whose sampling fields are flattened into it.
///
/// serde loses the field path inside `#[serde(flatten)]` parts, so the sampling fields are
/// checked on their own first; then every error of the whole request carries its path.
pub fn parse_request<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid UTF-8: {e}")))?;
    let value: Value = serde_json::from_str(text)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::bad_request("the request body must be a JSON object"));
    }
    typed::<SamplingFields>(&value)?;
    typed::<T>(&value)
}

fn typed<T: DeserializeOwned>(value: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let message = e.inner().to_string();
        let param = if path == "." { missing_field_name(&message) } else { Some(path) };
        match param {
            Some(param) => ApiError::invalid_param(param.clone(), format!("{param}: {message}")),
            None => ApiError::bad_request(message),
        }
    })
}

/// serde reports a missing field at the parent's path; its name is in the message.
fn missing_field_name(message: &str) -> Option<String> {
    let rest = message.strip_prefix("missing field `")?;
    Some(rest[..rest.find('`')?].to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::chat::ChatCompletionRequest;
    use crate::openai::completion::CompletionRequest;

    fn chat_error(body: &str) -> ApiError {
        parse_request::<ChatCompletionRequest>(body.as_bytes()).unwrap_err()
    }

    #[test]
    fn malformed_json_has_no_param() {
        let err = chat_error(r#"{"messages": ["#);
        assert_eq!(err.status, 400);
        assert_eq!(err.param, None);
        assert!(err.message.contains("not valid JSON"), "{}", err.message);
    }

    #[test]
    fn invalid_utf8_is_refused() {
        let err = parse_request::<ChatCompletionRequest>(b"{\"messages\": \"\xff\"}").unwrap_err();
        assert!(err.message.contains("UTF-8"), "{}", err.message);
    }

    #[test]
    fn wrong_types_name_the_field() {
        let cases = [
            (r#"{"messages": [], "temperature": "hot"}"#, "temperature"),
            (r#"{"messages": [], "max_tokens": 1.5}"#, "max_tokens"),
            (r#"{"messages": [], "stop": 3}"#, "stop"),
            (r#"{"messages": [{"role": "wizard", "content": "x"}]}"#, "messages[0].role"),
            (r#"{"messages": [{"role": "user", "content": 5}]}"#, "messages[0].content"),
            (r#"{"messages": "hi"}"#, "messages"),
            (r#"{"messages": [], "tool_choice": "sometimes"}"#, "tool_choice"),
            (r#"{"messages": [], "stream": "yes"}"#, "stream"),
            (r#"{"model": "m"}"#, "messages"),
        ];
        for (body, param) in cases {
            let err = chat_error(body);
            assert_eq!(err.status, 400, "{body}");
            assert_eq!(err.param.as_deref(), Some(param), "{body}: {}", err.message);
        }
    }

    #[test]
    fn completion_prompt_errors_name_prompt() {
        let err = parse_request::<CompletionRequest>(br#"{"prompt": {"a": 1}}"#).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("prompt"));
        let err = parse_request::<CompletionRequest>(br#"{"max_tokens": 3}"#).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("prompt"));
    }

    #[test]
    fn a_good_request_parses() {
        let req: ChatCompletionRequest = parse_request(
            br#"{"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0, "stop": ["x"], "top_k": -1}"#,
        )
        .unwrap();
        assert_eq!(req.sampling.temperature, Some(0.0));
        assert_eq!(req.sampling.top_k, Some(-1));
    }
}
