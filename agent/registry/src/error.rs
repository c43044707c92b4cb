use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("no etcd endpoints given")]
    NoEndpoints,
    #[error("etcd TLS: {0}")]
    Tls(String),
    #[error("etcd TLS: reading {path}: {source}")]
    TlsFile { path: PathBuf, source: std::io::Error },
    #[error("invalid registry identity: {what} {value:?} must be a non-empty name without '/'")]
    InvalidSegment { what: &'static str, value: String },
    #[error("connecting to etcd at {endpoints:?}: {source}")]
    Connect { endpoints: Vec<String>, source: etcd_client::Error },
    #[error("etcd {operation} on {key}: {source}")]
    Etcd { operation: &'static str, key: String, source: etcd_client::Error },
    #[error("etcd {operation} on {key} got no answer within {after:?}")]
    Timeout { operation: &'static str, key: String, after: Duration },
    #[error("lease {lease_id:x} expired or was revoked")]
    LeaseLost { lease_id: i64 },
    #[error("lease keep-alive for {key}: {reason}")]
    KeepAlive { key: String, reason: String },
    #[error("watch on {prefix} ended: {reason}")]
    WatchEnded { prefix: String, reason: String },
}
