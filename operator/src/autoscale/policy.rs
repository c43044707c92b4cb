//! The autoscaling policy: observations in, instance count and reason out. Pure, so it is
//! tested over synthetic traces (bursts, steady load, pending pods, flapping metrics).

use crate::crd::AutoscalingSpec;

use super::history::{History, Seconds};
use super::RoleLoad;

/// What the policy knows about one role at one moment.
#[derive(Debug, Clone)]
pub struct PolicyInput<'a> {
    pub spec: &'a AutoscalingSpec,
    /// Instances the role is set to now.
    pub current: i32,
    /// Instances created but not ready (scheduling, pulling, loading weights).
    pub pending: i32,
    /// None when no instance reported metrics.
    pub load: Option<RoleLoad>,
    /// Instances of the followed role (followRole mode).
    pub followed: Option<i32>,
    pub rollout_in_progress: bool,
    /// Most instances the GPU budget still allows for this role (None: no budget).
    pub gpu_limit: Option<i32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    LoadHigh,
    LoadLow,
    WithinTolerance,
    FollowingRole,
    MetricsUnavailable,
    RaisedToMinimum,
    CappedAtMaximum,
    CappedByGpuBudget,
    HeldPendingInstances,
    HeldRollout,
    Stabilizing,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::LoadHigh => "LoadHigh",
            Reason::LoadLow => "LoadLow",
            Reason::WithinTolerance => "WithinTolerance",
            Reason::FollowingRole => "FollowingRole",
            Reason::MetricsUnavailable => "MetricsUnavailable",
            Reason::RaisedToMinimum => "RaisedToMinimum",
            Reason::CappedAtMaximum => "CappedAtMaximum",
            Reason::CappedByGpuBudget => "CappedByGpuBudget",
            Reason::HeldPendingInstances => "HeldPendingInstances",
            Reason::HeldRollout => "HeldRollout",
            Reason::Stabilizing => "Stabilizing",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub from: i32,
    pub to: i32,
    pub reason: Reason,
    pub message: String,
}

/// The role's instance count now; records the raw recommendation in `history`.
pub fn decide(input: &PolicyInput, history: &mut History, now: Seconds) -> Decision {
    let (raw, reason, message) = recommend(input);
    if history.is_empty() {
        // A fresh history (new role, restarted operator) assumes the current count was right
        // until just now, so a single spike cannot scale before its window has passed.
        history.record(now - 0.001, input.current);
    }
    history.record(now, raw);
    let from = input.current;
    let decided = |to: i32, reason: Reason, message: String| Decision { from, to, reason, message };
    if input.rollout_in_progress && raw != from {
        return decided(from, Reason::HeldRollout, format!("frozen during a rollout (wanted {raw})"));
    }
    if raw > from && input.pending > 0 {
        return decided(from, Reason::HeldPendingInstances, format!("{} instances still starting (wanted {raw})", input.pending));
    }
    let stabilized = stabilize(input, history, now, raw);
    if stabilized != raw {
        return decided(stabilized, Reason::Stabilizing, format!("recommendation {raw} smoothed to {stabilized} ({message})"));
    }
    match input.gpu_limit {
        Some(limit) if raw > from && raw > limit => {
            let to = limit.max(from);
            decided(to, Reason::CappedByGpuBudget, format!("wanted {raw}, the GPU budget allows {to}"))
        }
        _ => decided(raw, reason, message),
    }
}

fn stabilize(input: &PolicyInput, history: &History, now: Seconds, raw: i32) -> i32 {
    let behavior = &input.spec.behavior;
    if raw > input.current {
        let window = f64::from(behavior.scale_up_stabilization_seconds);
        history.min_within(now, window).unwrap_or(raw).max(input.current)
    } else if raw < input.current {
        let window = f64::from(behavior.scale_down_stabilization_seconds);
        history.max_within(now, window).unwrap_or(raw).min(input.current)
    } else {
        raw
    }
}

