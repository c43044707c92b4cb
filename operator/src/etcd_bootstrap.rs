//! `dlengine-operator etcd-config`: the init step of the chart's bundled etcd members.
//!
//! Members keep their data in emptyDir (registrations are short leases that engines renew,
//! so nothing durable is lost, and no zone-bound volume pins a member to a zone). A member
//! that comes back without data must not bootstrap a second cluster: when the other members
//! answer, it is removed and re-added through them and joins as `existing`; only when no
//! member answers (first start of all three together) does it start a `new` cluster.
//! The result is an etcd `--config-file`, because the etcd image has no shell to decide this.

use std::path::{Path, PathBuf};
use std::time::Duration;

use etcd_client::Client;
use serde::Serialize;

use crate::registry::{etcd_connect_options, EtcdTls};

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("reading TLS material {path}: {source}")]
    Tls { path: String, source: std::io::Error },
    #[error("changing membership through {endpoint}: {message}")]
    Membership { endpoint: String, message: String },
    #[error("writing {path}: {source}")]
    Write { path: String, source: std::io::Error },
    #[error("serialising the etcd config: {0}")]
    Serialise(#[from] serde_norway::Error),
}

/// Where this member sits in the StatefulSet.
#[derive(Debug, Clone)]
pub struct MemberLayout {
    /// This pod's name, `<statefulset>-<ordinal>`.
    pub name: String,
    pub statefulset: String,
    pub headless_service: String,
    pub namespace: String,
    pub replicas: u32,
    pub data_dir: PathBuf,
    /// Directory with ca.crt, tls.crt, tls.key; None: plain HTTP.
    pub tls_dir: Option<PathBuf>,
}

impl MemberLayout {
    fn scheme(&self) -> &'static str {
        if self.tls_dir.is_some() { "https" } else { "http" }
    }

    fn host(&self, member: &str) -> String {
        format!("{member}.{}.{}.svc", self.headless_service, self.namespace)
    }

    pub fn peer_url(&self, member: &str) -> String {
        format!("{}://{}:2380", self.scheme(), self.host(member))
    }

    pub fn client_url(&self, member: &str) -> String {
        format!("{}://{}:2379", self.scheme(), self.host(member))
    }

    pub fn members(&self) -> Vec<String> {
        (0..self.replicas).map(|i| format!("{}-{i}", self.statefulset)).collect()
    }

    fn initial_cluster(&self) -> String {
        self.members().iter().map(|m| format!("{m}={}", self.peer_url(m))).collect::<Vec<_>>().join(",")
    }
}

#[derive(Debug, Serialize, PartialEq)]
pub struct TransportSecurity {
    #[serde(rename = "cert-file")]
    pub cert_file: String,
    #[serde(rename = "key-file")]
    pub key_file: String,
    #[serde(rename = "trusted-ca-file")]
    pub trusted_ca_file: String,
    #[serde(rename = "client-cert-auth")]
    pub client_cert_auth: bool,
}

/// The subset of etcd's config file this member needs.
#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct EtcdConfig {
    pub name: String,
    pub data_dir: String,
    pub listen_peer_urls: String,
    pub listen_client_urls: String,
    pub advertise_client_urls: String,
    pub initial_advertise_peer_urls: String,
    pub initial_cluster: String,
    pub initial_cluster_state: String,
    pub initial_cluster_token: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_transport_security: Option<TransportSecurity>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_transport_security: Option<TransportSecurity>,
}

/// The config for a member that starts a new cluster (`existing: None`) or joins one whose
/// membership, after this member was (re-)added, is `existing`.
pub fn config(layout: &MemberLayout, existing: Option<String>) -> EtcdConfig {
    let scheme = layout.scheme();
    let security = |client_cert_auth: bool| {
        layout.tls_dir.as_ref().map(|dir| TransportSecurity {
            cert_file: dir.join("tls.crt").display().to_string(),
            key_file: dir.join("tls.key").display().to_string(),
            trusted_ca_file: dir.join("ca.crt").display().to_string(),
            client_cert_auth,
        })
    };
    EtcdConfig {
        name: layout.name.clone(),
        data_dir: layout.data_dir.display().to_string(),
        listen_peer_urls: format!("{scheme}://0.0.0.0:2380"),
        listen_client_urls: format!("{scheme}://0.0.0.0:2379"),
        advertise_client_urls: layout.client_url(&layout.name),
        initial_advertise_peer_urls: layout.peer_url(&layout.name),
        initial_cluster_state: if existing.is_some() { "existing" } else { "new" }.into(),
        initial_cluster: existing.unwrap_or_else(|| layout.initial_cluster()),
        initial_cluster_token: format!("{}.{}", layout.statefulset, layout.namespace),
        // Engines authenticate with client certificates when they have them, but the CA is
        // what protects the registry; peers always authenticate each other.
        client_transport_security: security(false),
        peer_transport_security: security(true),
    }
}

