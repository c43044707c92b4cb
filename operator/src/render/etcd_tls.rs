//! Where engines find the etcd client certificates of `spec.registry.tlsSecret`.
//!
//! Like the multi-node variables, these are a proposal the agent must adopt: the `dlengine`
//! CLI has no etcd TLS flags yet (see docs/operator.md).

use k8s_openapi::api::core::v1::EnvVar;

use super::pod::value_env;
use super::ETCD_TLS_MOUNT;

pub const CA_ENV: &str = "DLENGINE_ETCD_CA_FILE";
pub const CERT_ENV: &str = "DLENGINE_ETCD_CERT_FILE";
pub const KEY_ENV: &str = "DLENGINE_ETCD_KEY_FILE";

pub fn environment(tls_secret: Option<&str>) -> Vec<EnvVar> {
    if tls_secret.is_none() {
        return Vec::new();
    }
    vec![
        value_env(CA_ENV, &format!("{ETCD_TLS_MOUNT}/ca.crt")),
        value_env(CERT_ENV, &format!("{ETCD_TLS_MOUNT}/tls.crt")),
        value_env(KEY_ENV, &format!("{ETCD_TLS_MOUNT}/tls.key")),
    ]
}
