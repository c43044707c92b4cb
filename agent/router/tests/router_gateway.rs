//! The router against a real etcd and in-process fake engines that register through the
//! real Registrar: routing, retries, breakers, stream failures, cancellation, ingress
//! protection, and discovery changes. Skipped with a printed reason without etcd.

mod support;

use std::time::Duration;

use dlengine_cli::Policy;
use dlengine_registry::testing::EtcdServer;
use futures::StreamExt;
use serde_json::{json, Value};
use support::fake_engine::FakeEngine;
use support::{completion, config, metric_sum, RunningRouter};

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap()
}

async fn post(router: &RunningRouter, body: &Value) -> (u16, Value) {
    let response = client().post(format!("{}/v1/completions", router.url)).json(body).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// The whole SSE body as text.
async fn stream_text(router: &RunningRouter, prompt: &str) -> String {
    let response = client().post(format!("{}/v1/completions", router.url)).json(&completion("tiny", prompt, true)).send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_model_and_lists_the_union_of_models() {
    let Some(etcd) = EtcdServer::start_or_skip() else { return };
    let a = FakeEngine::start(&etcd.endpoint(), "a", "tiny").await;
    let b = FakeEngine::start(&etcd.endpoint(), "b", "tiny").await;
    let other = FakeEngine::start(&etcd.endpoint(), "o", "other").await;
    let router = RunningRouter::start(config(&etcd.endpoint(), Policy::RoundRobin)).await;
    router.wait_workers(3).await;

    let models: Value = client().get(format!("{}/v1/models", router.url)).send().await.unwrap().json().await.unwrap();
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec!["other", "tiny"]);

    for i in 0..20 {
        let (status, body) = post(&router, &completion("tiny", &format!("hello {i}"), false)).await;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!((a.hits(), b.hits(), other.hits()), (10, 10, 0), "round robin over the model's workers only");

    let (status, body) = post(&router, &completion("nope", "x", false)).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "model_not_found");

    let metrics = router.metrics().await;
    assert_eq!(metric_sum(&metrics, "dlengine_router_worker_requests_total", &a.url), 10.0);
    assert_eq!(metric_sum(&metrics, "dlengine_router_routing_decisions_total", "round_robin"), 20.0);
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_are_refused_before_forwarding() {
    let Some(etcd) = EtcdServer::start_or_skip() else { return };
    let a = FakeEngine::start(&etcd.endpoint(), "a", "tiny").await;
    let router = RunningRouter::start(config(&etcd.endpoint(), Policy::LeastLoad)).await;
    router.wait_workers(1).await;
    let url = format!("{}/v1/chat/completions", router.url);
    let cases = [
        ("{not json", 400),
        ("[]", 400),
        (r#"{"messages":[{"role":"user","content":"x"}]}"#, 400),
        (r#"{"model":"tiny","messages":[{"role":"user","content":"x"}],"stream":"no"}"#, 400),
        (r#"{"model":"tiny"}"#, 400),
        (r#"{"model":"ghost","messages":[{"role":"user","content":"x"}]}"#, 404),
    ];
    for (body, want) in cases {
        let response = client().post(&url).header("content-type", "application/json").body(body).send().await.unwrap();
        assert_eq!(response.status().as_u16(), want, "{body}");
        let error: Value = response.json().await.unwrap();
        for field in ["message", "type", "param", "code"] {
            assert!(error["error"].get(field).is_some(), "{body}: no error.{field}");
        }
    }
    let big = "x".repeat(100 * 1024);
    let (status, _) = post(&router, &completion("tiny", &big, false)).await;
    assert_eq!(status, 413);
    assert_eq!(a.hits(), 0, "an invalid request reached the engine");
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_and_rate_limits() {
    let Some(etcd) = EtcdServer::start_or_skip() else { return };
    let _a = FakeEngine::start(&etcd.endpoint(), "a", "tiny").await;
    let mut settings = config(&etcd.endpoint(), Policy::RoundRobin);
    settings.api_keys = vec!["k1".into(), "k2".into()];
    settings.rate_limit_rps = 2.0;
    let router = RunningRouter::start(settings).await;
    router.wait_workers(1).await;
    let url = format!("{}/v1/completions", router.url);
    let body = completion("tiny", "hi", false);

    let anonymous = client().post(&url).json(&body).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let wrong = client().post(&url).bearer_auth("k3").json(&body).send().await.unwrap();
    assert_eq!(wrong.status(), 401);
    let models = client().get(format!("{}/v1/models", router.url)).send().await.unwrap();
    assert_eq!(models.status(), 401);
    assert_eq!(client().get(format!("{}/health", router.url)).send().await.unwrap().status(), 200);

    let mut statuses = Vec::new();
    for _ in 0..3 {
        let response = client().post(&url).bearer_auth("k1").json(&body).send().await.unwrap();
        if response.status() == 429 {
            let retry_after: u64 = response.headers()["retry-after"].to_str().unwrap().parse().unwrap();
            assert!(retry_after >= 1);
        }
        statuses.push(response.status().as_u16());
    }
    assert_eq!(statuses, vec![200, 200, 429], "burst of 2 then limited");
    // Limits are per key.
    let other_key = client().post(&url).bearer_auth("k2").json(&body).send().await.unwrap();
    assert_eq!(other_key.status(), 200);
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_pass_through_event_by_event() {
    let Some(etcd) = EtcdServer::start_or_skip() else { return };
    let a = FakeEngine::start(&etcd.endpoint(), "a", "tiny").await;
    let router = RunningRouter::start(config(&etcd.endpoint(), Policy::RoundRobin)).await;
    router.wait_workers(1).await;
    let response =
        client().post(format!("{}/v1/completions", router.url)).json(&completion("tiny", "gate", true)).send().await.unwrap();
    assert_eq!(response.headers()[dlengine_router::WORKER_HEADER], "a");
    let mut body = response.bytes_stream();
    // The engine holds the rest of the stream until the gate opens: a buffering router
    // would never deliver this first event.
    let first = tokio::time::timeout(Duration::from_secs(5), body.next()).await.expect("first event not relayed").unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).starts_with("data: {"), "{first:?}");
    a.gate.notify_one();
    let mut rest = String::new();
    while let Some(chunk) = body.next().await {
        rest.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    assert!(rest.ends_with("data: [DONE]\n\n"), "{rest}");
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mid_stream_death_and_stalls_end_with_an_error_event() {
    let Some(etcd) = EtcdServer::start_or_skip() else { return };
    let _a = FakeEngine::start(&etcd.endpoint(), "a", "tiny").await;
    let router = RunningRouter::start(config(&etcd.endpoint(), Policy::RoundRobin)).await;
    router.wait_workers(1).await;
    for prompt in ["die-after-2", "stall"] {
        let started = std::time::Instant::now();
        let text = stream_text(&router, prompt).await;
        let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
        assert!(events.len() >= 3, "{prompt}: {text}");
        let error = events[events.len() - 2];
        assert!(error.starts_with("event: error\ndata: "), "{prompt}: {text}");
        let json: Value = serde_json::from_str(error.trim_start_matches("event: error\ndata: ")).unwrap();
        assert!(json["error"]["message"].is_string());
        assert_eq!(events[events.len() - 1], "data: [DONE]");
        assert!(events[..events.len() - 2].iter().all(|e| e.starts_with("data: {")), "{prompt}: a partial event leaked: {text}");
        assert!(started.elapsed() < Duration::from_secs(10), "{prompt} took {:?}", started.elapsed());
    }
    let metrics = router.metrics().await;
    assert_eq!(metric_sum(&metrics, "dlengine_router_worker_errors_total", "kind=\"stream\""), 1.0);
    assert_eq!(metric_sum(&metrics, "dlengine_router_worker_errors_total", "kind=\"timeout\""), 1.0);
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_cancels_the_upstream_stream() {
    let Some(etcd) = EtcdServer::start_or_skip() else { return };
    let a = FakeEngine::start(&etcd.endpoint(), "a", "tiny").await;
    let router = RunningRouter::start(config(&etcd.endpoint(), Policy::RoundRobin)).await;
    router.wait_workers(1).await;
    let response =
        client().post(format!("{}/v1/completions", router.url)).json(&completion("tiny", "stall", true)).send().await.unwrap();
    let mut body = response.bytes_stream();
    body.next().await.unwrap().unwrap();
    drop(body);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while a.counters.cancelled.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(std::time::Instant::now() < deadline, "the engine never saw the cancellation");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_before_the_first_byte_are_retried_and_breakers_eject() {
    let Some(etcd) = EtcdServer::start_or_skip() else { return };
    let good = FakeEngine::start(&etcd.endpoint(), "good", "tiny").await;
    let mut dead = FakeEngine::start(&etcd.endpoint(), "dead", "tiny").await;
    let router = RunningRouter::start(config(&etcd.endpoint(), Policy::RoundRobin)).await;
    router.wait_workers(2).await;
    // The process dies but its lease lives on for a while: connection refused.
    dead.crash();
    for i in 0..12 {
        let (status, body) = post(&router, &completion("tiny", &format!("p{i}"), i % 2 == 0)).await;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(good.hits(), 12);
    let metrics = router.metrics().await;
    let dead_attempts = metric_sum(&metrics, "dlengine_router_worker_requests_total", &dead.url);
    assert!(dead_attempts <= 4.0, "breaker did not eject the dead worker: {dead_attempts} attempts");
    assert!(metric_sum(&metrics, "dlengine_router_retries_total", "") >= 1.0);
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5xx_everywhere_is_passed_on_after_the_retry_budget() {
    let Some(etcd) = EtcdServer::start_or_skip() else { return };
    let a = FakeEngine::start(&etcd.endpoint(), "a", "tiny").await;
    let b = FakeEngine::start(&etcd.endpoint(), "b", "tiny").await;
    let mut settings = config(&etcd.endpoint(), Policy::RoundRobin);
    settings.max_retries = 1;
    let router = RunningRouter::start(settings).await;
    router.wait_workers(2).await;
    let (status, body) = post(&router, &completion("tiny", "status-500", false)).await;
    assert_eq!(status, 500);
    assert!(body["error"]["message"].as_str().unwrap().contains("is broken"), "{body}");
    assert_eq!(a.hits() + b.hits(), 2, "one try and one retry");
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deregistered_worker_gets_no_new_requests() {
    let Some(etcd) = EtcdServer::start_or_skip() else { return };
    let a = FakeEngine::start(&etcd.endpoint(), "a", "tiny").await;
    let mut b = FakeEngine::start(&etcd.endpoint(), "b", "tiny").await;
    let router = RunningRouter::start(config(&etcd.endpoint(), Policy::LeastLoad)).await;
    router.wait_workers(2).await;
    b.deregister().await;
    router.wait_workers(1).await;
    let before = b.hits();
    for i in 0..10 {
        let (status, _) = post(&router, &completion("tiny", &format!("p{i}"), false)).await;
        assert_eq!(status, 200);
    }
    assert_eq!(b.hits(), before);
    assert_eq!(a.hits(), 10);
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_continues_on_the_last_view_while_etcd_is_down() {
    let Some(mut etcd) = EtcdServer::start_or_skip() else { return };
    let _a = FakeEngine::start(&etcd.endpoint(), "a", "tiny").await;
    let router = RunningRouter::start(config(&etcd.endpoint(), Policy::CacheAware)).await;
    router.wait_workers(1).await;
    etcd.kill();
    tokio::time::sleep(Duration::from_secs(4)).await; // past the lease TTL
    let health: Value = client().get(format!("{}/health", router.url)).send().await.unwrap().json().await.unwrap();
    assert_eq!(health["etcd_connected"], false);
    for i in 0..5 {
        let (status, body) = post(&router, &completion("tiny", &format!("p{i}"), false)).await;
        assert_eq!(status, 200, "{body}");
    }
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_policy_pins_by_header_and_user() {
    let Some(etcd) = EtcdServer::start_or_skip() else { return };
    let a = FakeEngine::start(&etcd.endpoint(), "a", "tiny").await;
    let b = FakeEngine::start(&etcd.endpoint(), "b", "tiny").await;
    let router = RunningRouter::start(config(&etcd.endpoint(), Policy::Session)).await;
    router.wait_workers(2).await;
    let url = format!("{}/v1/completions", router.url);
    let mut served_by = std::collections::HashMap::new();
    for session in 0..8 {
        for turn in 0..3 {
            let response = client()
                .post(&url)
                .header("x-session-id", format!("s{session}"))
                .json(&completion("tiny", &format!("turn {turn}"), false))
                .send()
                .await
                .unwrap();
            let worker = response.headers()[dlengine_router::WORKER_HEADER].to_str().unwrap().to_string();
            assert_eq!(served_by.entry(session).or_insert(worker.clone()), &worker, "session s{session} moved");
        }
    }
    let body = json!({"model": "tiny", "prompt": "x", "user": "alice"});
    let first = client().post(&url).json(&body).send().await.unwrap().headers()[dlengine_router::WORKER_HEADER].clone();
    for _ in 0..4 {
        let again = client().post(&url).json(&body).send().await.unwrap().headers()[dlengine_router::WORKER_HEADER].clone();
        assert_eq!(again, first);
    }
    assert!(a.hits() > 0 && b.hits() > 0, "sessions all landed on one worker");
    router.stop().await;
}
