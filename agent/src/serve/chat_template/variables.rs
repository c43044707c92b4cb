//! What a chat template sees: `messages`, `tools`, `add_generation_prompt`, the special
//! tokens and the request's `chat_template_kwargs`, shaped like transformers passes them.

use serde_json::{Map, Value};

#[derive(Debug, Clone, Default)]
pub struct TemplateInput {
    pub messages: Vec<Value>,
    pub tools: Option<Vec<Value>>,
    pub add_generation_prompt: bool,
    pub kwargs: Map<String, Value>,
}

impl TemplateInput {
    pub(super) fn context(&self, special_tokens: &[(&'static str, String)]) -> minijinja::Value {
        // Request kwargs first, so they cannot replace the conversation itself.
        let mut ctx: Map<String, Value> = self.kwargs.clone();
        for (name, token) in special_tokens {
            ctx.insert((*name).to_owned(), Value::String(token.clone()));
        }
        ctx.insert("messages".into(), Value::Array(self.messages.clone()));
        ctx.insert("tools".into(), self.tools.clone().map(Value::Array).unwrap_or(Value::Null));
        ctx.insert("add_generation_prompt".into(), Value::Bool(self.add_generation_prompt));
        minijinja::Value::from_serialize(&ctx)
    }
}

/// Messages as the template sees them: the client's JSON (key order kept) with null keys
/// dropped (as transformers does) and assistant tool-call `arguments` given as objects
/// where they are JSON objects, since templates write them with `tojson` (vLLM does too).
pub fn message_values(messages: &[Value]) -> Vec<Value> {
    messages.iter().cloned().map(message_value).collect()
}

fn message_value(mut value: Value) -> Value {
    drop_nulls(&mut value);
    if let Some(calls) = value.get_mut("tool_calls").and_then(Value::as_array_mut) {
        for call in calls {
            if let Some(arguments) = call.pointer_mut("/function/arguments") {
                if let Some(parsed) = arguments.as_str().and_then(|s| serde_json::from_str::<Value>(s).ok()) {
                    if parsed.is_object() {
                        *arguments = parsed;
                    }
                }
            }
        }
    }
    value
}

fn drop_nulls(value: &mut Value) {
    if let Value::Object(map) = value {
        map.retain(|_, v| !v.is_null());
    }
}
