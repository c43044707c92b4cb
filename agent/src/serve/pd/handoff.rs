//! The prefill side's answer: the usual response plus `kv_transfer_params`, a descriptor
//! when the request goes on to decode, null when prefill already finished it.

use axum::response::{IntoResponse, Response};
use dlengine_engine::engine::Engine;
use dlengine_engine::kv_transfer::KvHandoff;
use dlengine_engine::request::TokenLogprob;
use serde::Serialize;
use serde_json::Value;

use super::super::generation::Generation;
use super::descriptor::MigrationDescriptor;
use super::Pd;
use crate::openai::ApiError;

/// What a prefill request left behind when it handed its KV off.
#[derive(Debug)]
pub struct Handoff {
    pub kv: KvHandoff,
    pub first_token: TokenLogprob,
    /// A stop string matched the first token: the answer is final after all.
    pub finished: bool,
}

/// The non-streamed answer: `output` as is, or for a prefill order (`prefill_prompt`)
/// with `kv_transfer_params` added.
pub async fn answer<T: Serialize>(
    pd: &Pd,
    engine: &Engine,
    prefill_prompt: Option<&[u32]>,
    generation: &mut Generation,
    output: T,
) -> Result<Response, ApiError> {
    match prefill_prompt {
        Some(prompt) => with_kv_params(output, descriptor(pd, engine, prompt, generation.take_handoff()).await),
        None => Ok(axum::Json(output).into_response()),
    }
}

/// The descriptor for a handoff, or None (and the lease freed at once) if it finished.
async fn descriptor(pd: &Pd, engine: &Engine, prompt: &[u32], handoff: Option<Handoff>) -> Option<MigrationDescriptor> {
    let handoff = handoff?;
    if handoff.finished {
        engine.free_lease(handoff.kv.lease_id).await;
        return None;
    }
    Some(MigrationDescriptor::new(&pd.endpoint, engine.info(), prompt, handoff.first_token, handoff.kv))
}

/// `output` as JSON with `kv_transfer_params` added at the top level.
fn with_kv_params<T: Serialize>(output: T, descriptor: Option<MigrationDescriptor>) -> Result<Response, ApiError> {
    let mut json = serde_json::to_value(output).map_err(|e| ApiError::internal(format!("serializing the answer: {e}")))?;
    let params = serde_json::to_value(descriptor).map_err(|e| ApiError::internal(format!("serializing the descriptor: {e}")))?;
    if let Value::Object(object) = &mut json {
        object.insert("kv_transfer_params".into(), params);
    }
    Ok(axum::Json(json).into_response())
}
