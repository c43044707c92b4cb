//! The pod template of one role at one revision.

use std::collections::BTreeMap;

use dlengine_cli::env as agent_env;
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, ObjectFieldSelector, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, SecretKeySelector, SecurityContext,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::crd::{InferenceDeploymentSpec, PodOverrides, RoleSpec, DEFAULT_STARTUP_SECONDS};

use super::network::{pod_network, PodNetwork};
use super::{args, labels, multinode, volumes, InstanceShape, RenderContext, ENGINE_PORT, GPU_RESOURCE};

const PROBE_PERIOD_SECONDS: i32 = 10;
const ROUTER_STARTUP_SECONDS: i32 = 120;
const DEFAULT_GRACE_SECONDS: i64 = 60;

/// Everything a pod template depends on besides the spec.
pub struct PodInputs<'a> {
    pub deployment: &'a str,
    pub role: &'a RoleSpec,
    pub revision: &'a str,
    pub shape: &'a InstanceShape,
    pub workload_name: &'a str,
}

pub fn pod_template(spec: &InferenceDeploymentSpec, ctx: &RenderContext, input: &PodInputs) -> PodTemplateSpec {
    let overrides = spec.pod_template.clone().unwrap_or_default().overlaid_with(input.role.pod_template.as_ref());
    let network = pod_network(&spec.network, input.role, input.shape);
    let mut labels = overrides.labels.clone();
    labels.extend(labels::workload_labels(input.deployment, input.role, input.revision));
    if input.shape.nodes > 1 {
        labels.insert(labels::NODES_PER_INSTANCE.into(), input.shape.nodes.to_string());
    }
    let mut annotations = overrides.annotations.clone();
    annotations.extend(network.annotations.clone());
    PodTemplateSpec {
        metadata: Some(ObjectMeta { labels: Some(labels), annotations: non_empty(annotations), ..Default::default() }),
        spec: Some(pod_spec(spec, ctx, input, &overrides, &network)),
    }
}

fn pod_spec(spec: &InferenceDeploymentSpec, ctx: &RenderContext, input: &PodInputs, o: &PodOverrides, net: &PodNetwork) -> PodSpec {
    let tls_secret = ctx.etcd_tls_secret(spec);
    let (volumes, mounts) = volumes::volumes(spec, input.role, tls_secret.as_deref());
    let mut container = container(spec, ctx, input, net);
    container.volume_mounts = Some(mounts);
    PodSpec {
        containers: vec![container],
        volumes: Some(volumes),
        host_network: net.host_network.then_some(true),
        dns_policy: net.host_network.then(|| "ClusterFirstWithHostNet".to_string()),
        host_ipc: net.host_ipc.then_some(true),
        // Engines never call the Kubernetes API.
        automount_service_account_token: Some(false),
        service_account_name: o.service_account_name.clone(),
        node_selector: non_empty(o.node_selector.clone()),
        tolerations: non_empty_vec(o.tolerations.clone()),
        affinity: o.affinity.clone(),
        topology_spread_constraints: non_empty_vec(o.topology_spread_constraints.clone()),
        priority_class_name: o.priority_class_name.clone(),
        scheduler_name: o.scheduler_name.clone(),
        runtime_class_name: o.runtime_class_name.clone(),
        image_pull_secrets: non_empty_vec(o.image_pull_secrets.clone()),
        termination_grace_period_seconds: Some(o.termination_grace_period_seconds.unwrap_or(DEFAULT_GRACE_SECONDS)),
        security_context: Some(PodSecurityContext {
            seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..Default::default() }),
            ..Default::default()
        }),
        subdomain: (input.shape.nodes > 1).then(|| input.workload_name.to_string()),
        ..Default::default()
    }
}

