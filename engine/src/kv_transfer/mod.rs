//! What the engine knows about prefill/decode disaggregation: a prefill request hands its
//! KV blocks off under a lease instead of freeing them, and a decode request starts from
//! KV that arrived from elsewhere instead of computing its prompt. Moving the bytes
//! between processes (TCP, CUDA IPC, RDMA) is the agent's job; the engine only reads and
//! writes its own blocks.

mod buffer_pool;
mod frame_pool;
mod host_frame;
mod host_read;
mod host_write;
mod memory;
mod remote;
mod streamed;

use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::kv::BlockId;
use crate::request::TokenLogprob;

pub use buffer_pool::BufferPool;
pub use frame_pool::{frame_buffer, recycle_frame_buffer};
pub use host_frame::{pooled_frame, HostBytes, HostFrame};
pub use host_read::{HostKvReader, LeaseExtent};
pub use host_write::HostKvWriter;
pub use memory::{KvLocation, KvMemory, KvRegion};
pub use remote::{RemoteCopy, RemoteKvReader};
pub use streamed::{KvFrame, StreamedKv};

/// The KV role of one request.
#[derive(Debug, Clone, Default)]
pub enum KvTransfer {
    /// Ordinary request: prefill and decode here.
    #[default]
    Local,
    /// Prefill only: after the first token, pin the prompt's blocks under a lease for a
    /// decode engine to pull, unless the request already finished.
    Export,
    /// Prefill only, announced early: when the prompt's last chunk is scheduled, reserve
    /// the lease and say so ([`EarlyKv`]) before the forward runs, so a decode engine can
    /// start reading each layer as soon as prefill has written it. After the first token
    /// the blocks are pinned under that lease even if the request finished (decode may be
    /// reading them already); the token is kept with the lease for decode to fetch.
    ExportEarly,
    /// Decode only: the prompt's KV comes from `ImportedKv`; generation resumes after the
    /// first token prefill sampled.
    Import(ImportedKv),
}

/// A prompt's KV computed by another engine.
#[derive(Debug, Clone)]
pub struct ImportedKv {
    /// The token prefill sampled after the prompt (decode emits it as its first token).
    /// None when the request comes from an early descriptor: the copy starts at once and
    /// the token follows ([`crate::engine::FirstTokenSink`]).
    pub first_token: Option<TokenLogprob>,
    pub source: KvSource,
}

/// Where imported KV is read from when the request is admitted.
#[derive(Debug, Clone)]
pub enum KvSource {
    /// Bytes that reach this host in frames of whole layers (TCP), written into the
    /// blocks as they come.
    Streamed(Arc<StreamedKv>),
    /// Blocks of a peer process on this node, read device to device. With `ready_mark`
    /// (an early descriptor) each layer is read once the peer's progress mark for that
    /// layer reached it, i.e. while prefill is still computing later layers.
    CudaIpc { peer: Arc<CudaIpcKv>, remote_blocks: Vec<BlockId>, ready_mark: Option<u32> },
    /// Blocks of a peer that `reader` copies straight into this engine's cache (RDMA),
    /// with `ready_mark` layer by layer as the peer's forward writes them.
    Remote { reader: Arc<dyn RemoteKvReader>, remote_blocks: Vec<BlockId>, ready_mark: Option<u32> },
}

/// What a decode engine needs to map a peer's KV cache over CUDA IPC: one handle per
/// layer for K and one for V, in layer order, each a hex-encoded `CUipcMemHandle`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CudaIpcKv {
    /// PCI bus id of the exporting device (two processes on one GPU cannot use IPC).
    pub device: String,
    /// Exporting process, so a reader can tell two exports of one node apart.
    pub pid: u32,
    pub k_handles: Vec<String>,
    pub v_handles: Vec<String>,
    /// Handle of the per-layer progress marks (one u32 per layer): the mark of the last
    /// forward whose KV writes for that layer are complete, published for early handoffs.
    #[serde(default)]
    pub progress: Option<String>,
}

/// Announced when an early-handoff prefill request's last chunk is scheduled: the lease
/// its blocks will be pinned under and the blocks themselves, whose KV is complete once
/// the forward that carries `ready_mark` has run (per layer, where the backend publishes
/// progress marks; else once the first token is out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EarlyKv {
    pub lease_id: u64,
    pub blocks: Vec<BlockId>,
    pub num_tokens: usize,
    pub expires_at: Instant,
    pub ready_mark: Option<u32>,
}

/// How a decode engine learns the first token of an early handoff: the token, or why
/// there is none (the lease was released, expired, or the prefill request failed).
pub type FirstTokenResult = Result<TokenLogprob, String>;

/// Blocks a prefill request left pinned for a decode engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvHandoff {
    pub lease_id: u64,
    pub blocks: Vec<BlockId>,
    /// Prompt tokens whose KV the blocks hold.
    pub num_tokens: usize,
    pub expires_at: Instant,
}
