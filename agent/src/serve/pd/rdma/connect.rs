//! The queue-pair handshake, once per (decode, prefill) pair: decode creates its queue
//! pairs and posts them to prefill's `POST /pd/rdma/connect` `{"peer", "connect"}`;
//! prefill creates as many, connects each to decode's and answers `{"connect",
//! "advert"}`: its own queue pairs and where its cache lies; decode connects its queue
//! pairs to prefill's and plans READs against the advert.

use std::collections::VecDeque;

use axum::extract::State;
use axum::Json;
use dlengine_kv_rdma::{ConnectInfo, KvRdmaAdvert, PlanOptions, QpConfig, QueuePair, ReadPlanner};
use serde::Deserialize;
use serde_json::{json, Value};

use super::super::super::json_body::{parse_request, RawBody};
use super::super::super::state::AppState;
use super::super::peer_call::call;
use super::progress::RemoteProgress;
use super::reader::PeerLink;
use super::RdmaKv;
use crate::openai::ApiError;

/// Most decode engines a prefill engine keeps queue pairs for; the longest connected go
/// first (a decode engine whose pairs went away connects again after its next failure).
const MAX_ACCEPTED_PEERS: usize = 256;

/// Prefill side: queue pairs connected to decode engines, oldest first.
#[derive(Default)]
pub(super) struct Accepted(VecDeque<(String, Vec<QueuePair>)>);

impl Accepted {
    /// A peer connecting again replaces its old pairs (it has dropped its ends).
    fn insert(&mut self, peer: String, qps: Vec<QueuePair>) {
        self.0.retain(|(p, _)| *p != peer);
        if self.0.len() >= MAX_ACCEPTED_PEERS {
            self.0.pop_front();
        }
        self.0.push_back((peer, qps));
    }
}

#[derive(Deserialize)]
struct ConnectRequest {
    /// The decode engine's instance id.
    peer: String,
    connect: Value,
}

#[derive(Deserialize)]
struct ConnectAnswer {
    connect: Value,
    advert: Value,
}

/// Prefill side: `POST /pd/rdma/connect`.
pub async fn rdma_connect(State(state): State<AppState>, RawBody(body): RawBody) -> Result<Json<Value>, ApiError> {
    // Served while draining too: decode may still have to pull one of our leases.
    let pd = state.loaded().map(|r| &r.pd).ok_or_else(|| ApiError::unavailable("the model is still loading; retry shortly"))?;
    let rdma = pd.rdma.as_ref().ok_or_else(|| {
        ApiError::not_found("this engine moves no KV over RDMA (started with --kv-transport tcp or cuda-ipc, or without a device)")
            .with_code("rdma_unavailable")
    })?;
    let request = parse_request::<ConnectRequest>(&body)?;
    let theirs = ConnectInfo::from_json(&request.connect.to_string()).map_err(|e| ApiError::invalid_param("connect", e.to_string()))?;
    let ours = rdma.accept(request.peer, &theirs).map_err(|e| ApiError::unavailable(e).with_code("kv_transfer_failed"))?;
    Ok(Json(json!({ "connect": ours, "advert": rdma.advert() })))
}

impl RdmaKv {
    /// Prefill side: queue pairs for each of the peer's, connected to them.
    fn accept(&self, peer: String, theirs: &ConnectInfo) -> Result<ConnectInfo, String> {
        let mut qps = Vec::with_capacity(theirs.qps.len());
        for remote in &theirs.qps {
            let mut qp = self.pd.create_qp(&self.endpoint, &QpConfig::default()).map_err(|e| e.to_string())?;
            qp.connect(&theirs.endpoint, remote).map_err(|e| e.to_string())?;
            qps.push(qp);
        }
        let ours = ConnectInfo::new(self.endpoint.clone(), qps.iter().map(QueuePair::info).collect());
        tracing::info!(%peer, qps = qps.len(), "RDMA peer connected");
        self.accepted.lock().unwrap_or_else(|e| e.into_inner()).insert(peer, qps);
        Ok(ours)
    }

    /// Decode side: connects to the prefill engine behind `url`: `--rdma-qps` queue pairs
    /// for the data, and one to read prefill's progress marks if it publishes them.
    pub(super) async fn connect(&self, client: &reqwest::Client, url: &str, self_id: &str) -> Result<PeerLink, String> {
        let mut qps = (0..self.qps_per_peer + 1)
            .map(|_| self.pd.create_qp(&self.endpoint, &QpConfig::default()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        let ours = ConnectInfo::new(self.endpoint.clone(), qps.iter().map(QueuePair::info).collect());
        let answer: ConnectAnswer = call(client.post(url).json(&json!({ "peer": self_id, "connect": ours })), url).await?;
        let theirs = ConnectInfo::from_json(&answer.connect.to_string()).map_err(|e| format!("{url} answered: {e}"))?;
        let advert = KvRdmaAdvert::from_json(&answer.advert.to_string()).map_err(|e| format!("{url} answered: {e}"))?;
        if theirs.qps.len() != qps.len() {
            return Err(format!("{url} answered {} queue pairs for our {}", theirs.qps.len(), qps.len()));
        }
        for (qp, remote) in qps.iter_mut().zip(&theirs.qps) {
            qp.connect(&theirs.endpoint, remote).map_err(|e| e.to_string())?;
        }
        let progress = match advert.progress {
            Some(marks) => Some(RemoteProgress::new(&self.pd, marks, advert.layout.shape.layers)?),
            None => {
                qps.pop(); // prefill publishes no marks: nothing to read them with
                None
            }
        };
        let data_qps = qps.len() - usize::from(progress.is_some());
        let max_message_bytes = qps.iter().map(|qp| qp.max_message_bytes() as u64).min().unwrap_or(u64::MAX);
        let defaults = PlanOptions::default();
        let options = PlanOptions { num_qps: data_qps, max_message_bytes: defaults.max_message_bytes.min(max_message_bytes), ..defaults };
        let planner = ReadPlanner::new(advert.layout, advert.regions, self.layout.clone(), self.local_regions(), options)
            .map_err(|e| format!("prefill's KV cache cannot be read into ours: {e}"))?;
        Ok(PeerLink::new(qps, planner, progress))
    }
}
