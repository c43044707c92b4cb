//! The controller against the in-memory API server: create, update, scale, rollouts,
//! deletion with the finalizer, children deleted and recreated, status transitions,
//! autoscaling decisions.

use std::sync::{Arc, Mutex};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::jiff::Timestamp;
use kube::Resource;
use serde_json::{json, Value};

use super::*;
use crate::autoscale::load::{LoadFuture, RoleRef};
use crate::autoscale::{LoadError, LoadSource, RoleLoad};
use crate::crd::InferenceDeployment;
use crate::registry::MemoryRegistry;
use crate::render::{labels, RenderContext};
use crate::testing::fake_api::FakeApi;
use crate::testing::samples;

const CRS: &str = "apis/dlengine.io/v1alpha1";
const APPS: &str = "apis/apps/v1";
const CORE: &str = "api/v1";

#[derive(Default)]
struct FixedLoad(Mutex<Option<RoleLoad>>);

impl LoadSource for FixedLoad {
    fn role_load<'a>(&'a self, role: &'a RoleRef) -> LoadFuture<'a> {
        let load = self.0.lock().unwrap().clone();
        Box::pin(async move { load.ok_or(LoadError::NoInstance { role: role.role.clone() }) })
    }
}

struct FixedClock(Mutex<i64>);

impl Clock for FixedClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_second(*self.0.lock().unwrap()).unwrap()
    }
}

struct Harness {
    api: FakeApi,
    registry: Arc<MemoryRegistry>,
    load: Arc<FixedLoad>,
    clock: Arc<FixedClock>,
    ctx: Arc<Context>,
}

impl Harness {
    fn new() -> Harness {
        let api = FakeApi::default();
        let registry = Arc::new(MemoryRegistry::default());
        let load = Arc::new(FixedLoad::default());
        let clock = Arc::new(FixedClock(Mutex::new(1_800_000_000)));
        let ctx = Arc::new(Context::new(
            api.client(),
            RenderContext { default_etcd_endpoints: vec!["http://etcd:2379".into()], ..Default::default() },
            registry.clone(),
            load.clone(),
            Arc::new(telemetry::Metrics::new()),
            clock.clone(),
        ));
        Harness { api, registry, load, clock, ctx }
    }

    fn create(&self, dep: &InferenceDeployment) {
        let mut value = serde_json::to_value(dep).unwrap();
        value["apiVersion"] = json!("dlengine.io/v1alpha1");
        value["kind"] = json!("InferenceDeployment");
        self.api.put(CRS, "inferencedeployments", "default", value);
    }

    fn dep(&self, name: &str) -> Option<InferenceDeployment> {
        self.api.get(CRS, "inferencedeployments", "default", name).map(|v| serde_json::from_value(v).unwrap())
    }

    async fn reconcile(&self, name: &str) -> Result<kube::runtime::controller::Action, Error> {
        let dep = self.dep(name).expect("deployment exists");
        reconcile(Arc::new(dep), self.ctx.clone()).await
    }

    /// Reconciles until nothing changes any more (as watch events would drive it).
    async fn settle(&self, name: &str) {
        for _ in 0..6 {
            let before = self.api.snapshot();
            self.reconcile(name).await.unwrap();
            if self.api.snapshot() == before {
                return;
            }
        }
        panic!("reconcile of {name} does not settle");
    }

    fn edit_spec(&self, name: &str, edit: impl FnOnce(&mut InferenceDeployment)) {
        let mut dep = self.dep(name).unwrap();
        edit(&mut dep);
        let spec = serde_json::to_value(&dep.spec).unwrap();
        self.api.edit(CRS, "inferencedeployments", "default", name, |v| v["spec"] = spec);
    }

    fn deployments(&self) -> Vec<Deployment> {
        self.api.list(APPS, "deployments").into_iter().map(|v| serde_json::from_value(v).unwrap()).collect()
    }

