//! Bad requests get OpenAI-shaped errors with the right status and `param`, and the server
//! stays healthy after each one.

mod serve_support;

use serde_json::{json, Value};
use serve_support::{Server, MODEL};

fn user(content: &str) -> Value {
    json!([{"role": "user", "content": content}])
}

fn assert_error_shape(body: &Value, context: &str) {
    let error = &body["error"];
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "{context}: {body}");
    assert!(error["type"].is_string(), "{context}: {body}");
    assert!(error.get("param").is_some() && error.get("code").is_some(), "{context}: {body}");
}

#[tokio::test]
async fn bad_inputs_table() {
    let server = Server::start(&["--max-model-len", "256"]).await;
    let chat = "/v1/chat/completions";
    let cmpl = "/v1/completions";
    // (endpoint, raw body, status, param)
    let cases: Vec<(&str, String, u16, Option<&str>)> = vec![
        (chat, "{\"messages\": [".into(), 400, None),
        (chat, "[1, 2]".into(), 400, None),
        (chat, json!({"model": MODEL}).to_string(), 400, Some("messages")),
        (chat, json!({"messages": []}).to_string(), 400, Some("messages")),
        (chat, json!({"messages": "hi"}).to_string(), 400, Some("messages")),
        (chat, json!({"messages": [{"role": "wizard", "content": "x"}]}).to_string(), 400, Some("messages[0].role")),
        (chat, json!({"messages": [{"role": "user", "content": 7}]}).to_string(), 400, Some("messages[0].content")),
        (chat, json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}).to_string(), 400, Some("messages[0].content[0].type")),
        (chat, json!({"messages": user("x"), "temperature": "hot"}).to_string(), 400, Some("temperature")),
        (chat, json!({"messages": user("x"), "temperature": 3.5}).to_string(), 400, Some("temperature")),
        (chat, json!({"messages": user("x"), "temperature": -1}).to_string(), 400, Some("temperature")),
        (chat, json!({"messages": user("x"), "top_p": 0}).to_string(), 400, Some("top_p")),
        (chat, json!({"messages": user("x"), "top_p": 1.5}).to_string(), 400, Some("top_p")),
        (chat, json!({"messages": user("x"), "max_tokens": -1}).to_string(), 400, Some("max_tokens")),
        (chat, json!({"messages": user("x"), "max_tokens": 0}).to_string(), 400, Some("max_tokens")),
        (chat, json!({"messages": user("x"), "max_tokens": 1_000_000}).to_string(), 400, Some("max_tokens")),
        (chat, json!({"messages": user("x"), "max_completion_tokens": 0}).to_string(), 400, Some("max_completion_tokens")),
        (chat, json!({"messages": user("x"), "max_tokens": 1e300}).to_string(), 400, Some("max_tokens")),
        (chat, json!({"messages": user("x"), "n": 1000}).to_string(), 400, Some("n")),
        (chat, json!({"messages": user("x"), "n": 0}).to_string(), 400, Some("n")),
        (chat, json!({"messages": user("x"), "stream": "yes"}).to_string(), 400, Some("stream")),
        (chat, json!({"messages": user("x"), "stream_options": {"include_usage": true}}).to_string(), 400, Some("stream_options")),
        (chat, json!({"messages": user("x"), "tool_choice": "sometimes"}).to_string(), 400, Some("tool_choice")),
        (chat, json!({"messages": user("x"), "tool_choice": {"type": "function", "function": {"name": "nope"}},
                      "tools": [{"type": "function", "function": {"name": "f"}}]}).to_string(), 400, Some("tool_choice")),
        (chat, json!({"messages": user("x"), "tool_choice": "required"}).to_string(), 400, Some("tool_choice")),
        (chat, json!({"messages": user("x"), "top_logprobs": 2}).to_string(), 400, Some("top_logprobs")),
        (chat, json!({"messages": user("x"), "response_format": {"type": "json_schema"}}).to_string(), 400, Some("response_format")),
        (chat, json!({"messages": user("x"), "logit_bias": {"5": 10}}).to_string(), 400, Some("logit_bias")),
        (chat, json!({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "late"}]}).to_string(), 400, Some("messages")),
        (chat, json!({"messages": user(&"word ".repeat(400))}).to_string(), 400, Some("messages")),
        (chat, json!({"model": "gpt-4", "messages": user("x")}).to_string(), 404, Some("model")),
        (cmpl, json!({"max_tokens": 3}).to_string(), 400, Some("prompt")),
        (cmpl, json!({"prompt": {"a": 1}}).to_string(), 400, Some("prompt")),
        (cmpl, json!({"prompt": []}).to_string(), 400, Some("prompt")),
        (cmpl, json!({"prompt": ""}).to_string(), 400, Some("prompt")),
        (cmpl, json!({"prompt": [5, 100000]}).to_string(), 400, Some("prompt")),
        (cmpl, json!({"prompt": "x", "suffix": "y"}).to_string(), 400, Some("suffix")),
        (cmpl, json!({"prompt": "x", "echo": true, "logprobs": 1}).to_string(), 400, Some("echo")),
        (cmpl, json!({"prompt": "x", "logprobs": 50}).to_string(), 400, Some("logprobs")),
        (cmpl, json!({"prompt": "x", "stop": 5}).to_string(), 400, Some("stop")),
        (cmpl, json!({"prompt": "x", "max_tokens": 300}).to_string(), 400, Some("max_tokens")),
        (cmpl, json!({"prompt": "x", "best_of": 4}).to_string(), 400, Some("best_of")),
        (cmpl, json!({"model": "other", "prompt": "x"}).to_string(), 404, Some("model")),
    ];
    for (path, body, status, param) in cases {
        let response = server.client.post(server.url(path)).header("content-type", "application/json").body(body.clone()).send().await.unwrap();
        let got = response.status().as_u16();
        let answer: Value = response.json().await.unwrap_or_else(|e| panic!("{path} {body}: not JSON: {e}"));
        assert_eq!(got, status, "{path} {body}: {answer}");
        assert_error_shape(&answer, &body);
        assert_eq!(answer["error"]["param"].as_str(), param, "{path} {body}: {answer}");
        assert_eq!(server.health().await, 200, "unhealthy after {path} {body}");
    }
}

