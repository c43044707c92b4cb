//! One reconciliation of an InferenceDeployment: validate, observe, decide instance counts,
//! plan the rollout, apply, clean up, report.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType};
use kube::runtime::finalizer::{finalizer, Event};
use kube::{Resource, ResourceExt};

use crate::autoscale::Decision;
use crate::controller::telemetry::ScalingLabels;
use crate::crd::{InferenceDeployment, InferenceDeploymentStatus, InferenceRoleScaler, InferenceRoleScalerStatus, RoleSpec, RoleStatus, ScalingDecision};
use crate::render::{self, labels, names, Desired, InstanceShape, ENGINE_PORT};
use crate::validate::spec_problems;

use super::apply::{apply_child, apply_params};
use super::autoscaling::{desired_instances, DesiredInstances};
use super::cleanup::{delete_registrations, delete_stale, scale_old_workload};
use super::conditions::{self, Facts};
use super::observe::{observe, Observed, ObservedWorkload};
use super::rollout::{self, OldWorkload, RoleInstances, RolloutPlan};
use super::{Context, Error};

pub const FINALIZER: &str = "dlengine.io/registry-cleanup";

const REQUEUE_BUSY: Duration = Duration::from_secs(10);
const REQUEUE_AUTOSCALED: Duration = Duration::from_secs(30);
const REQUEUE_IDLE: Duration = Duration::from_secs(300);