    fn deployment_for(&self, role: &str) -> Vec<Deployment> {
        self.deployments().into_iter().filter(|d| d.metadata.labels.as_ref().unwrap()[labels::ROLE] == role).collect()
    }

    /// Plays the Deployment controller and kubelet: every pod of every Deployment is ready.
    fn all_pods_ready(&self) {
        for d in self.deployments() {
            self.mark_ready(&d.metadata.name.clone().unwrap());
        }
    }

    fn mark_ready(&self, name: &str) {
        self.api.edit(APPS, "deployments", "default", name, |v| {
            let replicas = v["spec"]["replicas"].clone();
            v["status"] = json!({"replicas": replicas, "readyReplicas": replicas, "updatedReplicas": replicas, "availableReplicas": replicas});
        });
    }

    fn condition(&self, name: &str, type_: &str) -> (String, String) {
        let dep = self.dep(name).unwrap();
        let c = dep.status.unwrap().conditions.into_iter().find(|c| c.type_ == type_).unwrap();
        (c.status, c.reason)
    }

    fn events(&self) -> Vec<Value> {
        self.api.list("apis/events.k8s.io/v1", "events")
    }

    fn has_event(&self, reason: &str) -> bool {
        self.events().iter().any(|e| e["reason"] == reason)
    }
}

#[tokio::test]
async fn create_adds_finalizer_children_and_honest_status() {
    let h = Harness::new();
    h.create(&samples::aggregated());
    h.settle("qwen-small").await;
    let dep = h.dep("qwen-small").unwrap();
    assert_eq!(dep.meta().finalizers.as_deref(), Some(&[FINALIZER.to_string()][..]));
    assert_eq!(h.deployments().len(), 1);
    assert_eq!(h.api.names(CORE, "services"), vec!["qwen-small"]);
    assert_eq!(h.api.list("apis/policy/v1", "poddisruptionbudgets").len(), 1);
    assert_eq!(h.api.list(CORE, "configmaps").len(), 1);
    assert_eq!(h.condition("qwen-small", "Ready"), ("False".into(), "InstancesNotReady".into()), "pods exist but are not ready");
    assert_eq!(h.condition("qwen-small", "Available").0, "False");
    let status = dep.status.unwrap();
    assert_eq!(status.observed_generation, Some(1));
    assert_eq!(status.endpoint.as_deref(), Some("http://qwen-small.default.svc:8000/v1"));
    assert_eq!(status.current_revision, status.update_revision);
    assert_eq!((status.roles[0].desired, status.roles[0].ready, status.roles[0].pending), (1, 0, 1));
}

#[tokio::test]
async fn ready_pods_make_it_ready_and_a_second_reconcile_writes_nothing() {
    let h = Harness::new();
    h.create(&samples::aggregated());
    h.settle("qwen-small").await;
    h.all_pods_ready();
    h.settle("qwen-small").await;
    assert_eq!(h.condition("qwen-small", "Ready"), ("True".into(), "AllInstancesReady".into()));
    assert_eq!(h.condition("qwen-small", "Available").0, "True");
    assert_eq!(h.condition("qwen-small", "Progressing").0, "False");
    let before = h.api.snapshot();
    h.clock.0.lock().map(|mut t| *t += 60).unwrap();
    h.reconcile("qwen-small").await.unwrap();
    assert_eq!(h.api.snapshot(), before, "a reconcile of an unchanged world changes nothing");
}

#[tokio::test]
async fn deleted_child_is_recreated() {
    let h = Harness::new();
    h.create(&samples::aggregated());
    h.settle("qwen-small").await;
    let name = h.deployments()[0].metadata.name.clone().unwrap();
    h.api.remove(APPS, "deployments", "default", &name);
    h.api.remove(CORE, "services", "default", "qwen-small");
    h.reconcile("qwen-small").await.unwrap();
    assert_eq!(h.deployments()[0].metadata.name.as_deref(), Some(name.as_str()));
    assert_eq!(h.api.names(CORE, "services"), vec!["qwen-small"]);
}

