//! Which workers may serve a request: whole on one worker, or split into a prefill hop and
//! a decode hop over workers whose KV caches are interchangeable.
//!
//! - Prefill workers of the model, at least one decode worker that pairs with one of them,
//!   and a single sequence (one prompt, `n` = 1): split, over the prefill and decode
//!   workers that have a partner.
//! - Otherwise whole: aggregated workers if any, else decode workers (which serve whole
//!   requests without a descriptor), else a 503 naming the missing role.
//!
//! Two engines pair when they load the same model at the same revision with the same KV
//! layout ([`compatible`]); a mismatched pair is never formed.

use std::sync::Arc;

use dlengine_registry::Role;

use crate::api_error::ApiError;
use crate::workers::{PoolSnapshot, Worker};

pub enum Route {
    Whole(Arc<[Arc<Worker>]>),
    /// Only workers with at least one partner on the other side. `whole` serves the request
    /// when no pair can take it at the moment (circuit breakers): aggregated workers, else
    /// decode workers.
    Split { prefill: Vec<Arc<Worker>>, decode: Vec<Arc<Worker>>, whole: Arc<[Arc<Worker>]> },
    Refuse(ApiError),
}

pub struct Plan {
    pub route: Route,
    /// Why a model with prefill workers is not split (metric label), when that is a fault of
    /// the deployment rather than of the request.
    pub pairing_failure: Option<&'static str>,
}

/// Whether a decode engine can continue from this prefill engine's KV.
pub fn compatible(prefill: &Worker, decode: &Worker) -> bool {
    prefill.record.model == decode.record.model && prefill.record.pairing_key() == decode.record.pairing_key()
}