pub async fn reconcile(dep: Arc<InferenceDeployment>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let namespace = dep.namespace().ok_or(Error::MissingField("metadata.namespace"))?;
    let api: Api<InferenceDeployment> = Api::namespaced(ctx.client.clone(), &namespace);
    let result = finalizer(&api, FINALIZER, dep, |event| async {
        match event {
            Event::Apply(dep) => apply_or_report(&dep, &ctx).await,
            Event::Cleanup(dep) => delete_registrations(&dep, &ctx).await.map(|()| Action::await_change()),
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    ctx.metrics.observe_reconcile(started.elapsed());
    result
}

pub fn error_policy(dep: Arc<InferenceDeployment>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(deployment = %dep.name_any(), namespace = ?dep.namespace(), %error, "reconcile failed");
    ctx.metrics.reconcile_errors.get_or_create(&super::telemetry::ErrorLabels { error: error.metric_label().into() }).inc();
    Action::requeue(Duration::from_secs(30))
}

/// A failed reconcile still says so in status (best effort: the API may be what failed).
async fn apply_or_report(dep: &InferenceDeployment, ctx: &Context) -> Result<Action, Error> {
    match apply(dep, ctx).await {
        Ok(action) => Ok(action),
        Err(error) => {
            let facts = Facts { error: Some(error.to_string()), ..Default::default() };
            let mut status = dep.status.clone().unwrap_or_default();
            status.conditions = conditions::conditions(&facts, &status.conditions, dep.metadata.generation, &now(ctx));
            if let Err(status_error) = write_status(dep, ctx, status).await {
                tracing::debug!(%status_error, "could not report the reconcile error in status");
            }
            Err(error)
        }
    }
}

async fn apply(dep: &InferenceDeployment, ctx: &Context) -> Result<Action, Error> {
    let problems = spec_problems(&dep.spec);
    if !problems.is_empty() {
        return refuse(dep, ctx, problems.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("; ")).await;
    }
    let namespace = dep.namespace().ok_or(Error::MissingField("metadata.namespace"))?;
    let uid = dep.uid().ok_or(Error::MissingField("metadata.uid"))?;
    let name = dep.name_any();
    let observed = observe(&ctx.client, &namespace, &name, &uid).await?;
    let update_revision = render::update_revision(dep, &ctx.render)?;
    let current_revision = current_revision(dep, &observed, &update_revision);
    let rolling_out = current_revision != update_revision || has_old_workloads(&observed, &update_revision);
    let shapes = shapes(dep)?;
    let wanted = desired_instances(dep, &observed, &shapes, rolling_out, ctx).await;
    let plan = plan_rollout(dep, &observed, &wanted.instances, &update_revision, &current_revision);
    let desired = render::render(dep, &ctx.render, &|role: &RoleSpec| instances_for(role, &plan, &wanted))?;
    for child in &desired.objects {
        apply_child(&ctx.client, &namespace, child).await?;
    }
    let kept = drain_old_workloads(ctx, &namespace, &observed, &plan).await?;
    let mut kept_revisions: BTreeSet<String> = kept.clone();
    kept_revisions.insert(update_revision.clone());
    let roles: BTreeSet<String> = dep.spec.roles.iter().map(|r| r.name.clone()).collect();
    delete_stale(&ctx.client, &namespace, &observed, &desired_names(&desired), &kept_revisions, &roles).await?;
    let new_current = if plan.complete || !rolling_out { update_revision.clone() } else { current_revision.clone() };
    announce(dep, ctx, &current_revision, &new_current, &update_revision, &wanted.decisions).await;
    let status = status(dep, ctx, &observed, &wanted, &desired, &new_current, &shapes);
    report_scalers(dep, ctx, &namespace, &observed, &status).await?;
    let busy = status.conditions.iter().any(|c| c.type_ == conditions::PROGRESSING && c.status == "True");
    write_status(dep, ctx, status).await?;
    Ok(requeue(dep, busy))
}

/// An invalid spec changes nothing in the cluster; status and an Event say what is wrong.
async fn refuse(dep: &InferenceDeployment, ctx: &Context, why: String) -> Result<Action, Error> {
    let mut status = dep.status.clone().unwrap_or_default();
    let already_said = status.conditions.iter().any(|c| c.type_ == conditions::DEGRADED && c.message == why);
    let facts = Facts { invalid_spec: Some(why.clone()), ..Default::default() };
    status.conditions = conditions::conditions(&facts, &status.conditions, dep.metadata.generation, &now(ctx));
    status.observed_generation = dep.metadata.generation;
    write_status(dep, ctx, status).await?;
    if !already_said {
        publish(dep, ctx, EventType::Warning, "InvalidSpec", &why).await;
    }
    Ok(Action::await_change())
}

/// The revision serving now: what status recorded (even if its workloads were deleted: the
/// rollout then simply completes), else the most ready one found, else the update.
fn current_revision(dep: &InferenceDeployment, observed: &Observed, update: &str) -> String {
    dep.status
        .as_ref()
        .and_then(|s| s.current_revision.clone())
        .or_else(|| most_ready_revision(observed))
        .unwrap_or_else(|| update.to_string())
}

fn most_ready_revision(observed: &Observed) -> Option<String> {
    let mut ready: BTreeMap<String, i32> = BTreeMap::new();
    for w in &observed.workloads {
        if let Some(rev) = &w.revision {
            *ready.entry(rev.clone()).or_default() += w.ready;
        }
    }
    ready.into_iter().max_by_key(|(_, n)| *n).map(|(rev, _)| rev)
}

fn has_old_workloads(observed: &Observed, update: &str) -> bool {
    observed.workloads.iter().any(|w| w.revision.as_deref().is_some_and(|r| r != update))
}

fn shapes(dep: &InferenceDeployment) -> Result<BTreeMap<String, InstanceShape>, Error> {
    dep.spec.roles.iter().map(|r| Ok((r.name.clone(), render::shape_of(r)?))).collect()
}

fn plan_rollout(dep: &InferenceDeployment, observed: &Observed, wanted: &BTreeMap<String, i32>, update: &str, current: &str) -> RolloutPlan {
    let roles: Vec<RoleInstances> = dep
        .spec
        .roles
        .iter()
        .filter(|r| r.kind.runs_engine())
        .map(|role| role_instances(role, observed, wanted, update, current))
        .collect();
    rollout::plan(&roles, &dep.spec.rollout)
}

fn role_instances(role: &RoleSpec, observed: &Observed, wanted: &BTreeMap<String, i32>, update: &str, current: &str) -> RoleInstances {
    let of_role = observed.workloads.iter().filter(|w| w.role == role.name);
    let (at_update, old): (Vec<&ObservedWorkload>, Vec<&ObservedWorkload>) = of_role.partition(|w| w.revision.as_deref() == Some(update));
    RoleInstances {
        role: role.name.clone(),
        desired: wanted.get(&role.name).copied().unwrap_or(role.replicas),
        update_current: at_update.iter().map(|w| w.instances).sum(),
        update_ready: at_update.iter().map(|w| w.ready).sum(),
        old: old
            .iter()
            .map(|w| OldWorkload {
                name: w.name.clone(),
                revision: w.revision.clone().unwrap_or_default(),
                current: w.instances,
                ready: w.ready,
                is_current_revision: w.revision.as_deref() == Some(current),
            })
            .collect(),
    }
}

fn instances_for(role: &RoleSpec, plan: &RolloutPlan, wanted: &DesiredInstances) -> i32 {
    let desired = wanted.instances.get(&role.name).copied().unwrap_or(role.replicas);
    if role.kind.runs_engine() {
        plan.update_targets.get(&role.name).copied().unwrap_or(desired)
    } else {
        desired
    }
}

/// Scales old workloads to the plan; returns the revisions that still have instances.
async fn drain_old_workloads(ctx: &Context, namespace: &str, observed: &Observed, plan: &RolloutPlan) -> Result<BTreeSet<String>, Error> {
    let mut kept = BTreeSet::new();
    for workload in &observed.workloads {
        let Some(&target) = plan.old_targets.get(&workload.name) else { continue };
        if target == 0 {
            continue; // deleted with the other stale children
        }
        if target != workload.instances {
            scale_old_workload(&ctx.client, namespace, workload.kind, &workload.name, target * workload.nodes).await?;
        }
        if let Some(rev) = &workload.revision {
            kept.insert(rev.clone());
        }
    }
    Ok(kept)
}

fn desired_names(desired: &Desired) -> BTreeSet<(String, String)> {
    desired.objects.iter().map(|o| (o.kind().to_string(), o.name())).collect()
}

async fn announce(dep: &InferenceDeployment, ctx: &Context, before: &str, after: &str, update: &str, decisions: &BTreeMap<String, Decision>) {
    let previous_update = dep.status.as_ref().and_then(|s| s.update_revision.clone());
    if previous_update.as_deref() != Some(update) && before != update {
        publish(dep, ctx, EventType::Normal, "RolloutStarted", &format!("rolling out revision {update} (current {before})")).await;
    }
    if before != after {
        publish(dep, ctx, EventType::Normal, "RolloutComplete", &format!("revision {after} is current")).await;
    }
    for (role, decision) in decisions {
        if changed_decision(dep, role, decision) {
            ctx.metrics.scaling_decisions.get_or_create(&ScalingLabels { reason: decision.reason.as_str().into() }).inc();
            let message = format!("role {role}: {} -> {} ({}): {}", decision.from, decision.to, decision.reason.as_str(), decision.message);
            publish(dep, ctx, EventType::Normal, "Autoscaled", &message).await;
        }
    }
}

/// Events only for changes of count or reason, so a steady state does not flood them.
fn changed_decision(dep: &InferenceDeployment, role: &str, decision: &Decision) -> bool {
    let last = dep.status.as_ref().and_then(|s| s.roles.iter().find(|r| r.name == role)).and_then(|r| r.last_scaling.clone());
    match last {
        Some(last) => last.to != decision.to || last.reason != decision.reason.as_str(),
        None => decision.to != decision.from,
    }
}

async fn publish(dep: &InferenceDeployment, ctx: &Context, type_: EventType, reason: &str, note: &str) {
    let event = KubeEvent { type_, reason: reason.into(), note: Some(note.into()), action: "Reconcile".into(), secondary: None };
    if let Err(error) = ctx.recorder.publish(&event, &dep.object_ref(&())).await {
        tracing::debug!(%error, reason, "event not published");
    }
}

#[allow(clippy::too_many_arguments)]
fn status(
    dep: &InferenceDeployment,
    ctx: &Context,
    observed: &Observed,
    wanted: &DesiredInstances,
    desired: &Desired,
    current: &str,
    shapes: &BTreeMap<String, InstanceShape>,
) -> InferenceDeploymentStatus {
    let previous = dep.status.clone().unwrap_or_default();
    let update = &desired.revision;
    let roles: Vec<RoleStatus> = dep.spec.roles.iter().map(|r| role_status(r, observed, wanted, update, shapes, &previous, ctx)).collect();
    let rolling_out = current != update.as_str();
    let facts = Facts {
        rolling_out,
        scaling: roles.iter().any(|r| r.pending > 0 || r.updated != r.desired),
        all_ready: !rolling_out && roles.iter().all(|r| r.updated >= r.desired),
        serving: serving(dep, observed),
        stuck: observed.workloads.iter().filter_map(|w| w.stuck.clone()).collect(),
        not_ready: roles.iter().filter(|r| r.updated < r.desired).map(|r| format!("role {}: {}/{} instances ready", r.name, r.updated, r.desired)).collect(),
        ..Default::default()
    };
    InferenceDeploymentStatus {
        observed_generation: dep.metadata.generation,
        conditions: conditions::conditions(&facts, &previous.conditions, dep.metadata.generation, &now(ctx)),
        current_revision: Some(current.to_string()),
        update_revision: Some(update.clone()),
        endpoint: render::front_role(&dep.spec)
            .map(|_| format!("http://{}.{}.svc:{ENGINE_PORT}/v1", names::endpoint_service(&dep.name_any()), dep.namespace().unwrap_or_default())),
        roles,
    }
}

fn role_status(
    role: &RoleSpec,
    observed: &Observed,
    wanted: &DesiredInstances,
    update: &str,
    shapes: &BTreeMap<String, InstanceShape>,
    previous: &InferenceDeploymentStatus,
    ctx: &Context,
) -> RoleStatus {
    let workloads: Vec<&ObservedWorkload> = observed.workloads.iter().filter(|w| w.role == role.name).collect();
    let is_update = |w: &&&ObservedWorkload| !role.kind.runs_engine() || w.revision.as_deref() == Some(update);
    let shape = shapes.get(&role.name).copied().unwrap_or(InstanceShape { gpus_per_instance: 0, gpus_per_pod: 0, nodes: 1, tensor_parallel: 1 });
    let previous_scaling = previous.roles.iter().find(|r| r.name == role.name).and_then(|r| r.last_scaling.clone());
    RoleStatus {
        name: role.name.clone(),
        kind: role.kind,
        desired: wanted.instances.get(&role.name).copied().unwrap_or(role.replicas),
        ready: workloads.iter().map(|w| w.ready).sum(),
        updated: workloads.iter().filter(is_update).map(|w| w.ready).sum(),
        pending: workloads.iter().map(|w| w.pending()).sum(),
        nodes_per_instance: shape.nodes,
        gpus_per_instance: shape.gpus_per_instance,
        last_scaling: scaling_record(wanted.decisions.get(&role.name), previous_scaling, ctx),
    }
}

/// The decision is recorded when its count or reason changes; otherwise the last record
/// (and its time) stays, so status does not change on every reconcile.
fn scaling_record(decision: Option<&Decision>, previous: Option<ScalingDecision>, ctx: &Context) -> Option<ScalingDecision> {
    let Some(decision) = decision else { return previous };
    if let Some(prev) = &previous {
        if prev.to == decision.to && prev.reason == decision.reason.as_str() {
            return previous;
        }
    }
    Some(ScalingDecision { from: decision.from, to: decision.to, reason: decision.reason.as_str().into(), message: decision.message.clone(), time: now(ctx) })
}

/// Some revision has a ready instance of every engine role (prefill pairs only with decode
/// of its own revision), and the router, if any, has a ready instance.
fn serving(dep: &InferenceDeployment, observed: &Observed) -> bool {
    let ready_of = |role: &str, revision: Option<&str>| {
        observed.workloads.iter().filter(|w| w.role == role && (revision.is_none() || w.revision.as_deref() == revision)).map(|w| w.ready).sum::<i32>()
    };
    let router_ok = dep.spec.roles.iter().filter(|r| !r.kind.runs_engine()).all(|r| ready_of(&r.name, None) > 0);
    let revisions: BTreeSet<&str> = observed.workloads.iter().filter_map(|w| w.revision.as_deref()).collect();
    let engines_ok = revisions
        .into_iter()
        .any(|rev| dep.spec.roles.iter().filter(|r| r.kind.runs_engine()).all(|r| ready_of(&r.name, Some(rev)) > 0));
    router_ok && engines_ok
}

/// The scale handles' status: instances and the pod selector HPAs need for per-pod metrics.
async fn report_scalers(dep: &InferenceDeployment, ctx: &Context, namespace: &str, observed: &Observed, status: &InferenceDeploymentStatus) -> Result<(), Error> {
    let api: Api<InferenceRoleScaler> = Api::namespaced(ctx.client.clone(), namespace);
    for (role_name, current) in &observed.scaler_status {
        let (Some(role), Some(role_status)) = (dep.spec.roles.iter().find(|r| &r.name == role_name), status.roles.iter().find(|r| &r.name == role_name)) else {
            continue;
        };
        let wanted = InferenceRoleScalerStatus {
            replicas: role_status.ready + role_status.pending,
            ready_replicas: role_status.ready,
            selector: labels::selector_string(&labels::role_selector(&dep.name_any(), role)),
        };
        if current.as_ref() == Some(&wanted) {
            continue;
        }
        let patch = Patch::Merge(serde_json::json!({ "status": wanted }));
        api.patch_status(&names::role_wide(&dep.name_any(), role), &kube::api::PatchParams::default(), &patch).await?;
    }
    Ok(())
}

/// Server-side apply of the whole status: fields the controller no longer reports go away.
async fn write_status(dep: &InferenceDeployment, ctx: &Context, status: InferenceDeploymentStatus) -> Result<(), Error> {
    if dep.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let namespace = dep.namespace().ok_or(Error::MissingField("metadata.namespace"))?;
    let api: Api<InferenceDeployment> = Api::namespaced(ctx.client.clone(), &namespace);
    let body = serde_json::json!({
        "apiVersion": InferenceDeployment::api_version(&()),
        "kind": InferenceDeployment::kind(&()),
        "status": status,
    });
    api.patch_status(&dep.name_any(), &apply_params(), &Patch::Apply(&body)).await?;
    Ok(())
}

fn requeue(dep: &InferenceDeployment, busy: bool) -> Action {
    let autoscaled = dep.spec.roles.iter().any(|r| r.autoscaling.is_some());
    match (busy, autoscaled) {
        (true, _) => Action::requeue(REQUEUE_BUSY),
        (false, true) => Action::requeue(REQUEUE_AUTOSCALED),
        (false, false) => Action::requeue(REQUEUE_IDLE),
    }
}

fn now(ctx: &Context) -> Time {
    Time(ctx.clock.now())
}
