//! What exists now: the deployment's workloads (by revision), their readiness counted in
//! whole instances, its scale handles, and every other child for stale-object cleanup.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::NamespaceResourceScope;
use kube::api::{Api, ListParams, ObjectMeta};
use kube::Resource;
use serde::de::DeserializeOwned;

use crate::crd::{InferenceRoleScaler, InferenceRoleScalerStatus};
use crate::render::labels;

use super::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkloadKind {
    Deployment,
    StatefulSet,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ObservedWorkload {
    pub name: String,
    pub kind: WorkloadKind,
    pub role: String,
    pub revision: Option<String>,
    pub nodes: i32,
    /// Instances the workload asks for.
    pub instances: i32,
    /// Instances whose pods are all ready.
    pub ready: i32,
    /// Why the workload is stuck, when its controller says so.
    pub stuck: Option<String>,
}

impl ObservedWorkload {
    pub fn pending(&self) -> i32 {
        (self.instances - self.ready).max(0)
    }
}

/// A child found by label, for deletion when no longer desired.
#[derive(Debug, Clone, PartialEq)]
pub struct ObservedChild {
    pub kind: &'static str,
    pub name: String,
    pub revision: Option<String>,
    pub role: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct Observed {
    pub workloads: Vec<ObservedWorkload>,
    /// `spec.replicas` of each role's scale handle, by role name.
    pub scalers: BTreeMap<String, i32>,
    /// Status of each role's scale handle, by role name (to write it only when it changes).
    pub scaler_status: BTreeMap<String, Option<InferenceRoleScalerStatus>>,
    pub children: Vec<ObservedChild>,
}

pub async fn observe(client: &kube::Client, namespace: &str, deployment: &str, owner_uid: &str) -> Result<Observed, Error> {
    let selector = format!("{}={deployment}", labels::DEPLOYMENT);
    let mut observed = Observed::default();
    for d in owned::<Deployment>(client, namespace, &selector, owner_uid).await? {
        observed.workloads.push(from_deployment(&d));
    }
    for s in owned::<StatefulSet>(client, namespace, &selector, owner_uid).await? {
        observed.workloads.push(from_stateful_set(client, namespace, &s).await?);
    }
    for scaler in owned::<InferenceRoleScaler>(client, namespace, &selector, owner_uid).await? {
        observed.scalers.insert(scaler.spec.role.clone(), scaler.spec.replicas);
        observed.scaler_status.insert(scaler.spec.role.clone(), scaler.status.clone());
        observed.children.push(child("InferenceRoleScaler", &scaler.metadata));
    }
    for w in &observed.workloads {
        let kind = if w.kind == WorkloadKind::Deployment { "Deployment" } else { "StatefulSet" };
        observed.children.push(ObservedChild { kind, name: w.name.clone(), revision: w.revision.clone(), role: Some(w.role.clone()) });
    }
    collect::<Service>(client, namespace, &selector, owner_uid, "Service", &mut observed.children).await?;
    collect::<ConfigMap>(client, namespace, &selector, owner_uid, "ConfigMap", &mut observed.children).await?;
    collect::<PodDisruptionBudget>(client, namespace, &selector, owner_uid, "PodDisruptionBudget", &mut observed.children).await?;
    collect::<HorizontalPodAutoscaler>(client, namespace, &selector, owner_uid, "HorizontalPodAutoscaler", &mut observed.children).await?;
    Ok(observed)
}

/// Objects with the deployment's label that it also owns: a user's object that merely
/// carries the label is never touched.
async fn owned<K>(client: &kube::Client, namespace: &str, selector: &str, owner_uid: &str) -> Result<Vec<K>, Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope> + Clone + DeserializeOwned + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    let list = api.list(&ListParams::default().labels(selector)).await?;
    Ok(list.items.into_iter().filter(|o| is_owned_by(o.meta(), owner_uid)).collect())
}

async fn collect<K>(client: &kube::Client, namespace: &str, selector: &str, owner_uid: &str, kind: &'static str, into: &mut Vec<ObservedChild>) -> Result<(), Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope> + Clone + DeserializeOwned + std::fmt::Debug,
{
    for object in owned::<K>(client, namespace, selector, owner_uid).await? {
        into.push(child(kind, object.meta()));
    }
    Ok(())
}

fn child(kind: &'static str, meta: &ObjectMeta) -> ObservedChild {
    ObservedChild { kind, name: meta.name.clone().unwrap_or_default(), revision: label(meta, labels::REVISION), role: label(meta, labels::ROLE) }
}

fn is_owned_by(meta: &ObjectMeta, uid: &str) -> bool {
    meta.owner_references.as_ref().is_some_and(|refs| refs.iter().any(|r| r.uid == uid))
}

fn label(meta: &ObjectMeta, key: &str) -> Option<String> {
    meta.labels.as_ref().and_then(|l| l.get(key).cloned())
}

fn from_deployment(d: &Deployment) -> ObservedWorkload {
    let status = d.status.clone().unwrap_or_default();
    let instances = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let ready = status.ready_replicas.unwrap_or(0).min(instances);
    let stuck = status.conditions.unwrap_or_default().into_iter().find(|c| c.type_ == "Progressing" && c.status == "False").map(|c| {
        format!("Deployment {}: {}", d.metadata.name.clone().unwrap_or_default(), c.message.unwrap_or(c.reason.unwrap_or_default()))
    });
    ObservedWorkload {
        name: d.metadata.name.clone().unwrap_or_default(),
        kind: WorkloadKind::Deployment,
        role: label(&d.metadata, labels::ROLE).unwrap_or_default(),
        revision: label(&d.metadata, labels::REVISION),
        nodes: 1,
        instances,
        ready,
        stuck,
    }
}

async fn from_stateful_set(client: &kube::Client, namespace: &str, s: &StatefulSet) -> Result<ObservedWorkload, Error> {
    let nodes = s
        .spec
        .as_ref()
        .and_then(|spec| spec.template.metadata.as_ref())
        .and_then(|m| label(m, labels::NODES_PER_INSTANCE))
        .and_then(|n| n.parse::<i32>().ok())
        .unwrap_or(1)
        .max(1);
    let pods = s.spec.as_ref().and_then(|spec| spec.replicas).unwrap_or(0);
    let selector = s
        .spec
        .as_ref()
        .and_then(|spec| spec.selector.match_labels.clone())
        .map(|m| labels::selector_string(&m))
        .unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let pod_list = api.list(&ListParams::default().labels(&selector)).await?;
    Ok(ObservedWorkload {
        name: s.metadata.name.clone().unwrap_or_default(),
        kind: WorkloadKind::StatefulSet,
        role: label(&s.metadata, labels::ROLE).unwrap_or_default(),
        revision: label(&s.metadata, labels::REVISION),
        nodes,
        instances: pods / nodes,
        ready: ready_instances(&pod_list.items, nodes, pods / nodes),
        stuck: None,
    })
}

/// An instance is ready only when every one of its pods is: one dead rank stops it all.
pub fn ready_instances(pods: &[Pod], nodes: i32, instances: i32) -> i32 {
    let mut ready_ranks: BTreeMap<i32, i32> = BTreeMap::new();
    for pod in pods.iter().filter(|p| pod_ready(p)) {
        let Some(index) = label(&pod.metadata, labels::POD_INDEX).and_then(|i| i.parse::<i32>().ok()) else { continue };
        *ready_ranks.entry(index / nodes).or_default() += 1;
    }
    ready_ranks.iter().filter(|(instance, ranks)| **instance < instances && **ranks >= nodes).count() as i32
}

fn pod_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodCondition, PodStatus};

    fn pod(index: i32, ready: bool) -> Pod {
        Pod {
            metadata: ObjectMeta { labels: Some([(labels::POD_INDEX.to_string(), index.to_string())].into()), ..Default::default() },
            spec: None,
            status: Some(PodStatus {
                conditions: Some(vec![PodCondition { type_: "Ready".into(), status: if ready { "True" } else { "False" }.into(), ..Default::default() }]),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn a_multi_node_instance_is_ready_only_with_all_its_pods() {
        // Two instances of two nodes: pods 0,1 form instance 0; pods 2,3 instance 1.
        let pods = [pod(0, true), pod(1, false), pod(2, true), pod(3, true)];
        assert_eq!(ready_instances(&pods, 2, 2), 1);
        // Three ready pods spread over both instances are not "one and a half" instances.
        let pods = [pod(0, true), pod(1, false), pod(2, true), pod(3, false)];
        assert_eq!(ready_instances(&pods, 2, 2), 0);
        // Pods beyond the desired instances (scale-down in progress) do not count.
        let pods = [pod(0, true), pod(1, true), pod(2, true), pod(3, true)];
        assert_eq!(ready_instances(&pods, 2, 1), 1);
    }
}