fn container(spec: &InferenceDeploymentSpec, ctx: &RenderContext, input: &PodInputs, net: &PodNetwork) -> Container {
    let mut command = args::command_line(spec, input.role, input.shape, &ctx.etcd_endpoints(spec));
    let program = command.remove(0);
    Container {
        name: labels::component(input.role.kind).to_string(),
        image: Some(spec.image.clone()),
        image_pull_policy: spec.image_pull_policy.clone(),
        command: Some(vec![program]),
        args: Some(command),
        env: Some(environment(spec, input, ctx.etcd_tls_secret(spec).as_deref())),
        ports: Some(vec![ContainerPort { name: Some("http".into()), container_port: ENGINE_PORT, protocol: Some("TCP".into()), ..Default::default() }]),
        resources: Some(resources(input, net)),
        startup_probe: Some(startup_probe(input.role)),
        readiness_probe: Some(http_probe("/v1/models", 3)),
        liveness_probe: Some(http_probe("/health", 6)),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            capabilities: Some(net.capabilities.clone()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The downward-API identity the agent registers with, plus the user's env (which wins).
fn environment(spec: &InferenceDeploymentSpec, input: &PodInputs, etcd_tls_secret: Option<&str>) -> Vec<EnvVar> {
    let mut env = vec![
        field_env(agent_env::NAMESPACE, "metadata.namespace"),
        field_env(agent_env::POD_NAME, "metadata.name"),
        field_env(agent_env::POD_UID, "metadata.uid"),
        field_env(agent_env::POD_IP, "status.podIP"),
        value_env(agent_env::DEPLOYMENT, input.deployment),
        value_env(agent_env::ADVERTISE_URL, &format!("http://$({}):{ENGINE_PORT}", agent_env::POD_IP)),
    ];
    if input.role.kind.runs_engine() {
        env.push(value_env(agent_env::REVISION, input.revision));
    }
    if let Some(secret) = api_key_for(spec, input.role) {
        env.push(EnvVar {
            name: agent_env::API_KEY.into(),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector { name: secret.name.clone(), key: secret.key.clone(), optional: Some(false) }),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    env.extend(multinode::environment(input.shape, input.workload_name));
    env.extend(super::etcd_tls::environment(etcd_tls_secret));
    for user in &input.role.env {
        env.retain(|e| e.name != user.name);
        env.push(user.clone());
    }
    env
}

/// Clients reach the router when there is one, else the engines: only that tier checks keys.
fn api_key_for<'a>(spec: &'a InferenceDeploymentSpec, role: &RoleSpec) -> Option<&'a crate::crd::ApiKeySecret> {
    let has_router = spec.roles.iter().any(|r| !r.kind.runs_engine());
    let faces_clients = if has_router { !role.kind.runs_engine() } else { true };
    spec.api_key_secret.as_ref().filter(|_| faces_clients)
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector { field_path: path.into(), api_version: None }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub(super) fn value_env(name: &str, value: &str) -> EnvVar {
    EnvVar { name: name.into(), value: Some(value.into()), ..Default::default() }
}

/// The user's resources, plus one pod's share of GPUs and the RDMA devices where not set.
fn resources(input: &PodInputs, net: &PodNetwork) -> ResourceRequirements {
    let mut res = input.role.resources.clone().unwrap_or_default();
    let mut limits = res.limits.take().unwrap_or_default();
    let user_set_gpus = limits.keys().any(|k| k.ends_with("/gpu"));
    if input.shape.gpus_per_pod > 0 && !user_set_gpus {
        limits.insert(GPU_RESOURCE.into(), Quantity(input.shape.gpus_per_pod.to_string()));
    }
    for (name, qty) in &net.extra_resources {
        limits.entry(name.clone()).or_insert_with(|| qty.clone());
    }
    // Extended resources must be requested as much as limited; the scheduler requires both equal.
    let mut requests = res.requests.take().unwrap_or_default();
    for (name, qty) in &limits {
        if name.contains('/') {
            requests.insert(name.clone(), qty.clone());
        }
    }
    res.limits = non_empty(limits);
    res.requests = non_empty(requests);
    res
}

/// Generous for engines (loading weights takes minutes), short for the router; while the
/// startup probe runs, liveness is off, so a loading engine is never killed as dead.
fn startup_probe(role: &RoleSpec) -> Probe {
    let budget = match (&role.probes, role.kind.runs_engine()) {
        (Some(p), _) => p.startup_seconds,
        (None, true) => DEFAULT_STARTUP_SECONDS,
        (None, false) => ROUTER_STARTUP_SECONDS,
    };
    let mut probe = http_probe("/health", (budget + PROBE_PERIOD_SECONDS - 1) / PROBE_PERIOD_SECONDS);
    probe.period_seconds = Some(PROBE_PERIOD_SECONDS);
    probe
}

fn http_probe(path: &str, failure_threshold: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction { path: Some(path.into()), port: IntOrString::String("http".into()), ..Default::default() }),
        period_seconds: Some(PROBE_PERIOD_SECONDS),
        timeout_seconds: Some(5),
        failure_threshold: Some(failure_threshold),
        ..Default::default()
    }
}

fn non_empty<V>(map: BTreeMap<String, V>) -> Option<BTreeMap<String, V>> {
    (!map.is_empty()).then_some(map)
}

fn non_empty_vec<T>(v: Vec<T>) -> Option<Vec<T>> {
    (!v.is_empty()).then_some(v)
}