#[tokio::test]
async fn over_length_errors_say_both_numbers() {
    let server = Server::start(&["--max-model-len", "64"]).await;
    let body = json!({"prompt": "The small engine read", "max_tokens": 100});
    let answer = server.post_json("/v1/completions", body, 400).await;
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(message.contains("64") && message.contains("100") && message.contains('5'), "{message}");
}

#[tokio::test]
async fn invalid_utf8_routes_methods_and_oversized_bodies() {
    let server = Server::start(&["--max-request-body-bytes", "2048"]).await;
    let response = server
        .client
        .post(server.url("/v1/completions"))
        .header("content-type", "application/json")
        .body(b"{\"prompt\": \"\xff\xfe\"}".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let answer: Value = response.json().await.unwrap();
    assert!(answer["error"]["message"].as_str().unwrap().contains("UTF-8"), "{answer}");

    let response = server.client.get(server.url("/v1/nothing")).send().await.unwrap();
    assert_eq!(response.status(), 404);
    assert_error_shape(&response.json().await.unwrap(), "unknown route");

    let response = server.client.get(server.url("/v1/chat/completions")).send().await.unwrap();
    assert_eq!(response.status(), 405);
    assert_error_shape(&response.json().await.unwrap(), "wrong method");

    let big = json!({"prompt": "x".repeat(4096)});
    let response = server.post("/v1/completions", big).await;
    assert_eq!(response.status(), 413);
    let answer: Value = response.json().await.unwrap();
    assert!(answer["error"]["message"].as_str().unwrap().contains("2048"), "{answer}");
    assert_eq!(server.health().await, 200);
    server.post_json("/v1/completions", json!({"prompt": "still fine", "max_tokens": 2}), 200).await;
}

#[tokio::test]
async fn api_key_guards_v1_only() {
    let server = Server::start(&["--api-key", "sekrit"]).await;
    let body = json!({"prompt": "x", "max_tokens": 1});
    let missing = server.post("/v1/completions", body.clone()).await;
    assert_eq!(missing.status(), 401);
    assert_error_shape(&missing.json().await.unwrap(), "no key");
    let wrong = server.client.post(server.url("/v1/completions")).bearer_auth("guess").json(&body).send().await.unwrap();
    assert_eq!(wrong.status(), 401);
    let right = server.client.post(server.url("/v1/completions")).bearer_auth("sekrit").json(&body).send().await.unwrap();
    assert_eq!(right.status(), 200);
    let models = server.client.get(server.url("/v1/models")).send().await.unwrap();
    assert_eq!(models.status(), 401);
    assert_eq!(server.health().await, 200, "health stays open");
    let metrics = server.client.get(server.url("/metrics")).send().await.unwrap();
    assert_eq!(metrics.status(), 200, "metrics stay open");
}

#[tokio::test]
async fn an_rdma_handshake_with_an_engine_without_rdma_is_refused_clearly() {
    let server = Server::start(&["--kv-transport", "tcp"]).await;
    let connect = json!({"peer": "decode-1", "connect": {"version": 1}});
    let body = server.post_json("/pd/rdma/connect", connect, 404).await;
    assert_error_shape(&body, "rdma connect");
    assert_eq!(body["error"]["code"], "rdma_unavailable", "{body}");
    assert_eq!(server.health().await, 200);
}
