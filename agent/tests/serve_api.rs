//! The OpenAI API of `dlengine serve` end to end over HTTP, with the real binary and a
//! fixture model on the CPU.

mod serve_support;

use serde_json::{json, Value};
use serve_support::{Server, MODEL};

fn chat(content: &str) -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 8})
}

fn text_of(events: &[Value], choice: u64, field: &str) -> String {
    events
        .iter()
        .filter_map(|e| e.get("choices")?.as_array())
        .flatten()
        .filter(|c| c["index"] == choice)
        .filter_map(|c| c.pointer(field)?.as_str().map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn health_models_and_metrics() {
    let server = Server::start(&[]).await;
    assert_eq!(server.health().await, 200);
    let models: Value = server.client.get(server.url("/v1/models")).send().await.unwrap().json().await.unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], MODEL);
    assert_eq!(models["data"][0]["max_model_len"], 1024, "qwen3-tiny's max_position_embeddings");
    server.post_json("/v1/completions", json!({"prompt": "The small engine", "max_tokens": 3, "ignore_eos": true}), 200).await;
    server.wait_for_metric("dlengine_running_sequences", 0.0, std::time::Duration::from_secs(10)).await;
    let metrics = server.client.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    for family in [
        "dlengine_requests_total{endpoint=\"/v1/completions\",status=\"200\"} 1",
        "dlengine_prompt_tokens_total",
        "dlengine_generation_tokens_total 3",
        "dlengine_time_to_first_token_seconds_count 1",
        "dlengine_inter_token_latency_seconds_count",
        "dlengine_e2e_request_latency_seconds_count 1",
        "dlengine_waiting_requests 0",
        "dlengine_running_sequences 0",
        "dlengine_kv_cache_usage_ratio",
        "dlengine_prefix_cache_hit_rate",
        "dlengine_preemptions",
    ] {
        assert!(metrics.contains(family), "missing {family} in\n{metrics}");
    }
}

