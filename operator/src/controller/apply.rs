//! Server-side apply of child objects under the operator's one field manager.

use k8s_openapi::NamespaceResourceScope;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::Resource;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::render::labels::MANAGER;
use crate::render::ChildObject;

use super::Error;

/// The operator owns what it applies; `force` takes fields back from anyone who edited them
/// (`kubectl edit` of a child is undone, as with any operator).
pub fn apply_params() -> PatchParams {
    PatchParams::apply(MANAGER).force()
}

pub async fn apply_child(client: &kube::Client, namespace: &str, child: &ChildObject) -> Result<(), Error> {
    let name = child.name();
    let manifest = child.manifest().map_err(|source| Error::Serialise { what: child.kind().into(), source })?;
    match child {
        ChildObject::Deployment(_) => apply::<Deployment>(client, namespace, &name, &manifest).await,
        ChildObject::StatefulSet(_) => apply::<StatefulSet>(client, namespace, &name, &manifest).await,
        ChildObject::Service(_) => apply::<Service>(client, namespace, &name, &manifest).await,
        ChildObject::ConfigMap(_) => apply::<ConfigMap>(client, namespace, &name, &manifest).await,
        ChildObject::PodDisruptionBudget(_) => apply::<PodDisruptionBudget>(client, namespace, &name, &manifest).await,
        ChildObject::HorizontalPodAutoscaler(_) => apply::<HorizontalPodAutoscaler>(client, namespace, &name, &manifest).await,
        ChildObject::RoleScaler(scaler) => create_if_absent(client, namespace, scaler).await,
    }
}

async fn apply<K>(client: &kube::Client, namespace: &str, name: &str, manifest: &serde_json::Value) -> Result<(), Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope> + Clone + DeserializeOwned + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    api.patch(name, &apply_params(), &Patch::Apply(manifest)).await?;
    Ok(())
}

/// Scale handles are written by their scaler after creation; re-applying them would take
/// `spec.replicas` back from the HPA.
async fn create_if_absent<K>(client: &kube::Client, namespace: &str, object: &K) -> Result<(), Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope> + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    let name = object.meta().name.clone().ok_or(Error::MissingField("metadata.name"))?;
    if api.get_opt(&name).await?.is_some() {
        return Ok(());
    }
    match api.create(&PostParams { field_manager: Some(MANAGER.into()), ..Default::default() }, object).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

pub async fn delete_if_present<K>(client: &kube::Client, namespace: &str, name: &str) -> Result<(), Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope> + Clone + DeserializeOwned + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}
