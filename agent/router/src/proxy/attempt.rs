//! One try of one request on one worker: counts it in flight while it lasts, and on its end
//! records latency and tells the worker's circuit breaker how it went. An attempt dropped
//! without a verdict (the client went away) counts for neither side.

use std::sync::Arc;
use std::time::Instant;

use crate::metrics::{Metrics, WorkerLabels};
use crate::workers::{Admission, Worker};

pub struct Attempt {
    worker: Arc<Worker>,
    admission: Admission,
    metrics: Arc<Metrics>,
    labels: WorkerLabels,
    started: Instant,
    settled: bool,
}

impl Attempt {
    pub fn begin(worker: Arc<Worker>, admission: Admission, metrics: Arc<Metrics>) -> Attempt {
        let labels = WorkerLabels { worker: worker.url().to_string() };
        worker.begin_request();
        metrics.worker_requests.get_or_create(&labels).inc();
        metrics.worker_in_flight.get_or_create(&labels).inc();
        Attempt { worker, admission, metrics, labels, started: Instant::now(), settled: false }
    }

    pub fn worker(&self) -> &Arc<Worker> {
        &self.worker
    }

    pub fn succeed(&mut self) {
        if !std::mem::replace(&mut self.settled, true) {
            self.worker.breaker.record_success();
        }
    }

    /// `kind` names the failure in the errors metric: connect, status_5xx, timeout, stream,
    /// invalid_response.
    pub fn fail(&mut self, kind: &'static str) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        self.metrics.worker_error(self.worker.url(), kind);
        if self.worker.breaker.record_failure(Instant::now()) {
            tracing::warn!(worker = %self.worker.url(), "worker ejected by its circuit breaker after {kind}");
        }
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        self.worker.end_request();
        self.metrics.worker_in_flight.get_or_create(&self.labels).dec();
        self.metrics.worker_latency.get_or_create(&self.labels).observe(self.started.elapsed().as_secs_f64());
        if !self.settled && self.admission == Admission::Probe {
            self.worker.breaker.release_probe();
        }
    }
}
