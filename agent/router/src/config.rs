//! The router's configuration, built once from the command line.

use std::path::Path;
use std::time::Duration;

use dlengine_cli::{Policy, RouterArgs};
use dlengine_registry::EtcdTls;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading API key file {path}: {source}")]
    KeyFile { path: String, source: std::io::Error },
    #[error("API key file {path} holds no keys")]
    EmptyKeyFile { path: String },
    #[error("--rate-limit-rps must be a finite number >= 0, got {0}")]
    RateLimit(f64),
    #[error("--etcd-endpoints is empty")]
    NoEtcd,
    #[error(transparent)]
    EtcdTls(#[from] dlengine_registry::RegistryError),
}

#[derive(Debug, Clone)]
pub struct RouterConfig {
    pub host: String,
    pub port: u16,
    pub etcd_endpoints: Vec<String>,
    pub etcd_tls: Option<EtcdTls>,
    pub namespace: String,
    pub deployment: Option<String>,
    pub policy: Policy,
    pub session_header: String,
    /// Empty: no authentication.
    pub api_keys: Vec<String>,
    /// 0: unlimited.
    pub rate_limit_rps: f64,
    pub max_request_body_bytes: usize,
    pub max_retries: usize,
    pub request_timeout: Duration,
    pub idle_timeout: Duration,
    pub drain_timeout: Duration,
}

impl RouterConfig {
    pub fn from_args(args: &RouterArgs) -> Result<RouterConfig, ConfigError> {
        let etcd_endpoints: Vec<String> = args.etcd_endpoints.iter().filter(|e| !e.trim().is_empty()).cloned().collect();
        if etcd_endpoints.is_empty() {
            return Err(ConfigError::NoEtcd);
        }
        if !args.rate_limit_rps.is_finite() || args.rate_limit_rps < 0.0 {
            return Err(ConfigError::RateLimit(args.rate_limit_rps));
        }
        let mut api_keys: Vec<String> = args.api_key.iter().filter(|k| !k.is_empty()).cloned().collect();
        if let Some(path) = &args.api_key_file {
            api_keys.extend(read_key_file(path)?);
        }
        Ok(RouterConfig {
            host: args.host.clone(),
            port: args.port,
            etcd_tls: EtcdTls::from_args(&args.etcd_tls, &etcd_endpoints)?,
            etcd_endpoints,
            namespace: args.namespace.clone(),
            deployment: args.deployment.clone(),
            policy: args.policy,
            session_header: args.session_header.to_ascii_lowercase(),
            api_keys,
            rate_limit_rps: args.rate_limit_rps,
            max_request_body_bytes: args.max_request_body_bytes,
            max_retries: args.max_retries,
            request_timeout: Duration::from_secs(args.request_timeout_secs.max(1)),
            idle_timeout: Duration::from_secs(args.idle_timeout_secs.max(1)),
            drain_timeout: Duration::from_secs(args.drain_timeout_secs),
        })
    }
}

/// One key per line; blank lines and `#` comments are skipped. A file with no key at all is
/// an error rather than a silently open router.
fn read_key_file(path: &Path) -> Result<Vec<String>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::KeyFile { path: path.display().to_string(), source })?;
    let keys: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(str::to_string)
        .collect();
    if keys.is_empty() {
        return Err(ConfigError::EmptyKeyFile { path: path.display().to_string() });
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use dlengine_cli::{Cli, Command};

    fn parse(extra: &[&str]) -> RouterArgs {
        parse_with_etcd("http://127.0.0.1:2379", extra)
    }

    fn parse_with_etcd(endpoint: &str, extra: &[&str]) -> RouterArgs {
        let mut argv = vec!["dlengine", "router", "--etcd-endpoints", endpoint];
        argv.extend_from_slice(extra);
        match Cli::parse_from(argv).command {
            Command::Router(args) => args,
            _ => unreachable!(),
        }
    }

    #[test]
    fn keys_come_from_the_flag_and_the_file() {
        let path = std::env::temp_dir().join(format!("router-keys-{}", std::process::id()));
        std::fs::write(&path, "# keys\nk2\n\n  k3  \n").unwrap();
        let config = RouterConfig::from_args(&parse(&["--api-key", "k1", "--api-key-file", path.to_str().unwrap()])).unwrap();
        assert_eq!(config.api_keys, vec!["k1", "k2", "k3"]);
        std::fs::write(&path, "# nothing\n").unwrap();
        assert!(RouterConfig::from_args(&parse(&["--api-key-file", path.to_str().unwrap()])).is_err());
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn etcd_tls_files_must_match_the_endpoints_scheme() {
        let ca = std::env::temp_dir().join(format!("router-ca-{}.crt", std::process::id()));
        std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\n").unwrap();
        let err = RouterConfig::from_args(&parse(&["--etcd-ca-file", ca.to_str().unwrap()])).unwrap_err();
        assert!(err.to_string().contains("must be https://"), "{err}");
        let https = parse_with_etcd("https://etcd:2379", &["--etcd-ca-file", ca.to_str().unwrap()]);
        assert!(RouterConfig::from_args(&https).unwrap().etcd_tls.is_some());
        let _ = std::fs::remove_file(ca);
    }

    #[test]
    fn negative_rate_is_refused() {
        assert!(RouterConfig::from_args(&parse(&["--rate-limit-rps=-1"])).is_err());
    }
}
