//! Spec -> objects: names, shapes, engine flags, network effects, revisions, and the
//! agent's own parser accepting every command line.

use clap::Parser;
use dlengine_cli::{Cli, Command, KvTransport, Mode};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Container, PodTemplateSpec, Service};

use super::*;
use crate::crd::{InferenceDeployment, RoleKind};
use crate::testing::samples;

fn ctx() -> RenderContext {
    RenderContext { default_etcd_endpoints: vec!["http://etcd:2379".into()], ..Default::default() }
}

fn rendered(dep: &InferenceDeployment) -> Desired {
    render(dep, &ctx(), &|role| role.replicas).unwrap()
}

fn deployments(d: &Desired) -> Vec<&Deployment> {
    d.objects.iter().filter_map(|o| if let ChildObject::Deployment(x) = o { Some(x) } else { None }).collect()
}

fn stateful_sets(d: &Desired) -> Vec<&StatefulSet> {
    d.objects.iter().filter_map(|o| if let ChildObject::StatefulSet(x) = o { Some(x) } else { None }).collect()
}

fn services(d: &Desired) -> Vec<&Service> {
    d.objects.iter().filter_map(|o| if let ChildObject::Service(x) = o { Some(x) } else { None }).collect()
}

fn templates(d: &Desired) -> Vec<(String, &PodTemplateSpec)> {
    let mut all: Vec<(String, &PodTemplateSpec)> = deployments(d).into_iter().map(|x| (x.metadata.name.clone().unwrap(), &x.spec.as_ref().unwrap().template)).collect();
    all.extend(stateful_sets(d).into_iter().map(|x| (x.metadata.name.clone().unwrap(), &x.spec.as_ref().unwrap().template)));
    all
}

fn container(t: &PodTemplateSpec) -> &Container {
    &t.spec.as_ref().unwrap().containers[0]
}

fn workload_of<'a>(d: &'a Desired, role: &str) -> &'a Deployment {
    deployments(d).into_iter().find(|x| x.metadata.labels.as_ref().unwrap()[labels::ROLE] == role).unwrap()
}

fn argv(c: &Container) -> Vec<String> {
    c.command.clone().unwrap().into_iter().chain(c.args.clone().unwrap()).collect()
}

fn limit(c: &Container, name: &str) -> Option<String> {
    c.resources.as_ref()?.limits.as_ref()?.get(name).map(|q| q.0.clone())
}

fn env(c: &Container, name: &str) -> Option<k8s_openapi::api::core::v1::EnvVar> {
    c.env.as_ref()?.iter().find(|e| e.name == name).cloned()
}

#[test]
fn every_rendered_command_line_parses_with_the_agent_cli() {
    for dep in samples::all() {
        let d = rendered(&dep);
        for (name, template) in templates(&d) {
            let line = argv(container(template));
            let cli = Cli::try_parse_from(&line).unwrap_or_else(|e| panic!("{name}: {line:?} does not parse: {e}"));
            let role = dep.spec.roles.iter().find(|r| name.contains(&format!("-{}", r.name))).unwrap();
            match (cli.command, role.kind) {
                (Command::Router(args), RoleKind::Router) => {
                    assert_eq!(args.etcd_endpoints, ctx().etcd_endpoints(&dep.spec));
                    assert_eq!(i32::from(args.port), ENGINE_PORT);
                }
                (Command::Serve(args), kind) => {
                    let mode = match kind {
                        RoleKind::Prefill => Mode::Prefill,
                        RoleKind::Decode => Mode::Decode,
                        RoleKind::Encode => Mode::Encode,
                        _ => Mode::Aggregated,
                    };
                    assert_eq!(args.mode, mode, "{name}");
                    assert_eq!(args.model.to_str().unwrap(), model_dir(&dep.spec));
                    assert_eq!(args.served_model_name.as_deref(), Some(dep.spec.model.name.as_str()));
                    assert_eq!(args.engine.tensor_parallel_size as i32, shape_of(role).unwrap().tensor_parallel);
                    assert_eq!(args.registry.etcd_endpoints, ctx().etcd_endpoints(&dep.spec));
                    assert_eq!(i32::from(args.port), ENGINE_PORT);
                }
                (other, kind) => panic!("{name}: {kind:?} rendered as {other:?}"),
            }
        }
    }
}

