//! Prometheus metrics (`GET /metrics`): request counts, token counters and latency
//! histograms recorded as requests run, engine gauges read from `Engine::stats()` at
//! scrape time (so they are never stale and cost nothing between scrapes).

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

use dlengine_engine::stats::{EngineStats, KvImportsByTransport};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub endpoint: String,
    pub status: String,
}

type RatioGauge = Gauge<f64, AtomicU64>;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ImportLabels {
    transport: &'static str,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransportLabels {
    transport: &'static str,
}

/// Decode: KV imports by transport, cumulative (set from the engine's counts).
#[derive(Default)]
struct ImportGauges {
    imports: Family<ImportLabels, Gauge>,
    bytes: Family<TransportLabels, Gauge>,
    seconds: Family<TransportLabels, RatioGauge>,
}

impl ImportGauges {
    fn register(registry: &mut Registry) -> Self {
        let g = Self::default();
        registry.register("kv_imports", "Decode: KV imports ended since start, by transport and outcome (done, failed)", g.imports.clone());
        registry.register("kv_import_bytes", "Decode: KV bytes imported since start (blocks already cached not counted)", g.bytes.clone());
        registry.register(
            "kv_import_seconds",
            "Decode: admission to KV and first token in hand, summed over done imports since start",
            g.seconds.clone(),
        );
        g
    }

    fn set(&self, by_transport: &KvImportsByTransport) {
        for (transport, counts) in by_transport.all() {
            self.imports.get_or_create(&ImportLabels { transport, outcome: "done" }).set(counts.done as i64);
            self.imports.get_or_create(&ImportLabels { transport, outcome: "failed" }).set(counts.failed as i64);
            self.bytes.get_or_create(&TransportLabels { transport }).set(counts.bytes as i64);
            self.seconds.get_or_create(&TransportLabels { transport }).set(counts.seconds);
        }
    }
}

