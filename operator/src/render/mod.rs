//! Spec -> desired objects, as a pure function: no API calls, no clock, no randomness.
//! The controller applies what this returns; tests and `dlengine-operator render` inspect it.

mod args;
mod child;
mod config_map;
mod disruption;
mod etcd_tls;
mod hpa;
pub mod labels;
mod multinode;
pub mod names;
mod network;
mod pod;
mod revision;
mod service;
mod shape;
mod volumes;
mod workload;

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};

use crate::crd::{Actuator, InferenceDeployment, InferenceDeploymentSpec, RoleSpec};

pub use args::{command_line, model_dir};
pub use child::ChildObject;
pub use etcd_tls::{CA_ENV as ETCD_CA_ENV, CERT_ENV as ETCD_CERT_ENV, KEY_ENV as ETCD_KEY_ENV};
pub use multinode::{HEADLESS_SERVICE_ENV, NODES_PER_INSTANCE_ENV, POD_INDEX_ENV};
pub use service::front_role;
pub use shape::InstanceShape;

/// Port every engine and the router serve HTTP on (the CLI's default).
pub const ENGINE_PORT: i32 = 8000;
pub const MODEL_MOUNT: &str = "/models";
pub const ETCD_TLS_MOUNT: &str = "/etc/dlengine/etcd-tls";
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";
/// Slack on top of the startup budget before a Deployment reports no progress.
const PROGRESS_SLACK_SECONDS: i32 = 600;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RenderError {
    #[error("InferenceDeployment has no name or namespace")]
    Unnamed,
    #[error("role {role}: {message}")]
    Parallelism { role: String, message: String },
    #[error("no etcd endpoints: set spec.registry.endpoints or start the operator with --default-etcd-endpoints")]
    NoRegistry,
    #[error("could not serialise {what}: {message}")]
    Serialise { what: String, message: String },
}

/// Operator-wide settings that rendering needs.
#[derive(Debug, Clone, Default)]
pub struct RenderContext {
    /// Used when a deployment names no etcd endpoints (the chart's bundled etcd).
    pub default_etcd_endpoints: Vec<String>,
    /// Secret (in each deployment's namespace) with the default etcd's client TLS material.
    pub default_etcd_tls_secret: Option<String>,
}

impl RenderContext {
    pub fn etcd_endpoints(&self, spec: &InferenceDeploymentSpec) -> Vec<String> {
        if spec.registry.endpoints.is_empty() {
            self.default_etcd_endpoints.clone()
        } else {
            spec.registry.endpoints.clone()
        }
    }

    /// The deployment's own TLS secret when it names its etcd, else the default one.
    pub fn etcd_tls_secret(&self, spec: &InferenceDeploymentSpec) -> Option<String> {
        if spec.registry.endpoints.is_empty() {
            spec.registry.tls_secret.clone().or_else(|| self.default_etcd_tls_secret.clone())
        } else {
            spec.registry.tls_secret.clone()
        }
    }
}

/// Everything the operator wants to exist for a deployment at its update revision.
#[derive(Debug, Clone)]
pub struct Desired {
    pub revision: String,
    pub objects: Vec<ChildObject>,
    pub shapes: BTreeMap<String, InstanceShape>,
}

/// The revision the spec asks for.
pub fn update_revision(dep: &InferenceDeployment, ctx: &RenderContext) -> Result<String, RenderError> {
    let (namespace, name) = identity(dep)?;
    let _ = namespace;
    let mut templates = Vec::new();
    for role in dep.spec.roles.iter().filter(|r| r.kind.runs_engine()) {
        let shape = shape_of(role)?;
        let workload = names::workload(&name, role, revision::PLACEHOLDER);
        templates.push((role.name.clone(), template(dep, ctx, role, revision::PLACEHOLDER, &shape, &workload)));
    }
    revision::hash_templates(&templates).map_err(|e| serialise("revision", e))
}