#[test]
fn disaggregated_rdma_flags_reach_the_engines() {
    let d = rendered(&samples::disaggregated());
    for role in ["prefill", "decode"] {
        let c = container(&workload_of(&d, role).spec.as_ref().unwrap().template).clone();
        let Command::Serve(args) = Cli::try_parse_from(argv(&c)).unwrap().command else { panic!("not serve") };
        assert_eq!(args.transfer.kv_transport, KvTransport::Rdma);
        assert!(args.transfer.require_rdma, "requireRDMA must become --require-rdma, never a silent TCP fallback");
        assert_eq!(args.engine.tensor_parallel_size, 2);
    }
}

#[test]
fn aggregated_single_gpu_is_one_deployment_behind_one_service() {
    let dep = samples::aggregated();
    let d = rendered(&dep);
    let ds = deployments(&d);
    assert_eq!(ds.len(), 1);
    assert_eq!(ds[0].metadata.name.as_deref(), Some(format!("qwen-small-engine-{}", d.revision).as_str()));
    assert_eq!(ds[0].spec.as_ref().unwrap().replicas, Some(1));
    let c = container(&ds[0].spec.as_ref().unwrap().template);
    assert_eq!(limit(c, GPU_RESOURCE).as_deref(), Some("1"));
    assert_eq!(c.resources.as_ref().unwrap().requests.as_ref().unwrap()[GPU_RESOURCE].0, "1", "extended resources are requested as limited");
    assert_eq!(c.startup_probe.as_ref().unwrap().http_get.as_ref().unwrap().path.as_deref(), Some("/health"));
    assert_eq!(c.startup_probe.as_ref().unwrap().failure_threshold, Some(180), "30 minutes of loading at 10 s a probe");
    assert_eq!(c.readiness_probe.as_ref().unwrap().http_get.as_ref().unwrap().path.as_deref(), Some("/v1/models"));
    let security = c.security_context.as_ref().unwrap();
    assert_eq!(security.privileged, Some(false));
    assert_eq!(security.capabilities.as_ref().unwrap().add, None, "no RDMA, no extra capability");
    let svc = services(&d);
    assert_eq!(svc.len(), 1);
    assert_eq!(svc[0].spec.as_ref().unwrap().selector.as_ref().unwrap()[labels::ROLE], "engine");
    assert!(d.objects.iter().any(|o| o.kind() == "PodDisruptionBudget"));
    assert!(d.objects.iter().any(|o| o.kind() == "ConfigMap" && o.name().ends_with(&d.revision)));
}

#[test]
fn downward_api_identity_uses_the_agent_env_names() {
    let d = rendered(&samples::aggregated());
    let c = container(&deployments(&d)[0].spec.as_ref().unwrap().template);
    for (name, path) in [(dlengine_cli::env::POD_UID, "metadata.uid"), (dlengine_cli::env::POD_IP, "status.podIP"), (dlengine_cli::env::NAMESPACE, "metadata.namespace"), (dlengine_cli::env::POD_NAME, "metadata.name")] {
        let var = env(c, name).unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(var.value_from.unwrap().field_ref.unwrap().field_path, path);
    }
    assert_eq!(env(c, dlengine_cli::env::REVISION).unwrap().value.as_deref(), Some(d.revision.as_str()));
    assert_eq!(env(c, dlengine_cli::env::DEPLOYMENT).unwrap().value.as_deref(), Some("qwen-small"));
    assert_eq!(env(c, dlengine_cli::env::ADVERTISE_URL).unwrap().value.as_deref(), Some("http://$(POD_IP):8000"));
}

