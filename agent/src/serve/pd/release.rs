//! Releasing prefill's lease from the decode side: once the KV is copied, or when the
//! request is dropped before that. Fire-and-forget: if the call is lost, the lease
//! expires on prefill's side anyway.

use serde_json::json;

/// Releases the lease when told to, or when dropped.
pub struct LeaseRelease {
    target: Option<(reqwest::Client, String, String)>,
}

impl LeaseRelease {
    pub fn new(client: reqwest::Client, free_url: String, lease_id: String) -> Self {
        Self { target: Some((client, free_url, lease_id)) }
    }

    /// Releases now (idempotent).
    pub fn release(&mut self) {
        let Some((client, url, lease_id)) = self.target.take() else { return };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        runtime.spawn(async move {
            match client.post(&url).json(&json!({ "lease_id": lease_id })).send().await {
                Ok(r) if r.status().is_success() => {}
                Ok(r) => tracing::warn!(%url, status = %r.status(), "releasing prefill's KV lease was refused"),
                Err(e) => tracing::warn!(%url, error = %e, "releasing prefill's KV lease failed; it will expire"),
            }
        });
    }
}

impl Drop for LeaseRelease {
    fn drop(&mut self) {
        self.release();
    }
}
