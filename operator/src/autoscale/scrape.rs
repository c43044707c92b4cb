//! [`LoadSource`] over the engines' own `/metrics`: the ready pods of a role, scraped over
//! plain HTTP on their pod IP, averaged. Latency quantiles use only what was observed since
//! the previous scrape of the same pod, so old traffic does not mask a new slowdown.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};

use super::load::{LoadFuture, LoadSource, RoleLoad, RoleRef};
use super::prometheus::{self, EngineSample, Histogram};
use super::LoadError;
use crate::render::{labels, ENGINE_PORT};

const SCRAPE_TIMEOUT: Duration = Duration::from_secs(3);

pub struct MetricsScraper {
    client: kube::Client,
    http: HttpClient<HttpConnector, Empty<Bytes>>,
    previous: Mutex<HashMap<String, (Histogram, Histogram)>>,
}

impl MetricsScraper {
    pub fn new(client: kube::Client) -> Self {
        let http = HttpClient::builder(TokioExecutor::new()).build_http();
        MetricsScraper { client, http, previous: Mutex::new(HashMap::new()) }
    }

    async fn load(&self, role: &RoleRef) -> Result<RoleLoad, LoadError> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &role.namespace);
        let selector = format!("{}={},{}={}", labels::DEPLOYMENT, role.deployment, labels::ROLE, role.role);
        let list = pods
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(|source| LoadError::ListPods { role: role.role.clone(), source })?;
        let mut samples = Vec::new();
        for pod in list.items.iter().filter(|p| is_ready(p)) {
            let (Some(ip), Some(uid)) = (pod.status.as_ref().and_then(|s| s.pod_ip.clone()), pod.metadata.uid.clone()) else {
                continue;
            };
            match self.scrape(&ip).await {
                Ok(sample) => samples.push(self.windowed(&uid, sample)),
                Err(error) => tracing::debug!(pod = ?pod.metadata.name, %error, "metrics scrape failed"),
            }
        }
        if samples.is_empty() {
            return Err(LoadError::NoInstance { role: role.role.clone() });
        }
        Ok(average(&samples))
    }

    async fn scrape(&self, ip: &str) -> Result<EngineSample, String> {
        let uri: hyper::Uri = format!("http://{ip}:{ENGINE_PORT}/metrics").parse().map_err(|e| format!("{e}"))?;
        let response = tokio::time::timeout(SCRAPE_TIMEOUT, self.http.get(uri)).await.map_err(|_| "timed out".to_string())?.map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            return Err(format!("status {}", response.status()));
        }
        let body = tokio::time::timeout(SCRAPE_TIMEOUT, response.into_body().collect()).await.map_err(|_| "timed out".to_string())?.map_err(|e| e.to_string())?;
        Ok(prometheus::parse(&String::from_utf8_lossy(&body.to_bytes())))
    }

    /// Replaces cumulative histograms by the part observed since this pod's last scrape.
    fn windowed(&self, uid: &str, mut sample: EngineSample) -> EngineSample {
        let Ok(mut previous) = self.previous.lock() else { return sample };
        let cumulative = (sample.ttft.clone(), sample.itl.clone());
        if let Some((ttft, itl)) = previous.get(uid) {
            sample.ttft = sample.ttft.since(ttft);
            sample.itl = sample.itl.since(itl);
        }
        previous.insert(uid.to_string(), cumulative);
        sample
    }
}

impl LoadSource for MetricsScraper {
    fn role_load<'a>(&'a self, role: &'a RoleRef) -> LoadFuture<'a> {
        Box::pin(self.load(role))
    }
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Means of the gauges; latency quantiles over all engines' observations together.
pub fn average(samples: &[EngineSample]) -> RoleLoad {
    let n = samples.len() as f64;
    let mean = |f: fn(&EngineSample) -> Option<f64>| samples.iter().filter_map(f).sum::<f64>() / n;
    RoleLoad {
        instances: samples.len() as i32,
        queue_depth: mean(|s| s.queue_depth),
        kv_cache_utilization: mean(|s| s.kv_cache_utilization),
        ttft_p95_seconds: merged(samples.iter().map(|s| &s.ttft)).quantile(0.95),
        itl_p95_seconds: merged(samples.iter().map(|s| &s.itl)).quantile(0.95),
    }
}

fn merged<'a>(histograms: impl Iterator<Item = &'a Histogram>) -> Histogram {
    let mut total: Option<Histogram> = None;
    for h in histograms.filter(|h| !h.buckets.is_empty()) {
        match &mut total {
            Some(t) if t.buckets.len() == h.buckets.len() => {
                for (acc, (_, c)) in t.buckets.iter_mut().zip(&h.buckets) {
                    acc.1 += c;
                }
            }
            Some(_) => {}
            None => total = Some(h.clone()),
        }
    }
    total.unwrap_or_default()
}
