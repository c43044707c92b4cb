//! Chat answers assembled from synthetic engine deltas: the model cannot be made to call
//! tools, so the wiring from deltas to tool calls, reasoning and chunks is tested here.

use std::sync::Arc;

use dlengine_engine::request::{ChoiceDelta, FinishReason, TokenLogprob};
use dlengine_engine::tokenizer::Tokenizer;

use super::*;
use crate::serve::output_parser::tool_parser_by_name;

fn tokenizer() -> Arc<Tokenizer> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models/qwen3-tiny");
    Arc::new(Tokenizer::from_dir(&dir).unwrap())
}

fn answer(n: usize, reasoning: Option<bool>, logprobs: bool) -> ChatAnswer {
    ChatAnswer {
        id: "chatcmpl-test".into(),
        created: 1,
        model: "m".into(),
        n,
        logprobs,
        include_usage: true,
        reasoning,
        tool_parser: tool_parser_by_name("hermes"),
        tokenizer: tokenizer(),
    }
}

fn delta(index: u32, text: &str, finish: Option<FinishReason>) -> ChoiceDelta {
    ChoiceDelta { index, text: text.into(), token_ids: vec![5], logprobs: vec![], finish_reason: finish, stop_reason: None, kv_handoff: None, kv_ready: None }
}

const OUTPUT: &[&str] = &["<think>look", " up</think>\n\nOn it.\n<tool", "_call>\n{\"name\": \"get_weather\", ", "\"arguments\": {\"city\": \"Paris\"}}\n</tool_call>", ""];

fn output_deltas(index: u32) -> Vec<ChoiceDelta> {
    let last = OUTPUT.len() - 1;
    OUTPUT.iter().enumerate().map(|(i, t)| delta(index, t, (i == last).then_some(FinishReason::Stop))).collect()
}

fn sse_events(bytes: &[u8]) -> Vec<serde_json::Value> {
    let text = std::str::from_utf8(bytes).unwrap();
    text.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| serde_json::from_str(e.strip_prefix("data: ").unwrap()).unwrap())
        .collect()
}

#[test]
fn a_non_streamed_tool_call_answer() {
    let mut collector = ChatMessageCollector::new(answer(1, Some(false), false));
    for d in output_deltas(0) {
        collector.add(0, d);
    }
    let response = collector.finish(Usage::new(3, 5, 0));
    let choice = &response.choices[0];
    assert_eq!(choice.finish_reason.as_deref(), Some("tool_calls"));
    assert_eq!(choice.message.reasoning_content.as_deref(), Some("look up"));
    assert_eq!(choice.message.content.as_deref(), Some("\n\nOn it."));
    assert_eq!(choice.message.tool_calls.len(), 1);
    let call = &choice.message.tool_calls[0];
    assert_eq!(call.function.name, "get_weather");
    assert_eq!(call.function.arguments, r#"{"city":"Paris"}"#);
    assert!(call.id.starts_with("call_"));
    assert_eq!(response.usage.total_tokens, 8);
}

#[test]
fn a_streamed_tool_call_answer_never_shows_the_tags() {
    let mut chunks = ChatChunks::new(answer(1, Some(false), false));
    let mut out = Vec::new();
    for d in output_deltas(0) {
        chunks.delta(0, d, &mut out);
    }
    chunks.finish(Usage::new(3, 5, 0), &mut out);
    let events = sse_events(&out);
    assert!(!String::from_utf8_lossy(&out).contains("<tool_call>"));
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    let field = |name: &str| -> String {
        events.iter().filter_map(|e| e["choices"].get(0)?["delta"][name].as_str().map(str::to_owned)).collect()
    };
    assert_eq!(field("reasoning_content"), "look up");
    assert_eq!(field("content"), "\n\nOn it.");
    let calls: Vec<_> = events.iter().filter_map(|e| e["choices"].get(0)?["delta"]["tool_calls"].as_array().cloned()).flatten().collect();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["index"], 0);
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    let finish: Vec<_> = events.iter().filter_map(|e| e["choices"].get(0)?["finish_reason"].as_str().map(str::to_owned)).collect();
    assert_eq!(finish, vec!["tool_calls"]);
    let last = events.last().unwrap();
    assert_eq!(last["choices"].as_array().unwrap().len(), 0);
    assert_eq!(last["usage"]["completion_tokens"], 5);
}

#[test]
fn choices_are_kept_apart_and_plain_stop_stays_stop() {
    let mut collector = ChatMessageCollector::new(answer(2, None, true));
    let lp = TokenLogprob { token_id: 5, logprob: -0.5, top: vec![(5, -0.5), (6, -1.5)] };
    let mut first = delta(1, "hello", Some(FinishReason::Length));
    first.logprobs = vec![lp];
    collector.add(0, first);
    collector.add(0, delta(0, "bye", Some(FinishReason::Stop)));
    let response = collector.finish(Usage::new(1, 2, 0));
    assert_eq!(response.choices[0].message.content.as_deref(), Some("bye"));
    assert_eq!(response.choices[0].finish_reason.as_deref(), Some("stop"));
    assert_eq!(response.choices[1].message.content.as_deref(), Some("hello"));
    assert_eq!(response.choices[1].finish_reason.as_deref(), Some("length"));
    let lps = response.choices[1].logprobs.as_ref().unwrap();
    assert_eq!(lps.content.len(), 1);
    assert_eq!(lps.content[0].top_logprobs.len(), 2);
    assert_eq!(lps.content[0].logprob, -0.5);
}
