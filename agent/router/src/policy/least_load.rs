//! Power of two choices: sample two workers at random, take the less loaded. Nearly as good
//! as always taking the global minimum, without every router herding onto the same worker
//! between two load reports.

use std::sync::Arc;

use rand::Rng;

use super::{Decision, Policy, RouteRequest};
use crate::workers::Worker;

#[derive(Debug, Default)]
pub struct LeastLoad;

/// The less loaded of two random candidates (the only one when there is one).
pub fn two_choices(candidates: &[Arc<Worker>]) -> &Arc<Worker> {
    if candidates.len() == 1 {
        return &candidates[0];
    }
    let mut rng = rand::rng();
    let first = rng.random_range(0..candidates.len());
    let mut second = rng.random_range(0..candidates.len() - 1);
    if second >= first {
        second += 1;
    }
    let (a, b) = (&candidates[first], &candidates[second]);
    if b.load_score() < a.load_score() {
        b
    } else {
        a
    }
}

impl Policy for LeastLoad {
    fn name(&self) -> &'static str {
        "least_load"
    }

    fn choose(&self, candidates: &[Arc<Worker>], _request: &RouteRequest<'_>) -> Decision {
        Decision { worker: two_choices(candidates).clone(), reason: "least_load" }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::workers;

    #[test]
    fn never_picks_the_busier_of_two() {
        let pool = workers(2);
        for _ in 0..5 {
            pool[0].begin_request();
        }
        for _ in 0..50 {
            assert_eq!(LeastLoad.choose(&pool, &RouteRequest::default()).worker.id, pool[1].id);
        }
    }

    #[test]
    fn reported_queue_counts_as_load() {
        let pool = workers(2);
        pool[1].set_load(dlengine_registry::Load { waiting: 9, ..Default::default() });
        for _ in 0..50 {
            assert_eq!(LeastLoad.choose(&pool, &RouteRequest::default()).worker.id, pool[0].id);
        }
    }

    #[test]
    fn spreads_over_idle_workers() {
        let pool = workers(4);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            seen.insert(LeastLoad.choose(&pool, &RouteRequest::default()).worker.id);
        }
        assert_eq!(seen.len(), 4);
    }
}