struct EngineGauges {
    waiting: Gauge,
    running: Gauge,
    kv_usage: RatioGauge,
    kv_blocks_used: Gauge,
    kv_blocks_total: Gauge,
    prefix_hit_rate: RatioGauge,
    preemptions: Gauge,
    in_flight: Gauge,
    kv_leases: Gauge,
    kv_blocks_leased: Gauge,
    pending_kv_imports: Gauge,
    kv_imports: ImportGauges,
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    prompt_tokens: Counter,
    generation_tokens: Counter,
    ttft: Histogram,
    inter_token: Histogram,
    e2e: Histogram,
    gauges: EngineGauges,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("dlengine");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("requests", "HTTP requests by endpoint and status", requests.clone());
        let prompt_tokens = Counter::default();
        registry.register("prompt_tokens", "Prompt tokens of finished requests", prompt_tokens.clone());
        let generation_tokens = Counter::default();
        registry.register("generation_tokens", "Generated tokens of finished requests", generation_tokens.clone());
        let ttft = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register("time_to_first_token_seconds", "Request start to first token", ttft.clone());
        let inter_token = Histogram::new(exponential_buckets(0.0005, 2.0, 15));
        registry.register("inter_token_latency_seconds", "Time between output deltas of a request", inter_token.clone());
        let e2e = Histogram::new(exponential_buckets(0.01, 2.0, 15));
        registry.register("e2e_request_latency_seconds", "Request start to last token", e2e.clone());
        let gauges = EngineGauges::register(&mut registry);
        Self { registry, requests, prompt_tokens, generation_tokens, ttft, inter_token, e2e, gauges }
    }

    pub fn count_request(&self, endpoint: &str, status: u16) {
        self.requests.get_or_create(&RequestLabels { endpoint: endpoint.to_owned(), status: status.to_string() }).inc();
    }

    /// Prometheus text exposition, engine gauges refreshed from `stats` first.
    pub fn render(&self, stats: Option<EngineStats>, in_flight: usize) -> String {
        if let Some(stats) = stats {
            self.gauges.set(&stats);
        }
        self.gauges.in_flight.set(in_flight as i64);
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl EngineGauges {
    fn register(registry: &mut Registry) -> Self {
        let g = Self {
            waiting: Gauge::default(),
            running: Gauge::default(),
            kv_usage: RatioGauge::default(),
            kv_blocks_used: Gauge::default(),
            kv_blocks_total: Gauge::default(),
            prefix_hit_rate: RatioGauge::default(),
            preemptions: Gauge::default(),
            in_flight: Gauge::default(),
            kv_leases: Gauge::default(),
            kv_blocks_leased: Gauge::default(),
            pending_kv_imports: Gauge::default(),
            kv_imports: ImportGauges::register(registry),
        };
        registry.register("kv_leases", "Prefill: handed-off KV waiting for a decode engine to pull it", g.kv_leases.clone());
        registry.register("kv_blocks_leased", "Prefill: KV blocks held by leases", g.kv_blocks_leased.clone());
        registry.register("pending_kv_imports", "Decode: requests whose KV arrived, waiting for room", g.pending_kv_imports.clone());
        registry.register("waiting_requests", "Requests queued, not yet running", g.waiting.clone());
        registry.register("running_sequences", "Sequences being stepped", g.running.clone());
        registry.register("kv_cache_usage_ratio", "Fraction of KV-cache blocks in use", g.kv_usage.clone());
        registry.register("kv_cache_blocks_used", "KV-cache blocks in use", g.kv_blocks_used.clone());
        registry.register("kv_cache_blocks", "KV-cache blocks in all", g.kv_blocks_total.clone());
        registry.register("prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / looked up", g.prefix_hit_rate.clone());
        registry.register("preemptions", "Sequences preempted since start (cumulative)", g.preemptions.clone());
        registry.register("in_flight_requests", "Generation requests the server is answering", g.in_flight.clone());
        g
    }

    fn set(&self, s: &EngineStats) {
        self.waiting.set(s.waiting_requests as i64);
        self.running.set(s.running_seqs as i64);
        self.kv_usage.set(s.kv_usage());
        self.kv_blocks_used.set(s.kv_blocks_used as i64);
        self.kv_blocks_total.set(s.kv_blocks_total as i64);
        self.prefix_hit_rate.set(s.prefix_hit_rate());
        self.preemptions.set(s.preemptions as i64);
        self.kv_leases.set(s.kv_leases as i64);
        self.kv_blocks_leased.set(s.kv_blocks_leased as i64);
        self.pending_kv_imports.set(s.pending_kv_imports as i64);
        self.kv_imports.set(&s.kv_imports);
    }
}

/// Times one generation request: first token, gaps between deltas, the whole request.
pub struct RequestObserver {
    metrics: Arc<Metrics>,
    start: Instant,
    last_token: Option<Instant>,
    finished: bool,
}

impl RequestObserver {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics, start: Instant::now(), last_token: None, finished: false }
    }

    pub fn on_tokens(&mut self, tokens: usize) {
        if tokens == 0 {
            return;
        }
        let now = Instant::now();
        match self.last_token {
            None => self.metrics.ttft.observe((now - self.start).as_secs_f64()),
            Some(last) => self.metrics.inter_token.observe((now - last).as_secs_f64()),
        }
        self.last_token = Some(now);
    }

    pub fn on_finish(&mut self, prompt_tokens: usize, completion_tokens: usize) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        self.metrics.e2e.observe(self.start.elapsed().as_secs_f64());
        self.metrics.prompt_tokens.inc_by(prompt_tokens as u64);
        self.metrics.generation_tokens.inc_by(completion_tokens as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_every_family() {
        let metrics = Arc::new(Metrics::new());
        metrics.count_request("/v1/completions", 200);
        let mut observer = RequestObserver::new(metrics.clone());
        observer.on_tokens(1);
        observer.on_tokens(1);
        observer.on_finish(5, 2);
        let stats = EngineStats { kv_blocks_total: 10, kv_blocks_used: 5, waiting_requests: 3, ..Default::default() };
        let text = metrics.render(Some(stats), 1);
        for line in [
            "dlengine_requests_total{endpoint=\"/v1/completions\",status=\"200\"} 1",
            "dlengine_prompt_tokens_total 5",
            "dlengine_generation_tokens_total 2",
            "dlengine_time_to_first_token_seconds_count 1",
            "dlengine_inter_token_latency_seconds_count 1",
            "dlengine_e2e_request_latency_seconds_count 1",
            "dlengine_waiting_requests 3",
            "dlengine_kv_cache_usage_ratio 0.5",
            "dlengine_kv_cache_blocks_used 5",
            "dlengine_in_flight_requests 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }
}
