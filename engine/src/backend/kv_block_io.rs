//! Whole-block access to a backend's KV cache, for moving a prompt's KV between engines
//! (prefill/decode disaggregation). Separate from [`super::Backend`] because the engine
//! reaches it through the executor as a trait object, and because a backend that cannot
//! do it only has to say so.

use std::ops::Range;
use std::sync::Arc;

use super::Result;
use crate::error::BackendError;
use crate::kv_transfer::{CudaIpcKv, HostKvReader, HostKvWriter, KvMemory};

pub trait KvBlockIo {
    /// Copies whole blocks of `layers` to the host: per layer the K of each block in
    /// order, then the V of each block; raw bytes in the KV dtype.
    fn read_kv_blocks(&mut self, _blocks: &[u32], _layers: Range<usize>) -> Result<Vec<u8>> {
        Err(BackendError::Unsupported("reading KV blocks to the host".into()))
    }

    /// The inverse of [`read_kv_blocks`](Self::read_kv_blocks).
    fn write_kv_blocks(&mut self, _blocks: &[u32], _layers: Range<usize>, _bytes: &[u8]) -> Result<()> {
        Err(BackendError::Unsupported("writing KV blocks from the host".into()))
    }

    /// A reader of this cache's blocks that works from other threads, without the
    /// engine's; None where only [`read_kv_blocks`](Self::read_kv_blocks) can.
    fn host_reader(&mut self) -> Result<Option<Arc<dyn HostKvReader>>> {
        Ok(None)
    }

    /// A writer of frames into this cache's blocks that works from other threads, without
    /// the engine's; None where only [`write_kv_blocks`](Self::write_kv_blocks) can.
    fn host_writer(&mut self) -> Result<Option<Arc<dyn HostKvWriter>>> {
        Ok(None)
    }

    /// Handles another process on this node can map the KV cache with (CUDA IPC); None
    /// where the backend has no such thing.
    fn export_kv_ipc(&mut self) -> Result<Option<CudaIpcKv>> {
        Ok(None)
    }

    /// Starts copying blocks of a peer's exported cache into ours, device to device, off
    /// the compute stream; `pairs` are (peer block, local block). With `ready_mark`, each
    /// layer is copied once the peer published that mark for it
    /// ([`publish_progress`](Self::publish_progress)). Returns a ticket for
    /// [`copy_finished`](Self::copy_finished).
    fn start_copy_from_peer(&mut self, _peer: &CudaIpcKv, _pairs: &[(u32, u32)], _ready_mark: Option<u32>) -> Result<u64> {
        Err(BackendError::Unsupported("copying KV from a peer device (CUDA IPC)".into()))
    }

    /// Whether the copy of `ticket` is complete (the ticket is spent once it is). An error
    /// ends it too: the peer never reached the mark, or the copy failed.
    fn copy_finished(&mut self, _ticket: u64) -> Result<bool> {
        Err(BackendError::Unsupported("copying KV from a peer device (CUDA IPC)".into()))
    }

    /// Asks the next forward to publish `mark` as each layer's progress once that layer's
    /// KV writes are complete, for a peer reading the layers early. False where the
    /// backend publishes no progress (the peer then waits for the whole forward).
    fn publish_progress(&mut self, _mark: u32) -> bool {
        false
    }

    /// Where the KV cache lives, for a transport that reads or writes it without the
    /// engine (RDMA). With `dmabuf`, GPU buffers are exported as dma-bufs too, where the
    /// device can. None where the backend cannot say.
    fn kv_memory(&mut self, _dmabuf: bool) -> Result<Option<KvMemory>> {
        Ok(None)
    }

    /// Makes KV that a NIC wrote into the cache visible to the work launched next (a GPU
    /// may otherwise see RDMA writes late). Nothing to do for host memory.
    fn after_remote_writes(&mut self) -> Result<()> {
        Ok(())
    }
}
