//! Prefill/decode disaggregation through the router, against a real etcd and in-process
//! engines of every role that implement the engine contract over real HTTP (see
//! `support::pd_engine`): the split itself, prefill finishing alone, pairing rules,
//! failures, retries, lease releases and fallbacks, and the same over prefill engines that
//! answer early descriptors in two lines (the router's default flow with real engines),
//! whose second line the tests hold back or script to fail; and which worker's circuit
//! breaker a failed KV transfer counts against. Skipped with a printed reason without etcd.

mod support;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use dlengine_cli::Policy;
use dlengine_registry::testing::EtcdServer;
use dlengine_registry::Role;
use dlengine_router::{RouterConfig, PREFILL_WORKER_HEADER, WORKER_HEADER};
use serde_json::{json, Value};
use support::pd_engine::{Early, PdEngine, Script, SecondLine, Spec};
use support::{config, metric_sum, RunningRouter};

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap()
}

struct Answer {
    status: u16,
    worker: String,
    prefill: String,
    text: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or(Value::Null)
    }

    /// The `data:` events of an SSE body, `[DONE]` checked and left out.
    fn events(&self) -> Vec<Value> {
        assert!(self.text.ends_with("data: [DONE]\n\n"), "{}", self.text);
        self.text
            .split("\n\n")
            .filter(|e| !e.is_empty() && *e != "data: [DONE]")
            .map(|e| serde_json::from_str(e.strip_prefix("data: ").unwrap_or_else(|| panic!("not a data event: {e}"))).unwrap())
            .collect()
    }

    /// Streamed text: completions' `text` or chat's `delta.content`, concatenated.
    fn streamed_text(&self) -> String {
        let mut text = String::new();
        for event in self.events() {
            for choice in event["choices"].as_array().unwrap() {
                let piece = choice["text"].as_str().or(choice["delta"]["content"].as_str());
                text.push_str(piece.unwrap_or(""));
            }
        }
        text
    }
}

async fn send(router: &RunningRouter, path: &str, body: &Value) -> Answer {
    let response = client().post(format!("{}{path}", router.url)).json(body).send().await.unwrap();
    let header = |name: &str| response.headers().get(name).map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    let (worker, prefill) = (header(WORKER_HEADER), header(PREFILL_WORKER_HEADER));
    let status = response.status().as_u16();
    Answer { status, worker, prefill, text: response.text().await.unwrap() }
}

fn completion(prompt: &str, stream: bool) -> Value {
    json!({"model": "tiny", "prompt": prompt, "max_tokens": 8, "stream": stream})
}

