//! The policy over synthetic traces: bursts, steady load, pending pods, flapping metrics,
//! rollouts, GPU budget, prefill:decode ratio.

use super::history::History;
use super::policy::{decide, Decision, PolicyInput, Reason};
use super::RoleLoad;
use crate::crd::{AutoscalingSpec, FollowRole, MetricTargets, ScalingBehavior};

fn spec(min: i32, max: i32, up_window: i32, down_window: i32) -> AutoscalingSpec {
    AutoscalingSpec {
        actuator: Default::default(),
        min_replicas: min,
        max_replicas: max,
        targets: Some(MetricTargets { queue_depth: Some(4.0), kv_cache_utilization: Some(0.8), itl_p95_seconds: Some(0.05), ttft_p95_seconds: None }),
        follow_role: None,
        behavior: ScalingBehavior { scale_up_stabilization_seconds: up_window, scale_down_stabilization_seconds: down_window, ..Default::default() },
        hpa: None,
    }
}

fn load(queue: f64, kv: f64, itl: Option<f64>) -> Option<RoleLoad> {
    Some(RoleLoad { instances: 1, queue_depth: queue, kv_cache_utilization: kv, ttft_p95_seconds: None, itl_p95_seconds: itl })
}

fn input(spec: &AutoscalingSpec, current: i32, load: Option<RoleLoad>) -> PolicyInput<'_> {
    PolicyInput { spec, current, pending: 0, load, followed: None, rollout_in_progress: false, gpu_limit: None }
}

/// Runs a trace of (seconds, load) and applies each decision, as the controller does.
fn run(spec: &AutoscalingSpec, start: i32, trace: &[(f64, Option<RoleLoad>)]) -> Vec<Decision> {
    let mut history = History::default();
    let mut current = start;
    trace
        .iter()
        .map(|(t, l)| {
            let d = decide(&input(spec, current, l.clone()), &mut history, *t);
            current = d.to;
            d
        })
        .collect()
}

#[test]
fn steady_load_at_target_changes_nothing() {
    let s = spec(1, 10, 0, 300);
    let trace: Vec<_> = (0..20).map(|i| (f64::from(i) * 15.0, load(4.0, 0.8, Some(0.04)))).collect();
    for d in run(&s, 3, &trace) {
        assert_eq!((d.to, d.reason), (3, Reason::WithinTolerance));
    }
}

#[test]
fn burst_scales_up_at_once_bounded_by_step_and_max() {
    let s = spec(1, 8, 0, 300);
    let decisions = run(&s, 2, &[(0.0, load(40.0, 0.9, None)), (15.0, load(40.0, 0.9, None))]);
    assert_eq!((decisions[0].to, decisions[0].reason), (6, Reason::LoadHigh), "10x queue wants 20, a step adds at most 4");
    assert_eq!((decisions[1].to, decisions[1].reason), (8, Reason::CappedAtMaximum));
}

#[test]
fn latency_slo_breach_scales_up_even_with_short_queues() {
    let s = spec(1, 10, 0, 300);
    let d = run(&s, 2, &[(0.0, load(1.0, 0.3, Some(0.1)))]);
    assert_eq!((d[0].to, d[0].reason), (4, Reason::LoadHigh));
}

#[test]
fn low_latency_alone_never_scales_down_below_what_utilization_needs() {
    let s = spec(1, 10, 0, 0);
    let d = run(&s, 4, &[(0.0, load(4.0, 0.8, Some(0.001)))]);
    assert_eq!(d[0].to, 4);
}

#[test]
fn scale_down_waits_for_its_window() {
    let s = spec(1, 10, 0, 300);
    let mut trace = vec![(0.0, load(8.0, 0.8, None))];
    trace.extend((1..=30).map(|i| (f64::from(i) * 15.0, load(0.5, 0.1, None))));
    let decisions = run(&s, 4, &trace);
    assert_eq!(decisions[0].to, 8);
    let first_down = decisions.iter().position(|d| d.to < 8).unwrap();
    assert!(15.0 * first_down as f64 > 300.0, "scaled down after {}s", 15 * first_down);
    assert_eq!(decisions.last().unwrap().to, 1);
}