#[tokio::test]
async fn scaling_keeps_the_revision_and_the_pods() {
    let h = Harness::new();
    h.create(&samples::aggregated());
    h.settle("qwen-small").await;
    h.all_pods_ready();
    let before = h.deployments()[0].clone();
    h.edit_spec("qwen-small", |d| d.spec.roles[0].replicas = 3);
    h.settle("qwen-small").await;
    let after = h.deployments();
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].metadata.name, before.metadata.name);
    assert_eq!(after[0].spec.as_ref().unwrap().replicas, Some(3));
    assert_eq!(after[0].spec.as_ref().unwrap().template, before.spec.as_ref().unwrap().template, "no pod is rolled");
    assert_eq!(h.condition("qwen-small", "Ready").0, "False", "3 desired, 1 ready");
    assert_eq!(h.condition("qwen-small", "Progressing"), ("True".into(), "Scaling".into()));
}

#[tokio::test]
async fn image_change_rolls_a_new_revision_then_removes_the_old_one() {
    let h = Harness::new();
    h.create(&samples::aggregated());
    h.settle("qwen-small").await;
    h.all_pods_ready();
    h.settle("qwen-small").await;
    let old = h.dep("qwen-small").unwrap().status.unwrap().current_revision.unwrap();
    h.edit_spec("qwen-small", |d| d.spec.image = "ghcr.io/dlengine/dlengine:0.2.0".into());
    h.settle("qwen-small").await;
    let status = h.dep("qwen-small").unwrap().status.unwrap();
    let new = status.update_revision.clone().unwrap();
    assert_ne!(new, old);
    assert_eq!(status.current_revision.as_deref(), Some(old.as_str()), "old stays current until the new one is up");
    assert_eq!(h.deployments().len(), 2, "old and new side by side");
    assert_eq!(h.condition("qwen-small", "Ready"), ("False".into(), "RolloutInProgress".into()));
    assert_eq!(h.condition("qwen-small", "Available").0, "True", "the old revision still serves");
    assert!(h.has_event("RolloutStarted"));
    h.all_pods_ready();
    h.settle("qwen-small").await;
    let names: Vec<String> = h.deployments().iter().map(|d| d.metadata.name.clone().unwrap()).collect();
    assert_eq!(names, vec![format!("qwen-small-engine-{new}")]);
    let status = h.dep("qwen-small").unwrap().status.unwrap();
    assert_eq!(status.current_revision.as_deref(), Some(new.as_str()));
    assert_eq!(h.condition("qwen-small", "Ready").0, "True");
    assert!(h.has_event("RolloutComplete"));
    assert_eq!(h.api.list(CORE, "configmaps").len(), 1, "the old revision's ConfigMap went with it");
}

#[tokio::test]
async fn prefill_and_decode_roll_forward_together() {
    let h = Harness::new();
    h.create(&samples::disaggregated());
    h.settle("llama-pd").await;
    h.all_pods_ready();
    h.settle("llama-pd").await;
    assert_eq!(h.condition("llama-pd", "Ready").0, "True");
    h.edit_spec("llama-pd", |d| d.spec.roles.iter_mut().find(|r| r.name == "decode").unwrap().engine_args.push("--max-num-seqs=64".into()));
    h.settle("llama-pd").await;
    assert_eq!(h.deployment_for("prefill").len(), 2, "a decode change rolls prefill too: one revision");
    assert_eq!(h.deployment_for("decode").len(), 2);
    let update = h.dep("llama-pd").unwrap().status.unwrap().update_revision.unwrap();
    // New prefill ready, new decode not: the new revision cannot serve, so nothing old goes.
    let new_prefill = h.deployment_for("prefill").into_iter().find(|d| d.metadata.name.as_ref().unwrap().ends_with(&update)).unwrap();
    h.mark_ready(&new_prefill.metadata.name.unwrap());
    h.settle("llama-pd").await;
    assert_eq!(h.deployment_for("prefill").len(), 2);
    assert_eq!(h.deployment_for("decode").len(), 2);
    for d in h.deployments().iter().filter(|d| !d.metadata.name.as_ref().unwrap().ends_with(&update) && d.metadata.labels.as_ref().unwrap().contains_key(labels::REVISION)) {
        assert_eq!(d.spec.as_ref().unwrap().replicas, Some(1), "{:?} kept at full size", d.metadata.name);
    }
    h.all_pods_ready();
    h.settle("llama-pd").await;
    assert_eq!(h.deployment_for("prefill").len(), 1);
    assert_eq!(h.deployment_for("decode").len(), 1);
    assert_eq!(h.deployment_for("router").len(), 1, "the router is not part of revision rollouts");
    assert_eq!(h.condition("llama-pd", "Ready").0, "True");
}

