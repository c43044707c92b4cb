//! Desired instances per role: the spec, the role's scale handle (HPA, KEDA), or the
//! operator's own policy, in that order of precedence by actuator.

use std::collections::BTreeMap;

use k8s_openapi::jiff::Timestamp;

use crate::autoscale::load::RoleRef;
use crate::autoscale::{decide, Decision, PolicyInput};
use crate::crd::{Actuator, InferenceDeployment, RoleSpec};
use crate::render::InstanceShape;

use super::observe::Observed;
use super::Context;

/// Desired instances of every role, and the policy decisions taken on the way.
pub struct DesiredInstances {
    pub instances: BTreeMap<String, i32>,
    pub decisions: BTreeMap<String, Decision>,
}

pub async fn desired_instances(
    dep: &InferenceDeployment,
    observed: &Observed,
    shapes: &BTreeMap<String, InstanceShape>,
    rolling_out: bool,
    ctx: &Context,
) -> DesiredInstances {
    let mut result = DesiredInstances { instances: BTreeMap::new(), decisions: BTreeMap::new() };
    // Followed roles first, so followers see their leader's new count.
    let (followers, leaders): (Vec<&RoleSpec>, Vec<&RoleSpec>) =
        dep.spec.roles.iter().partition(|r| r.autoscaling.as_ref().is_some_and(|a| a.follow_role.is_some()));
    for role in leaders.into_iter().chain(followers) {
        let (count, decision) = role_instances(dep, role, observed, shapes, rolling_out, &result.instances, ctx).await;
        result.instances.insert(role.name.clone(), count);
        if let Some(decision) = decision {
            result.decisions.insert(role.name.clone(), decision);
        }
    }
    result
}

async fn role_instances(
    dep: &InferenceDeployment,
    role: &RoleSpec,
    observed: &Observed,
    shapes: &BTreeMap<String, InstanceShape>,
    rolling_out: bool,
    decided: &BTreeMap<String, i32>,
    ctx: &Context,
) -> (i32, Option<Decision>) {
    let Some(autoscaling) = &role.autoscaling else { return (role.replicas, None) };
    let clamp = |n: i32| n.clamp(autoscaling.min_replicas, autoscaling.max_replicas);
    match autoscaling.actuator {
        Actuator::Hpa | Actuator::External => (clamp(*observed.scalers.get(&role.name).unwrap_or(&role.replicas)), None),
        Actuator::Operator => {
            let current = clamp(previous_desired(dep, role));
            let load = match ctx.load.role_load(&role_ref(dep, role)).await {
                Ok(load) => Some(load),
                Err(error) => {
                    tracing::debug!(role = %role.name, %error, "no load for role");
                    None
                }
            };
            let input = PolicyInput {
                spec: autoscaling,
                current,
                pending: pending(observed, &role.name),
                load,
                followed: autoscaling.follow_role.as_ref().and_then(|f| decided.get(&f.role).copied()),
                rollout_in_progress: rolling_out,
                gpu_limit: gpu_limit(dep, role, shapes, decided),
            };
            let decision = record(ctx, dep, role, &input);
            (decision.to, Some(decision))
        }
    }
}

fn record(ctx: &Context, dep: &InferenceDeployment, role: &RoleSpec, input: &PolicyInput) -> Decision {
    let key = format!("{}/{}/{}", dep.metadata.namespace.clone().unwrap_or_default(), dep.metadata.name.clone().unwrap_or_default(), role.name);
    let now = seconds(ctx.clock.now());
    match ctx.histories.lock() {
        Ok(mut histories) => decide(input, histories.entry(key).or_default(), now),
        // A poisoned lock only loses smoothing history; decide without it.
        Err(_) => decide(input, &mut Default::default(), now),
    }
}

/// The count the autoscaler set last time (kept in status), else the spec's starting point.
fn previous_desired(dep: &InferenceDeployment, role: &RoleSpec) -> i32 {
    dep.status
        .as_ref()
        .and_then(|s| s.roles.iter().find(|r| r.name == role.name))
        .map(|r| r.desired)
        .unwrap_or(role.replicas)
}

fn pending(observed: &Observed, role: &str) -> i32 {
    observed.workloads.iter().filter(|w| w.role == role).map(|w| w.pending()).sum()
}

/// Instances of `role` the GPU budget leaves room for, given the other roles' counts.
fn gpu_limit(dep: &InferenceDeployment, role: &RoleSpec, shapes: &BTreeMap<String, InstanceShape>, decided: &BTreeMap<String, i32>) -> Option<i32> {
    let budget = dep.spec.gpu_budget?;
    let gpus = |r: &RoleSpec| shapes.get(&r.name).map(|s| s.gpus_per_instance).unwrap_or(0);
    let per_instance = gpus(role);
    if per_instance == 0 {
        return None;
    }
    let used_by_others: i32 = dep
        .spec
        .roles
        .iter()
        .filter(|r| r.name != role.name)
        .map(|r| gpus(r) * decided.get(&r.name).copied().unwrap_or(r.replicas))
        .sum();
    Some(((budget - used_by_others) / per_instance).max(0))
}

fn role_ref(dep: &InferenceDeployment, role: &RoleSpec) -> RoleRef {
    RoleRef {
        namespace: dep.metadata.namespace.clone().unwrap_or_default(),
        deployment: dep.metadata.name.clone().unwrap_or_default(),
        role: role.name.clone(),
    }
}

fn seconds(t: Timestamp) -> f64 {
    t.as_millisecond() as f64 / 1000.0
}
