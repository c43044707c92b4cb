//! An SSE stream made from a finished non-streaming answer, for a streaming client whose
//! request prefill finished alone (EOS, a stop string, `max_tokens` = 1, the context limit).
//! The chunks have the shapes engines stream:
//!
//! - chat (`chat.completion.chunk`): per choice a role chunk, then reasoning, content and
//!   tool-call deltas (each only if present), then a chunk with `finish_reason`;
//! - completions (`text_completion`): per choice one chunk with its text and
//!   `finish_reason`;
//!
//! then a usage chunk (empty `choices`) when `stream_options.include_usage` asked for one,
//! and `data: [DONE]`.

use bytes::Bytes;
use serde_json::{json, Map, Value};

use crate::gateway::inspect::Endpoint;

pub fn stream_from_answer(endpoint: Endpoint, answer: &Value, include_usage: bool) -> Bytes {
    let chunk_object = match endpoint {
        Endpoint::Completions => "text_completion",
        Endpoint::ChatCompletions => "chat.completion.chunk",
    };
    let envelope = |choices: Vec<Value>| {
        json!({
            "id": answer.get("id").cloned().unwrap_or(Value::Null),
            "object": chunk_object,
            "created": answer.get("created").cloned().unwrap_or(Value::Null),
            "model": answer.get("model").cloned().unwrap_or(Value::Null),
            "choices": choices,
        })
    };
    let mut out = Vec::new();
    let choices = answer.get("choices").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    for choice in choices {
        let pieces = match endpoint {
            Endpoint::Completions => vec![completion_piece(choice)],
            Endpoint::ChatCompletions => chat_pieces(choice),
        };
        for piece in pieces {
            push_event(&mut out, &envelope(vec![piece]));
        }
    }
    if include_usage {
        if let Some(usage) = answer.get("usage").filter(|u| !u.is_null()) {
            let mut chunk = envelope(Vec::new());
            chunk["usage"] = usage.clone();
            push_event(&mut out, &chunk);
        }
    }
    out.extend_from_slice(b"data: [DONE]\n\n");
    Bytes::from(out)
}

fn push_event(out: &mut Vec<u8>, value: &Value) {
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(value.to_string().as_bytes());
    out.extend_from_slice(b"\n\n");
}

fn field(object: &Value, name: &str) -> Value {
    object.get(name).cloned().unwrap_or(Value::Null)
}

/// A completions choice streams as itself: index, text, logprobs, finish_reason, stop_reason.
fn completion_piece(choice: &Value) -> Value {
    json!({
        "index": field(choice, "index"),
        "text": choice.get("text").cloned().unwrap_or_else(|| Value::String(String::new())),
        "logprobs": field(choice, "logprobs"),
        "finish_reason": field(choice, "finish_reason"),
        "stop_reason": field(choice, "stop_reason"),
    })
}

fn chat_pieces(choice: &Value) -> Vec<Value> {
    let index = field(choice, "index");
    let message = choice.get("message").cloned().unwrap_or_else(|| json!({}));
    let delta_piece = |delta: Value| json!({"index": index, "delta": delta, "finish_reason": null});
    let mut pieces = vec![delta_piece(json!({"role": field(&message, "role").as_str().unwrap_or("assistant")}))];
    let non_empty = |name: &str| message.get(name).and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_string);
    if let Some(reasoning) = non_empty("reasoning_content") {
        pieces.push(delta_piece(json!({"reasoning_content": reasoning})));
    }
    let logprobs = choice.get("logprobs").filter(|l| !l.is_null()).cloned();
    let mut logprobs_sent = false;
    if let Some(content) = non_empty("content") {
        let mut piece = delta_piece(json!({"content": content}));
        if let Some(logprobs) = &logprobs {
            piece["logprobs"] = logprobs.clone();
            logprobs_sent = true;
        }
        pieces.push(piece);
    }
    let calls = message.get("tool_calls").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    if !calls.is_empty() {
        let deltas: Vec<Value> = calls.iter().enumerate().map(|(i, call)| tool_call_delta(i, call)).collect();
        pieces.push(delta_piece(json!({"tool_calls": deltas})));
    }
    let mut last = Map::new();
    last.insert("index".into(), index);
    last.insert("delta".into(), json!({}));
    if let Some(logprobs) = logprobs.filter(|_| !logprobs_sent) {
        last.insert("logprobs".into(), logprobs);
    }
    last.insert("finish_reason".into(), field(choice, "finish_reason"));
    if let Some(stop_reason) = choice.get("stop_reason").filter(|s| !s.is_null()) {
        last.insert("stop_reason".into(), stop_reason.clone());
    }
    pieces.push(Value::Object(last));
    pieces
}

