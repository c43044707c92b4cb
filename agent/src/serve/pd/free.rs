//! `POST /pd/free` `{"lease_id": "..."}`: a decode engine (or the router abandoning a
//! descriptor) releases the KV blocks a prefill request left pinned.

use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::super::json_body::{parse_request, RawBody};
use super::super::state::AppState;
use crate::openai::ApiError;

#[derive(Debug, Deserialize)]
struct FreeRequest {
    lease_id: String,
}

pub async fn free_lease(State(state): State<AppState>, RawBody(body): RawBody) -> Result<Json<Value>, ApiError> {
    // Served while draining too: decode engines must be able to let go of our blocks.
    let engine = state.loaded_engine().ok_or_else(|| ApiError::unavailable("the model is still loading; retry shortly"))?;
    let request = parse_request::<FreeRequest>(&body)?;
    let lease_id = request.lease_id.parse::<u64>().map_err(|_| ApiError::invalid_param("lease_id", "not a lease id"))?;
    let freed = engine.free_lease(lease_id).await;
    Ok(Json(json!({ "freed": freed })))
}
