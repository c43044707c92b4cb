//! A prefill engine's pinned KV blocks, from the descriptor the router holds until a decode
//! engine has taken over. Dropped while still armed — the decode hop failed, the deadline
//! passed, or the client went away and the request future was dropped between the hops —
//! it tells the prefill engine to release the blocks now (`POST /pd/free`) instead of at
//! lease expiry. Fire-and-forget, with a short timeout: releasing is an optimisation, the
//! engine's lease expiry is the guarantee.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::metrics::Metrics;

/// How long a release may take; the request never waits for it.
const FREE_TIMEOUT: Duration = Duration::from_secs(2);

pub struct Lease {
    client: reqwest::Client,
    /// The prefill engine's base URL.
    prefill_url: String,
    id: String,
    metrics: Arc<Metrics>,
    armed: bool,
}

impl Lease {
    pub fn new(client: reqwest::Client, prefill_url: &str, id: String, metrics: Arc<Metrics>) -> Lease {
        Lease { client, prefill_url: prefill_url.to_string(), id, metrics, armed: true }
    }

    /// The decode engine took the KV over (and releases it itself).
    pub fn handed_over(mut self) {
        self.armed = false;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(lease = %self.id, "no runtime to release a KV lease; it expires on its own");
            return;
        };
        self.metrics.pd_lease_frees.inc();
        let request = self
            .client
            .post(format!("{}/pd/free", self.prefill_url))
            .timeout(FREE_TIMEOUT)
            .json(&json!({"lease_id": self.id}))
            .send();
        let (url, id) = (self.prefill_url.clone(), self.id.clone());
        runtime.spawn(async move {
            match request.await {
                Ok(response) if response.status().is_success() => tracing::debug!(worker = %url, lease = %id, "KV lease released"),
                Ok(response) => tracing::warn!(worker = %url, lease = %id, status = %response.status(), "releasing a KV lease failed"),
                Err(error) => tracing::warn!(worker = %url, lease = %id, "releasing a KV lease failed: {error}"),
            }
        });
    }
}
