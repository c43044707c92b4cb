//! Who this engine process is in the registry: namespace, deployment, revision, role,
//! instance id and the URL others reach it at, from flags or the Kubernetes downward API
//! (the flags read the same environment variables), with defaults outside Kubernetes.

use std::net::IpAddr;

use dlengine_cli::RegistryArgs;

use crate::error::RegistryError;
use crate::key::{is_valid_segment, RegistryKey};
use crate::record::Role;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub namespace: String,
    pub deployment: String,
    pub revision: String,
    pub role: Role,
    pub instance_id: String,
    pub advertise_url: String,
}

impl Identity {
    /// `bind_host`/`port` are what the HTTP server actually bound (the port after `--port 0`
    /// is resolved). `pod_ip` is the downward API's `POD_IP`, if set.
    pub fn from_args(
        args: &RegistryArgs,
        role: Role,
        bind_host: &str,
        port: u16,
        pod_ip: Option<&str>,
    ) -> Result<Identity, RegistryError> {
        let instance_id = args.instance_id.clone().unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let advertise_url = match &args.advertise_url {
            Some(url) => url.trim_end_matches('/').to_string(),
            None => default_advertise_url(bind_host, port, pod_ip),
        };
        let identity = Identity {
            namespace: args.namespace.clone(),
            deployment: args.deployment.clone(),
            revision: args.revision.clone(),
            role,
            instance_id,
            advertise_url,
        };
        identity.validate()?;
        Ok(identity)
    }

    fn validate(&self) -> Result<(), RegistryError> {
        for (what, value) in [
            ("namespace", &self.namespace),
            ("deployment", &self.deployment),
            ("revision", &self.revision),
            ("instance id", &self.instance_id),
        ] {
            if !is_valid_segment(value) {
                return Err(RegistryError::InvalidSegment { what, value: value.clone() });
            }
        }
        Ok(())
    }

    pub fn key(&self) -> RegistryKey {
        RegistryKey {
            namespace: self.namespace.clone(),
            deployment: self.deployment.clone(),
            revision: self.revision.clone(),
            role: self.role,
            instance_id: self.instance_id.clone(),
        }
    }
}

/// A concrete bind address is reachable as is; behind a wildcard bind, the pod IP (in
/// Kubernetes) or else the host name is what peers can reach.
fn default_advertise_url(bind_host: &str, port: u16, pod_ip: Option<&str>) -> String {
    let host = match bind_host.parse::<IpAddr>() {
        Ok(ip) if !ip.is_unspecified() => bracket_v6(ip),
        Ok(_) => match pod_ip.filter(|ip| !ip.is_empty()) {
            Some(ip) => ip.parse::<IpAddr>().map(bracket_v6).unwrap_or_else(|_| ip.to_string()),
            None => gethostname::gethostname().to_string_lossy().into_owned(),
        },
        Err(_) => bind_host.to_string(),
    };
    format!("http://{host}:{port}")
}

fn bracket_v6(ip: IpAddr) -> String {
    match ip {
        IpAddr::V6(v6) => format!("[{v6}]"),
        IpAddr::V4(v4) => v4.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn registry_args(extra: &[&str]) -> RegistryArgs {
        #[derive(Parser)]
        struct Wrapper {
            #[command(flatten)]
            registry: RegistryArgs,
        }
        let mut argv = vec!["x", "--etcd-endpoints", "http://127.0.0.1:2379"];
        argv.extend_from_slice(extra);
        Wrapper::parse_from(argv).registry
    }

    #[test]
    fn concrete_bind_address_is_advertised() {
        let id = Identity::from_args(&registry_args(&[]), Role::Aggregated, "127.0.0.1", 8001, Some("10.0.0.9")).unwrap();
        assert_eq!(id.advertise_url, "http://127.0.0.1:8001");
        assert!(!id.instance_id.is_empty());
    }

    #[test]
    fn wildcard_bind_uses_the_pod_ip() {
        let id = Identity::from_args(&registry_args(&[]), Role::Prefill, "0.0.0.0", 80, Some("10.0.0.9")).unwrap();
        assert_eq!(id.advertise_url, "http://10.0.0.9:80");
        assert_eq!(id.key().role, Role::Prefill);
    }

    #[test]
    fn explicit_flags_win() {
        let args = registry_args(&["--instance-id", "uid-1", "--advertise-url", "http://svc:9/", "--deployment", "d1"]);
        let id = Identity::from_args(&args, Role::Decode, "0.0.0.0", 80, None).unwrap();
        assert_eq!(id.advertise_url, "http://svc:9");
        assert_eq!(id.key().render(), "/dlengine/default/d1/0/decode/uid-1");
    }

    #[test]
    fn a_slash_in_a_segment_is_refused() {
        let args = registry_args(&["--deployment", "a/b"]);
        assert!(Identity::from_args(&args, Role::Decode, "127.0.0.1", 80, None).is_err());
    }
}
