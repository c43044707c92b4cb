//! Session affinity by consistent hashing of the session key (the session header, else the
//! request's `user`). Rendezvous hashing: each worker scores hash(key, instance id) and the
//! highest wins, so a worker leaving moves only its own sessions, and every router replica
//! agrees without sharing state. Requests without a key fall back to least load.

use std::sync::Arc;

use super::hash::hash_pair;
use super::least_load::two_choices;
use super::{Decision, Policy, RouteRequest};
use crate::workers::Worker;

#[derive(Debug, Default)]
pub struct Session;

impl Policy for Session {
    fn name(&self) -> &'static str {
        "session"
    }

    fn choose(&self, candidates: &[Arc<Worker>], request: &RouteRequest<'_>) -> Decision {
        let Some(key) = request.session_key.filter(|k| !k.is_empty()) else {
            return Decision { worker: two_choices(candidates).clone(), reason: "no_session_key" };
        };
        let worker = candidates
            .iter()
            .max_by_key(|w| hash_pair(key, &w.record.instance_id))
            .unwrap_or(&candidates[0]);
        Decision { worker: worker.clone(), reason: "session_hash" }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::workers;

    fn pick(pool: &[Arc<Worker>], key: &str) -> u64 {
        Session.choose(pool, &RouteRequest { text: "", session_key: Some(key) }).worker.id.0
    }

    #[test]
    fn same_key_same_worker_and_keys_spread() {
        let pool = workers(4);
        let mut used = std::collections::HashSet::new();
        for i in 0..64 {
            let key = format!("user-{i}");
            let first = pick(&pool, &key);
            assert_eq!(pick(&pool, &key), first);
            used.insert(first);
        }
        assert_eq!(used.len(), 4);
    }

    #[test]
    fn removing_a_worker_moves_only_its_sessions() {
        let pool = workers(4);
        let before: Vec<u64> = (0..100).map(|i| pick(&pool, &format!("s{i}"))).collect();
        let without_first: Vec<Arc<Worker>> = pool[1..].to_vec();
        for (i, was) in before.iter().enumerate() {
            let now = pick(&without_first, &format!("s{i}"));
            if *was != pool[0].id.0 {
                assert_eq!(now, *was, "session s{i} moved although its worker stayed");
            }
        }
    }
}
