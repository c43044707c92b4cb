//! Writing frames received from the TCP transport into a decode engine's KV cache. A
//! backend that can write its cache from any thread (CUDA: a stream of the writer's own)
//! offers a [`HostKvWriter`]: frames are then received straight into memory the device
//! reads, and written off the engine thread as they arrive, so a long prompt's import
//! never holds up the requests decoding beside it. Other backends write between steps, on
//! the engine thread ([`super::StreamedKv`]).

use std::ops::Range;

use super::HostFrame;
use crate::kv::BlockId;

/// Writes frames into blocks of a KV cache from any thread, blocking it until written.
pub trait HostKvWriter: Send + Sync {
    /// A buffer of `len` bytes to receive a frame into, which [`write`](Self::write) reads
    /// without copying it first (on a GPU: pinned host memory the device maps).
    fn buffer(&self, len: usize) -> Result<HostFrame, String>;

    /// Writes `frame`, `layers` of as many blocks as `blocks` holds in [`super::KvFrame`]
    /// order, into `blocks`, except the rows of the first `skip` blocks (found in this
    /// engine's prefix cache: shared, never written).
    fn write(&self, frame: &[u8], layers: Range<usize>, blocks: &[BlockId], skip: usize) -> Result<(), String>;
}
