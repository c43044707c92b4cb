//! The workload of one role at one revision: a Deployment when an instance is one pod, a
//! StatefulSet (with a headless Service) when an instance spans nodes.

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment, StatefulSet, StatefulSetSpec,
};
use k8s_openapi::api::core::v1::{PodTemplateSpec, Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{ChildObject, ENGINE_PORT};

/// What differs between the workloads of a deployment.
pub struct WorkloadInputs {
    pub metadata: ObjectMeta,
    pub selector: std::collections::BTreeMap<String, String>,
    pub template: PodTemplateSpec,
    pub instances: i32,
    pub nodes: i32,
    /// Seconds the Deployment controller waits before it reports no progress.
    pub progress_deadline_seconds: i32,
}

pub fn workload_objects(input: WorkloadInputs) -> Vec<ChildObject> {
    if input.nodes > 1 {
        let headless = headless_service(&input);
        vec![ChildObject::StatefulSet(stateful_set(input)), ChildObject::Service(headless)]
    } else {
        vec![ChildObject::Deployment(deployment(input))]
    }
}

fn deployment(input: WorkloadInputs) -> Deployment {
    Deployment {
        metadata: input.metadata,
        spec: Some(DeploymentSpec {
            replicas: Some(input.instances),
            selector: LabelSelector { match_labels: Some(input.selector), ..Default::default() },
            template: input.template,
            // Engine templates never change within a revision; this governs the router, which
            // must keep serving while it rolls.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::String("25%".into())),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            revision_history_limit: Some(2),
            progress_deadline_seconds: Some(input.progress_deadline_seconds),
            ..Default::default()
        }),
        status: None,
    }
}

fn stateful_set(input: WorkloadInputs) -> StatefulSet {
    let service_name = input.metadata.name.clone();
    StatefulSet {
        metadata: input.metadata,
        spec: Some(StatefulSetSpec {
            replicas: Some(input.instances * input.nodes),
            selector: LabelSelector { match_labels: Some(input.selector), ..Default::default() },
            service_name,
            template: input.template,
            // All pods of an instance start together; ordered start would serialise model loads.
            pod_management_policy: Some("Parallel".into()),
            revision_history_limit: Some(2),
            ..Default::default()
        }),
        status: None,
    }
}

/// Stable DNS names for the pods of multi-node instances; published before they are ready
/// because the ranks of an instance must find each other while loading.
fn headless_service(input: &WorkloadInputs) -> Service {
    Service {
        metadata: input.metadata.clone(),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(input.selector.clone()),
            publish_not_ready_addresses: Some(true),
            ports: Some(vec![ServicePort { name: Some("http".into()), port: ENGINE_PORT, target_port: Some(IntOrString::String("http".into())), ..Default::default() }]),
            ..Default::default()
        }),
        status: None,
    }
}
