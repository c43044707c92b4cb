//! `dlengine-router`: the OpenAI-compatible gateway in front of engines discovered in etcd.
//!
//! Owns: following the registry ([`dlengine_registry::Discovery`]) into a worker pool,
//! routing policies, forwarding with retries, circuit breakers and timeouts, SSE relay,
//! ingress protection (API keys, rate limits, body size, validation), metrics and graceful
//! drain.
//!
//! Must not: parse requests beyond what routing and validation need (the engine owns the
//! OpenAI semantics), link the engine or the agent binary, or make serving depend on etcd
//! being up — the last known view keeps routing while etcd is away.
//!
//! Disaggregation: a model with prefill workers and decode workers that pair with them
//! (same model, revision and KV layout) has each single-sequence request split: prefill
//! computes the prompt and hands back a migration descriptor, decode continues from it.
//! Everything else is served whole by aggregated workers (else decode workers). See
//! `proxy::split` and docs/router.md.

mod api_error;
mod config;
mod gateway;
mod metrics;
pub mod policy;
mod proxy;
mod server;
#[cfg(test)]
mod testing;
pub mod workers;

pub use api_error::ApiError;
pub use config::{ConfigError, RouterConfig};
pub use proxy::{PREFILL_WORKER_HEADER, WORKER_HEADER};
pub use server::{run, run_with_config};