fn chat(content: &str, stream: bool) -> Value {
    json!({"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 8, "stream": stream})
}

async fn engine(etcd: &EtcdServer, name: &str, role: Role, script: &Arc<Script>) -> PdEngine {
    PdEngine::start(&etcd.endpoint(), Spec::new(name, role), script.clone()).await
}

/// A prefill engine that answers early descriptors in two lines, as real ones do.
async fn early_prefill(etcd: &EtcdServer, name: &str, script: &Arc<Script>) -> PdEngine {
    PdEngine::start(&etcd.endpoint(), Spec::new(name, Role::Prefill).early(), script.clone()).await
}

/// An early-descriptor prefill `p1` and a decode `d1` behind a round-robin router whose
/// configuration `tune` may adjust.
async fn early_pair(etcd: &EtcdServer, script: &Arc<Script>, tune: impl FnOnce(&mut RouterConfig)) -> (PdEngine, PdEngine, RunningRouter) {
    let p = early_prefill(etcd, "p1", script).await;
    let d = engine(etcd, "d1", Role::Decode, script).await;
    let mut config = config(&etcd.endpoint(), Policy::RoundRobin);
    tune(&mut config);
    let router = RunningRouter::start(config).await;
    router.wait_workers(2).await;
    (p, d, router)
}

fn lease_of(body: &Value) -> String {
    body["kv_transfer_params"]["lease_id"].as_str().unwrap_or_else(|| panic!("no descriptor in {body}")).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_split_over_a_prefill_and_a_decode_worker() {
    let Some(etcd) = EtcdServer::start_or_skip() else { return };
    let script = Arc::new(Script::default());
    let p = engine(&etcd, "p1", Role::Prefill, &script).await;
    let d = engine(&etcd, "d1", Role::Decode, &script).await;
    let router = RunningRouter::start(config(&etcd.endpoint(), Policy::CacheAware)).await;
    router.wait_workers(2).await;

    let answer = send(&router, "/v1/completions", &completion("hello", false)).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.json()["choices"][0]["text"], "P decoded by d1");
    assert_eq!((answer.worker.as_str(), answer.prefill.as_str()), ("d1", "p1"));
    let to_prefill = &p.bodies()[0];
    assert_eq!(to_prefill["kv_transfer_params"], json!({"do_remote_decode": true, "early_descriptor": true}));
    assert_eq!(to_prefill["stream"], false);
    assert_eq!(to_prefill["prompt"], "hello");
    let to_decode = &d.bodies()[0];
    assert_eq!(to_decode["kv_transfer_params"], json!({"lease_id": "p1-0", "engine": "p1", "first_token": 7}));
    assert_eq!((to_decode["prompt"].as_str(), to_decode["max_tokens"].as_u64()), (Some("hello"), Some(8)));

    // Streamed: prefill still gets a plain request, decode the client's own.
    let mut body = completion("hello again", true);
    body["stream_options"] = json!({"include_usage": true});
    let answer = send(&router, "/v1/completions", &body).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.streamed_text(), "P decoded by d1");
    assert_eq!(answer.events().last().unwrap()["usage"]["completion_tokens"], 3);
    let to_prefill = &p.bodies()[1];
    assert_eq!(to_prefill["stream"], false);
    assert!(to_prefill.get("stream_options").is_none(), "{to_prefill}");
    let to_decode = &d.bodies()[1];
    assert_eq!((to_decode["stream"].as_bool(), to_decode["stream_options"]["include_usage"].as_bool()), (Some(true), Some(true)));
    assert_eq!(lease_of(to_decode), "p1-1");

    let answer = send(&router, "/v1/chat/completions", &chat("hi", true)).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.streamed_text(), "P decoded by d1");
    assert!(p.bodies()[2]["messages"].is_array());
    assert_eq!(lease_of(&d.bodies()[2]), "p1-2");

    // A client's own descriptor never reaches an engine.
    let mut forged = completion("forged", false);
    forged["kv_transfer_params"] = json!({"lease_id": "someone-else"});
    let answer = send(&router, "/v1/completions", &forged).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(p.bodies()[3]["kv_transfer_params"], json!({"do_remote_decode": true, "early_descriptor": true}));
    assert_eq!(lease_of(&d.bodies()[3]), "p1-3");

    assert!(p.frees().is_empty(), "a lease was released although decode took it: {:?}", p.frees());
    let metrics = router.metrics().await;
    assert_eq!(metric_sum(&metrics, "dlengine_router_pd_requests_total", ""), 4.0);
    assert_eq!(metric_sum(&metrics, "dlengine_router_pd_prefill_finished_total", ""), 0.0);
    assert_eq!(metric_sum(&metrics, "dlengine_router_worker_requests_total", &d.url), 4.0);
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_prefill_finished_is_answered_by_prefill_alone() {
    let Some(etcd) = EtcdServer::start_or_skip() else { return };
    let script = Arc::new(Script::default());
    let p = engine(&etcd, "p1", Role::Prefill, &script).await;
    let d = engine(&etcd, "d1", Role::Decode, &script).await;
    let router = RunningRouter::start(config(&etcd.endpoint(), Policy::RoundRobin)).await;
    router.wait_workers(2).await;

    let mut one_token = completion("short", false);
    one_token["max_tokens"] = json!(1);
    let answer = send(&router, "/v1/completions", &one_token).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    let body = answer.json();
    assert_eq!((body["choices"][0]["text"].as_str(), body["choices"][0]["finish_reason"].as_str()), (Some("P"), Some("length")));
    assert!(body.get("kv_transfer_params").is_none(), "{body}");
    assert_eq!((answer.worker.as_str(), answer.prefill.as_str()), ("p1", "p1"));

    // Streamed: synthesized from prefill's JSON.
    let mut streamed = completion("finish-in-prefill", true);
    streamed["stream_options"] = json!({"include_usage": true});
    let answer = send(&router, "/v1/completions", &streamed).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    let events = answer.events();
    assert_eq!(events.len(), 2, "{}", answer.text);
    assert_eq!(events[0]["object"], "text_completion");
    assert_eq!((events[0]["choices"][0]["text"].as_str(), events[0]["choices"][0]["finish_reason"].as_str()), (Some("P"), Some("length")));
    assert_eq!(events[1]["choices"], json!([]));
    assert_eq!(events[1]["usage"]["total_tokens"], 4);

    let answer = send(&router, "/v1/chat/completions", &chat("finish-in-prefill tool-call", true)).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    let events = answer.events();
    assert!(events.iter().all(|e| e["object"] == "chat.completion.chunk"), "{}", answer.text);
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    let call = &events[1]["choices"][0]["delta"]["tool_calls"][0];
    assert_eq!((call["index"].as_u64(), call["function"]["name"].as_str()), (Some(0), Some("get_time")));
    assert_eq!(events.last().unwrap()["choices"][0]["finish_reason"], "tool_calls");
    assert!(events.iter().all(|e| e.get("usage").is_none()), "usage was not asked for");

    let answer = send(&router, "/v1/chat/completions", &chat("finish-in-prefill", false)).await;
    assert_eq!(answer.json()["choices"][0]["message"]["content"], "P");

    assert_eq!(d.hits(), 0, "decode was asked although prefill finished");
    assert_eq!(p.hits(), 4);
    let metrics = router.metrics().await;
    assert_eq!(metric_sum(&metrics, "dlengine_router_pd_prefill_finished_total", ""), 4.0);
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engines_of_another_revision_layout_or_model_are_never_paired() {
    let Some(etcd) = EtcdServer::start_or_skip() else { return };
    let script = Arc::new(Script::default());
    let e = etcd.endpoint();
    let p_good = engine(&etcd, "p-good", Role::Prefill, &script).await;
    let p_rev = PdEngine::start(&e, Spec { revision: "r2".into(), ..Spec::new("p-rev", Role::Prefill) }, script.clone()).await;
    let d_good = engine(&etcd, "d-good", Role::Decode, &script).await;
    let d_layout = PdEngine::start(&e, Spec { block_size: 32, ..Spec::new("d-layout", Role::Decode) }, script.clone()).await;
    let d_model = PdEngine::start(&e, Spec { weights: "other-weights".into(), ..Spec::new("d-model", Role::Decode) }, script.clone()).await;
    // Model "solo": its only prefill and decode workers do not pair.
    let solo = |name: &str, role| Spec { model: "solo".into(), ..Spec::new(name, role) };
    let solo_p = PdEngine::start(&e, solo("solo-p", Role::Prefill), script.clone()).await;
    let solo_d = PdEngine::start(&e, Spec { revision: "r9".into(), ..solo("solo-d", Role::Decode) }, script.clone()).await;
    let router = RunningRouter::start(config(&e, Policy::RoundRobin)).await;
    router.wait_workers(7).await;

    for i in 0..6 {
        let answer = send(&router, "/v1/completions", &completion(&format!("q{i}"), i % 2 == 0)).await;
        assert_eq!(answer.status, 200, "{}", answer.text);
        assert_eq!((answer.worker.as_str(), answer.prefill.as_str()), ("d-good", "p-good"));
    }
    assert_eq!((p_rev.hits(), d_layout.hits(), d_model.hits()), (0, 0, 0), "a mismatched engine got work");
    assert_eq!(p_good.hits(), 6);
    assert!(d_good.bodies().iter().all(|b| lease_of(b).starts_with("p-good-")));

    // Nothing pairs: decode serves whole requests, prefill gets nothing.
    let answer = send(&router, "/v1/completions", &json!({"model": "solo", "prompt": "x"})).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.json()["choices"][0]["text"], "whole by solo-d");
    assert_eq!(solo_p.hits(), 0);
    assert!(solo_d.bodies()[0].get("kv_transfer_params").is_none());
    let metrics = router.metrics().await;
    assert_eq!(metric_sum(&metrics, "dlengine_router_pd_pairing_failures_total", "no_compatible_decode"), 1.0);
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_kv_transfer_re_prefills_on_another_pair_and_frees_the_lease() {
    let Some(etcd) = EtcdServer::start_or_skip() else { return };
    let script = Arc::new(Script::default());
    let prefills = [engine(&etcd, "p1", Role::Prefill, &script).await, engine(&etcd, "p2", Role::Prefill, &script).await];
    let decodes = [engine(&etcd, "d1", Role::Decode, &script).await, engine(&etcd, "d2", Role::Decode, &script).await];
    let router = RunningRouter::start(config(&etcd.endpoint(), Policy::RoundRobin)).await;
    router.wait_workers(4).await;

    for (round, stream) in [false, true].into_iter().enumerate() {
        script.kv_failures.store(1, Ordering::SeqCst);
        let answer = send(&router, "/v1/completions", &completion(&format!("retry {round}"), stream)).await;
        assert_eq!(answer.status, 200, "{}", answer.text);
        let text = if stream { answer.streamed_text() } else { answer.json()["choices"][0]["text"].as_str().unwrap().to_string() };
        assert_eq!(text, format!("P decoded by {}", answer.worker));
        // Two prefills and two decode requests happened this round; the first pair failed.
        let this_round = |bodies: Vec<Value>| bodies.into_iter().filter(|b| b["prompt"] == format!("retry {round}")).collect::<Vec<_>>();
        let tried: Vec<(String, Value)> =
            decodes.iter().flat_map(|d| this_round(d.bodies()).into_iter().map(|b| (d.name.clone(), b))).collect();
        assert_eq!(tried.len(), 2, "{tried:?}");
        let (failed, served): (Vec<_>, Vec<_>) = tried.into_iter().partition(|(name, _)| *name != answer.worker);
        let (failed_decode, failed_body) = &failed[0];
        assert_ne!(failed_decode, &answer.worker, "the pair was redone on the failed decode worker");
        let failed_lease = lease_of(failed_body);
        let served_lease = lease_of(&served[0].1);
        let failed_prefill = prefills.iter().find(|p| failed_lease.starts_with(&format!("{}-", p.name))).unwrap();
        assert!(served_lease.starts_with(&format!("{}-", answer.prefill)), "{served_lease} vs {}", answer.prefill);
        assert_ne!(failed_prefill.name, answer.prefill, "re-prefill did not move to the other prefill worker");
        let frees = failed_prefill.wait_frees(round + 1).await;
        assert!(frees.contains(&failed_lease), "abandoned lease {failed_lease} not freed: {frees:?}");
        let all_frees: usize = prefills.iter().map(|p| p.frees().len()).sum();
        assert_eq!(all_frees, round + 1, "only the abandoned lease is freed");
    }
    let metrics = router.metrics().await;
    assert_eq!(metric_sum(&metrics, "dlengine_router_pd_retries_total", ""), 2.0);
    assert_eq!(metric_sum(&metrics, "dlengine_router_pd_lease_frees_total", ""), 2.0);
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_end_in_clear_errors_once_the_budget_is_spent() {
    let Some(etcd) = EtcdServer::start_or_skip() else { return };
    let script = Arc::new(Script::default());
    let p = engine(&etcd, "p1", Role::Prefill, &script).await;
    let d = PdEngine::start_with(&etcd.endpoint(), Spec::new("d1", Role::Decode), script.clone(), true).await;
    let a = engine(&etcd, "a1", Role::Aggregated, &script).await;
    let router = RunningRouter::start(config(&etcd.endpoint(), Policy::LeastLoad)).await;
    router.wait_workers(3).await;

    // Prefill's own 5xx: no other prefill worker, passed on.
    let answer = send(&router, "/v1/completions", &completion("prefill-500", false)).await;
    assert_eq!(answer.status, 500, "{}", answer.text);
    assert_eq!(answer.json()["error"]["message"], "prefill broke");
    assert_eq!(d.hits(), 0);

    // A decode worker refusing the pair: not retried, passed on, the lease released.
    let answer = send(&router, "/v1/completions", &completion("layout-400", false)).await;
    assert_eq!(answer.status, 400, "{}", answer.text);
    assert_eq!(answer.json()["error"]["code"], "kv_layout_mismatch");
    assert_eq!((p.hits(), d.hits()), (2, 1));
    assert_eq!(p.wait_frees(1).await, vec!["p1-0".to_string()]);

    // Every pair fails the transfer: 1 + max_retries pairs, each lease freed, decode's error.
    let answer = send(&router, "/v1/completions", &completion("doomed", true)).await;
    assert_eq!(answer.status, 503, "{}", answer.text);
    assert_eq!(answer.json()["error"]["code"], "kv_transfer_failed");
    assert_eq!((p.hits(), d.hits()), (5, 4));
    let mut frees = p.wait_frees(4).await;
    frees.sort();
    assert_eq!(frees, vec!["p1-0", "p1-1", "p1-2", "p1-3"]);

    // Three failed transfers in a row ejected the prefill worker (`kv_transfer_failed` is
    // held against prefill): no prefill is wasted meanwhile, the aggregated worker serves
    // whole requests.
    let answer = send(&router, "/v1/completions", &completion("while ejected", false)).await;
    assert_eq!((answer.status, answer.worker.as_str()), (200, "a1"), "{}", answer.text);
    assert_eq!(answer.json()["choices"][0]["text"], "whole by a1");
    assert_eq!((p.hits(), a.hits()), (5, 1));
    let metrics = router.metrics().await;
    assert_eq!(metric_sum(&metrics, "dlengine_router_pd_pairing_failures_total", "kv_layout_mismatch"), 1.0);
    assert_eq!(metric_sum(&metrics, "dlengine_router_pd_pairing_failures_total", "no_available_pair"), 1.0);
    assert_eq!(metric_sum(&metrics, "dlengine_router_pd_retries_total", ""), 2.0);
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_between_the_hops_frees_the_lease_and_cancels_decode() {
    let Some(etcd) = EtcdServer::start_or_skip() else { return };
    let script = Arc::new(Script::default());
    let p = engine(&etcd, "p1", Role::Prefill, &script).await;
    let d = engine(&etcd, "d1", Role::Decode, &script).await;
    let router = RunningRouter::start(config(&etcd.endpoint(), Policy::RoundRobin)).await;
    router.wait_workers(2).await;
    let impatient = reqwest::Client::builder().timeout(Duration::from_millis(500)).build().unwrap();
    let sent = impatient.post(format!("{}/v1/completions", router.url)).json(&completion("decode-stall", false)).send().await;
    assert!(sent.is_err(), "decode was supposed to stall");
    assert_eq!(p.wait_frees(1).await, vec!["p1-0".to_string()]);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while d.seen.cancelled.load(Ordering::SeqCst) == 0 {
        assert!(std::time::Instant::now() < deadline, "decode never saw the cancellation");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_cannot_be_split_are_served_whole() {
    let Some(etcd) = EtcdServer::start_or_skip() else { return };
    let script = Arc::new(Script::default());
    let e = etcd.endpoint();
    let on = |model: &str, name: &str, role| Spec { model: model.into(), ..Spec::new(name, role) };
    let p = engine(&etcd, "p1", Role::Prefill, &script).await;
    let d = engine(&etcd, "d1", Role::Decode, &script).await;
    let a = engine(&etcd, "a1", Role::Aggregated, &script).await;
    let agg = PdEngine::start(&e, on("plain", "a2", Role::Aggregated), script.clone()).await;
    let agg_d = PdEngine::start(&e, on("plain", "d2", Role::Decode), script.clone()).await;
    let only_d = PdEngine::start(&e, on("decoders", "d3", Role::Decode), script.clone()).await;
    let _only_p = PdEngine::start(&e, on("prefills", "p4", Role::Prefill), script.clone()).await;
    let only_p_agg = PdEngine::start(&e, on("mixed", "p5", Role::Prefill), script.clone()).await;
    let mixed_a = PdEngine::start(&e, on("mixed", "a5", Role::Aggregated), script.clone()).await;
    let router = RunningRouter::start(config(&e, Policy::RoundRobin)).await;
    router.wait_workers(9).await;

    // n > 1 and several prompts are not split.
    let mut several = completion("n2", false);
    several["n"] = json!(2);
    let answer = send(&router, "/v1/completions", &several).await;
    assert_eq!((answer.status, answer.worker.as_str()), (200, "a1"), "{}", answer.text);
    let batch = json!({"model": "tiny", "prompt": ["one", "two"]});
    assert_eq!(send(&router, "/v1/completions", &batch).await.worker, "a1");
    assert_eq!((p.hits(), d.hits(), a.hits()), (0, 0, 2));

    // No prefill worker: aggregated as before, a client's descriptor removed.
    let mut forged = json!({"model": "plain", "prompt": "x"});
    forged["kv_transfer_params"] = json!({"lease_id": "x"});
    let answer = send(&router, "/v1/completions", &forged).await;
    assert_eq!((answer.status, answer.worker.as_str()), (200, "a2"), "{}", answer.text);
    assert!(agg.bodies()[0].get("kv_transfer_params").is_none());
    assert_eq!(agg_d.hits(), 0);

    // Only decode workers: whole requests on them.
    let answer = send(&router, "/v1/completions", &json!({"model": "decoders", "prompt": "x"})).await;
    assert_eq!(answer.json()["choices"][0]["text"], "whole by d3");
    assert_eq!(only_d.hits(), 1);

    // Prefill without decode: aggregated if any, else a 503 naming the missing role.
    let answer = send(&router, "/v1/completions", &json!({"model": "mixed", "prompt": "x"})).await;
    assert_eq!((answer.status, answer.worker.as_str()), (200, "a5"));
    assert_eq!((only_p_agg.hits(), mixed_a.hits()), (0, 1));
    let answer = send(&router, "/v1/chat/completions", &json!({"model": "prefills", "messages": [{"role": "user", "content": "x"}]})).await;
    assert_eq!(answer.status, 503, "{}", answer.text);
    let message = answer.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(message.contains("no decode"), "{message}");

    let metrics = router.metrics().await;
    assert_eq!(metric_sum(&metrics, "dlengine_router_pd_requests_total", ""), 0.0);
    assert_eq!(metric_sum(&metrics, "dlengine_router_pd_pairing_failures_total", "no_decode"), 2.0);
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_descriptor_goes_to_decode_while_prefill_holds_its_second_line() {
    let Some(etcd) = EtcdServer::start_or_skip() else { return };
    let script = Arc::new(Script::default());
    let (p, d, router) = early_pair(&etcd, &script, |_| {}).await;
    p.hold_second_lines();

    // The client has decode's whole answer while prefill has written only its first line
    // (a router waiting for the second one would wait until its request deadline).
    let answer = send(&router, "/v1/completions", &completion("early", false)).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.json()["choices"][0]["text"], "P decoded by d1");
    assert_eq!((answer.worker.as_str(), answer.prefill.as_str()), ("d1", "p1"));
    assert_eq!(p.bodies()[0]["kv_transfer_params"], json!({"do_remote_decode": true, "early_descriptor": true}));
    let early = json!({"lease_id": "p1-0", "engine": "p1", "first_token_url": format!("{}/pd/first_token", p.url)});
    assert_eq!(d.bodies()[0]["kv_transfer_params"], early, "decode did not get the first line's descriptor as it is");
    assert_eq!(p.first_token_asks(), vec!["p1-0".to_string()]);
    assert_eq!(p.early_state("p1-0"), Some(Early::FirstLine));

    let answer = send(&router, "/v1/chat/completions", &chat("early, streamed", true)).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.streamed_text(), "P decoded by d1");
    assert_eq!(d.bodies()[1]["stream"], true);
    assert_eq!(lease_of(&d.bodies()[1]), "p1-1");
    assert_eq!(p.early_state("p1-1"), Some(Early::FirstLine));

    // Prefill's answers are drained, not dropped (that would abort prefill's requests):
    // both connections are still open (time enough for a closed one to show), and both
    // answers are read to their end once prefill writes the rest.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!((p.early_state("p1-0"), p.early_state("p1-1")), (Some(Early::FirstLine), Some(Early::FirstLine)));
    p.release_second_lines();
    assert_eq!(p.wait_early("p1-0", Early::Ended).await, Some(Early::Ended));
    assert_eq!(p.wait_early("p1-1", Early::Ended).await, Some(Early::Ended));
    assert!(p.frees().is_empty(), "a lease was released although decode took it: {:?}", p.frees());
    let metrics = router.metrics().await;
    assert_eq!(metric_sum(&metrics, "dlengine_router_pd_requests_total", ""), 2.0);
    assert_eq!(metric_sum(&metrics, "dlengine_router_pd_retries_total", ""), 0.0);
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_decode_hop_aborts_prefills_early_answer_and_frees_its_lease() {
    let Some(etcd) = EtcdServer::start_or_skip() else { return };
    let script = Arc::new(Script::default());
    let p = early_prefill(&etcd, "p1", &script).await;
    let decodes = [engine(&etcd, "d1", Role::Decode, &script).await, engine(&etcd, "d2", Role::Decode, &script).await];
    let router = RunningRouter::start(config(&etcd.endpoint(), Policy::RoundRobin)).await;
    router.wait_workers(3).await;
    p.hold_second_lines();

    // The first pair fails the transfer: redone on the other decode worker.
    script.kv_failures.store(1, Ordering::SeqCst);
    let answer = send(&router, "/v1/completions", &completion("early retry", false)).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.json()["choices"][0]["text"], format!("P decoded by {}", answer.worker));
    let tried: Vec<(String, String)> =
        decodes.iter().flat_map(|d| d.bodies().iter().map(|b| (d.name.clone(), lease_of(b))).collect::<Vec<_>>()).collect();
    assert_eq!(tried.len(), 2, "{tried:?}");
    let failed = tried.iter().find(|(name, _)| *name != answer.worker).unwrap_or_else(|| panic!("{tried:?}"));
    let served = tried.iter().find(|(name, _)| *name == answer.worker).unwrap();
    assert_eq!((failed.1.as_str(), served.1.as_str()), ("p1-0", "p1-1"));
    // The failed pair's prefill answer is abandoned while its second line is still held
    // back: the router does not wait for it, and prefill's request is cancelled.
    assert_eq!(p.wait_early("p1-0", Early::Aborted).await, Some(Early::Aborted));
    assert_eq!(p.wait_frees(1).await, vec!["p1-0".to_string()]);
    assert_eq!(p.early_state("p1-1"), Some(Early::FirstLine));
    p.release_second_lines();
    assert_eq!(p.wait_early("p1-1", Early::Ended).await, Some(Early::Ended));

    // Every pair fails: decode's error once the budget is spent, every early answer
    // aborted and every lease freed.
    p.hold_second_lines();
    script.kv_failures.store(3, Ordering::SeqCst);
    let answer = send(&router, "/v1/completions", &completion("early doomed", true)).await;
    assert_eq!(answer.status, 503, "{}", answer.text);
    assert_eq!(answer.json()["error"]["code"], "kv_transfer_failed");
    assert_eq!(p.hits(), 5);
    for lease in ["p1-2", "p1-3", "p1-4"] {
        assert_eq!(p.wait_early(lease, Early::Aborted).await, Some(Early::Aborted), "{lease}");
    }
    let mut frees = p.wait_frees(4).await;
    frees.sort();
    assert_eq!(frees, vec!["p1-0", "p1-2", "p1-3", "p1-4"]);
    let metrics = router.metrics().await;
    assert_eq!(metric_sum(&metrics, "dlengine_router_pd_retries_total", ""), 3.0);
    assert_eq!(metric_sum(&metrics, "dlengine_router_pd_lease_frees_total", ""), 4.0);
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefill_failing_after_its_first_line_does_not_hang_the_client() {
    let Some(etcd) = EtcdServer::start_or_skip() else { return };
    let script = Arc::new(Script::default());
    let (p, d, router) = early_pair(&etcd, &script, |_| {}).await;

    // Prefill's request dies after the descriptor went out (connection broken, or an error
    // for a second line): decode cannot get the first token and fails the transfer; the
    // pair is redone and its lease freed.
    for (round, second_line) in [SecondLine::Drop, SecondLine::Error].into_iter().enumerate() {
        p.script_second_lines(&[second_line]);
        let answer = send(&router, "/v1/completions", &completion(&format!("early {second_line:?}"), round == 1)).await;
        assert_eq!(answer.status, 200, "{second_line:?}: {}", answer.text);
        let (failed, served) = (format!("p1-{}", 2 * round), format!("p1-{}", 2 * round + 1));
        let leases: Vec<String> = d.bodies()[2 * round..].iter().map(lease_of).collect();
        assert_eq!(leases, vec![failed.clone(), served.clone()], "{second_line:?}");
        assert_eq!(p.first_token_asks()[2 * round..], [failed.clone(), served.clone()]);
        assert!(p.wait_frees(round + 1).await.contains(&failed), "{second_line:?}: {:?}", p.frees());
    }
    assert_eq!(p.early_state("p1-0"), Some(Early::Dropped));

    // Every pair fails so: the client gets decode's error at once, not at the deadline.
    p.script_second_lines(&[SecondLine::Drop, SecondLine::Error, SecondLine::Drop]);
    let started = std::time::Instant::now();
    let answer = send(&router, "/v1/chat/completions", &chat("early, every pair fails", false)).await;
    assert_eq!(answer.status, 503, "{}", answer.text);
    assert_eq!(answer.json()["error"]["code"], "kv_transfer_failed");
    assert!(started.elapsed() < Duration::from_secs(10), "the client waited {:?}", started.elapsed());
    assert_eq!(p.wait_frees(5).await.len(), 5, "{:?}", p.frees());
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_line_that_never_comes_is_drained_until_the_request_deadline() {
    let Some(etcd) = EtcdServer::start_or_skip() else { return };
    let script = Arc::new(Script::default());
    let (p, d, router) = early_pair(&etcd, &script, |c| c.request_timeout = Duration::from_secs(2)).await;

    p.script_second_lines(&[SecondLine::Never]);
    let answer = send(&router, "/v1/completions", &completion("early, prefill stalls", true)).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.streamed_text(), "P decoded by d1");
    assert_eq!(lease_of(&d.bodies()[0]), "p1-0");
    assert_eq!(p.early_state("p1-0"), Some(Early::FirstLine));
    // The drain gives up at the request deadline: no task and no connection left behind.
    assert_eq!(p.wait_early("p1-0", Early::Aborted).await, Some(Early::Aborted));
    assert!(p.frees().is_empty(), "decode took the lease over: {:?}", p.frees());
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_token_requests_ask_for_no_early_descriptor() {
    let Some(etcd) = EtcdServer::start_or_skip() else { return };
    let script = Arc::new(Script::default());
    let (p, d, router) = early_pair(&etcd, &script, |_| {}).await;

    let mut one_token = completion("one token", false);
    one_token["max_tokens"] = json!(1);
    let answer = send(&router, "/v1/completions", &one_token).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    let body = answer.json();
    assert_eq!((body["choices"][0]["text"].as_str(), body["choices"][0]["finish_reason"].as_str()), (Some("P"), Some("length")));
    assert_eq!((answer.worker.as_str(), answer.prefill.as_str()), ("p1", "p1"));

    let mut one_token = chat("one token", true);
    one_token.as_object_mut().unwrap().remove("max_tokens");
    one_token["max_completion_tokens"] = json!(1);
    let answer = send(&router, "/v1/chat/completions", &one_token).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.streamed_text(), "P");

    for body in p.bodies() {
        assert_eq!(body["kv_transfer_params"], json!({"do_remote_decode": true, "early_descriptor": false}));
    }
    assert_eq!((p.hits(), d.hits()), (2, 0), "a one-token request was handed to decode");
    assert!(p.seen.early.lock().unwrap().is_empty());
    router.stop().await;
}

/// A prefill worker whose KV cannot be pulled: decode answers 503 `kv_transfer_failed`,
/// which is prefill's fault. Its breaker ejects it after three; decode's is not charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_kv_transfer_counts_against_the_prefill_worker_not_decode() {
    let Some(etcd) = EtcdServer::start_or_skip() else { return };
    let script = Arc::new(Script::default());
    let e = etcd.endpoint();
    // Model "tiny": late answers; model "early": early descriptors.
    let mut engines = Vec::new();
    for (model, early) in [("tiny", false), ("early", true)] {
        let spec = |name: &str, role| Spec { model: model.into(), early, ..Spec::new(&format!("{model}-{name}"), role) };
        let bad = PdEngine::start(&e, spec("bad", Role::Prefill), script.clone()).await;
        let good = PdEngine::start(&e, spec("good", Role::Prefill), script.clone()).await;
        let d = PdEngine::start(&e, spec("d", Role::Decode), script.clone()).await;
        script.unpullable.lock().unwrap().push(bad.name.clone());
        engines.push((model, bad, good, d));
    }
    let router = RunningRouter::start(config(&e, Policy::RoundRobin)).await;
    router.wait_workers(6).await;

    for (model, bad, good, d) in &engines {
        for i in 0..8 {
            let body = json!({"model": model, "prompt": format!("q{i}"), "max_tokens": 8, "stream": i % 2 == 1});
            let answer = send(&router, "/v1/completions", &body).await;
            assert_eq!(answer.status, 200, "{model}: {}", answer.text);
            assert_eq!((answer.worker.as_str(), answer.prefill.as_str()), (d.name.as_str(), good.name.as_str()));
        }
        let metrics = router.metrics().await;
        let errors = |labels: String| metric_sum(&metrics, "dlengine_router_worker_errors_total", &labels);
        assert_eq!(errors(format!("worker=\"{}\"", d.url)), 0.0, "{model}: decode was charged");
        assert_eq!(errors(format!("worker=\"{}\",kind=\"kv_transfer\"", bad.url)), 3.0, "{model}");
        // Ejected after its third failed transfer (a probe, if this took over 2 s).
        assert!((3..=4).contains(&bad.hits()), "{model}: the prefill worker whose KV cannot be pulled got {} requests", bad.hits());
        assert_eq!(d.hits(), 8 + bad.hits());
    }
    router.stop().await;
}
