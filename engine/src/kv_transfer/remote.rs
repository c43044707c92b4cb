//! A copy into this engine's KV blocks that something outside the engine carries out
//! (RDMA READs posted by the agent, which land in the cache without the engine's help).
//! The engine allocates the blocks, starts the copy and polls it like a device copy.

use std::sync::{Arc, Mutex};

use crate::kv::BlockId;

/// Starts copies of a peer's blocks into local ones.
pub trait RemoteKvReader: Send + Sync + std::fmt::Debug {
    /// For logs: the transport's name.
    fn transport(&self) -> &'static str;

    /// Starts copying; `pairs` are (peer block, local block). With `ready_mark` (an early
    /// descriptor) each layer is read once the peer's progress mark for it reached that
    /// mark, where the reader can see the peer's marks (else the caller starts the copy
    /// only once the peer's forward is over). The local blocks stay untouched by the
    /// engine until the returned copy has finished, failed included.
    fn start(&self, pairs: Vec<(BlockId, BlockId)>, ready_mark: Option<u32>) -> RemoteCopy;
}

/// The completion of one remote copy, shared by who carries it out and the engine.
#[derive(Debug, Clone, Default)]
pub struct RemoteCopy(Arc<Mutex<Option<Result<(), String>>>>);

impl RemoteCopy {
    /// Records the outcome: the copy wrote its last byte, or failed and writes no more.
    pub fn finish(&self, outcome: Result<(), String>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome);
    }

    /// None while the copy runs.
    pub fn poll(&self) -> Option<Result<(), String>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}
