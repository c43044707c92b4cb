//! Names of child objects. Engine workloads carry the revision because a Deployment's
//! selector is immutable and old and new revisions run side by side during a rollout.

use crate::crd::RoleSpec;

/// Deployment or StatefulSet (and its headless Service and ConfigMap) of an engine role
/// at one revision, or of the router (which has no revision).
pub fn workload(deployment: &str, role: &RoleSpec, revision: &str) -> String {
    if role.kind.runs_engine() {
        format!("{deployment}-{}-{revision}", role.name)
    } else {
        format!("{deployment}-{}", role.name)
    }
}

/// Objects that span revisions: PodDisruptionBudget, HPA, InferenceRoleScaler.
pub fn role_wide(deployment: &str, role: &RoleSpec) -> String {
    format!("{deployment}-{}", role.name)
}

/// The ClusterIP Service clients use: the OpenAI endpoint.
pub fn endpoint_service(deployment: &str) -> String {
    deployment.to_string()
}
