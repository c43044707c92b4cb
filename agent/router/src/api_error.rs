//! OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with the HTTP
//! status that goes with them. Every refusal the router makes goes through here.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `type`: invalid_request_error, authentication_error, rate_limit_error...
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
    /// Seconds for a `Retry-After` header (429, 503).
    pub retry_after_secs: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), kind, param: None, code: None, retry_after_secs: None }
    }

    pub fn invalid_request(message: impl Into<String>, param: Option<&'static str>) -> Self {
        ApiError { param, ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message) }
    }

    pub fn model_not_found(model: &str) -> Self {
        ApiError {
            param: Some("model"),
            code: Some("model_not_found"),
            ..Self::new(StatusCode::NOT_FOUND, "invalid_request_error", format!("The model `{model}` does not exist or has no running engine."))
        }
    }

    pub fn unauthorized() -> Self {
        ApiError {
            code: Some("invalid_api_key"),
            ..Self::new(StatusCode::UNAUTHORIZED, "authentication_error", "Missing or invalid API key: send `Authorization: Bearer KEY`.")
        }
    }

    pub fn body_too_large(limit: usize) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", format!("Request body exceeds {limit} bytes."))
    }

    pub fn rate_limited(retry_after_secs: u64) -> Self {
        ApiError {
            code: Some("rate_limit_exceeded"),
            retry_after_secs: Some(retry_after_secs),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", "Rate limit exceeded for this API key; retry later.")
        }
    }

    pub fn no_worker(message: impl Into<String>) -> Self {
        ApiError { retry_after_secs: Some(1), ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", message) }
    }

    pub fn bad_gateway(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_GATEWAY, "upstream_error", message)
    }

    pub fn gateway_timeout(message: impl Into<String>) -> Self {
        Self::new(StatusCode::GATEWAY_TIMEOUT, "timeout", message)
    }

    pub fn draining() -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", "The router is shutting down.")
    }

    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(secs) = self.retry_after_secs {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_the_openai_shape() {
        let body = ApiError::model_not_found("m").body();
        let error = &body["error"];
        assert_eq!(error["type"], "invalid_request_error");
        assert_eq!(error["param"], "model");
        assert_eq!(error["code"], "model_not_found");
        assert!(error["message"].as_str().unwrap().contains("`m`"));
    }

    #[test]
    fn rate_limit_carries_retry_after() {
        let response = ApiError::rate_limited(3).into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "3");
    }
}
