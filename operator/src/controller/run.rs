//! Wiring of the kube-runtime Controller: the watched kinds, the shared context, shutdown.

use std::future::Future;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::runtime::{watcher, Controller};
use kube::Api;

use crate::crd::{InferenceDeployment, InferenceRoleScaler};
use crate::render::labels;

use super::{error_policy, reconcile, Context};

#[derive(Debug, Clone, Default)]
pub struct ControllerConfig {
    /// Watch one namespace only (None: all namespaces).
    pub namespace: Option<String>,
    /// Reconciliations running at once (0: unbounded).
    pub concurrency: u16,
}

fn api<K>(client: &kube::Client, namespace: &Option<String>) -> Api<K>
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Runs until `shutdown` resolves; in-flight reconciliations finish first.
pub async fn run_controller(context: Arc<Context>, config: ControllerConfig, shutdown: impl Future<Output = ()> + Send + Sync + 'static) {
    let client = context.client.clone();
    let ns = &config.namespace;
    // Only the operator's own children are cached, not every ConfigMap of the cluster.
    let children = watcher::Config::default().labels(&format!("{}={}", labels::MANAGED_BY, labels::MANAGER));
    let controller_config = kube::runtime::controller::Config::default().concurrency(config.concurrency);
    context.metrics.set_ready(true);
    Controller::new(api::<InferenceDeployment>(&client, ns), watcher::Config::default().any_semantic())
        .with_config(controller_config)
        .owns(api::<Deployment>(&client, ns), children.clone())
        .owns(api::<StatefulSet>(&client, ns), children.clone())
        .owns(api::<Service>(&client, ns), children.clone())
        .owns(api::<ConfigMap>(&client, ns), children.clone())
        .owns(api::<PodDisruptionBudget>(&client, ns), children.clone())
        .owns(api::<HorizontalPodAutoscaler>(&client, ns), children.clone())
        .owns(api::<InferenceRoleScaler>(&client, ns), children)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, context)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => tracing::debug!(deployment = %object.name, namespace = ?object.namespace, "reconciled"),
                Err(error) => tracing::warn!(%error, "reconcile error"),
            }
        })
        .await;
}
