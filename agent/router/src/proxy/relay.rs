//! Passes a worker's SSE stream to the client event by event, as it arrives.
//!
//! Bytes are forwarded at event boundaries (a blank line), never split inside an event, so
//! that when the worker dies mid-stream, stalls past the idle timeout, or hits the request
//! deadline, the client gets one well-formed `event: error` with an OpenAI error body and
//! then `data: [DONE]` — never a half event, a silent truncation, or a hang. Dropping the
//! relay (the client went away) drops the upstream response, which cancels the request on
//! the worker.

use std::convert::Infallible;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use serde_json::json;
use tokio::time::Instant;

use super::attempt::Attempt;

const DONE_MARKER: &[u8] = b"data: [DONE]";

pub struct Relay {
    upstream: BoxStream<'static, reqwest::Result<Bytes>>,
    pending: BytesMut,
    attempt: Attempt,
    idle_timeout: Duration,
    deadline: Instant,
    saw_done: bool,
    finished: bool,
}

impl Relay {
    /// `first` is the chunk already read to decide the attempt had started well.
    pub fn new(
        first: Bytes,
        upstream: BoxStream<'static, reqwest::Result<Bytes>>,
        attempt: Attempt,
        idle_timeout: Duration,
        deadline: Instant,
    ) -> Relay {
        Relay {
            upstream,
            pending: BytesMut::from(&first[..]),
            attempt,
            idle_timeout,
            deadline,
            saw_done: false,
            finished: false,
        }
    }

    pub fn into_stream(self) -> impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
        futures::stream::unfold(self, |mut relay| async move { relay.next_piece().await.map(|piece| (Ok(piece), relay)) })
    }

    async fn next_piece(&mut self) -> Option<Bytes> {
        loop {
            if let Some(events) = self.take_complete_events() {
                return Some(events);
            }
            if self.finished {
                return None;
            }
            let wait_until = self.deadline.min(Instant::now() + self.idle_timeout);
            match tokio::time::timeout_at(wait_until, self.upstream.next()).await {
                Ok(Some(Ok(chunk))) => self.pending.extend_from_slice(&chunk),
                Ok(None) => return self.upstream_ended(),
                Ok(Some(Err(error))) => {
                    return self.fail("stream", format!("The worker failed mid-stream: {error}"));
                }
                Err(_) if Instant::now() >= self.deadline => {
                    return self.fail("timeout", "The request exceeded the router's request timeout.".into());
                }
                Err(_) => {
                    let message = format!("The worker sent nothing for {}s (idle timeout).", self.idle_timeout.as_secs());
                    return self.fail("timeout", message);
                }
            }
        }
    }

    /// Splits off every complete event in `pending`; notes `[DONE]` going by.
    fn take_complete_events(&mut self) -> Option<Bytes> {
        let end = last_event_end(&self.pending)?;
        let events = self.pending.split_to(end).freeze();
        if !self.saw_done && contains(&events, DONE_MARKER) {
            self.saw_done = true;
            self.attempt.succeed();
        }
        Some(events)
    }

    fn upstream_ended(&mut self) -> Option<Bytes> {
        self.finished = true;
        if self.saw_done {
            // Anything after [DONE] without a closing blank line is noise; drop it.
            return None;
        }
        self.fail_after_finish("stream", "The worker closed the stream before it finished.".into())
    }

    fn fail(&mut self, kind: &'static str, message: String) -> Option<Bytes> {
        self.finished = true;
        if self.saw_done {
            return None;
        }
        self.fail_after_finish(kind, message)
    }

    fn fail_after_finish(&mut self, kind: &'static str, message: String) -> Option<Bytes> {
        tracing::warn!(worker = %self.attempt.worker().url(), "stream cut: {message}");
        self.attempt.fail(kind);
        // A partial event cannot be completed; the error event replaces it.
        self.pending.clear();
        Some(error_event(&message))
    }
}

/// `event: error` with an OpenAI error body, then the end-of-stream marker clients wait for.
pub fn error_event(message: &str) -> Bytes {
    let body = json!({"error": {"message": message, "type": "upstream_error", "param": null, "code": "worker_failed"}});
    Bytes::from(format!("event: error\ndata: {body}\n\ndata: [DONE]\n\n"))
}

/// End (exclusive) of the last complete event: just past the last blank line.
fn last_event_end(buffer: &[u8]) -> Option<usize> {
    let lf = find_last(buffer, b"\n\n").map(|i| i + 2);
    let crlf = find_last(buffer, b"\r\n\r\n").map(|i| i + 4);
    lf.max(crlf)
}

fn find_last(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).rposition(|w| w == needle)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_event_boundaries() {
        assert_eq!(last_event_end(b"data: a\n\ndata: b"), Some(9));
        assert_eq!(last_event_end(b"data: a\n\ndata: b\n\n"), Some(18));
        assert_eq!(last_event_end(b"data: a\r\n\r\n"), Some(11));
        assert_eq!(last_event_end(b"data: partial"), None);
    }

    #[test]
    fn error_event_is_parseable_sse() {
        let text = String::from_utf8(error_event("boom").to_vec()).unwrap();
        let mut events = text.split("\n\n").filter(|e| !e.is_empty());
        let error = events.next().unwrap();
        assert!(error.starts_with("event: error\ndata: "));
        let json: serde_json::Value = serde_json::from_str(error.trim_start_matches("event: error\ndata: ")).unwrap();
        assert_eq!(json["error"]["message"], "boom");
        assert_eq!(events.next(), Some("data: [DONE]"));
    }
}
