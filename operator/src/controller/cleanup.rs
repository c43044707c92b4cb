//! Removal of what is no longer desired: old revisions once drained, children of removed
//! roles, and the registry prefix when the deployment itself is deleted.

use std::collections::BTreeSet;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, Patch, PatchParams};
use kube::ResourceExt;

use crate::crd::{InferenceDeployment, InferenceRoleScaler};
use crate::registry::{EtcdTls, RegistryError, RegistryTarget};
use crate::render::labels::MANAGER;

use super::apply::delete_if_present;
use super::observe::{Observed, ObservedChild, WorkloadKind};
use super::{Context, Error};

/// Lets a deployment be deleted when its etcd is gone for good.
pub const SKIP_REGISTRY_CLEANUP: &str = "dlengine.io/skip-registry-cleanup";

/// Deletes every observed child that is neither desired nor part of an old revision still
/// draining; children of roles removed from the spec go at once, whatever their revision.
pub async fn delete_stale(
    client: &kube::Client,
    namespace: &str,
    observed: &Observed,
    desired: &BTreeSet<(String, String)>,
    kept_revisions: &BTreeSet<String>,
    roles: &BTreeSet<String>,
) -> Result<(), Error> {
    for child in &observed.children {
        let wanted = desired.contains(&(child.kind.to_string(), child.name.clone()));
        let role_exists = child.role.as_ref().is_none_or(|r| roles.contains(r));
        let kept = role_exists && child.revision.as_ref().is_some_and(|r| kept_revisions.contains(r));
        if !wanted && !kept {
            tracing::info!(kind = child.kind, name = %child.name, "deleting child that is no longer desired");
            delete_child(client, namespace, child).await?;
        }
    }
    Ok(())
}

async fn delete_child(client: &kube::Client, namespace: &str, child: &ObservedChild) -> Result<(), Error> {
    match child.kind {
        "Deployment" => delete_if_present::<Deployment>(client, namespace, &child.name).await,
        "StatefulSet" => delete_if_present::<StatefulSet>(client, namespace, &child.name).await,
        "Service" => delete_if_present::<Service>(client, namespace, &child.name).await,
        "ConfigMap" => delete_if_present::<ConfigMap>(client, namespace, &child.name).await,
        "PodDisruptionBudget" => delete_if_present::<PodDisruptionBudget>(client, namespace, &child.name).await,
        "HorizontalPodAutoscaler" => delete_if_present::<HorizontalPodAutoscaler>(client, namespace, &child.name).await,
        "InferenceRoleScaler" => delete_if_present::<InferenceRoleScaler>(client, namespace, &child.name).await,
        _ => Ok(()),
    }
}

/// Sets the instance count of an old revision's workload without re-applying it (the spec
/// that rendered it is gone); a separate field manager keeps the main one's fields intact.
pub async fn scale_old_workload(client: &kube::Client, namespace: &str, kind: WorkloadKind, name: &str, pods: i32) -> Result<(), Error> {
    let patch = Patch::Merge(serde_json::json!({"spec": {"replicas": pods}}));
    let params = PatchParams { field_manager: Some(format!("{MANAGER}-rollout")), ..Default::default() };
    match kind {
        WorkloadKind::Deployment => {
            Api::<Deployment>::namespaced(client.clone(), namespace).patch(name, &params, &patch).await?;
        }
        WorkloadKind::StatefulSet => {
            Api::<StatefulSet>::namespaced(client.clone(), namespace).patch(name, &params, &patch).await?;
        }
    }
    Ok(())
}

/// The finalizer's work: forget every registration of the deployment, all revisions.
pub async fn delete_registrations(dep: &InferenceDeployment, ctx: &Context) -> Result<(), Error> {
    if dep.annotations().get(SKIP_REGISTRY_CLEANUP).is_some_and(|v| v == "true") {
        tracing::warn!(deployment = %dep.name_any(), "registry cleanup skipped by annotation");
        return Ok(());
    }
    let endpoints = ctx.render.etcd_endpoints(&dep.spec);
    if endpoints.is_empty() {
        return Ok(());
    }
    let namespace = dep.namespace().ok_or(Error::MissingField("metadata.namespace"))?;
    let tls = match ctx.render.etcd_tls_secret(&dep.spec) {
        Some(secret) => Some(read_tls(&ctx.client, &namespace, &secret).await?),
        None => None,
    };
    let target = RegistryTarget { endpoints, tls, namespace, deployment: dep.name_any() };
    let deleted = ctx.registry.delete_deployment(&target).await?;
    tracing::info!(prefix = %target.prefix(), deleted, "registry prefix deleted");
    Ok(())
}

async fn read_tls(client: &kube::Client, namespace: &str, name: &str) -> Result<EtcdTls, Error> {
    let secret = Api::<Secret>::namespaced(client.clone(), namespace).get(name).await?;
    let data = secret.data.unwrap_or_default();
    let get = |key: &str| data.get(key).map(|b| b.0.clone());
    let ca = get("ca.crt").ok_or_else(|| RegistryError::Tls { secret: name.into(), message: "no ca.crt key".into() })?;
    Ok(EtcdTls { ca, client_cert: get("tls.crt"), client_key: get("tls.key") })
}