#[test]
fn rdma_network_becomes_annotation_device_and_ipc_lock_only() {
    let d = rendered(&samples::disaggregated());
    let decode = workload_of(&d, "decode");
    let template = &decode.spec.as_ref().unwrap().template;
    let annotations = template.metadata.as_ref().unwrap().annotations.as_ref().unwrap();
    assert_eq!(annotations[labels::MULTUS_NETWORKS], "rdma-net");
    let c = container(template);
    assert_eq!(limit(c, "nvidia.com/rdma_vf").as_deref(), Some("1"));
    assert_eq!(limit(c, GPU_RESOURCE).as_deref(), Some("2"));
    let security = c.security_context.as_ref().unwrap();
    assert_eq!(security.capabilities.as_ref().unwrap().add.as_deref(), Some(&["IPC_LOCK".to_string()][..]));
    assert_eq!(security.privileged, Some(false));
    assert_eq!(template.spec.as_ref().unwrap().host_network, None, "host networking is opt-in");
    let router = workload_of(&d, "router");
    assert_eq!(router.metadata.name.as_deref(), Some("llama-pd-router"), "the router has no revision");
    let rc = container(&router.spec.as_ref().unwrap().template);
    assert_eq!(limit(rc, GPU_RESOURCE), None);
    assert!(router.spec.as_ref().unwrap().template.metadata.as_ref().unwrap().annotations.is_none(), "router gets no RDMA network");
}

#[test]
fn multi_node_instances_are_stateful_sets_with_a_headless_service() {
    let d = rendered(&samples::multinode());
    assert!(deployments(&d).is_empty());
    let sts = stateful_sets(&d);
    assert_eq!(sts.len(), 1);
    let spec = sts[0].spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(2), "1 instance x 2 nodes");
    assert_eq!(spec.pod_management_policy.as_deref(), Some("Parallel"));
    let headless = services(&d).into_iter().find(|s| s.metadata.name == sts[0].metadata.name).unwrap();
    assert_eq!(headless.spec.as_ref().unwrap().cluster_ip.as_deref(), Some("None"));
    assert_eq!(spec.service_name, headless.metadata.name.clone());
    let c = container(&spec.template);
    assert_eq!(limit(c, GPU_RESOURCE).as_deref(), Some("8"));
    assert_eq!(env(c, NODES_PER_INSTANCE_ENV).unwrap().value.as_deref(), Some("2"));
    assert!(env(c, POD_INDEX_ENV).is_some());
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.host_network, Some(true), "opted in");
    assert_eq!(pod.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    assert_eq!(c.startup_probe.as_ref().unwrap().failure_threshold, Some(360));
}

#[test]
fn replicas_and_autoscaling_never_change_the_revision() {
    let dep = samples::autoscaled();
    let base = update_revision(&dep, &ctx()).unwrap();
    let mut scaled = dep.clone();
    scaled.spec.roles[1].replicas = 7;
    scaled.spec.roles[1].autoscaling.as_mut().unwrap().max_replicas = 20;
    scaled.spec.gpu_budget = Some(64);
    assert_eq!(update_revision(&scaled, &ctx()).unwrap(), base);
    let d = render(&scaled, &ctx(), &|r| r.replicas).unwrap();
    assert_eq!(workload_of(&d, "decode").spec.as_ref().unwrap().replicas, Some(7));
}

#[test]
fn any_engine_change_makes_one_new_revision_for_prefill_and_decode() {
    let dep = samples::disaggregated();
    let base = rendered(&dep);
    let mut changed = dep.clone();
    changed.spec.roles.iter_mut().find(|r| r.name == "decode").unwrap().engine_args.push("--max-num-seqs=64".into());
    let next = rendered(&changed);
    assert_ne!(base.revision, next.revision);
    for role in ["prefill", "decode"] {
        assert!(workload_of(&next, role).metadata.name.as_ref().unwrap().ends_with(&next.revision));
    }
    let mut image = dep.clone();
    image.spec.image = "ghcr.io/dlengine/dlengine:0.2.0".into();
    assert_ne!(update_revision(&image, &ctx()).unwrap(), base.revision);
}