/// Decides new-or-join, changes membership if joining, and writes the config file.
pub async fn bootstrap(layout: &MemberLayout, out: &Path) -> Result<EtcdConfig, BootstrapError> {
    let has_data = layout.data_dir.join("member").exists();
    let existing = if has_data { None } else { join_existing(layout).await? };
    let config = config(layout, existing);
    let text = serde_norway::to_string(&config)?;
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent).map_err(|source| BootstrapError::Write { path: parent.display().to_string(), source })?;
    }
    std::fs::write(out, text).map_err(|source| BootstrapError::Write { path: out.display().to_string(), source })?;
    Ok(config)
}

/// Re-adds this member through any other member that answers; returns the resulting
/// `initial-cluster`, or None when no cluster answers.
async fn join_existing(layout: &MemberLayout) -> Result<Option<String>, BootstrapError> {
    let tls = read_tls(layout)?;
    for peer in layout.members().into_iter().filter(|m| *m != layout.name) {
        let endpoint = layout.client_url(&peer);
        let options = etcd_connect_options(tls.as_ref()).with_connect_timeout(Duration::from_secs(3)).with_timeout(Duration::from_secs(5));
        let Ok(mut client) = Client::connect([endpoint.as_str()], Some(options)).await else { continue };
        if client.member_list().await.is_err() {
            continue;
        }
        return rejoin(&mut client, layout, &endpoint).await.map(Some);
    }
    Ok(None)
}

async fn rejoin(client: &mut Client, layout: &MemberLayout, endpoint: &str) -> Result<String, BootstrapError> {
    let failed = |e: etcd_client::Error| BootstrapError::Membership { endpoint: endpoint.into(), message: e.to_string() };
    let peer_url = layout.peer_url(&layout.name);
    let members = client.member_list().await.map_err(failed)?;
    for stale in members.members().iter().filter(|m| m.name() == layout.name || m.peer_urls().iter().any(|u| *u == peer_url)) {
        client.member_remove(stale.id()).await.map_err(failed)?;
    }
    let added = client.member_add([peer_url.as_str()], None).await.map_err(failed)?;
    let cluster = added
        .member_list()
        .iter()
        .filter_map(|m| {
            let name = if m.name().is_empty() { layout.name.as_str() } else { m.name() };
            m.peer_urls().first().map(|url| format!("{name}={url}"))
        })
        .collect::<Vec<_>>()
        .join(",");
    Ok(cluster)
}

fn read_tls(layout: &MemberLayout) -> Result<Option<EtcdTls>, BootstrapError> {
    let Some(dir) = &layout.tls_dir else { return Ok(None) };
    let read = |file: &str| {
        let path = dir.join(file);
        std::fs::read(&path).map_err(|source| BootstrapError::Tls { path: path.display().to_string(), source })
    };
    Ok(Some(EtcdTls { ca: read("ca.crt")?, client_cert: Some(read("tls.crt")?), client_key: Some(read("tls.key")?) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(name: &str, tls: bool) -> MemberLayout {
        MemberLayout {
            name: name.into(),
            statefulset: "reg-etcd".into(),
            headless_service: "reg-etcd".into(),
            namespace: "ops".into(),
            replicas: 3,
            data_dir: "/var/lib/etcd".into(),
            tls_dir: tls.then(|| PathBuf::from("/etc/etcd/tls")),
        }
    }

    #[test]
    fn a_first_start_bootstraps_all_members_as_a_new_cluster() {
        let c = config(&layout("reg-etcd-1", false), None);
        assert_eq!(c.initial_cluster_state, "new");
        assert_eq!(
            c.initial_cluster,
            "reg-etcd-0=http://reg-etcd-0.reg-etcd.ops.svc:2380,reg-etcd-1=http://reg-etcd-1.reg-etcd.ops.svc:2380,reg-etcd-2=http://reg-etcd-2.reg-etcd.ops.svc:2380"
        );
        assert_eq!(c.advertise_client_urls, "http://reg-etcd-1.reg-etcd.ops.svc:2379");
        assert!(c.peer_transport_security.is_none());
    }

    #[test]
    fn tls_secures_clients_and_authenticates_peers() {
        let c = config(&layout("reg-etcd-0", true), Some("x=y".into()));
        assert_eq!(c.initial_cluster_state, "existing");
        assert!(c.listen_client_urls.starts_with("https://"));
        assert!(c.peer_transport_security.as_ref().unwrap().client_cert_auth);
        assert_eq!(c.client_transport_security.as_ref().unwrap().trusted_ca_file, "/etc/etcd/tls/ca.crt");
        let yaml = serde_norway::to_string(&c).unwrap();
        assert!(yaml.contains("initial-cluster-state: existing") && yaml.contains("peer-transport-security:"), "{yaml}");
    }

    #[tokio::test]
    async fn with_nobody_answering_a_member_starts_new_and_writes_its_config() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = layout("reg-etcd-0", false);
        // Unresolvable peers: nobody answers.
        l.namespace = "invalid.".into();
        l.data_dir = dir.path().join("data");
        let out = dir.path().join("etcd.yaml");
        let c = bootstrap(&l, &out).await.unwrap();
        assert_eq!(c.initial_cluster_state, "new");
        assert!(std::fs::read_to_string(out).unwrap().contains("name: reg-etcd-0"));
    }
}
