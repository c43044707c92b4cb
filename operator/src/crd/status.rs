use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::RoleKind;

/// What the operator observed. `Ready` is True only when the update revision is the
/// current one and every role has all its desired instances ready.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct InferenceDeploymentStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Revision whose engines serve traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_revision: Option<String>,
    /// Revision being rolled out (equal to current when none is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_revision: Option<String>,
    /// OpenAI-compatible base URL inside the cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<RoleStatus>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RoleStatus {
    pub name: String,
    pub kind: RoleKind,
    /// Instances wanted now (spec, scaler or autoscaler).
    pub desired: i32,
    /// Instances of any revision whose pods are all ready.
    pub ready: i32,
    /// Instances of the update revision whose pods are all ready.
    pub updated: i32,
    /// Instances created but not yet ready (scheduling, pulling, loading).
    pub pending: i32,
    pub nodes_per_instance: i32,
    pub gpus_per_instance: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scaling: Option<ScalingDecision>,
}

/// The autoscaler's latest decision for a role and why it was taken.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ScalingDecision {
    pub from: i32,
    pub to: i32,
    /// CamelCase reason, e.g. `QueueDepthHigh`, `HeldPendingInstances`.
    pub reason: String,
    pub message: String,
    pub time: Time,
}
