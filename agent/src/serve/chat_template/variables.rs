//! What a chat template sees: `messages`, `tools`, `add_generation_prompt`, the special
//! tokens and the request's `chat_template_kwargs`, shaped like transformers passes them.
//!
//! Messages and tools stay template values parsed straight from the request body, so maps
//! keep the client's key order (Python dicts do; `tojson` of a tool schema depends on it).

use minijinja::value::{Value, ValueKind};

#[derive(Debug, Clone, Default)]
pub struct TemplateInput {
    pub messages: Vec<Value>,
    pub tools: Option<Value>,
    pub add_generation_prompt: bool,
    pub kwargs: serde_json::Map<String, serde_json::Value>,
}

impl TemplateInput {
    pub(super) fn context(&self, special_tokens: &[(&'static str, String)]) -> Value {
        // Request kwargs first, so they cannot replace the conversation itself.
        let mut vars: std::collections::BTreeMap<String, Value> =
            self.kwargs.iter().map(|(k, v)| (k.clone(), Value::from_serialize(v))).collect();
        for (name, token) in special_tokens {
            vars.insert((*name).to_owned(), Value::from(token.as_str()));
        }
        vars.insert("messages".into(), Value::from(self.messages.clone()));
        vars.insert("tools".into(), self.tools.clone().unwrap_or(Value::from(())));
        vars.insert("documents".into(), Value::from(()));
        vars.insert("add_generation_prompt".into(), Value::from(self.add_generation_prompt));
        Value::from_iter(vars)
    }
}

/// Messages as the template sees them: null keys dropped (as transformers does) and
/// assistant tool-call `arguments` given as objects where they are JSON objects, since
/// templates write them with `tojson` (vLLM does the same).
pub fn message_values(messages: &Value) -> Vec<Value> {
    match messages.try_iter() {
        Ok(items) => items.map(|m| message_value(&m)).collect(),
        Err(_) => Vec::new(),
    }
}

fn message_value(message: &Value) -> Value {
    map_entries(message, |key, value| match key {
        _ if value.is_none() => None,
        "tool_calls" => Some(Value::from(value.try_iter().map(|calls| calls.map(|c| call_value(&c)).collect::<Vec<_>>()).unwrap_or_default())),
        _ => Some(value),
    })
}

fn call_value(call: &Value) -> Value {
    map_entries(call, |key, value| match key {
        "function" => Some(map_entries(&value, |key, value| match key {
            "arguments" => Some(value.as_str().and_then(parse_object).unwrap_or(value)),
            _ => Some(value),
        })),
        _ => Some(value),
    })
}

fn parse_object(text: &str) -> Option<Value> {
    serde_json::from_str::<Value>(text).ok().filter(|v| v.kind() == ValueKind::Map)
}

/// A map rebuilt entry by entry in its order (`edit` returns None to drop an entry);
/// anything else is returned unchanged.
fn map_entries(map: &Value, edit: impl Fn(&str, Value) -> Option<Value>) -> Value {
    if map.kind() != ValueKind::Map {
        return map.clone();
    }
    let Ok(keys) = map.try_iter() else { return map.clone() };
    Value::from_iter(keys.filter_map(|key| {
        let value = map.get_item(&key).ok()?;
        let name = key.as_str()?.to_owned();
        edit(&name, value).map(|v| (name, v))
    }))
}