/// The instance count the observations ask for, before guards and smoothing.
fn recommend(input: &PolicyInput) -> (i32, Reason, String) {
    let spec = input.spec;
    let by_metrics = metric_recommendation(input);
    let by_follow = follow_recommendation(input);
    let (wanted, reason, message) = match (by_metrics, by_follow) {
        (Some(m), Some(f)) if f.0 >= m.0 => f,
        (Some(m), _) => m,
        (None, Some(f)) => f,
        (None, None) => (input.current, Reason::MetricsUnavailable, "no instance reported metrics; keeping the current count".into()),
    };
    let stepped = wanted.min(input.current + spec.behavior.max_scale_up_step);
    if stepped < spec.min_replicas {
        return (spec.min_replicas, Reason::RaisedToMinimum, format!("{message}; raised to minReplicas {}", spec.min_replicas));
    }
    if stepped > spec.max_replicas {
        return (spec.max_replicas, Reason::CappedAtMaximum, format!("{message}; capped at maxReplicas {}", spec.max_replicas));
    }
    (stepped, reason, message)
}

/// HPA-style: scale by the worst ratio of observed to target. Latency SLOs only push up:
/// low latency says nothing about how few instances would still meet it.
fn metric_recommendation(input: &PolicyInput) -> Option<(i32, Reason, String)> {
    let targets = input.spec.targets.as_ref()?;
    let load = input.load.as_ref()?;
    let ratio = |observed: Option<f64>, target: Option<f64>| match (observed, target) {
        (Some(o), Some(t)) if t > 0.0 => Some(o / t),
        _ => None,
    };
    let utilization = [
        ratio(Some(load.queue_depth), targets.queue_depth),
        ratio(Some(load.kv_cache_utilization), targets.kv_cache_utilization),
    ];
    let latency = [ratio(load.ttft_p95_seconds, targets.ttft_p95_seconds), ratio(load.itl_p95_seconds, targets.itl_p95_seconds)];
    let up = utilization.iter().chain(latency.iter()).flatten().fold(0.0_f64, |a, &b| a.max(b));
    let down = utilization.iter().flatten().fold(0.0_f64, |a, &b| a.max(b));
    let tolerance = input.spec.behavior.tolerance;
    let current = input.current;
    let describe = format!(
        "queue {:.2}/instance, KV {:.0}%, TTFT p95 {}, ITL p95 {} over {} instances",
        load.queue_depth,
        load.kv_cache_utilization * 100.0,
        seconds(load.ttft_p95_seconds),
        seconds(load.itl_p95_seconds),
        load.instances
    );
    if current == 0 {
        let wanted = if load.queue_depth > 0.0 { 1 } else { 0 };
        return Some((wanted, Reason::LoadHigh, format!("scale from zero: {describe}")));
    }
    if up > 1.0 + tolerance {
        let wanted = (f64::from(current) * up).ceil() as i32;
        return Some((wanted, Reason::LoadHigh, format!("{describe}: {:.2}x target", up)));
    }
    let latency_ok = latency.iter().flatten().all(|&r| r <= 1.0);
    if down < 1.0 - tolerance && latency_ok {
        let wanted = (f64::from(current) * down).ceil() as i32;
        return Some((wanted, Reason::LoadLow, format!("{describe}: {:.2}x target", down)));
    }
    Some((current, Reason::WithinTolerance, format!("{describe}: within {:.0}% of target", tolerance * 100.0)))
}

fn follow_recommendation(input: &PolicyInput) -> Option<(i32, Reason, String)> {
    let follow = input.spec.follow_role.as_ref()?;
    let followed = input.followed?;
    let ideal = (f64::from(followed) * follow.ratio).ceil() as i32;
    let off_by = f64::from((input.current - ideal).abs()) / f64::from(ideal.max(1));
    let wanted = if off_by <= follow.tolerance { input.current } else { ideal };
    Some((wanted, Reason::FollowingRole, format!("{} x {followed} instances of {} = {ideal}", follow.ratio, follow.role)))
}

fn seconds(value: Option<f64>) -> String {
    value.map(|v| format!("{:.3}s", v)).unwrap_or_else(|| "n/a".into())
}
