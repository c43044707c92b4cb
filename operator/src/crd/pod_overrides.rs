use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, LocalObjectReference, Toleration, TopologySpreadConstraint};
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// Pod settings a user may set for all roles (`spec.podTemplate`) or one role
/// (`roles[].podTemplate`). Deliberately a short list: the operator owns containers,
/// probes, volumes and security context so that the engine contract cannot be broken.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PodOverrides {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topology_spread_constraints: Vec<TopologySpreadConstraint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_class_name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<LocalObjectReference>,
    /// Seconds a pod gets between SIGTERM and SIGKILL (engines drain in-flight requests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub termination_grace_period_seconds: Option<i64>,
}

impl PodOverrides {
    /// `self` with every field `role` sets replaced by the role's value; maps merge key by key.
    pub fn overlaid_with(&self, role: Option<&PodOverrides>) -> PodOverrides {
        let Some(role) = role else { return self.clone() };
        let mut merged = self.clone();
        merged.labels.extend(role.labels.clone());
        merged.annotations.extend(role.annotations.clone());
        merged.node_selector.extend(role.node_selector.clone());
        if !role.tolerations.is_empty() {
            merged.tolerations = role.tolerations.clone();
        }
        if !role.topology_spread_constraints.is_empty() {
            merged.topology_spread_constraints = role.topology_spread_constraints.clone();
        }
        if !role.image_pull_secrets.is_empty() {
            merged.image_pull_secrets = role.image_pull_secrets.clone();
        }
        override_option(&mut merged.affinity, &role.affinity);
        override_option(&mut merged.service_account_name, &role.service_account_name);
        override_option(&mut merged.priority_class_name, &role.priority_class_name);
        override_option(&mut merged.scheduler_name, &role.scheduler_name);
        override_option(&mut merged.runtime_class_name, &role.runtime_class_name);
        override_option(&mut merged.termination_grace_period_seconds, &role.termination_grace_period_seconds);
        merged
    }
}

fn override_option<T: Clone>(base: &mut Option<T>, over: &Option<T>) {
    if over.is_some() {
        base.clone_from(over);
    }
}
