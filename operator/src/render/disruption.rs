//! One PodDisruptionBudget per role, across revisions: voluntary evictions (node drains)
//! take one pod of a role at a time, so a model reload never hits all instances at once.

use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

pub fn role_budget(metadata: ObjectMeta, selector: std::collections::BTreeMap<String, String>) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata,
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector { match_labels: Some(selector), ..Default::default() }),
            // A crash-looping pod must not block node drains.
            unhealthy_pod_eviction_policy: Some("AlwaysAllow".into()),
            ..Default::default()
        }),
        status: None,
    }
}
