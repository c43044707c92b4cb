//! Each request to the next worker in key order.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::{Decision, Policy, RouteRequest};
use crate::workers::Worker;

#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl Policy for RoundRobin {
    fn name(&self) -> &'static str {
        "round_robin"
    }

    fn choose(&self, candidates: &[Arc<Worker>], _request: &RouteRequest<'_>) -> Decision {
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        Decision { worker: candidates[turn % candidates.len()].clone(), reason: "round_robin" }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::workers;

    #[test]
    fn spreads_evenly() {
        let pool = workers(3);
        let policy = RoundRobin::default();
        let mut counts = [0; 3];
        for _ in 0..30 {
            let picked = policy.choose(&pool, &RouteRequest::default()).worker.id.0 as usize;
            counts[picked - 1] += 1;
        }
        assert_eq!(counts, [10, 10, 10]);
    }
}
