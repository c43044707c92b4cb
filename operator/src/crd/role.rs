use k8s_openapi::api::core::v1::{EnvVar, ResourceRequirements};
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{AutoscalingSpec, Parallelism, PodOverrides};

/// One group of identical processes: the router, or engines of one mode.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.kind != 'Router' || !has(self.parallelism)").message("a Router role has no parallelism (it runs no model)"))]
#[x_kube(validation = Rule::new("self.kind != 'Router' || !has(self.autoscaling) || !has(self.autoscaling.followRole)").message("a Router role cannot follow another role"))]
pub struct RoleSpec {
    /// DNS label, at most 15 characters (it is part of child object names).
    #[schemars(length(min = 1, max = 15), regex(pattern = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"))]
    pub name: String,
    pub kind: RoleKind,
    /// Instances (an instance spans `nodes per instance` pods). Ignored while an
    /// autoscaler drives the role, except as its starting point.
    #[serde(default = "one")]
    #[schemars(range(min = 0, max = 10000))]
    pub replicas: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallelism: Option<Parallelism>,
    /// Container resources. GPUs are added from parallelism when not given here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Extra `dlengine serve`/`router` flags, appended after the ones the operator renders.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 512)))]
    #[x_kube(validation = Rule::new("self.all(a, !a.startsWith('--port') && !a.startsWith('--mode') && !a.startsWith('--etcd-endpoints') && !a.startsWith('--tensor-parallel-size') && !a.startsWith('--kv-transport'))").message("engineArgs must not set flags the operator owns (--port, --mode, --etcd-endpoints, --tensor-parallel-size, --kv-transport)"))]
    pub engine_args: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_template: Option<PodOverrides>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probes: Option<ProbeBudget>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RoleKind {
    Router,
    Prefill,
    Decode,
    Encode,
    Aggregated,
}

impl RoleKind {
    /// Roles that load the model and register in etcd under a revision.
    pub fn runs_engine(self) -> bool {
        !matches!(self, RoleKind::Router)
    }

    /// Roles that send or receive KV cache between pods.
    pub fn moves_kv(self) -> bool {
        matches!(self, RoleKind::Prefill | RoleKind::Decode)
    }
}

/// Time budgets of the health probes. Loading a large model takes minutes, so the
/// startup probe's budget is sized for it and liveness only starts after it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProbeBudget {
    /// Seconds an engine may take from start to a healthy `/health` (default 1800).
    #[serde(default = "default_startup_seconds")]
    #[schemars(range(min = 10, max = 86400))]
    pub startup_seconds: i32,
}

pub const DEFAULT_STARTUP_SECONDS: i32 = 1800;

fn default_startup_seconds() -> i32 {
    DEFAULT_STARTUP_SECONDS
}

fn one() -> i32 {
    1
}
