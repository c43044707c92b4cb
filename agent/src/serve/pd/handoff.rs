//! The prefill side's answer: the usual response plus `kv_transfer_params`, a descriptor
//! when the request goes on to decode, null when prefill already finished it.
//!
//! An early handoff answers in two JSON lines (`application/x-ndjson`): first
//! `{"kv_transfer_params": <early descriptor>}` as soon as the prompt's last forward is
//! under way, then the answer as above (or `{"error": ...}` if the request failed after
//! all). The lease then always holds the blocks: decode may be reading them already.

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use dlengine_engine::engine::Engine;
use dlengine_engine::kv_transfer::KvHandoff;
use dlengine_engine::request::TokenLogprob;
use serde::Serialize;
use serde_json::{json, Value};

use super::super::engine_errors::engine_error;
use super::super::generation::{collect, Collector, Event, Generation};
use super::descriptor::{MigrationDescriptor, PrefillEndpoint};
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

/// A request computed here for a decode engine.
pub struct PrefillOrder {
    pub prompt: Vec<u32>,
    pub early: bool,
}

/// The non-streamed answer: the collected output as is, or for a prefill order with
/// `kv_transfer_params` added (in two lines for an early handoff).
pub async fn answer<C>(
    pd: &Pd,
    engine: &Engine,
    order: Option<PrefillOrder>,
    mut generation: Generation,
    mut collector: C,
) -> Result<Response, ApiError>
where
    C: Collector + Send + 'static,
    C::Output: Serialize + Send,
{
    let Some(order) = order else {
        return Ok(axum::Json(collect(&mut generation, collector).await?).into_response());
    };
    let from = Prefill { endpoint: pd.endpoint.clone(), engine: engine.clone(), prompt: order.prompt };
    if order.early {
        while let Some(event) = generation.next().await {
            match event {
                Event::KvReady(kv) => {
                    let early = MigrationDescriptor::early(&from.endpoint, from.engine.info(), &from.prompt, kv);
                    return Ok(two_lines(json!({ "kv_transfer_params": early }), from.final_line(generation, collector)));
                }
                Event::Delta { source, delta } => collector.add(source, delta),
                Event::Failed(e) => return Err(engine_error(&e)),
            }
        }
    }
    let output = collect(&mut generation, collector).await?;
    let descriptor = from.descriptor(generation.take_handoff(), false).await;
    with_kv_params(output, descriptor)
}

/// What a prefill answer's descriptor is made of.
struct Prefill {
    endpoint: PrefillEndpoint,
    engine: Engine,
    prompt: Vec<u32>,
}

impl Prefill {
    /// The descriptor for a handoff, or None if the request finished: then the lease is
    /// freed at once, unless the handoff was early (decode holds it then).
    async fn descriptor(&self, handoff: Option<Handoff>, early: bool) -> Option<MigrationDescriptor> {
        let handoff = handoff?;
        if handoff.finished && !early {
            self.engine.free_lease(handoff.kv.lease_id).await;
            return None;
        }
        Some(MigrationDescriptor::new(&self.endpoint, self.engine.info(), &self.prompt, handoff.first_token, handoff.kv))
    }

    /// The second line of an early answer.
    async fn final_line<C>(self, mut generation: Generation, collector: C) -> Value
    where
        C: Collector,
        C::Output: Serialize,
    {
        let output = match collect(&mut generation, collector).await {
            Ok(output) => output,
            Err(error) => return json!({ "error": error.body() }),
        };
        let descriptor = self.descriptor(generation.take_handoff(), true).await;
        match with_kv_params_value(output, descriptor) {
            Ok(value) => value,
            Err(error) => json!({ "error": error.body() }),
        }
    }
}

/// `first`, then whatever `rest` resolves to, one JSON document per line.
fn two_lines(first: Value, rest: impl std::future::Future<Output = Value> + Send + 'static) -> Response {
    let first = futures::stream::once(async move { Ok::<_, Infallible>(Bytes::from(format!("{first}\n"))) });
    let rest = futures::stream::once(async move { Ok::<_, Infallible>(Bytes::from(format!("{}\n", rest.await))) });
    let mut response = Response::new(Body::from_stream(futures::StreamExt::chain(first, rest)));
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-ndjson"));
    response
}

/// `output` as JSON with `kv_transfer_params` added at the top level.
fn with_kv_params<T: Serialize>(output: T, descriptor: Option<MigrationDescriptor>) -> Result<Response, ApiError> {
    Ok(axum::Json(with_kv_params_value(output, descriptor)?).into_response())
}

fn with_kv_params_value<T: Serialize>(output: T, descriptor: Option<MigrationDescriptor>) -> Result<Value, ApiError> {
    let mut json = serde_json::to_value(output).map_err(|e| ApiError::internal(format!("serializing the answer: {e}")))?;
    let params = serde_json::to_value(descriptor).map_err(|e| ApiError::internal(format!("serializing the descriptor: {e}")))?;
    if let Value::Object(object) = &mut json {
        object.insert("kv_transfer_params".into(), params);
    }
    Ok(json)
}
