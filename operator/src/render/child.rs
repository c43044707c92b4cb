//! One object the operator wants to exist, typed.

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::Resource;
use serde::Serialize;

use crate::crd::InferenceRoleScaler;

#[derive(Debug, Clone, PartialEq)]
pub enum ChildObject {
    Deployment(Deployment),
    StatefulSet(StatefulSet),
    Service(Service),
    ConfigMap(ConfigMap),
    PodDisruptionBudget(PodDisruptionBudget),
    HorizontalPodAutoscaler(HorizontalPodAutoscaler),
    /// Created once and then left to its scaler (HPA, KEDA): never re-applied.
    RoleScaler(InferenceRoleScaler),
}

impl ChildObject {
    pub fn kind(&self) -> &'static str {
        match self {
            ChildObject::Deployment(_) => "Deployment",
            ChildObject::StatefulSet(_) => "StatefulSet",
            ChildObject::Service(_) => "Service",
            ChildObject::ConfigMap(_) => "ConfigMap",
            ChildObject::PodDisruptionBudget(_) => "PodDisruptionBudget",
            ChildObject::HorizontalPodAutoscaler(_) => "HorizontalPodAutoscaler",
            ChildObject::RoleScaler(_) => "InferenceRoleScaler",
        }
    }

    pub fn name(&self) -> String {
        match self {
            ChildObject::Deployment(o) => o.meta().name.clone(),
            ChildObject::StatefulSet(o) => o.meta().name.clone(),
            ChildObject::Service(o) => o.meta().name.clone(),
            ChildObject::ConfigMap(o) => o.meta().name.clone(),
            ChildObject::PodDisruptionBudget(o) => o.meta().name.clone(),
            ChildObject::HorizontalPodAutoscaler(o) => o.meta().name.clone(),
            ChildObject::RoleScaler(o) => o.meta().name.clone(),
        }
        .unwrap_or_default()
    }

    /// The full manifest, with apiVersion and kind, as it would be applied.
    pub fn manifest(&self) -> Result<serde_json::Value, serde_json::Error> {
        match self {
            ChildObject::Deployment(o) => with_type(o),
            ChildObject::StatefulSet(o) => with_type(o),
            ChildObject::Service(o) => with_type(o),
            ChildObject::ConfigMap(o) => with_type(o),
            ChildObject::PodDisruptionBudget(o) => with_type(o),
            ChildObject::HorizontalPodAutoscaler(o) => with_type(o),
            ChildObject::RoleScaler(o) => with_type(o),
        }
    }
}

fn with_type<K: Resource<DynamicType = ()> + Serialize>(object: &K) -> Result<serde_json::Value, serde_json::Error> {
    let mut value = serde_json::to_value(object)?;
    if let Some(map) = value.as_object_mut() {
        map.insert("apiVersion".into(), K::api_version(&()).into_owned().into());
        map.insert("kind".into(), K::kind(&()).into_owned().into());
    }
    Ok(value)
}
