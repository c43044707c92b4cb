use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::{
    InferenceDeploymentStatus, ModelSpec, NetworkSpec, PodOverrides, RegistrySpec, RoleSpec, RolloutSpec,
};

/// One served model: its weights, the roles that serve it, and how they talk to each other.
///
/// The name is short (24 characters) because it is the prefix of every child object,
/// and StatefulSet pods must stay valid DNS labels with the revision appended.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "dlengine.io",
    version = "v1alpha1",
    kind = "InferenceDeployment",
    namespaced,
    derive = "PartialEq",
    status = "InferenceDeploymentStatus",
    shortname = "infd",
    category = "dlengine",
    doc = "A model served by dlengine router, prefill, decode, encode or aggregated roles",
    printcolumn(name = "Model", type_ = "string", json_path = ".spec.model.name"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Revision", type_ = "string", json_path = ".status.currentRevision"),
    printcolumn(name = "Endpoint", type_ = "string", json_path = ".status.endpoint", priority = "1"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("size(self.metadata.name) <= 24").message("metadata.name must be at most 24 characters: it prefixes every child object's name")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.roles.all(r, self.roles.exists_one(o, o.name == r.name))").message("role names must be unique"))]
#[x_kube(validation = Rule::new("self.roles.exists(r, r.kind != 'Router')").message("at least one role must serve the model (Aggregated, Prefill, Decode or Encode)"))]
#[x_kube(validation = Rule::new("self.roles.filter(r, r.kind == 'Router').size() <= 1").message("at most one Router role"))]
#[x_kube(validation = Rule::new("!self.roles.exists(r, r.kind == 'Prefill') || self.roles.exists(r, r.kind == 'Decode')").message("a Prefill role requires a Decode role"))]
#[x_kube(validation = Rule::new("!self.roles.exists(r, r.kind == 'Decode') || self.roles.exists(r, r.kind == 'Prefill')").message("a Decode role requires a Prefill role"))]
#[x_kube(validation = Rule::new("!self.roles.exists(r, r.kind == 'Prefill') || self.roles.exists(r, r.kind == 'Router')").message("disaggregated serving (Prefill and Decode) requires a Router role to split requests"))]
#[x_kube(validation = Rule::new("!self.roles.exists(r, r.kind == 'Encode') || self.roles.exists(r, r.kind == 'Router')").message("an Encode role requires a Router role"))]
#[x_kube(validation = Rule::new("self.roles.all(r, !has(r.autoscaling) || !has(r.autoscaling.followRole) || self.roles.exists(o, o.name == r.autoscaling.followRole.role && o.name != r.name && o.kind != 'Router'))").message("autoscaling.followRole.role must name another non-Router role of this deployment"))]
pub struct InferenceDeploymentSpec {
    /// The model every engine role serves.
    pub model: ModelSpec,
    /// Container image with the `dlengine` binary.
    #[schemars(length(max = 1024))]
    #[x_kube(validation = Rule::new("self != ''").message("image must not be empty"))]
    pub image: String,
    /// Kubernetes image pull policy (Always, IfNotPresent, Never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["Always", "IfNotPresent", "Never"]))]
    pub image_pull_policy: Option<String>,
    /// Pod settings shared by every role; a role's own `podTemplate` wins field by field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_template: Option<PodOverrides>,
    /// The processes that serve the model.
    #[schemars(length(min = 1, max = 8))]
    pub roles: Vec<RoleSpec>,
    /// KV-cache transport between prefill and decode, and how pods attach to RDMA networks.
    #[serde(default)]
    pub network: NetworkSpec,
    /// Where engines register (etcd).
    #[serde(default)]
    pub registry: RegistrySpec,
    /// How a new revision replaces the current one.
    #[serde(default)]
    pub rollout: RolloutSpec,
    /// Secret key whose value clients must send as `Authorization: Bearer ...`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_secret: Option<ApiKeySecret>,
    /// Most GPUs this deployment may use at once, all roles and revisions together;
    /// the autoscaler never scales past it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub gpu_budget: Option<i32>,
}

/// A key of a Secret in the deployment's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeySecret {
    pub name: String,
    #[serde(default = "default_api_key_key")]
    pub key: String,
}

fn default_api_key_key() -> String {
    "api-key".to_string()
}