#[tokio::test]
async fn delete_removes_the_registry_prefix_then_the_finalizer() {
    let h = Harness::new();
    h.create(&samples::aggregated());
    h.settle("qwen-small").await;
    h.registry.put("/dlengine/default/qwen-small/abc/aggregated/pod-1", "{}");
    h.registry.put("/dlengine/default/qwen-small2/abc/aggregated/pod-2", "{}");
    let api: kube::Api<InferenceDeployment> = kube::Api::namespaced(h.ctx.client.clone(), "default");
    api.delete("qwen-small", &Default::default()).await.unwrap();
    assert!(h.dep("qwen-small").is_some(), "the finalizer holds the object");
    h.registry.fail_with(Some("etcd down"));
    assert!(h.reconcile("qwen-small").await.is_err(), "cleanup failure is retried, not skipped");
    assert!(h.dep("qwen-small").is_some());
    h.registry.fail_with(None);
    h.reconcile("qwen-small").await.unwrap();
    assert!(h.dep("qwen-small").is_none());
    assert_eq!(h.registry.keys(), vec!["/dlengine/default/qwen-small2/abc/aggregated/pod-2"]);
    assert!(h.deployments().is_empty(), "children are garbage collected through owner references");
}

#[tokio::test]
async fn invalid_spec_is_refused_without_touching_children() {
    let h = Harness::new();
    let mut dep = samples::aggregated();
    dep.spec.roles.push(dep.spec.roles[0].clone());
    h.create(&dep);
    h.settle("qwen-small").await;
    assert!(h.deployments().is_empty());
    assert_eq!(h.condition("qwen-small", "Degraded"), ("True".into(), "InvalidSpec".into()));
    assert!(h.has_event("InvalidSpec"));
    let events = h.events().len();
    h.reconcile("qwen-small").await.unwrap();
    assert_eq!(h.events().len(), events, "the same problem is not announced twice");
}

#[tokio::test]
async fn removed_role_takes_its_children_along() {
    let h = Harness::new();
    let mut dep = samples::disaggregated();
    dep.spec.roles.push(crate::crd::RoleSpec { name: "chat".into(), kind: crate::crd::RoleKind::Aggregated, ..dep.spec.roles[1].clone() });
    h.create(&dep);
    h.settle("llama-pd").await;
    assert_eq!(h.deployment_for("chat").len(), 1);
    h.edit_spec("llama-pd", |d| d.spec.roles.retain(|r| r.name != "chat"));
    h.settle("llama-pd").await;
    assert!(h.deployment_for("chat").is_empty());
    assert!(!h.api.names("apis/policy/v1", "poddisruptionbudgets").contains(&"llama-pd-chat".to_string()));
}