/// A whole call as one delta (clients concatenate argument fragments; one is valid).
fn tool_call_delta(index: usize, call: &Value) -> Value {
    let function = call.get("function").cloned().unwrap_or_else(|| json!({}));
    json!({
        "index": index,
        "id": field(call, "id"),
        "type": call.get("type").cloned().unwrap_or_else(|| Value::String("function".into())),
        "function": {"name": field(&function, "name"), "arguments": field(&function, "arguments")},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(bytes: &Bytes) -> Vec<Value> {
        let text = std::str::from_utf8(bytes).unwrap();
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
        text.split("\n\n")
            .filter(|e| !e.is_empty() && *e != "data: [DONE]")
            .map(|e| serde_json::from_str(e.strip_prefix("data: ").unwrap()).unwrap())
            .collect()
    }

    #[test]
    fn chat_answer_becomes_role_content_tool_and_finish_chunks() {
        let answer = json!({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 5, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi", "reasoning_content": "think",
                "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]},
                "logprobs": null, "finish_reason": "tool_calls", "stop_reason": null}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        });
        let chunks = events(&stream_from_answer(Endpoint::ChatCompletions, &answer, true));
        assert_eq!(chunks.len(), 6, "{chunks:?}");
        for chunk in &chunks {
            assert_eq!((chunk["id"].as_str(), chunk["object"].as_str(), chunk["created"].as_u64()), (Some("chatcmpl-1"), Some("chat.completion.chunk"), Some(5)));
        }
        assert_eq!(chunks[0]["choices"][0]["delta"], json!({"role": "assistant"}));
        assert_eq!(chunks[1]["choices"][0]["delta"], json!({"reasoning_content": "think"}));
        assert_eq!(chunks[2]["choices"][0]["delta"], json!({"content": "Hi"}));
        let call = &chunks[3]["choices"][0]["delta"]["tool_calls"][0];
        assert_eq!((call["index"].as_u64(), call["id"].as_str(), call["function"]["name"].as_str()), (Some(0), Some("call_1"), Some("f")));
        assert_eq!(call["function"]["arguments"], "{\"a\":1}");
        assert_eq!(chunks[4]["choices"][0]["finish_reason"], "tool_calls");
        assert!(chunks[..4].iter().all(|c| c["choices"][0]["finish_reason"].is_null()));
        assert_eq!(chunks[5]["choices"], json!([]));
        assert_eq!(chunks[5]["usage"]["total_tokens"], 4);
    }

    #[test]
    fn chat_without_usage_request_has_no_usage_chunk() {
        let answer = json!({"id": "c", "created": 1, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": ""}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}});
        let chunks = events(&stream_from_answer(Endpoint::ChatCompletions, &answer, false));
        assert_eq!(chunks.len(), 2, "role then finish: {chunks:?}");
        assert!(chunks.iter().all(|c| c.get("usage").is_none()));
        assert_eq!(chunks[1]["choices"][0]["finish_reason"], "stop");
    }

    #[test]
    fn completion_answer_becomes_one_chunk_per_choice() {
        let answer = json!({
            "id": "cmpl-1", "object": "text_completion", "created": 5, "model": "m",
            "choices": [{"index": 0, "text": "A", "logprobs": null, "finish_reason": "length", "stop_reason": null}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        });
        let chunks = events(&stream_from_answer(Endpoint::Completions, &answer, true));
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks[0]["object"], "text_completion");
        assert_eq!(chunks[0]["choices"][0]["text"], "A");
        assert_eq!(chunks[0]["choices"][0]["finish_reason"], "length");
        assert_eq!(chunks[1]["usage"]["completion_tokens"], 1);
    }
}
