//! Finish and stop reasons in wire form.

use dlengine_engine::request::{FinishReason, StopReason};
use serde_json::Value;

/// `finish_reason`; a choice that stopped after calling tools reports `tool_calls`.
pub fn finish_reason(reason: FinishReason, made_tool_calls: bool) -> String {
    match reason {
        FinishReason::Stop if made_tool_calls => "tool_calls".to_owned(),
        other => other.as_str().to_owned(),
    }
}

/// vLLM's `stop_reason`: the stop token id or stop string, null for EOS or length.
pub fn stop_reason(reason: Option<StopReason>) -> Option<Value> {
    match reason? {
        StopReason::Token(id) => Some(Value::from(id)),
        StopReason::Text(s) => Some(Value::from(s)),
    }
}
