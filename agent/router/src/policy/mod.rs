//! Routing policies: given the workers that may take a request (right model and role, not
//! ejected, not already tried for it), choose one.
//!
//! A policy only chooses; it never sends, retries or touches breakers. `forget` lets a
//! policy drop per-worker state when a worker leaves the pool.

mod cache_aware;
mod hash;
mod least_load;
mod prefix_tree;
mod round_robin;
mod session;

use std::sync::Arc;

use dlengine_cli::Policy as PolicyKind;

pub use cache_aware::{CacheAware, CacheAwareSettings};
pub use least_load::LeastLoad;
pub use round_robin::RoundRobin;
pub use session::Session;

use crate::workers::Worker;

/// What a policy may look at in a request.
#[derive(Debug, Default, Clone, Copy)]
pub struct RouteRequest<'a> {
    /// The prompt as text (completions) or the flattened messages (chat).
    pub text: &'a str,
    /// The session header's value, else the request's `user`.
    pub session_key: Option<&'a str>,
}

#[derive(Debug, Clone)]
pub struct Decision {
    pub worker: Arc<Worker>,
    /// Why this worker, for the routing-decisions metric (`cache_hit`, `round_robin`...).
    pub reason: &'static str,
}

pub trait Policy: Send + Sync {
    fn name(&self) -> &'static str;
    /// `candidates` is never empty.
    fn choose(&self, candidates: &[Arc<Worker>], request: &RouteRequest<'_>) -> Decision;
    fn forget(&self, _worker: &Worker) {}
}

pub fn build(kind: PolicyKind) -> Arc<dyn Policy> {
    match kind {
        PolicyKind::RoundRobin => Arc::new(RoundRobin::default()),
        PolicyKind::LeastLoad => Arc::new(LeastLoad),
        PolicyKind::CacheAware => Arc::new(CacheAware::new(CacheAwareSettings::default())),
        PolicyKind::Session => Arc::new(Session),
    }
}
