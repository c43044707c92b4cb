//! The one thing the operator does in etcd: when an `InferenceDeployment` is deleted, its
//! finalizer removes the registry prefix `/dlengine/<namespace>/<deployment>/`, so no
//! router keeps routing to engines of a deployment that no longer exists.
//!
//! Behind a trait so controller tests run against [`MemoryRegistry`].

mod etcd;
mod memory;

use std::future::Future;
use std::pin::Pin;

pub use etcd::{EtcdRegistry, EtcdTls};
pub(crate) use etcd::options as etcd_connect_options;
pub use memory::MemoryRegistry;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("connecting to etcd at {endpoints:?}: {message}")]
    Connect { endpoints: Vec<String>, message: String },
    #[error("deleting etcd prefix {prefix}: {message}")]
    Delete { prefix: String, message: String },
    #[error("reading etcd TLS secret {secret}: {message}")]
    Tls { secret: String, message: String },
}

/// Where one deployment's registrations live, and how to reach that etcd.
#[derive(Debug, Clone, PartialEq)]
pub struct RegistryTarget {
    pub endpoints: Vec<String>,
    pub tls: Option<EtcdTls>,
    pub namespace: String,
    pub deployment: String,
}

impl RegistryTarget {
    /// `/dlengine/<namespace>/<deployment>/`: the trailing slash keeps deployment `a` from
    /// matching deployment `ab`.
    pub fn prefix(&self) -> String {
        deployment_prefix(&self.namespace, &self.deployment)
    }
}

pub fn deployment_prefix(namespace: &str, deployment: &str) -> String {
    format!("/dlengine/{namespace}/{deployment}/")
}

pub type DeleteFuture<'a> = Pin<Box<dyn Future<Output = Result<u64, RegistryError>> + Send + 'a>>;

pub trait RegistryCleaner: Send + Sync {
    /// Deletes every key under the target's prefix; returns how many were deleted.
    fn delete_deployment<'a>(&'a self, target: &'a RegistryTarget) -> DeleteFuture<'a>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends_in_a_slash() {
        assert_eq!(deployment_prefix("ns", "llama"), "/dlengine/ns/llama/");
    }
}
