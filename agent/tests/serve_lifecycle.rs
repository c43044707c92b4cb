//! Load and lifecycle: queue-full refusals, client disconnects, SIGTERM drain, start-up
//! refusals.

mod serve_support;

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};
use serve_support::{Server, MODEL};

/// A request that keeps the engine busy for a while: the whole context, n samples.
fn long_stream(n: usize) -> Value {
    json!({"prompt": "Once upon a time", "max_tokens": 1000, "ignore_eos": true, "temperature": 1.0, "n": n, "stream": true})
}

#[tokio::test]
async fn a_full_queue_answers_429_with_retry_after() {
    let server = Server::start(&["--max-waiting-requests", "1", "--max-num-seqs", "1"]).await;
    let body = json!({"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": true});
    let requests = (0..12).map(|_| server.post("/v1/completions", body.clone()));
    let responses = futures::future::join_all(requests).await;
    let statuses: Vec<u16> = responses.iter().map(|r| r.status().as_u16()).collect();
    assert!(statuses.iter().all(|&s| s == 200 || s == 429), "{statuses:?}");
    let refused: Vec<_> = responses.into_iter().filter(|r| r.status() == 429).collect();
    assert!(!refused.is_empty(), "12 concurrent requests against a queue of 1 were all accepted: {statuses:?}");
    for r in refused {
        assert!(r.headers().contains_key("retry-after"));
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["type"], "rate_limit_error");
    }
    assert_eq!(server.health().await, 200);
}

#[tokio::test]
async fn a_disconnected_stream_frees_its_kv_blocks() {
    let server = Server::start(&[]).await;
    let response = server.post("/v1/completions", long_stream(8)).await;
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let first = body.next().await.expect("a first chunk").expect("chunk bytes");
    assert!(first.starts_with(b"data: "));
    assert!(server.metric("dlengine_running_sequences").await >= 1.0, "the request should still be running");
    assert!(server.metric("dlengine_kv_cache_blocks_used").await > 0.0);
    drop(body);
    server.wait_for_metric("dlengine_running_sequences", 0.0, Duration::from_secs(10)).await;
    server.wait_for_metric("dlengine_kv_cache_blocks_used", 0.0, Duration::from_secs(10)).await;
    assert_eq!(server.health().await, 200);
}

/// Starts a long stream, reads its first chunk, then sends SIGTERM.
async fn stream_then_terminate(server: &Server, n: usize) -> (impl futures::Stream<Item = reqwest::Result<axum::body::Bytes>>, String) {
    let response = server.post("/v1/completions", long_stream(n)).await;
    assert_eq!(response.status(), 200);
    let mut body = Box::pin(response.bytes_stream());
    let first = String::from_utf8(body.next().await.unwrap().unwrap().to_vec()).unwrap();
    server.terminate();
    (body, first)
}

/// The rest of a stream as text; a broken connection fails the test.
async fn read_to_end(mut body: impl futures::Stream<Item = reqwest::Result<axum::body::Bytes>> + Unpin, mut text: String) -> String {
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(bytes) => text.push_str(&String::from_utf8_lossy(&bytes)),
            Err(e) => panic!("the stream broke instead of ending cleanly: {e}"),
        }
    }
    text
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_then_exits_zero() {
    let mut server = Server::start(&["--drain-timeout-secs", "60"]).await;
    let (body, first) = stream_then_terminate(&server, 4).await;
    // Draining: not ready, and new work is refused, while the stream goes on.
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.health().await != 503 {
        assert!(Instant::now() < deadline, "health never turned 503");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let refused = server.post("/v1/completions", json!({"prompt": "x", "max_tokens": 1})).await;
    assert_eq!(refused.status(), 503);
    let text = read_to_end(body, first).await;
    assert!(text.ends_with("data: [DONE]\n\n"), "the in-flight stream was cut: ...{}", &text[text.len().saturating_sub(200)..]);
    assert!(!text.contains("{\"error\""), "the in-flight stream failed: ...{}", &text[text.len().saturating_sub(400)..]);
    let status = server.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "log:\n{}", server.log());
}

#[tokio::test]
async fn streams_cut_by_the_drain_timeout_end_with_an_error_event() {
    // Sixteen samples of a thousand tokens: seconds of CPU work, well past the 1 s deadline.
    let mut server = Server::start(&["--drain-timeout-secs", "1"]).await;
    let (body, first) = stream_then_terminate(&server, 16).await;
    let text = read_to_end(body, first).await;
    let events = serve_support::parse_sse(&text);
    assert_eq!(events.last().unwrap(), "[DONE]", "...{}", &text[text.len().saturating_sub(300)..]);
    let error = &events[events.len() - 2]["error"];
    assert!(error["message"].as_str().is_some_and(|m| m.contains("shut down")), "{error}");
    assert_eq!(error["type"], "server_error");
    assert_eq!(server.wait_exit(Duration::from_secs(30)).code(), Some(0));
}

#[tokio::test]
async fn rdma_asked_for_without_a_device_stops_start_up_with_the_reason() {
    if std::fs::read_dir("/sys/class/infiniband").is_ok_and(|mut d| d.next().is_some()) {
        eprintln!("skipped: this machine has RDMA devices");
        return;
    }
    let cases: [(&[&str], &str); 3] = [
        (&["--kv-transport", "rdma"], "--kv-transport rdma / --require-rdma: "),
        (&["--require-rdma"], "--kv-transport rdma / --require-rdma: "),
        (&["--require-rdma", "--kv-transport", "tcp"], "--require-rdma contradicts --kv-transport tcp"),
    ];
    for (flags, reason) in cases {
        let mut server = Server::spawn(MODEL, flags);
        let status = server.wait_exit(Duration::from_secs(120));
        let log = server.log();
        assert!(!status.success(), "{flags:?}: {log}");
        assert!(log.contains(reason), "{flags:?}: {log}");
        // The device-level cause, whichever way the binary was built.
        if !reason.contains("contradicts") {
            assert!(log.contains("no RDMA device found") || log.contains("without the `rdma` feature"), "{flags:?}: {log}");
        }
    }
}
