use k8s_openapi::api::autoscaling::v2::MetricSpec;
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Autoscaling of one role, by the operator's own policy or by an HPA/KEDA through the
/// role's `InferenceRoleScaler` (which has a `/scale` subresource).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas").message("autoscaling.minReplicas must be <= maxReplicas"))]
#[x_kube(validation = Rule::new("self.actuator != 'Operator' || has(self.targets) || has(self.followRole)").message("the Operator actuator needs targets or followRole"))]
#[x_kube(validation = Rule::new("self.actuator != 'HPA' || (has(self.hpa) && size(self.hpa.metrics) > 0)").message("the HPA actuator needs hpa.metrics"))]
#[x_kube(validation = Rule::new("self.actuator == 'Operator' || !has(self.followRole)").message("followRole works only with the Operator actuator"))]
pub struct AutoscalingSpec {
    #[serde(default)]
    pub actuator: Actuator,
    #[schemars(range(min = 0))]
    pub min_replicas: i32,
    #[schemars(range(min = 1))]
    pub max_replicas: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub targets: Option<MetricTargets>,
    /// Keep this role at a ratio of another role's instances (prefill:decode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub follow_role: Option<FollowRole>,
    #[serde(default)]
    pub behavior: ScalingBehavior,
    /// Metrics of the rendered HorizontalPodAutoscaler (actuator HPA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hpa: Option<HpaSpec>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Actuator {
    /// The operator's policy over the engines' `/metrics`.
    #[default]
    Operator,
    /// A HorizontalPodAutoscaler the operator renders, targeting the role's scaler.
    #[serde(rename = "HPA")]
    Hpa,
    /// Something else (KEDA, a person) writes the role scaler's `/scale`.
    External,
}

/// Per-instance targets; the role scales so that the worst ratio of observed to target is 1.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.queueDepth) || has(self.kvCacheUtilization) || has(self.ttftP95Seconds) || has(self.itlP95Seconds)").message("autoscaling.targets needs at least one target"))]
pub struct MetricTargets {
    /// Waiting requests per instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub queue_depth: Option<f64>,
    /// Fraction of KV-cache blocks in use (0-1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.01, max = 1.0))]
    pub kv_cache_utilization: Option<f64>,
    /// SLO on the 95th percentile time to first token, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.001))]
    pub ttft_p95_seconds: Option<f64>,
    /// SLO on the 95th percentile inter-token latency, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0001))]
    pub itl_p95_seconds: Option<f64>,
}

/// `replicas = ceil(ratio x replicas of role)`, changed only when off by more than `tolerance`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FollowRole {
    #[schemars(length(min = 1, max = 15))]
    pub role: String,
    #[schemars(range(min = 0.01, max = 100.0))]
    pub ratio: f64,
    #[serde(default = "default_tolerance")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub tolerance: f64,
}

/// Windows over which recommendations are smoothed, so flapping metrics do not flap pods.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ScalingBehavior {
    /// Scale up to the lowest recommendation of this window (default 0: at once).
    #[serde(default)]
    #[schemars(range(min = 0, max = 3600))]
    pub scale_up_stabilization_seconds: i32,
    /// Scale down to the highest recommendation of this window (default 300).
    #[serde(default = "default_scale_down_window")]
    #[schemars(range(min = 0, max = 3600))]
    pub scale_down_stabilization_seconds: i32,
    /// Relative change within which no scaling happens (default 0.1).
    #[serde(default = "default_tolerance")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub tolerance: f64,
    /// Most instances added in one decision (default 4: GPUs are scarce and slow to load).
    #[serde(default = "default_max_step")]
    #[schemars(range(min = 1))]
    pub max_scale_up_step: i32,
}

impl Default for ScalingBehavior {
    fn default() -> Self {
        ScalingBehavior {
            scale_up_stabilization_seconds: 0,
            scale_down_stabilization_seconds: default_scale_down_window(),
            tolerance: default_tolerance(),
            max_scale_up_step: default_max_step(),
        }
    }
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HpaSpec {
    pub metrics: Vec<MetricSpec>,
}

fn default_tolerance() -> f64 {
    0.1
}

fn default_scale_down_window() -> i32 {
    300
}

fn default_max_step() -> i32 {
    4
}
