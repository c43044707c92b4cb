//! Cache-aware routing: send a prompt to the worker most likely to hold its prefix in KV
//! cache, unless load is so uneven that balancing matters more.
//!
//! - Imbalanced (busiest minus idlest above `balance_abs` and busiest above `balance_rel`
//!   times the idlest): least loaded worker.
//! - Else, if some worker holds at least `match_threshold` of the prompt, or a whole earlier
//!   prompt this one continues (the next turn of a conversation, however long the last
//!   answer was): the least loaded of those (a hit).
//! - Else: the worker with the least text in the tree, so new prefixes spread out.

use std::sync::{Arc, Mutex};

use super::prefix_tree::PrefixTree;
use super::{Decision, Policy, RouteRequest};
use crate::workers::Worker;

#[derive(Debug, Clone, Copy)]
pub struct CacheAwareSettings {
    /// Fraction of the prompt that must be found in one worker's tree to follow it.
    pub match_threshold: f64,
    pub balance_abs: f64,
    pub balance_rel: f64,
    /// Bytes of prompt text remembered per worker.
    pub max_bytes_per_worker: usize,
}

impl Default for CacheAwareSettings {
    fn default() -> Self {
        CacheAwareSettings { match_threshold: 0.3, balance_abs: 8.0, balance_rel: 1.5, max_bytes_per_worker: 4 << 20 }
    }
}

pub struct CacheAware {
    settings: CacheAwareSettings,
    tree: Mutex<PrefixTree>,
}

impl CacheAware {
    pub fn new(settings: CacheAwareSettings) -> Self {
        CacheAware { settings, tree: Mutex::new(PrefixTree::default()) }
    }

    fn is_imbalanced(&self, candidates: &[Arc<Worker>]) -> bool {
        let scores = candidates.iter().map(|w| w.load_score());
        let (min, max) = scores.fold((f64::MAX, f64::MIN), |(lo, hi), s| (lo.min(s), hi.max(s)));
        max - min > self.settings.balance_abs && max > min * self.settings.balance_rel
    }

    fn choose_by_cache(&self, tree: &PrefixTree, candidates: &[Arc<Worker>], text: &str) -> Decision {
        let found = tree.longest_match(text.as_bytes());
        let share = !text.is_empty() && found.matched as f64 >= self.settings.match_threshold * text.len() as f64;
        if share || found.continues_a_prompt {
            let holder = candidates.iter().filter(|w| found.tenants.contains(&w.id)).min_by(|a, b| a.load_score().total_cmp(&b.load_score()));
            if let Some(worker) = holder {
                return Decision { worker: worker.clone(), reason: "cache_hit" };
            }
        }
        let emptiest = candidates
            .iter()
            .min_by(|a, b| tree.bytes_of(a.id).cmp(&tree.bytes_of(b.id)).then(a.load_score().total_cmp(&b.load_score())))
            .unwrap_or(&candidates[0]);
        Decision { worker: emptiest.clone(), reason: "cache_miss" }
    }
}

fn least_loaded(candidates: &[Arc<Worker>]) -> &Arc<Worker> {
    candidates.iter().min_by(|a, b| a.load_score().total_cmp(&b.load_score())).unwrap_or(&candidates[0])
}

impl Policy for CacheAware {
    fn name(&self) -> &'static str {
        "cache_aware"
    }

    fn choose(&self, candidates: &[Arc<Worker>], request: &RouteRequest<'_>) -> Decision {
        let mut tree = self.tree.lock().unwrap_or_else(|e| e.into_inner());
        let decision = if self.is_imbalanced(candidates) {
            Decision { worker: least_loaded(candidates).clone(), reason: "load_imbalance" }
        } else {
            self.choose_by_cache(&tree, candidates, request.text)
        };
        // Wherever it goes, that worker will now cache this prompt.
        tree.insert(request.text.as_bytes(), decision.worker.id);
        tree.evict(decision.worker.id, self.settings.max_bytes_per_worker);
        decision
    }

    fn forget(&self, worker: &Worker) {
        self.tree.lock().unwrap_or_else(|e| e.into_inner()).remove_tenant(worker.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::workers;

    fn route(policy: &CacheAware, pool: &[Arc<Worker>], text: &str) -> Decision {
        policy.choose(pool, &RouteRequest { text, session_key: None })
    }

    #[test]
    fn a_growing_conversation_stays_on_one_worker() {
        let pool = workers(3);
        let policy = CacheAware::new(CacheAwareSettings::default());
        let mut conversation = String::from("system: you are terse\n");
        let mut first = None;
        for turn in 0..6 {
            conversation.push_str(&format!("user: question {turn}\n"));
            let decision = route(&policy, &pool, &conversation);
            let id = decision.worker.id;
            assert_eq!(*first.get_or_insert(id), id, "turn {turn} moved");
            if turn > 0 {
                assert_eq!(decision.reason, "cache_hit");
            }
            conversation.push_str("assistant: ok\n");
        }
    }

    #[test]
    fn a_conversation_with_long_answers_stays_too() {
        let pool = workers(3);
        let policy = CacheAware::new(CacheAwareSettings::default());
        let mut conversation = String::from("user: hi\n");
        let first = route(&policy, &pool, &conversation).worker.id;
        for turn in 0..4 {
            conversation.push_str(&format!("assistant: {}\nuser: next {turn}\n", "long answer ".repeat(50)));
            let decision = route(&policy, &pool, &conversation);
            assert_eq!((decision.worker.id, decision.reason), (first, "cache_hit"), "turn {turn}");
        }
    }

    #[test]
    fn unrelated_prompts_spread_out() {
        let pool = workers(3);
        let policy = CacheAware::new(CacheAwareSettings::default());
        let mut used = std::collections::HashSet::new();
        for i in 0..3 {
            used.insert(route(&policy, &pool, &format!("{i} completely different prompt {i}")).worker.id);
        }
        assert_eq!(used.len(), 3);
    }

    #[test]
    fn imbalance_overrides_the_cache() {
        let pool = workers(2);
        let policy = CacheAware::new(CacheAwareSettings::default());
        let holder = route(&policy, &pool, "a long shared prefix").worker.clone();
        for _ in 0..20 {
            holder.begin_request();
        }
        let decision = route(&policy, &pool, "a long shared prefix, continued");
        assert_ne!(decision.worker.id, holder.id);
        assert_eq!(decision.reason, "load_imbalance");
    }

    #[test]
    fn forgetting_a_worker_clears_its_prefixes() {
        let pool = workers(2);
        let policy = CacheAware::new(CacheAwareSettings::default());
        let holder = route(&policy, &pool, "remember me").worker.clone();
        policy.forget(&holder);
        let other = pool.iter().find(|w| w.id != holder.id).unwrap().clone();
        assert_eq!(route(&policy, std::slice::from_ref(&other), "remember me").worker.id, other.id);
        assert_eq!(route(&policy, &pool, "remember me").reason, "cache_hit");
    }
}
