//! The workers the router knows, rebuilt from the discovery view on every change and read
//! by the request path as an immutable snapshot (one `Arc` clone per request).
//!
//! Workers are indexed by (served model name, role): whole requests go to `aggregated` (else
//! `decode`) workers, split requests to a prefill and a decode worker of the same model
//! paired by model, revision and KV layout (see `proxy::plan`).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use dlengine_registry::{Role, WorkerView};

use super::breaker::BreakerPolicy;
use super::worker::{Worker, WorkerId};

#[derive(Debug, Default)]
pub struct PoolSnapshot {
    by_key: HashMap<String, Arc<Worker>>,
    /// Sorted by key so that round-robin order is stable.
    routes: HashMap<(String, Role), Arc<[Arc<Worker>]>>,
}

impl PoolSnapshot {
    pub fn workers_for(&self, model: &str, role: Role) -> Arc<[Arc<Worker>]> {
        self.routes.get(&(model.to_string(), role)).cloned().unwrap_or_else(|| Arc::from(Vec::new()))
    }

    /// Whether any worker, of any role, serves the model.
    pub fn knows_model(&self, model: &str) -> bool {
        self.routes.keys().any(|(m, _)| m == model)
    }

    /// Served model names with the roles present for each, sorted.
    pub fn models(&self) -> BTreeMap<String, Vec<Role>> {
        let mut models: BTreeMap<String, Vec<Role>> = BTreeMap::new();
        for (model, role) in self.routes.keys() {
            models.entry(model.clone()).or_default().push(*role);
        }
        for roles in models.values_mut() {
            roles.sort();
        }
        models
    }

    pub fn workers(&self) -> impl Iterator<Item = &Arc<Worker>> {
        self.by_key.values()
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

/// What one sync changed.
#[derive(Debug, Default)]
pub struct PoolChanges {
    pub added: Vec<Arc<Worker>>,
    pub removed: Vec<Arc<Worker>>,
}

pub struct WorkerPool {
    snapshot: RwLock<Arc<PoolSnapshot>>,
    next_id: AtomicU64,
    breaker: BreakerPolicy,
}

impl WorkerPool {
    pub fn new(breaker: BreakerPolicy) -> WorkerPool {
        WorkerPool { snapshot: RwLock::new(Arc::default()), next_id: AtomicU64::new(1), breaker }
    }

    pub fn snapshot(&self) -> Arc<PoolSnapshot> {
        self.snapshot.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Makes the pool match the view: new keys become workers, changed registrations
    /// replace theirs, load updates refresh in place, missing keys are dropped at once.
    pub fn sync(&self, view: &WorkerView) -> PoolChanges {
        let previous = self.snapshot();
        let mut changes = PoolChanges::default();
        let mut by_key = HashMap::with_capacity(view.len());
        for (key, record) in view.workers() {
            let worker = match previous.by_key.get(key) {
                Some(existing) if existing.same_engine(record) => {
                    existing.set_load(record.load);
                    existing.clone()
                }
                existing => {
                    if let Some(replaced) = existing {
                        changes.removed.push(replaced.clone());
                    }
                    let id = WorkerId(self.next_id.fetch_add(1, Ordering::Relaxed));
                    let worker = Arc::new(Worker::new(id, key.to_string(), record.clone(), self.breaker));
                    changes.added.push(worker.clone());
                    worker
                }
            };
            by_key.insert(key.to_string(), worker);
        }
        changes.removed.extend(previous.by_key.iter().filter(|(k, _)| !by_key.contains_key(*k)).map(|(_, w)| w.clone()));
        let routes = index_routes(&by_key);
        *self.snapshot.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(PoolSnapshot { by_key, routes });
        changes
    }
}

fn index_routes(by_key: &HashMap<String, Arc<Worker>>) -> HashMap<(String, Role), Arc<[Arc<Worker>]>> {
    let mut grouped: HashMap<(String, Role), Vec<Arc<Worker>>> = HashMap::new();
    for worker in by_key.values() {
        let route = (worker.record.served_model_name.clone(), worker.record.role);
        grouped.entry(route).or_default().push(worker.clone());
    }
    grouped
        .into_iter()
        .map(|(route, mut workers)| {
            workers.sort_by(|a, b| a.key.cmp(&b.key));
            (route, Arc::from(workers))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{record, view_of};

    #[test]
    fn sync_adds_updates_and_removes() {
        let pool = WorkerPool::new(BreakerPolicy::default());
        let a = record("a", "m", Role::Aggregated);
        let b = record("b", "m", Role::Aggregated);
        let changes = pool.sync(&view_of(&[&a, &b]));
        assert_eq!(changes.added.len(), 2);
        let snapshot = pool.snapshot();
        let workers = snapshot.workers_for("m", Role::Aggregated);
        assert_eq!(workers.len(), 2);
        let id_a = workers[0].id;
        workers[0].begin_request();

        // A load update keeps the worker (and its in-flight count).
        let mut a2 = a.clone();
        a2.load.waiting = 7;
        let changes = pool.sync(&view_of(&[&a2, &b]));
        assert!(changes.added.is_empty() && changes.removed.is_empty());
        let same = pool.snapshot().workers_for("m", Role::Aggregated)[0].clone();
        assert_eq!(same.id, id_a);
        assert_eq!(same.in_flight(), 1);
        assert_eq!(same.load().waiting, 7);

        // A new URL under the same key is a new engine.
        let mut a3 = a.clone();
        a3.url = "http://elsewhere".into();
        let changes = pool.sync(&view_of(&[&a3, &b]));
        assert_eq!((changes.added.len(), changes.removed.len()), (1, 1));

        let changes = pool.sync(&view_of(&[&b]));
        assert_eq!(changes.removed.len(), 1);
        assert_eq!(pool.snapshot().len(), 1);
    }

    #[test]
    fn models_are_indexed_by_role() {
        let pool = WorkerPool::new(BreakerPolicy::default());
        pool.sync(&view_of(&[&record("p", "m", Role::Prefill), &record("d", "m", Role::Decode), &record("x", "n", Role::Aggregated)]));
        let snapshot = pool.snapshot();
        assert!(snapshot.knows_model("m"));
        assert!(snapshot.workers_for("m", Role::Aggregated).is_empty());
        assert_eq!(snapshot.models()["m"], vec![Role::Prefill, Role::Decode]);
        assert!(!snapshot.knows_model("zzz"));
    }
}
