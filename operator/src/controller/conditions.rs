//! Status conditions from observed facts. `Ready` is strict: the update revision is the
//! current one and every role has all desired instances ready; `Available` only says that
//! some complete serving path exists (a ready router, and ready engines of one revision
//! that pair with each other).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

pub const READY: &str = "Ready";
pub const AVAILABLE: &str = "Available";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";

/// What the controller found, reduced to what the conditions depend on.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Facts {
    /// The spec cannot be reconciled; why.
    pub invalid_spec: Option<String>,
    /// Reconcile failed on the way (API error, registry...).
    pub error: Option<String>,
    pub rolling_out: bool,
    /// Some role has fewer or more instances than desired.
    pub scaling: bool,
    /// Every role of the current revision has all desired instances ready.
    pub all_ready: bool,
    /// A ready router (if any) and ready, mutually pairing engines of one revision.
    pub serving: bool,
    /// Workloads whose controllers report no progress (crash loops, unschedulable pods).
    pub stuck: Vec<String>,
    /// Explanation of what is not ready, for the Ready condition's message.
    pub not_ready: Vec<String>,
}

pub fn conditions(facts: &Facts, previous: &[Condition], generation: Option<i64>, now: &Time) -> Vec<Condition> {
    let make = |type_: &str, status: bool, reason: &str, message: String| {
        condition(previous, type_, status, reason, message, generation, now)
    };
    vec![
        ready(facts, make),
        available(facts, make),
        progressing(facts, make),
        degraded(facts, make),
    ]
}

fn ready(facts: &Facts, make: impl Fn(&str, bool, &str, String) -> Condition) -> Condition {
    if let Some(why) = &facts.invalid_spec {
        return make(READY, false, "InvalidSpec", why.clone());
    }
    if facts.rolling_out {
        return make(READY, false, "RolloutInProgress", "a new revision is rolling out".into());
    }
    if !facts.all_ready {
        return make(READY, false, "InstancesNotReady", facts.not_ready.join("; "));
    }
    make(READY, true, "AllInstancesReady", "every role of the current revision has all its instances ready".into())
}

fn available(facts: &Facts, make: impl Fn(&str, bool, &str, String) -> Condition) -> Condition {
    if facts.serving {
        make(AVAILABLE, true, "ServingPathReady", "requests can be served".into())
    } else {
        make(AVAILABLE, false, "NoServingPath", "no ready router with ready, pairing engines of one revision".into())
    }
}

fn progressing(facts: &Facts, make: impl Fn(&str, bool, &str, String) -> Condition) -> Condition {
    if facts.rolling_out {
        make(PROGRESSING, true, "RollingOut", "replacing the current revision".into())
    } else if facts.scaling {
        make(PROGRESSING, true, "Scaling", "instances are being added or removed".into())
    } else {
        make(PROGRESSING, false, "Stable", "nothing to change".into())
    }
}

fn degraded(facts: &Facts, make: impl Fn(&str, bool, &str, String) -> Condition) -> Condition {
    if let Some(why) = &facts.invalid_spec {
        return make(DEGRADED, true, "InvalidSpec", why.clone());
    }
    if let Some(error) = &facts.error {
        return make(DEGRADED, true, "ReconcileError", error.clone());
    }
    if !facts.stuck.is_empty() {
        return make(DEGRADED, true, "ProgressDeadlineExceeded", facts.stuck.join("; "));
    }
    make(DEGRADED, false, "AsExpected", "no problem found".into())
}

/// A condition whose transition time moves only when its status changes.
fn condition(previous: &[Condition], type_: &str, status: bool, reason: &str, message: String, generation: Option<i64>, now: &Time) -> Condition {
    let status = if status { "True" } else { "False" }.to_string();
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.clone());
    Condition { type_: type_.into(), status, reason: reason.into(), message, observed_generation: generation, last_transition_time }
}

pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    conditions.iter().any(|c| c.type_ == type_ && c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(seconds: i64) -> Time {
        Time(Timestamp::from_second(seconds).unwrap())
    }

    #[test]
    fn ready_needs_everything_ready_and_no_rollout() {
        let facts = Facts { all_ready: true, serving: true, ..Default::default() };
        let c = conditions(&facts, &[], Some(1), &at(0));
        assert!(is_true(&c, READY) && is_true(&c, AVAILABLE) && !is_true(&c, PROGRESSING) && !is_true(&c, DEGRADED));
        let c = conditions(&Facts { rolling_out: true, ..facts.clone() }, &[], Some(1), &at(0));
        assert!(!is_true(&c, READY), "a rollout is not Ready even when everything old still runs");
        assert!(is_true(&c, AVAILABLE));
    }

    #[test]
    fn transition_time_moves_only_on_status_change() {
        let facts = Facts { all_ready: true, serving: true, ..Default::default() };
        let first = conditions(&facts, &[], Some(1), &at(10));
        let again = conditions(&facts, &first, Some(2), &at(20));
        let ready = again.iter().find(|c| c.type_ == READY).unwrap();
        assert_eq!(ready.last_transition_time, at(10));
        assert_eq!(ready.observed_generation, Some(2));
        let broken = conditions(&Facts::default(), &again, Some(2), &at(30));
        assert_eq!(broken.iter().find(|c| c.type_ == READY).unwrap().last_transition_time, at(30));
    }

    #[test]
    fn invalid_spec_is_degraded_with_the_reason() {
        let facts = Facts { invalid_spec: Some("spec.roles: role name \"a\" is used twice".into()), ..Default::default() };
        let c = conditions(&facts, &[], None, &at(0));
        let degraded = c.iter().find(|c| c.type_ == DEGRADED).unwrap();
        assert_eq!((degraded.status.as_str(), degraded.reason.as_str()), ("True", "InvalidSpec"));
        assert!(degraded.message.contains("used twice"));
    }
}
