//! Decode side: one prefill peer's connected queue pairs, and the engine's
//! [`RemoteKvReader`] over them. READs run on a blocking thread (completion polling
//! spins); transfers from one peer take turns on its queue pairs.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use dlengine_engine::kv::BlockId;
use dlengine_engine::kv_transfer::{RemoteCopy, RemoteKvReader};
use dlengine_kv_rdma::{read_blocks, QueuePair, ReadOptions, ReadPlanner, ReadTransfer};

use super::progress::RemoteProgress;
use super::RdmaKv;

pub(super) struct PeerLink {
    /// The data's queue pairs, then (with `progress`) one for reading prefill's marks.
    qps: Mutex<Vec<QueuePair>>,
    planner: ReadPlanner,
    /// Prefill's progress marks, where it publishes them.
    progress: Option<RemoteProgress>,
}

impl PeerLink {
    /// A link over `qps`, the last of which reads the marks when there is `progress`.
    pub(super) fn new(qps: Vec<QueuePair>, planner: ReadPlanner, progress: Option<RemoteProgress>) -> Self {
        Self { qps: Mutex::new(qps), planner, progress }
    }

    /// Whether an early descriptor's READs can follow prefill's forward layer by layer.
    pub(super) fn follows_progress(&self) -> bool {
        self.progress.is_some()
    }

    /// False once a failed transfer left a queue pair in the error state. A link in use
    /// counts as usable: its transfer says otherwise when it fails.
    fn usable(&self) -> bool {
        self.qps.try_lock().map_or(true, |qps| qps.iter().all(|qp| qp.unusable_reason().is_none()))
    }

    /// Copies the blocks of `pairs`; with `ready_mark` and prefill's marks, each layer once
    /// prefill's forward has written it.
    fn read(&self, pairs: &[(BlockId, BlockId)], ready_mark: Option<u32>) -> Result<(), String> {
        let plan = self.planner.plan(pairs).map_err(|e| format!("planning the RDMA READs: {e}"))?;
        let mut qps = self.qps.lock().unwrap_or_else(|e| e.into_inner());
        let data_qps = qps.len() - usize::from(self.progress.is_some());
        let (data, marks_qp) = qps.split_at_mut(data_qps);
        let started = Instant::now();
        let read = match (ready_mark, &self.progress, marks_qp.first_mut()) {
            (Some(mark), Some(progress), Some(marks_qp)) => ReadTransfer::start(data, &plan, ReadOptions::default())
                .and_then(|transfer| transfer.wait_gated(|| progress.layers_ready(marks_qp, mark, started), |_| {})),
            _ => read_blocks(data, &plan, ReadOptions::default()),
        };
        let stats = read.map_err(|e| format!("RDMA READ: {e}"))?;
        let seconds = started.elapsed().as_secs_f64();
        tracing::debug!(bytes = stats.bytes, requests = stats.requests, ms = seconds * 1e3, gb_per_s = stats.bytes as f64 / seconds / 1e9, "RDMA READ done");
        Ok(())
    }
}

/// Copies a lease's blocks from one prefill peer.
pub struct RdmaReader {
    link: Arc<PeerLink>,
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for RdmaReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RdmaReader")
    }
}

impl RemoteKvReader for RdmaReader {
    fn transport(&self) -> &'static str {
        "rdma"
    }

    fn start(&self, pairs: Vec<(BlockId, BlockId)>, ready_mark: Option<u32>) -> RemoteCopy {
        let copy = RemoteCopy::default();
        let (done, link) = (copy.clone(), self.link.clone());
        self.runtime.spawn_blocking(move || done.finish(link.read(&pairs, ready_mark)));
        copy
    }
}

impl RdmaReader {
    /// Whether an early descriptor's READs can follow prefill's forward layer by layer
    /// (prefill published its progress marks); else they wait for its first token.
    pub fn follows_progress(&self) -> bool {
        self.link.follows_progress()
    }
}

impl RdmaKv {
    /// A reader from the prefill engine `prefill_id` (connect URL `url`), over the link
    /// kept from earlier requests while it is usable, else over a new one.
    pub async fn reader(&self, client: &reqwest::Client, self_id: &str, prefill_id: &str, url: &str) -> Result<RdmaReader, String> {
        let link = match self.usable_link(prefill_id) {
            Some(link) => link,
            None => self.connect_once(client, url, self_id, prefill_id).await?,
        };
        Ok(RdmaReader { link, runtime: tokio::runtime::Handle::current() })
    }

    /// A new link to `prefill_id`, unless another request connected one while this one
    /// waited its turn.
    async fn connect_once(&self, client: &reqwest::Client, url: &str, self_id: &str, prefill_id: &str) -> Result<Arc<PeerLink>, String> {
        let _one_at_a_time = self.connecting.lock().await;
        if let Some(link) = self.usable_link(prefill_id) {
            return Ok(link);
        }
        let link = Arc::new(self.connect(client, url, self_id).await?);
        self.peers.lock().unwrap_or_else(|e| e.into_inner()).insert(prefill_id.to_owned(), link.clone());
        Ok(link)
    }

    fn usable_link(&self, prefill_id: &str) -> Option<Arc<PeerLink>> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner()).get(prefill_id).filter(|l| l.usable()).cloned()
    }
}
