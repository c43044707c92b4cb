//! Rollout of a new revision, as a pure plan over observed instance counts.
//!
//! Prefill and decode of one revision only pair with each other, so a revision serves only
//! as far as its slowest role is up: old instances are drained in step with the *least*
//! ready new role, never faster. The router is not part of this: it has no revision.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::crd::RolloutSpec;

/// Observed instances of one role at the update revision and at older revisions.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RoleInstances {
    pub role: String,
    pub desired: i32,
    /// Instances the update revision's workload asks for now (0 when it does not exist yet).
    pub update_current: i32,
    pub update_ready: i32,
    pub old: Vec<OldWorkload>,
}

/// A workload of an older revision.
#[derive(Debug, Clone, PartialEq)]
pub struct OldWorkload {
    pub name: String,
    pub revision: String,
    pub current: i32,
    pub ready: i32,
    /// The revision that served before this rollout: drained last.
    pub is_current_revision: bool,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct RolloutPlan {
    /// Instances per role for the update revision's workload.
    pub update_targets: BTreeMap<String, i32>,
    /// Instances per old workload name.
    pub old_targets: BTreeMap<String, i32>,
    /// The update revision is fully up and nothing old runs: it becomes current.
    pub complete: bool,
}

pub fn plan(roles: &[RoleInstances], rollout: &RolloutSpec) -> RolloutPlan {
    let progress = paired_progress(roles);
    let mut result = RolloutPlan::default();
    for role in roles {
        let (surge, unavailable) = limits(rollout, role.desired);
        let old_current: i32 = role.old.iter().map(|o| o.current).sum();
        let served_by_update = (progress * f64::from(role.desired)).floor() as i32;
        let old_budget = (role.desired - unavailable - served_by_update).max(0).min(old_current);
        // Total instances stay within desired + surge once the old ones being removed are gone.
        let room = role.desired + surge - old_budget;
        let update_target = role.update_current.max(room).clamp(0, role.desired);
        result.update_targets.insert(role.role.clone(), update_target);
        result.old_targets.extend(distribute(&role.old, old_budget));
    }
    result.complete = roles.iter().all(|r| r.update_ready >= r.desired && r.update_current == r.desired)
        && result.old_targets.values().all(|&n| n == 0)
        && roles.iter().all(|r| r.old.iter().all(|o| o.current == 0));
    result
}

/// How far the update revision can serve: the smallest ready fraction over its roles.
fn paired_progress(roles: &[RoleInstances]) -> f64 {
    roles
        .iter()
        .map(|r| if r.desired == 0 { 1.0 } else { (f64::from(r.update_ready) / f64::from(r.desired)).min(1.0) })
        .fold(1.0, f64::min)
}

/// Surge (rounded up) and unavailability (rounded down) in instances; never both zero,
/// or the rollout could not move.
fn limits(rollout: &RolloutSpec, desired: i32) -> (i32, i32) {
    let surge = resolve(rollout.max_surge.as_ref(), desired, 25, true);
    let unavailable = resolve(rollout.max_unavailable.as_ref(), desired, 0, false);
    if surge == 0 && unavailable == 0 {
        (1, 0)
    } else {
        (surge, unavailable)
    }
}

fn resolve(value: Option<&IntOrString>, desired: i32, default_percent: i32, round_up: bool) -> i32 {
    let percent = match value {
        Some(IntOrString::Int(n)) => return (*n).max(0),
        Some(IntOrString::String(s)) => s.trim_end_matches('%').parse::<i32>().unwrap_or(default_percent),
        None => default_percent,
    };
    let scaled = f64::from(desired) * f64::from(percent.max(0)) / 100.0;
    (if round_up { scaled.ceil() } else { scaled.floor() }) as i32
}

/// Spread `budget` over old workloads, keeping the previously current revision longest.
fn distribute(old: &[OldWorkload], mut budget: i32) -> BTreeMap<String, i32> {
    let mut ordered: Vec<&OldWorkload> = old.iter().collect();
    ordered.sort_by_key(|o| (!o.is_current_revision, o.name.clone()));
    let mut targets = BTreeMap::new();
    for workload in ordered {
        let keep = workload.current.min(budget);
        budget -= keep;
        targets.insert(workload.name.clone(), keep);
    }
    targets
}

#[cfg(test)]
mod tests {
    use super::*;

