use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The `/scale` handle of one role. The operator creates one per role whose actuator is
/// HPA or External; HorizontalPodAutoscalers and KEDA write `spec.replicas` through the
/// scale subresource and the operator adopts it as the role's desired instance count.
#[derive(CustomResource, JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "dlengine.io",
    version = "v1alpha1",
    kind = "InferenceRoleScaler",
    namespaced,
    derive = "PartialEq",
    status = "InferenceRoleScalerStatus",
    shortname = "irs",
    category = "dlengine",
    doc = "Scale subresource of one role of an InferenceDeployment (for HPA and KEDA)",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Deployment", type_ = "string", json_path = ".spec.deployment"),
    printcolumn(name = "Role", type_ = "string", json_path = ".spec.role"),
    printcolumn(name = "Desired", type_ = "integer", json_path = ".spec.replicas"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas")
)]
#[serde(rename_all = "camelCase")]
pub struct InferenceRoleScalerSpec {
    pub deployment: String,
    pub role: String,
    /// Desired instances of the role.
    #[schemars(range(min = 0))]
    pub replicas: i32,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct InferenceRoleScalerStatus {
    /// Instances that exist (any readiness).
    pub replicas: i32,
    pub ready_replicas: i32,
    /// Label selector of the role's pods, for per-pod metrics.
    pub selector: String,
}
