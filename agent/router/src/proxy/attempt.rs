//! One try of one request on one worker: counts it in flight while it lasts, and on its end
//! records latency and tells the worker's circuit breaker how it went. An attempt dropped
//! without a verdict (the client went away) counts for neither side.
//!
//! A prefill hop's verdict waits for decode: prefill answered, but whether its KV could be
//! pulled is known only from decode's answer. [`Attempt::defer`] ends the attempt (no
//! longer in flight) and hands its verdict on as a [`Verdict`].

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
    imports_kv: bool,
}

impl Attempt {
    pub fn begin(worker: Arc<Worker>, admission: Admission, metrics: Arc<Metrics>) -> Attempt {
        let labels = WorkerLabels { worker: worker.url().to_string() };
        worker.begin_request();
        metrics.worker_requests.get_or_create(&labels).inc();
        metrics.worker_in_flight.get_or_create(&labels).inc();
        Attempt { worker, admission, metrics, labels, started: Instant::now(), settled: false, imports_kv: false }
    }

    /// A decode hop: the worker pulls a prefill worker's KV, and a failed pull
    /// (`kv_transfer_failed`) is not held against it.
    pub fn importing_kv(mut self) -> Attempt {
        self.imports_kv = true;
        self
    }

    pub fn imports_kv(&self) -> bool {
        self.imports_kv
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
        if !std::mem::replace(&mut self.settled, true) {
            record_failure(&self.worker, &self.metrics, kind);
        }
    }

    /// Ends the attempt now; its verdict is the returned one's to give.
    pub fn defer(mut self) -> Verdict {
        let settled = std::mem::replace(&mut self.settled, true);
        Verdict { worker: self.worker.clone(), admission: self.admission, metrics: self.metrics.clone(), settled }
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

/// The verdict of an attempt that is over, for its worker's breaker; dropped without one,
/// it counts for neither side.
pub struct Verdict {
    worker: Arc<Worker>,
    admission: Admission,
    metrics: Arc<Metrics>,
    settled: bool,
}

impl Verdict {
    pub fn succeed(mut self) {
        if !std::mem::replace(&mut self.settled, true) {
            self.worker.breaker.record_success();
        }
    }

    /// `kind` as for [`Attempt::fail`]; `kv_transfer`: decode could not pull this worker's KV.
    pub fn fail(mut self, kind: &'static str) {
        if !std::mem::replace(&mut self.settled, true) {
            record_failure(&self.worker, &self.metrics, kind);
        }
    }
}

impl Drop for Verdict {
    fn drop(&mut self) {
        if !self.settled && self.admission == Admission::Probe {
            self.worker.breaker.release_probe();
        }
    }
}

fn record_failure(worker: &Worker, metrics: &Metrics, kind: &'static str) {
    metrics.worker_error(worker.url(), kind);
    if worker.breaker.record_failure(Instant::now()) {
        tracing::warn!(worker = %worker.url(), "worker ejected by its circuit breaker after {kind}");
    }
}
