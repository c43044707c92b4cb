//! Engine refusals and failures as HTTP answers.

use dlengine_engine::error::{EngineError, SubmitError};

use crate::openai::ApiError;

/// How the request named its prompt and its length limit, so errors can point at them.
#[derive(Debug, Clone, Copy)]
pub struct PromptFields {
    /// `prompt` or `messages`.
    pub prompt: &'static str,
    /// `max_tokens` / `max_completion_tokens` when the client set one.
    pub max_tokens: Option<&'static str>,
}

/// Seconds a client is told to wait after a 429.
const RETRY_AFTER_SECS: u64 = 1;

pub fn submit_error(err: SubmitError, fields: PromptFields) -> ApiError {
    let message = err.to_string();
    match err {
        SubmitError::InvalidParam(p) => ApiError::invalid_param(p.param, message),
        SubmitError::EmptyPrompt | SubmitError::TokenOutOfVocab { .. } => ApiError::invalid_param(fields.prompt, message),
        SubmitError::TooLong { .. } => ApiError::invalid_param(fields.max_tokens.unwrap_or(fields.prompt), message),
        SubmitError::QueueFull { .. } => ApiError::too_many_requests(message, RETRY_AFTER_SECS),
        SubmitError::Draining => ApiError::unavailable(message),
    }
}

pub fn engine_error(err: &EngineError) -> ApiError {
    ApiError::internal(format!("generation failed: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIELDS: PromptFields = PromptFields { prompt: "messages", max_tokens: Some("max_tokens") };

    #[test]
    fn statuses() {
        let too_long = SubmitError::TooLong { prompt_tokens: 10, max_tokens: 100, max_model_len: 64 };
        let err = submit_error(too_long, FIELDS);
        assert_eq!((err.status.as_u16(), err.param.as_deref()), (400, Some("max_tokens")));
        assert!(err.message.contains("64") && err.message.contains("10") && err.message.contains("100"), "{}", err.message);
        let err = submit_error(SubmitError::QueueFull { limit: 1 }, FIELDS);
        assert_eq!((err.status.as_u16(), err.retry_after_secs), (429, Some(1)));
        assert_eq!(submit_error(SubmitError::Draining, FIELDS).status.as_u16(), 503);
        let err = submit_error(SubmitError::EmptyPrompt, FIELDS);
        assert_eq!(err.param.as_deref(), Some("messages"));
    }
}