#[test]
fn hpa_actuator_renders_a_scaler_and_an_hpa_on_it() {
    let d = rendered(&samples::autoscaled());
    let scaler = d.objects.iter().find_map(|o| if let ChildObject::RoleScaler(s) = o { Some(s) } else { None }).unwrap();
    assert_eq!((scaler.spec.role.as_str(), scaler.spec.replicas), ("router", 2));
    let hpa = d.objects.iter().find_map(|o| if let ChildObject::HorizontalPodAutoscaler(h) = o { Some(h) } else { None }).unwrap();
    let target = &hpa.spec.as_ref().unwrap().scale_target_ref;
    assert_eq!((target.kind.as_str(), target.name.as_str()), ("InferenceRoleScaler", "chat-autoscaled-router"));
    assert_eq!(hpa.spec.as_ref().unwrap().max_replicas, 6);
}

#[test]
fn api_key_goes_to_the_tier_clients_reach() {
    let d = rendered(&samples::autoscaled());
    let router = container(&workload_of(&d, "router").spec.as_ref().unwrap().template).clone();
    assert!(env(&router, dlengine_cli::env::API_KEY).is_some());
    let decode = container(&workload_of(&d, "decode").spec.as_ref().unwrap().template).clone();
    assert!(env(&decode, dlengine_cli::env::API_KEY).is_none());
}

#[test]
fn image_volumes_and_host_paths_mount_read_only() {
    let d = rendered(&samples::autoscaled());
    let pod = workload_of(&d, "decode").spec.as_ref().unwrap().template.spec.clone().unwrap();
    let model = pod.volumes.unwrap().into_iter().find(|v| v.name == "model").unwrap();
    assert_eq!(model.image.unwrap().reference.as_deref(), Some("registry.example.com/models/qwen2.5-7b-instruct:v1"));
    let mount = pod.containers[0].volume_mounts.clone().unwrap().into_iter().find(|m| m.name == "model").unwrap();
    assert_eq!(mount.read_only, Some(true));
}

#[test]
fn no_registry_is_an_explicit_error() {
    let dep = samples::aggregated();
    let err = render(&dep, &RenderContext::default(), &|r| r.replicas).unwrap_err();
    assert_eq!(err, RenderError::NoRegistry);
}

#[test]
fn owner_references_point_at_the_deployment() {
    let d = rendered(&samples::aggregated());
    for object in &d.objects {
        let manifest = object.manifest().unwrap();
        assert_eq!(manifest["metadata"]["ownerReferences"][0]["uid"], "uid-qwen-small", "{}", object.name());
        assert_eq!(manifest["metadata"]["ownerReferences"][0]["controller"], true);
    }
}

#[test]
fn default_etcd_tls_secret_mounts_only_for_the_default_etcd() {
    let ctx = RenderContext { default_etcd_endpoints: vec!["https://etcd:2379".into()], default_etcd_tls_secret: Some("etcd-client".into()) };
    let dep = samples::aggregated();
    let d = render(&dep, &ctx, &|r| r.replicas).unwrap();
    let pod = deployments(&d)[0].spec.as_ref().unwrap().template.spec.clone().unwrap();
    let tls = pod.volumes.unwrap().into_iter().find(|v| v.name == "etcd-tls").expect("TLS volume");
    assert_eq!(tls.secret.unwrap().secret_name.as_deref(), Some("etcd-client"));
    assert_eq!(env(&pod.containers[0], ETCD_CA_ENV).unwrap().value.as_deref(), Some("/etc/dlengine/etcd-tls/ca.crt"));
    let own = samples::disaggregated();
    assert_eq!(ctx.etcd_tls_secret(&own.spec), None, "a deployment naming its etcd brings its own TLS secret");
}
