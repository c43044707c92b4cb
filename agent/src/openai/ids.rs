//! Response ids and timestamps.

/// `prefix-<32 hex digits>`, e.g. `chatcmpl-…`, `cmpl-…`, `call_…` (OpenAI's shapes).
pub fn random_id(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::new_v4().simple())
}

pub fn completion_id() -> String {
    random_id("cmpl-")
}

pub fn chat_completion_id() -> String {
    random_id("chatcmpl-")
}

pub fn tool_call_id() -> String {
    random_id("call_")
}

/// Seconds since the Unix epoch, the unit of every `created` field.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

pub fn unix_now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
