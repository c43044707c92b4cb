//! Labels and annotations the operator puts on what it creates.

use std::collections::BTreeMap;

use crate::crd::{RoleKind, RoleSpec};

pub const NAME: &str = "app.kubernetes.io/name";
pub const INSTANCE: &str = "app.kubernetes.io/instance";
pub const COMPONENT: &str = "app.kubernetes.io/component";
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const DEPLOYMENT: &str = "dlengine.io/deployment";
pub const ROLE: &str = "dlengine.io/role";
pub const REVISION: &str = "dlengine.io/revision";
/// Pods per instance, on multi-node workloads (status groups pods into instances with it).
pub const NODES_PER_INSTANCE: &str = "dlengine.io/nodes-per-instance";
/// Set by the StatefulSet controller on every pod since Kubernetes 1.28.
pub const POD_INDEX: &str = "apps.kubernetes.io/pod-index";
pub const MULTUS_NETWORKS: &str = "k8s.v1.cni.cncf.io/networks";
pub const MANAGER: &str = "dlengine-operator";

pub fn component(kind: RoleKind) -> &'static str {
    match kind {
        RoleKind::Router => "router",
        RoleKind::Prefill => "prefill",
        RoleKind::Decode => "decode",
        RoleKind::Encode => "encode",
        RoleKind::Aggregated => "aggregated",
    }
}

/// Labels every child of a deployment has.
pub fn deployment_labels(deployment: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (NAME.to_string(), "dlengine".to_string()),
        (INSTANCE.to_string(), deployment.to_string()),
        (MANAGED_BY.to_string(), MANAGER.to_string()),
        (DEPLOYMENT.to_string(), deployment.to_string()),
    ])
}

/// Selector of a role's pods across revisions.
pub fn role_selector(deployment: &str, role: &RoleSpec) -> BTreeMap<String, String> {
    BTreeMap::from([(DEPLOYMENT.to_string(), deployment.to_string()), (ROLE.to_string(), role.name.clone())])
}

/// Selector of one workload's pods: the role's, narrowed to a revision for engines.
pub fn workload_selector(deployment: &str, role: &RoleSpec, revision: &str) -> BTreeMap<String, String> {
    let mut selector = role_selector(deployment, role);
    if role.kind.runs_engine() {
        selector.insert(REVISION.to_string(), revision.to_string());
    }
    selector
}

/// Labels of a workload and its pods.
pub fn workload_labels(deployment: &str, role: &RoleSpec, revision: &str) -> BTreeMap<String, String> {
    let mut labels = deployment_labels(deployment);
    labels.extend(workload_selector(deployment, role, revision));
    labels.insert(COMPONENT.to_string(), component(role.kind).to_string());
    labels
}

/// `key=value,...` form of a selector, for list calls and the scale subresource.
pub fn selector_string(selector: &BTreeMap<String, String>) -> String {
    selector.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}