pub fn plan(snapshot: &PoolSnapshot, model: &str, single_sequence: bool) -> Plan {
    let aggregated = snapshot.workers_for(model, Role::Aggregated);
    let prefill = snapshot.workers_for(model, Role::Prefill);
    let decode = snapshot.workers_for(model, Role::Decode);
    let whole = |pairing_failure| {
        let route = if !aggregated.is_empty() {
            Route::Whole(aggregated.clone())
        } else if !decode.is_empty() {
            Route::Whole(decode.clone())
        } else if !prefill.is_empty() {
            Route::Refuse(ApiError::no_worker(format!(
                "Model `{model}` has prefill workers but no decode or aggregated worker to finish requests; start a `--mode decode` (or aggregated) engine."
            )))
        } else if snapshot.knows_model(model) {
            Route::Refuse(ApiError::no_worker(format!("Model `{model}` has no aggregated, prefill or decode worker.")))
        } else {
            Route::Refuse(ApiError::model_not_found(model))
        };
        Plan { route, pairing_failure }
    };
    if prefill.is_empty() || !single_sequence {
        return whole(None);
    }
    if decode.is_empty() {
        return whole(Some("no_decode"));
    }
    let paired_prefill: Vec<Arc<Worker>> = prefill.iter().filter(|p| decode.iter().any(|d| compatible(p, d))).cloned().collect();
    if paired_prefill.is_empty() {
        return whole(Some("no_compatible_decode"));
    }
    let paired_decode = decode.iter().filter(|d| paired_prefill.iter().any(|p| compatible(p, d))).cloned().collect();
    let whole = if aggregated.is_empty() { decode.clone() } else { aggregated.clone() };
    Plan { route: Route::Split { prefill: paired_prefill, decode: paired_decode, whole }, pairing_failure: None }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{record, view_of};
    use crate::workers::{BreakerPolicy, WorkerPool};
    use dlengine_registry::WorkerRecord;

    fn snapshot(records: &[WorkerRecord]) -> Arc<PoolSnapshot> {
        let pool = WorkerPool::new(BreakerPolicy::default());
        pool.sync(&view_of(&records.iter().collect::<Vec<_>>()));
        pool.snapshot()
    }

    fn ids(workers: &[Arc<Worker>]) -> Vec<&str> {
        workers.iter().map(|w| w.record.instance_id.as_str()).collect()
    }

    fn whole_ids(plan: &Plan) -> Vec<&str> {
        match &plan.route {
            Route::Whole(workers) => ids(workers),
            _ => panic!("not whole"),
        }
    }

    #[test]
    fn splits_only_matching_pairs() {
        let p1 = record("p1", "m", Role::Prefill);
        let mut p2 = record("p2", "m", Role::Prefill);
        p2.revision = "1".into();
        let d1 = record("d1", "m", Role::Decode);
        let mut d_layout = record("d2", "m", Role::Decode);
        d_layout.kv_layout.block_size = 32;
        let mut d_model = record("d3", "m", Role::Decode);
        d_model.model = "other-weights".into();
        let plan = plan(&snapshot(&[p1, p2, d1, d_layout, d_model]), "m", true);
        let Route::Split { prefill, decode, whole } = &plan.route else { panic!("not split") };
        assert_eq!(ids(prefill), vec!["p1"]);
        assert_eq!(ids(decode), vec!["d1"]);
        assert_eq!(ids(whole), vec!["d1", "d2", "d3"], "no aggregated worker: decode workers serve whole");
        assert!(plan.pairing_failure.is_none());
    }

    #[test]
    fn mismatched_engines_are_never_paired() {
        let p = record("p", "m", Role::Prefill);
        let mut d = record("d", "m", Role::Decode);
        d.revision = "7".into();
        let a = record("a", "m", Role::Aggregated);
        let with_aggregated = plan(&snapshot(&[p.clone(), d.clone(), a]), "m", true);
        assert_eq!(whole_ids(&with_aggregated), vec!["a"]);
        assert_eq!(with_aggregated.pairing_failure, Some("no_compatible_decode"));
        // Without aggregated workers, decode engines serve the request whole.
        let decode_only = plan(&snapshot(&[p, d]), "m", true);
        assert_eq!(whole_ids(&decode_only), vec!["d"]);
    }

    #[test]
    fn without_prefill_requests_go_whole_as_before() {
        let a = record("a", "m", Role::Aggregated);
        let d = record("d", "m", Role::Decode);
        assert_eq!(whole_ids(&plan(&snapshot(&[a, d.clone()]), "m", true)), vec!["a"]);
        assert_eq!(whole_ids(&plan(&snapshot(&[d]), "m", true)), vec!["d"]);
        let Route::Refuse(error) = plan(&snapshot(&[]), "m", true).route else { panic!() };
        assert_eq!(error.status, 404);
        let Route::Refuse(error) = plan(&snapshot(&[record("e", "m", Role::Encode)]), "m", true).route else { panic!() };
        assert_eq!(error.status, 503);
    }

    #[test]
    fn prefill_without_decode_uses_aggregated_or_refuses() {
        let p = record("p", "m", Role::Prefill);
        let a = record("a", "m", Role::Aggregated);
        let plan_a = plan(&snapshot(&[p.clone(), a]), "m", true);
        assert_eq!(whole_ids(&plan_a), vec!["a"]);
        assert_eq!(plan_a.pairing_failure, Some("no_decode"));
        let Route::Refuse(error) = plan(&snapshot(&[p]), "m", true).route else { panic!("not refused") };
        assert_eq!(error.status, 503);
        assert!(error.message.contains("no decode"), "{}", error.message);
    }

    #[test]
    fn several_sequences_are_not_split() {
        let records = [record("p", "m", Role::Prefill), record("d", "m", Role::Decode), record("a", "m", Role::Aggregated)];
        let plan_n = plan(&snapshot(&records), "m", false);
        assert_eq!(whole_ids(&plan_n), vec!["a"]);
        assert!(plan_n.pairing_failure.is_none());
        let plan_d = plan(&snapshot(&records[..2]), "m", false);
        assert_eq!(whole_ids(&plan_d), vec!["d"]);
    }
}
