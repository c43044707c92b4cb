//! Server-sent events: `data: {json}\n\n` frames, `data: [DONE]` last, and an error event
//! (then `[DONE]`) when the engine fails mid-stream, so a stream never just stops.

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::engine_errors::engine_error;
use super::generation::{Event, Generation};
use crate::openai::usage::Usage;

const DONE: &[u8] = b"data: [DONE]\n\n";

/// Appends one `data:` event holding `value` as JSON.
pub fn push_event<T: Serialize>(out: &mut Vec<u8>, value: &T) {
    out.extend_from_slice(b"data: ");
    // Our wire types always serialize.
    let _ = serde_json::to_writer(&mut *out, value);
    out.extend_from_slice(b"\n\n");
}

/// Turns engine deltas into SSE events for one endpoint's chunk shape.
pub trait ChunkWriter: Send + 'static {
    fn delta(&mut self, source: usize, delta: dlengine_engine::request::ChoiceDelta, out: &mut Vec<u8>);
    /// After the last delta (the usage chunk, when asked for).
    fn finish(&mut self, usage: Usage, out: &mut Vec<u8>);
}

struct StreamState<W> {
    generation: Generation,
    writer: W,
    done: bool,
}

/// The streaming response: one body chunk per engine delta.
pub fn sse_response<W: ChunkWriter>(generation: Generation, writer: W) -> Response {
    let state = StreamState { generation, writer, done: false };
    let frames = futures::stream::unfold(state, |mut state| async move {
        if state.done {
            return None;
        }
        let mut out = Vec::new();
        while out.is_empty() && !state.done {
            match state.generation.next().await {
                Some(Event::Delta { source, delta }) => state.writer.delta(source, delta, &mut out),
                // Prefill orders are never streamed.
                Some(Event::KvReady(_)) => {}
                Some(Event::Failed(e)) => {
                    tracing::error!("request failed mid-stream: {e}");
                    push_event(&mut out, &engine_error(&e).body());
                    out.extend_from_slice(DONE);
                    state.done = true;
                }
                None => {
                    state.writer.finish(state.generation.usage(), &mut out);
                    out.extend_from_slice(DONE);
                    state.done = true;
                }
            }
        }
        Some((Ok::<_, Infallible>(Bytes::from(out)), state))
    });
    let mut response = Body::from_stream(frames).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}
