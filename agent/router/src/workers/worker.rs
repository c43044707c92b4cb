//! One engine the router can send requests to: its registration, the load it last
//! published, what this router has in flight on it, and its circuit breaker.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use dlengine_registry::{Load, WorkerRecord};

use super::breaker::{BreakerPolicy, CircuitBreaker};

/// Small and copyable, for policies' own bookkeeping; unique for the router's lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerId(pub u64);

#[derive(Debug)]
pub struct Worker {
    pub id: WorkerId,
    /// The registry key; also the pool's key.
    pub key: String,
    /// The registration as first seen. A change in anything but load makes a new worker.
    pub record: WorkerRecord,
    load: Mutex<Load>,
    in_flight: AtomicUsize,
    pub breaker: CircuitBreaker,
}

impl Worker {
    pub fn new(id: WorkerId, key: String, record: WorkerRecord, breaker: BreakerPolicy) -> Worker {
        let load = record.load;
        Worker { id, key, record, load: Mutex::new(load), in_flight: AtomicUsize::new(0), breaker: CircuitBreaker::new(breaker) }
    }

    pub fn url(&self) -> &str {
        &self.record.url
    }

    pub fn load(&self) -> Load {
        *self.load.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_load(&self, load: Load) {
        *self.load.lock().unwrap_or_else(|e| e.into_inner()) = load;
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn begin_request(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    pub fn end_request(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// How busy the worker is, for least-load decisions. This router's own in-flight count
    /// is exact and fresh; the published `running` also counts other routers' requests but
    /// is up to a second old, so the larger of the two stands for what is running, and
    /// queued requests come on top.
    pub fn load_score(&self) -> f64 {
        let load = self.load();
        let running = self.in_flight().max(load.running) as f64;
        running + load.waiting as f64 + load.kv_usage
    }

    /// Whether `other` is the same engine process at the same address: then its breaker
    /// and in-flight count carry over and only the load is refreshed.
    pub fn same_engine(&self, other: &WorkerRecord) -> bool {
        let mut mine = self.record.clone();
        mine.load = other.load;
        &mine == other
    }
}
