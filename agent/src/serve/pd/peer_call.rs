//! One JSON call from this engine to another engine's `/pd/*` endpoint: the answer
//! parsed, or a message naming the URL and what went wrong (unreachable, a non-2xx
//! status with its body, unreadable JSON).

use serde::de::DeserializeOwned;

pub async fn call<T: DeserializeOwned>(request: reqwest::RequestBuilder, url: &str) -> Result<T, String> {
    let response = request.send().await.map_err(|e| format!("asking {url}: {e}"))?;
    let status = response.status();
    let body = response.bytes().await.map_err(|e| format!("reading {url}'s answer: {e}"))?;
    if !status.is_success() {
        return Err(format!("{url} answered {status}: {}", String::from_utf8_lossy(&body)));
    }
    serde_json::from_slice(&body).map_err(|e| format!("{url} answered unreadable JSON: {e}"))
}
