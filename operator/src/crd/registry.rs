use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// The etcd cluster engines register in. Empty: the operator's default (the chart's
/// bundled etcd, passed to the operator as `--default-etcd-endpoints`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.tlsSecret) || self.endpoints.all(e, e.startsWith('https://'))").message("registry.tlsSecret needs https:// endpoints"))]
pub struct RegistrySpec {
    /// etcd client URLs, e.g. `https://etcd-0.etcd:2379`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(max = 512)))]
    #[x_kube(validation = Rule::new("self.all(e, e.startsWith('http://') || e.startsWith('https://'))").message("registry.endpoints must be http:// or https:// URLs"))]
    pub endpoints: Vec<String>,
    /// Secret in the deployment's namespace with `ca.crt`, and `tls.crt`/`tls.key` for
    /// client authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_secret: Option<String>,
}