#[test]
fn flapping_metrics_do_not_flap_instances() {
    let s = spec(1, 10, 60, 300);
    let trace: Vec<_> = (0..40).map(|i| (f64::from(i) * 15.0, if i % 2 == 0 { load(8.0, 0.5, None) } else { load(1.0, 0.2, None) })).collect();
    let decisions = run(&s, 4, &trace);
    let changes = decisions.windows(2).filter(|w| w[0].to != w[1].to).count();
    assert_eq!(changes, 0, "{:?}", decisions.iter().map(|d| d.to).collect::<Vec<_>>());
}

#[test]
fn no_scale_up_while_instances_are_pending() {
    let s = spec(1, 10, 0, 300);
    let mut i = input(&s, 2, load(20.0, 0.9, None));
    i.pending = 1;
    let d = decide(&i, &mut History::default(), 0.0);
    assert_eq!((d.to, d.reason), (2, Reason::HeldPendingInstances));
    // Pending pods do not block a scale-down (it may be what unblocks the cluster).
    let s = spec(1, 10, 0, 0);
    let mut i = input(&s, 4, load(0.0, 0.0, None));
    i.pending = 2;
    assert_eq!(decide(&i, &mut History::default(), 0.0).to, 1);
}

#[test]
fn frozen_during_rollouts() {
    let s = spec(1, 10, 0, 0);
    let mut i = input(&s, 2, load(20.0, 0.9, None));
    i.rollout_in_progress = true;
    let d = decide(&i, &mut History::default(), 0.0);
    assert_eq!((d.to, d.reason), (2, Reason::HeldRollout));
}

#[test]
fn gpu_budget_caps_scale_up() {
    let s = spec(1, 10, 0, 0);
    let mut i = input(&s, 2, load(20.0, 0.9, None));
    i.gpu_limit = Some(3);
    let d = decide(&i, &mut History::default(), 0.0);
    assert_eq!((d.to, d.reason), (3, Reason::CappedByGpuBudget));
}

#[test]
fn missing_metrics_keep_the_count_within_bounds() {
    let s = spec(2, 10, 0, 0);
    let d = decide(&input(&s, 1, None), &mut History::default(), 0.0);
    assert_eq!((d.to, d.reason), (2, Reason::RaisedToMinimum));
    let d = decide(&input(&s, 5, None), &mut History::default(), 0.0);
    assert_eq!((d.to, d.reason), (5, Reason::MetricsUnavailable));
}

#[test]
fn prefill_follows_decode_with_tolerance() {
    let mut s = spec(1, 10, 0, 0);
    s.targets = None;
    s.follow_role = Some(FollowRole { role: "decode".into(), ratio: 0.5, tolerance: 0.2 });
    let mut i = input(&s, 2, None);
    i.followed = Some(8);
    let d = decide(&i, &mut History::default(), 0.0);
    assert_eq!((d.to, d.reason), (4, Reason::FollowingRole));
    i.current = 4;
    i.followed = Some(9);
    assert_eq!(decide(&i, &mut History::default(), 0.0).to, 4, "4 is within 20% of the ideal 5");
    i.followed = Some(12);
    assert_eq!(decide(&i, &mut History::default(), 0.0).to, 6);
}

#[test]
fn metrics_outvote_the_ratio_when_higher() {
    let mut s = spec(1, 10, 0, 0);
    s.follow_role = Some(FollowRole { role: "decode".into(), ratio: 0.5, tolerance: 0.1 });
    let mut i = input(&s, 2, load(12.0, 0.5, None));
    i.followed = Some(2);
    let d = decide(&i, &mut History::default(), 0.0);
    assert_eq!((d.to, d.reason), (6, Reason::LoadHigh));
}

#[test]
fn scale_from_zero_on_queued_requests() {
    let s = spec(0, 4, 0, 0);
    let d = decide(&input(&s, 0, load(3.0, 0.0, None)), &mut History::default(), 0.0);
    assert_eq!(d.to, 1);
}
