//! Prometheus metrics of the router, served as text at `/metrics`.
//!
//! Per worker (label `worker` = its URL): attempts sent, errors by kind, requests in flight,
//! and latency from send to the response's last byte. Per policy: routing decisions by
//! reason. Per endpoint: what clients got (status code), including the router's refusals.
//! Prefill/decode disaggregation: requests split, answered by prefill alone, pairs redone,
//! requests that could not be split (by reason) and leases released early.

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabels {
    pub worker: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerErrorLabels {
    pub worker: String,
    /// connect, status_5xx, timeout, stream, invalid_response
    pub kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub policy: &'static str,
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PairingLabels {
    /// no_decode, no_compatible_decode, no_available_pair (every pair ejected by breakers),
    /// kv_layout_mismatch (a decode engine refused a pair)
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClientLabels {
    pub endpoint: &'static str,
    pub status: u16,
}

type HistogramFamily = Family<WorkerLabels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 1 ms .. ~65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

pub struct Metrics {
    registry: Registry,
    pub worker_requests: Family<WorkerLabels, Counter>,
    pub worker_errors: Family<WorkerErrorLabels, Counter>,
    pub worker_in_flight: Family<WorkerLabels, Gauge>,
    pub worker_latency: HistogramFamily,
    pub decisions: Family<DecisionLabels, Counter>,
    pub client_requests: Family<ClientLabels, Counter>,
    pub retries: Counter,
    pub pd_requests: Counter,
    pub pd_prefill_finished: Counter,
    pub pd_retries: Counter,
    pub pd_pairing_failures: Family<PairingLabels, Counter>,
    pub pd_lease_frees: Counter,
    pub workers: Gauge,
    pub etcd_connected: Gauge,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("dlengine_router");
        let worker_requests = Family::default();
        let worker_errors = Family::default();
        let worker_in_flight = Family::default();
        let worker_latency: HistogramFamily = Family::new_with_constructor(latency_histogram);
        let decisions = Family::default();
        let client_requests = Family::default();
        let retries = Counter::default();
        let pd_requests = Counter::default();
        let pd_prefill_finished = Counter::default();
        let pd_retries = Counter::default();
        let pd_pairing_failures = Family::default();
        let pd_lease_frees = Counter::default();
        let workers = Gauge::default();
        let etcd_connected = Gauge::default();
        registry.register("worker_requests", "Requests sent to a worker (each attempt counts)", worker_requests.clone());
        registry.register("worker_errors", "Failed attempts on a worker, by kind", worker_errors.clone());
        registry.register("worker_in_flight", "Requests in flight on a worker", worker_in_flight.clone());
        registry.register("worker_request_duration_seconds", "Send to last byte, per worker", worker_latency.clone());
        registry.register("routing_decisions", "Routing decisions by policy and reason", decisions.clone());
        registry.register("client_requests", "Requests answered, by endpoint and HTTP status", client_requests.clone());
        registry.register("retries", "Attempts moved to another worker", retries.clone());
        registry.register("pd_requests", "Requests split into a prefill and a decode hop", pd_requests.clone());
        registry.register("pd_prefill_finished", "Split requests that prefill finished alone (no decode hop)", pd_prefill_finished.clone());
        registry.register("pd_retries", "Prefill/decode pairs redone after a failed hop", pd_retries.clone());
        registry.register("pd_pairing_failures", "Requests of a model with prefill workers that could not be split, by reason", pd_pairing_failures.clone());
        registry.register("pd_lease_frees", "Prefill KV leases released early by the router (POST /pd/free)", pd_lease_frees.clone());
        registry.register("workers", "Workers in the current view", workers.clone());
        registry.register("etcd_connected", "1 while the etcd watch is established", etcd_connected.clone());
        Metrics {
            registry,
            worker_requests,
            worker_errors,
            worker_in_flight,
            worker_latency,
            decisions,
            client_requests,
            retries,
            pd_requests,
            pd_prefill_finished,
            pd_retries,
            pd_pairing_failures,
            pd_lease_frees,
            workers,
            etcd_connected,
        }
    }

    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }

    pub fn worker_error(&self, worker: &str, kind: &'static str) {
        self.worker_errors.get_or_create(&WorkerErrorLabels { worker: worker.to_string(), kind }).inc();
    }

    pub fn pairing_failure(&self, reason: &'static str) {
        self.pd_pairing_failures.get_or_create(&PairingLabels { reason }).inc();
    }

    pub fn client_answer(&self, endpoint: &'static str, status: u16) {
        self.client_requests.get_or_create(&ClientLabels { endpoint, status }).inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
