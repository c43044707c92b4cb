//! Reading a lease's KV to host memory for the TCP transport's send side. A backend that
//! can read its cache from any thread (CUDA: a stream of the reader's own) offers a
//! [`HostKvReader`]: frames are then read off the engine thread, which goes on stepping,
//! and a layer still being computed is read as soon as its progress mark says it is
//! written, so the transfer overlaps prefill's forward. Other backends read between
//! steps, on the engine thread.

use std::ops::Range;

use super::HostFrame;
use crate::kv::BlockId;

/// What a reader needs to read a lease: its blocks and, while the forward computing them
/// may still run (an early handoff), the progress mark each layer must reach first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseExtent {
    /// Empty while only the engine thread may read the blocks: the lease is reserved and
    /// its forward publishes no progress, so the KV is complete once that step is over.
    pub blocks: Vec<BlockId>,
    pub ready_mark: Option<u32>,
}

impl LeaseExtent {
    pub fn is_readable(&self) -> bool {
        !self.blocks.is_empty()
    }
}

/// Reads blocks of a KV cache to host memory from any thread, blocking it until the bytes
/// are there.
pub trait HostKvReader: Send + Sync {
    /// `layers` of `blocks`, each layer read once its progress reached `ready_mark` (when
    /// given); fails if that takes too long (the forward died or stalled).
    fn read(&self, blocks: &[BlockId], layers: Range<usize>, ready_mark: Option<u32>) -> Result<HostFrame, String>;
}