#[tokio::test]
async fn completions_plain_streamed_batched_and_echoed() {
    let server = Server::start(&[]).await;
    let body = json!({"model": MODEL, "prompt": "The small engine read", "max_tokens": 6, "temperature": 0, "ignore_eos": true});
    let whole = server.post_json("/v1/completions", body.clone(), 200).await;
    assert_eq!(whole["object"], "text_completion");
    assert!(whole["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(whole["model"], MODEL);
    assert_eq!(whole["choices"][0]["finish_reason"], "length");
    assert_eq!(whole["usage"]["completion_tokens"], 6);
    assert_eq!(whole["usage"]["prompt_tokens"], 5, "the fixture prompt is 5 tokens");
    assert_eq!(whole["usage"]["total_tokens"], 11);
    let text = whole["choices"][0]["text"].as_str().unwrap().to_owned();
    assert!(!text.is_empty());

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let events = server.post_sse("/v1/completions", streamed).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    assert_eq!(text_of(&events, 0, "/text"), text, "greedy stream equals greedy whole");
    let usage = &events[events.len() - 2];
    assert_eq!(usage["choices"].as_array().unwrap().len(), 0);
    assert_eq!(usage["usage"]["completion_tokens"], 6);

    let batch = json!({"prompt": ["The small engine read", "Once upon"], "max_tokens": 2, "temperature": 0, "n": 2, "ignore_eos": true});
    let batched = server.post_json("/v1/completions", batch, 200).await;
    let indices: Vec<u64> = batched["choices"].as_array().unwrap().iter().map(|c| c["index"].as_u64().unwrap()).collect();
    assert_eq!(indices, vec![0, 1, 2, 3]);
    assert_eq!(batched["choices"][0]["text"], batched["choices"][1]["text"], "greedy samples agree");
    assert_eq!(batched["usage"]["completion_tokens"], 8);
    let ids = json!({"prompt": [[464, 199, 3], [5, 6]], "max_tokens": 2, "temperature": 0, "ignore_eos": true});
    let by_ids = server.post_json("/v1/completions", ids, 200).await;
    assert_eq!(by_ids["choices"].as_array().unwrap().len(), 2);
    assert_eq!(by_ids["usage"]["prompt_tokens"], 5);

    let echoed = server.post_json("/v1/completions", json!({"prompt": "The small", "max_tokens": 2, "echo": true}), 200).await;
    assert!(echoed["choices"][0]["text"].as_str().unwrap().starts_with("The small"));
}

#[tokio::test]
async fn chat_plain_and_streamed() {
    let server = Server::start(&[]).await;
    let whole = server.post_json("/v1/chat/completions", chat("Hello there"), 200).await;
    assert_eq!(whole["object"], "chat.completion");
    assert!(whole["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(whole["choices"][0]["message"]["role"], "assistant");
    let finish = whole["choices"][0]["finish_reason"].as_str().unwrap();
    assert!(finish == "stop" || finish == "length", "{finish}");
    assert!(whole["usage"]["prompt_tokens"].as_u64().unwrap() > 5);
    let whole_text = whole["choices"][0]["message"]["content"].as_str().unwrap_or_default().to_owned()
        + whole["choices"][0]["message"]["reasoning_content"].as_str().unwrap_or_default();

    let mut body = chat("Hello there");
    body["stream"] = json!(true);
    let events = server.post_sse("/v1/chat/completions", body).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    assert_eq!(events[0]["object"], "chat.completion.chunk");
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed = text_of(&events, 0, "/delta/content") + &text_of(&events, 0, "/delta/reasoning_content");
    assert_eq!(streamed.len(), whole_text.len(), "stream {streamed:?} vs whole {whole_text:?}");
    assert!(events.iter().all(|e| e.get("usage").is_none()), "no usage chunk unless asked");
}

#[tokio::test]
async fn n_choices_seeds_stop_strings_and_logprobs() {
    let server = Server::start(&[]).await;
    let sampled = json!({"prompt": "Once upon a time", "max_tokens": 12, "temperature": 1.0, "seed": 1234, "n": 3, "ignore_eos": true});
    let a = server.post_json("/v1/completions", sampled.clone(), 200).await;
    let b = server.post_json("/v1/completions", sampled, 200).await;
    assert_eq!(a["choices"].as_array().unwrap().len(), 3);
    let texts = |r: &Value| r["choices"].as_array().unwrap().iter().map(|c| c["text"].as_str().unwrap().to_owned()).collect::<Vec<_>>();
    assert_eq!(texts(&a), texts(&b), "same seed, same samples");

    // A stop string taken from the greedy output cuts exactly before it.
    let greedy = json!({"prompt": "Once upon a time", "max_tokens": 16, "temperature": 0, "ignore_eos": true});
    let full = server.post_json("/v1/completions", greedy.clone(), 200).await["choices"][0]["text"].as_str().unwrap().to_owned();
    let stop: String = full.chars().skip(3).take(2).collect();
    assert_eq!(stop.chars().count(), 2, "greedy output too short: {full:?}");
    let prefix = &full[..full.find(&stop).unwrap()];
    let mut stopped = greedy.clone();
    stopped["stop"] = json!([stop]);
    let answer = server.post_json("/v1/completions", stopped, 200).await;
    assert_eq!(answer["choices"][0]["text"], prefix);
    assert_eq!(answer["choices"][0]["finish_reason"], "stop");
    assert_eq!(answer["choices"][0]["stop_reason"], json!(stop));

    let mut with_logprobs = greedy;
    with_logprobs["logprobs"] = json!(2);
    with_logprobs["max_tokens"] = json!(4);
    let answer = server.post_json("/v1/completions", with_logprobs, 200).await;
    let lp = &answer["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 4);
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), 4);
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 2);
    assert_eq!(lp["text_offset"][0], 0);
    assert!(lp["token_logprobs"][0].as_f64().unwrap() <= 0.0);

    let mut chat_lp = chat("Hi");
    chat_lp["logprobs"] = json!(true);
    chat_lp["top_logprobs"] = json!(3);
    let answer = server.post_json("/v1/chat/completions", chat_lp, 200).await;
    let content = answer["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len() as u64, answer["usage"]["completion_tokens"].as_u64().unwrap());
    assert_eq!(content[0]["top_logprobs"].as_array().unwrap().len(), 3);
    assert!(content[0]["bytes"].is_array());
}

#[tokio::test]
async fn chat_extras_tools_kwargs_and_request_ids() {
    let server = Server::start(&[]).await;
    let mut body = chat("What is the weather in Paris?");
    body["tools"] = json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    body["chat_template_kwargs"] = json!({"enable_thinking": false});
    let response = server
        .client
        .post(server.url("/v1/chat/completions"))
        .header("x-request-id", "abc-123")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-request-id"], "abc-123");
    let answer: Value = response.json().await.unwrap();
    let message = &answer["choices"][0]["message"];
    // A random model calls no tool, but raw tags must never reach the content.
    assert!(!message["content"].as_str().unwrap_or_default().contains("<tool_call>"));
    assert!(!message["content"].as_str().unwrap_or_default().contains("</think>"));
}
