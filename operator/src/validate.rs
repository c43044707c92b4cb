//! Checks of a spec that the CRD schema cannot express, or that the apiserver may not have
//! enforced (objects stored before a CRD upgrade). The controller refuses a spec that fails
//! them with a `Degraded` condition naming every problem, and changes nothing.

use std::collections::BTreeSet;

use crate::crd::{Actuator, InferenceDeploymentSpec, RoleKind, RoleSpec};
use crate::render::InstanceShape;

/// One problem of a spec, with the path of the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecProblem {
    pub field: String,
    pub message: String,
}

fn problem(field: impl Into<String>, message: impl Into<String>) -> SpecProblem {
    SpecProblem { field: field.into(), message: message.into() }
}

/// Every problem of `spec`; empty when it can be reconciled.
pub fn spec_problems(spec: &InferenceDeploymentSpec) -> Vec<SpecProblem> {
    let mut problems = role_set_problems(spec);
    for (index, role) in spec.roles.iter().enumerate() {
        problems.extend(role_problems(spec, role, &format!("spec.roles[{index}]")));
    }
    problems
}

fn role_set_problems(spec: &InferenceDeploymentSpec) -> Vec<SpecProblem> {
    let mut problems = Vec::new();
    let mut seen = BTreeSet::new();
    for role in &spec.roles {
        if !seen.insert(role.name.as_str()) {
            problems.push(problem("spec.roles", format!("role name {:?} is used twice", role.name)));
        }
    }
    let has = |kind: RoleKind| spec.roles.iter().any(|r| r.kind == kind);
    if !spec.roles.iter().any(|r| r.kind.runs_engine()) {
        problems.push(problem("spec.roles", "no role serves the model"));
    }
    if spec.roles.iter().filter(|r| r.kind == RoleKind::Router).count() > 1 {
        problems.push(problem("spec.roles", "at most one Router role"));
    }
    if has(RoleKind::Prefill) != has(RoleKind::Decode) {
        problems.push(problem("spec.roles", "Prefill and Decode roles come together"));
    }
    if (has(RoleKind::Prefill) || has(RoleKind::Encode)) && !has(RoleKind::Router) {
        problems.push(problem("spec.roles", "Prefill/Decode and Encode roles need a Router role"));
    }
    problems
}

fn role_problems(spec: &InferenceDeploymentSpec, role: &RoleSpec, path: &str) -> Vec<SpecProblem> {
    let mut problems = Vec::new();
    if let Err(message) = InstanceShape::of(role) {
        problems.push(problem(format!("{path}.parallelism"), message));
    }
    let Some(autoscaling) = &role.autoscaling else { return problems };
    if autoscaling.min_replicas > autoscaling.max_replicas {
        problems.push(problem(format!("{path}.autoscaling"), "minReplicas is greater than maxReplicas"));
    }
    if let Some(follow) = &autoscaling.follow_role {
        let leader = spec.roles.iter().find(|r| r.name == follow.role);
        match leader {
            None => problems.push(problem(format!("{path}.autoscaling.followRole.role"), format!("no role named {:?}", follow.role))),
            Some(l) if l.name == role.name || l.kind == RoleKind::Router => {
                problems.push(problem(format!("{path}.autoscaling.followRole.role"), "must name another engine role"))
            }
            Some(l) if l.autoscaling.as_ref().and_then(|a| a.follow_role.as_ref()).is_some() => {
                problems.push(problem(format!("{path}.autoscaling.followRole.role"), "the followed role follows another role itself"))
            }
            Some(_) => {}
        }
        if autoscaling.actuator != Actuator::Operator {
            problems.push(problem(format!("{path}.autoscaling.followRole"), "followRole works only with the Operator actuator"));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::samples;

    #[test]
    fn samples_have_no_problems() {
        for dep in samples::all() {
            assert_eq!(spec_problems(&dep.spec), vec![], "{}", dep.metadata.name.clone().unwrap_or_default());
        }
    }

    #[test]
    fn duplicate_roles_and_lonely_prefill_are_named() {
        let mut dep = samples::disaggregated();
        dep.spec.roles.retain(|r| r.kind != RoleKind::Decode);
        dep.spec.roles.push(dep.spec.roles[0].clone());
        let text: Vec<String> = spec_problems(&dep.spec).iter().map(|p| p.to_string()).collect();
        assert!(text.iter().any(|t| t.contains("used twice")), "{text:?}");
        assert!(text.iter().any(|t| t.contains("come together")), "{text:?}");
    }

    #[test]
    fn unsupported_parallelism_is_refused_with_its_reason() {
        let mut dep = samples::aggregated();
        dep.spec.roles[0].parallelism = Some(crate::crd::Parallelism { data_parallel: 2, ..Default::default() });
        let problems = spec_problems(&dep.spec);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].message.contains("data-parallel"), "{}", problems[0]);
    }
}
