//! The first token of an early handoff. An early descriptor leaves prefill before the
//! token is sampled; decode fetches it with `POST /pd/first_token {"lease_id"}`, which
//! prefill answers as soon as the token exists (a long poll, bounded by
//! [`FIRST_TOKEN_TIMEOUT`]): `{"first_token": {token_id, logprob, top}}`, or an error
//! when the lease is unknown, expired or released, or the prefill request failed.

use std::time::Duration;

use axum::extract::State;
use axum::Json;
use dlengine_engine::kv_transfer::FirstTokenResult;
use dlengine_engine::request::TokenLogprob;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::super::json_body::{parse_request, RawBody};
use super::super::state::AppState;
use super::peer_call::call;
use crate::openai::ApiError;

/// How long either side waits for the token: a prompt's last forward, far below this.
pub const FIRST_TOKEN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Deserialize)]
struct FirstTokenRequest {
    lease_id: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct FirstTokenAnswer {
    first_token: TokenLogprob,
}

/// Prefill side: `POST /pd/first_token`.
pub async fn first_token(State(state): State<AppState>, RawBody(body): RawBody) -> Result<Json<serde_json::Value>, ApiError> {
    // Served while draining too: decode may be mid-import of one of our requests.
    let engine = state.loaded_engine().ok_or_else(|| ApiError::unavailable("the model is still loading; retry shortly"))?;
    let request = parse_request::<FirstTokenRequest>(&body)?;
    let lease_id = request.lease_id.parse::<u64>().map_err(|_| ApiError::invalid_param("lease_id", "not a lease id"))?;
    match tokio::time::timeout(FIRST_TOKEN_TIMEOUT, engine.first_token_of_lease(lease_id)).await {
        Ok(Ok(token)) => Ok(Json(json!(FirstTokenAnswer { first_token: token }))),
        Ok(Err(why)) => Err(ApiError::not_found(why).with_param("lease_id").with_code("kv_transfer_failed")),
        Err(_) => Err(ApiError::unavailable("prefill sampled no first token in time").with_code("kv_transfer_failed")),
    }
}

/// Decode side: asks prefill for the token, at most [`FIRST_TOKEN_TIMEOUT`].
pub async fn fetch(client: &reqwest::Client, url: &str, lease_id: &str) -> FirstTokenResult {
    let request = client.post(url).timeout(FIRST_TOKEN_TIMEOUT).json(&json!({ "lease_id": lease_id }));
    call::<FirstTokenAnswer>(request, url).await.map(|a| a.first_token)
}
