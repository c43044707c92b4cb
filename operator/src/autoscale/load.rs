//! Load of a role as the autoscaler sees it, and the trait that provides it.

use std::future::Future;
use std::pin::Pin;

/// Averages over the ready instances of one role (at any revision).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RoleLoad {
    /// Instances whose metrics were read.
    pub instances: i32,
    /// Waiting requests per instance.
    pub queue_depth: f64,
    /// Fraction of KV-cache blocks in use.
    pub kv_cache_utilization: f64,
    /// 95th percentile time to first token since the last observation, seconds.
    pub ttft_p95_seconds: Option<f64>,
    /// 95th percentile inter-token latency since the last observation, seconds.
    pub itl_p95_seconds: Option<f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("listing pods of role {role}: {source}")]
    ListPods { role: String, source: kube::Error },
    #[error("no instance of role {role} answered on /metrics")]
    NoInstance { role: String },
}

/// Which pods a load observation is about.
#[derive(Debug, Clone)]
pub struct RoleRef {
    pub namespace: String,
    pub deployment: String,
    pub role: String,
}

pub type LoadFuture<'a> = Pin<Box<dyn Future<Output = Result<RoleLoad, LoadError>> + Send + 'a>>;

/// Reads a role's load (the engines' `/metrics` in a cluster; fixed values in tests).
pub trait LoadSource: Send + Sync {
    fn role_load<'a>(&'a self, role: &'a RoleRef) -> LoadFuture<'a>;
}
