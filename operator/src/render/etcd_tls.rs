//! Where engines find the etcd client certificates of `spec.registry.tlsSecret`: the
//! environment variables the `dlengine` CLI reads for `--etcd-ca-file`,
//! `--etcd-cert-file` and `--etcd-key-file`.

use dlengine_cli::env as agent_env;
use k8s_openapi::api::core::v1::EnvVar;

use super::pod::value_env;
use super::ETCD_TLS_MOUNT;

pub const CA_ENV: &str = agent_env::ETCD_CA_FILE;
pub const CERT_ENV: &str = agent_env::ETCD_CERT_FILE;
pub const KEY_ENV: &str = agent_env::ETCD_KEY_FILE;

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
