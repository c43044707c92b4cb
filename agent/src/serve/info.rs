//! The small endpoints: health, models, metrics, and the answers for unknown routes and
//! wrong methods.

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::state::{AppState, Phase};
use crate::openai::models::{ModelCard, ModelList};
use crate::openai::ApiError;

/// 200 when ready; 503 while loading or draining (readiness probes take the pod out).
pub async fn health(State(state): State<AppState>) -> Response {
    match state.phase() {
        Phase::Ready => Json(serde_json::json!({"status": "ok"})).into_response(),
        Phase::Loading => ApiError::unavailable("the model is still loading").into_response(),
        Phase::Draining => ApiError::unavailable("the server is shutting down").into_response(),
    }
}

pub async fn models(State(state): State<AppState>) -> Result<Json<ModelList>, ApiError> {
    let ready = state.ready()?;
    let card = ModelCard::new(
        state.served_model().to_owned(),
        state.created(),
        Some(state.model_root().to_owned()),
        Some(ready.engine.info().max_model_len),
    );
    Ok(Json(ModelList::new(vec![card])))
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    let stats = state.loaded_engine().map(|e| e.stats());
    let text = state.metrics().render(stats, state.in_flight().count());
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text).into_response()
}

pub async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found(format!("no route for {method} {}", uri.path()))
}

pub async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::method_not_allowed(format!("{method} is not allowed on {}", uri.path()))
}

/// Counts every answer by route and status.
pub async fn count_requests(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let endpoint = request.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned());
    let response = next.run(request).await;
    let status = response.status();
    let endpoint = endpoint.unwrap_or_else(|| if status == StatusCode::NOT_FOUND { "unmatched".into() } else { "other".into() });
    state.metrics().count_request(&endpoint, status.as_u16());
    response
}