    fn role(name: &str, desired: i32, update: (i32, i32), old: (i32, i32)) -> RoleInstances {
        RoleInstances {
            role: name.into(),
            desired,
            update_current: update.0,
            update_ready: update.1,
            old: vec![OldWorkload { name: format!("{name}-old"), revision: "old".into(), current: old.0, ready: old.1, is_current_revision: true }],
        }
    }

    fn spec(surge: i32, unavailable: i32) -> RolloutSpec {
        RolloutSpec { max_surge: Some(IntOrString::Int(surge)), max_unavailable: Some(IntOrString::Int(unavailable)) }
    }

    #[test]
    fn no_old_revision_means_straight_to_desired() {
        let plan = plan(&[RoleInstances { role: "a".into(), desired: 3, ..Default::default() }], &RolloutSpec::default());
        assert_eq!(plan.update_targets["a"], 3);
        assert!(!plan.complete, "not complete until ready");
    }

    #[test]
    fn surge_bounds_new_instances_and_old_stay_until_new_are_ready() {
        let roles = [role("prefill", 4, (0, 0), (4, 4)), role("decode", 4, (0, 0), (4, 4))];
        let plan = plan(&roles, &spec(1, 0));
        assert_eq!(plan.update_targets["prefill"], 1);
        assert_eq!(plan.old_targets["prefill-old"], 4);
        assert_eq!(plan.old_targets["decode-old"], 4);
    }

    #[test]
    fn old_decode_is_not_drained_while_new_decode_lags_new_prefill() {
        // New prefill fully ready, new decode not ready at all: the new revision serves nothing.
        let roles = [role("prefill", 2, (2, 2), (2, 2)), role("decode", 2, (1, 0), (2, 2))];
        let plan = plan(&roles, &spec(1, 0));
        assert_eq!(plan.old_targets["prefill-old"], 2, "old prefill still pairs with old decode");
        assert_eq!(plan.old_targets["decode-old"], 2);
        assert_eq!(plan.update_targets["decode"], 1);
    }

    #[test]
    fn draining_follows_the_slowest_role() {
        let roles = [role("prefill", 2, (2, 2), (2, 2)), role("decode", 2, (2, 1), (2, 2))];
        let plan = plan(&roles, &spec(1, 0));
        assert_eq!(plan.old_targets["prefill-old"], 1);
        assert_eq!(plan.old_targets["decode-old"], 1);
    }

    #[test]
    fn complete_when_new_is_up_and_old_is_gone() {
        let roles = [role("prefill", 2, (2, 2), (0, 0)), role("decode", 2, (2, 2), (0, 0))];
        assert!(plan(&roles, &spec(1, 0)).complete);
        let roles = [role("prefill", 2, (2, 2), (2, 2)), role("decode", 2, (2, 2), (2, 2))];
        let p = plan(&roles, &spec(1, 0));
        assert!(!p.complete);
        assert_eq!(p.old_targets["prefill-old"], 0, "fully ready new revision drains the old one");
    }

    #[test]
    fn percentages_round_like_deployments() {
        let rollout = RolloutSpec { max_surge: Some(IntOrString::String("25%".into())), max_unavailable: Some(IntOrString::String("25%".into())) };
        assert_eq!(limits(&rollout, 10), (3, 2));
        assert_eq!(limits(&RolloutSpec { max_surge: Some(IntOrString::Int(0)), max_unavailable: Some(IntOrString::Int(0)) }, 5), (1, 0));
    }

    #[test]
    fn unavailability_lets_old_drain_early() {
        let roles = [role("decode", 4, (0, 0), (4, 4))];
        let p = plan(&roles, &spec(0, 1));
        assert_eq!(p.old_targets["decode-old"], 3);
        assert_eq!(p.update_targets["decode"], 1, "room freed by unavailability is used by the update");
    }
}
