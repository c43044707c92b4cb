//! Identity of the pods of a multi-node instance. A StatefulSet of `instances x nodes` pods
//! with Parallel pod management: pod index i belongs to instance i / nodes with rank
//! i % nodes, and rank 0 is reachable at `<workload>-<i - rank>.<workload>` (headless Service).
//!
//! These variables are the operator's half of a contract the agent does not read yet: the
//! `dlengine` CLI has no multi-node flags (see docs/operator.md).

use k8s_openapi::api::core::v1::{EnvVar, EnvVarSource, ObjectFieldSelector};

use super::labels::POD_INDEX;
use super::pod::value_env;
use super::InstanceShape;

pub const NODES_PER_INSTANCE_ENV: &str = "DLENGINE_NODES_PER_INSTANCE";
pub const POD_INDEX_ENV: &str = "DLENGINE_POD_INDEX";
pub const HEADLESS_SERVICE_ENV: &str = "DLENGINE_HEADLESS_SERVICE";

pub fn environment(shape: &InstanceShape, workload: &str) -> Vec<EnvVar> {
    if shape.nodes <= 1 {
        return Vec::new();
    }
    vec![
        value_env(NODES_PER_INSTANCE_ENV, &shape.nodes.to_string()),
        value_env(HEADLESS_SERVICE_ENV, workload),
        EnvVar {
            name: POD_INDEX_ENV.into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector { field_path: format!("metadata.labels['{POD_INDEX}']"), api_version: None }),
                ..Default::default()
            }),
            ..Default::default()
        },
    ]
}