/// Desired objects, with `instances(role)` instances of each role at the update revision.
pub fn render(dep: &InferenceDeployment, ctx: &RenderContext, instances: &dyn Fn(&RoleSpec) -> i32) -> Result<Desired, RenderError> {
    let (namespace, name) = identity(dep)?;
    if ctx.etcd_endpoints(&dep.spec).is_empty() {
        return Err(RenderError::NoRegistry);
    }
    let revision = update_revision(dep, ctx)?;
    let meta = |object_name: String, labels: BTreeMap<String, String>| child_meta(dep, &namespace, object_name, labels);
    let mut objects = Vec::new();
    let mut shapes = BTreeMap::new();
    for role in &dep.spec.roles {
        let shape = shape_of(role)?;
        shapes.insert(role.name.clone(), shape);
        let workload_name = names::workload(&name, role, &revision);
        let labels = labels::workload_labels(&name, role, &revision);
        let command = args::command_line(&dep.spec, role, &shape, &ctx.etcd_endpoints(&dep.spec));
        let shape_json = serde_json::json!({"nodes": shape.nodes, "gpusPerPod": shape.gpus_per_pod, "gpusPerInstance": shape.gpus_per_instance}).to_string();
        let config = config_map::engine_config(meta(workload_name.clone(), labels.clone()), &command, shape_json)
            .map_err(|e| serialise("ConfigMap", e))?;
        objects.push(ChildObject::ConfigMap(config));
        objects.extend(workload::workload_objects(workload::WorkloadInputs {
            metadata: meta(workload_name.clone(), labels.clone()),
            selector: labels::workload_selector(&name, role, &revision),
            template: template(dep, ctx, role, &revision, &shape, &workload_name),
            instances: instances(role),
            nodes: shape.nodes,
            progress_deadline_seconds: startup_budget(role) + PROGRESS_SLACK_SECONDS,
        }));
        let role_labels = {
            let mut l = labels::deployment_labels(&name);
            l.insert(labels::ROLE.into(), role.name.clone());
            l
        };
        let role_wide = names::role_wide(&name, role);
        objects.push(ChildObject::PodDisruptionBudget(disruption::role_budget(
            meta(role_wide.clone(), role_labels.clone()),
            labels::role_selector(&name, role),
        )));
        objects.extend(scaling_objects(&name, role, meta(role_wide, role_labels), instances(role)));
    }
    if let Some(front) = front_role(&dep.spec) {
        let service_meta = meta(names::endpoint_service(&name), labels::deployment_labels(&name));
        objects.push(ChildObject::Service(service::endpoint_service(service_meta, &name, front)));
    }
    Ok(Desired { revision, objects, shapes })
}

fn scaling_objects(deployment: &str, role: &RoleSpec, meta: ObjectMeta, instances: i32) -> Vec<ChildObject> {
    let Some(autoscaling) = &role.autoscaling else { return Vec::new() };
    let mut objects = Vec::new();
    if matches!(autoscaling.actuator, Actuator::Hpa | Actuator::External) {
        objects.push(ChildObject::RoleScaler(hpa::role_scaler(meta.clone(), deployment, &role.name, instances)));
    }
    if autoscaling.actuator == Actuator::Hpa {
        objects.push(ChildObject::HorizontalPodAutoscaler(hpa::autoscaler(meta, autoscaling)));
    }
    objects
}

fn template(dep: &InferenceDeployment, ctx: &RenderContext, role: &RoleSpec, revision: &str, shape: &InstanceShape, workload: &str) -> PodTemplateSpec {
    let deployment = dep.name_any();
    pod::pod_template(&dep.spec, ctx, &pod::PodInputs { deployment: &deployment, role, revision, shape, workload_name: workload })
}

fn startup_budget(role: &RoleSpec) -> i32 {
    role.probes.as_ref().map(|p| p.startup_seconds).unwrap_or(crate::crd::DEFAULT_STARTUP_SECONDS)
}

pub fn shape_of(role: &RoleSpec) -> Result<InstanceShape, RenderError> {
    InstanceShape::of(role).map_err(|message| RenderError::Parallelism { role: role.name.clone(), message })
}

fn identity(dep: &InferenceDeployment) -> Result<(String, String), RenderError> {
    match (&dep.metadata.namespace, &dep.metadata.name) {
        (Some(ns), Some(name)) => Ok((ns.clone(), name.clone())),
        _ => Err(RenderError::Unnamed),
    }
}

fn child_meta(dep: &InferenceDeployment, namespace: &str, name: String, labels: BTreeMap<String, String>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(namespace.to_string()),
        labels: Some(labels),
        owner_references: dep.controller_owner_ref(&()).map(|r| vec![r]),
        ..Default::default()
    }
}

fn serialise(what: &str, e: serde_json::Error) -> RenderError {
    RenderError::Serialise { what: what.into(), message: e.to_string() }
}

#[cfg(test)]
mod tests;