#[tokio::test]
async fn hpa_drives_the_role_through_its_scaler() {
    let h = Harness::new();
    h.create(&samples::autoscaled());
    h.settle("chat-autoscaled").await;
    let scaler = h.api.get(CRS, "inferencerolescalers", "default", "chat-autoscaled-router").expect("scaler created");
    assert_eq!(scaler["spec"]["replicas"], 2);
    assert_eq!(h.api.names("apis/autoscaling/v2", "horizontalpodautoscalers"), vec!["chat-autoscaled-router"]);
    // The HPA writes /scale.
    h.api.edit(CRS, "inferencerolescalers", "default", "chat-autoscaled-router", |v| v["spec"]["replicas"] = json!(5));
    h.settle("chat-autoscaled").await;
    assert_eq!(h.deployment_for("router")[0].spec.as_ref().unwrap().replicas, Some(5));
    let scaler = h.api.get(CRS, "inferencerolescalers", "default", "chat-autoscaled-router").unwrap();
    assert_eq!(scaler["spec"]["replicas"], 5, "the operator never takes replicas back from the HPA");
    assert_eq!(scaler["status"]["selector"], "dlengine.io/deployment=chat-autoscaled,dlengine.io/role=router", "HPA resource metrics need the pod selector");
    assert_eq!(scaler["status"]["replicas"], 5);
}

#[tokio::test]
async fn operator_autoscaler_scales_decode_and_prefill_follows() {
    let h = Harness::new();
    h.create(&samples::autoscaled());
    h.settle("chat-autoscaled").await;
    h.all_pods_ready();
    h.settle("chat-autoscaled").await;
    *h.load.0.lock().unwrap() = Some(RoleLoad { instances: 2, queue_depth: 12.0, kv_cache_utilization: 0.5, ttft_p95_seconds: Some(0.2), itl_p95_seconds: Some(0.02) });
    h.clock.0.lock().map(|mut t| *t += 60).unwrap();
    h.reconcile("chat-autoscaled").await.unwrap();
    let status = h.dep("chat-autoscaled").unwrap().status.unwrap();
    let decode = status.roles.iter().find(|r| r.name == "decode").unwrap();
    assert_eq!(decode.desired, 6, "queue 12 vs target 4 over 2 instances, step 4");
    assert_eq!(decode.last_scaling.as_ref().unwrap().reason, "LoadHigh");
    let prefill = status.roles.iter().find(|r| r.name == "prefill").unwrap();
    assert_eq!(prefill.desired, 3, "half of decode");
    assert_eq!(h.deployment_for("decode")[0].spec.as_ref().unwrap().replicas, Some(6));
    assert!(h.has_event("Autoscaled"));
    // New instances are pending: more load must not add more yet.
    *h.load.0.lock().unwrap() = Some(RoleLoad { instances: 2, queue_depth: 40.0, kv_cache_utilization: 0.9, ttft_p95_seconds: None, itl_p95_seconds: None });
    h.clock.0.lock().map(|mut t| *t += 60).unwrap();
    h.reconcile("chat-autoscaled").await.unwrap();
    let status = h.dep("chat-autoscaled").unwrap().status.unwrap();
    let decode = status.roles.iter().find(|r| r.name == "decode").unwrap();
    assert_eq!((decode.desired, decode.last_scaling.as_ref().unwrap().reason.as_str()), (6, "HeldPendingInstances"));
}

#[tokio::test]
async fn stuck_workload_marks_the_deployment_degraded() {
    let h = Harness::new();
    h.create(&samples::aggregated());
    h.settle("qwen-small").await;
    let name = h.deployments()[0].metadata.name.clone().unwrap();
    h.api.edit(APPS, "deployments", "default", &name, |v| {
        v["status"] = json!({"replicas": 1, "conditions": [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded", "message": "ReplicaSet has timed out progressing."}]});
    });
    h.reconcile("qwen-small").await.unwrap();
    assert_eq!(h.condition("qwen-small", "Degraded"), ("True".into(), "ProgressDeadlineExceeded".into()));
    assert_eq!(h.condition("qwen-small", "Ready").0, "False");
}
