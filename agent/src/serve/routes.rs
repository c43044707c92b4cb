//! The HTTP surface.

use axum::extract::DefaultBodyLimit;
use axum::middleware::{from_fn, from_fn_with_state};
use axum::routing::{get, post};
use axum::{Extension, Router};

use super::auth::require_api_key;
use super::chat::chat_completions;
use super::completions::completions;
use super::info::{count_requests, health, method_not_allowed, metrics, models, not_found};
use super::json_body::BodyLimit;
use super::pd::{first_token, free_lease, rdma_connect};
use super::request_id::with_request_id;
use super::state::AppState;

pub fn router(state: AppState) -> Router {
    let limit = state.body_limit();
    let api = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/pd/free", post(free_lease))
        .route("/pd/first_token", post(first_token))
        .route("/pd/rdma/connect", post(rdma_connect))
        .route_layer(from_fn_with_state(state.clone(), require_api_key));
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .merge(api)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(from_fn_with_state(state.clone(), count_requests))
        .layer(DefaultBodyLimit::max(limit))
        .layer(Extension(BodyLimit(limit)))
        .layer(from_fn(with_request_id))
        .with_state(state)
}
