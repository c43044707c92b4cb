//! Whole-block access to a backend's KV cache, for moving a prompt's KV between engines
//! (prefill/decode disaggregation). Separate from [`super::Backend`] because the engine
//! reaches it through the executor as a trait object, and because a backend that cannot
//! do it only has to say so.

use std::ops::Range;

use super::Result;
use crate::error::BackendError;
use crate::kv_transfer::CudaIpcKv;

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

    /// Handles another process on this node can map the KV cache with (CUDA IPC); None
    /// where the backend has no such thing.
    fn export_kv_ipc(&mut self) -> Result<Option<CudaIpcKv>> {
        Ok(None)
    }

    /// Copies blocks of a peer's exported cache into ours, device to device; `pairs` are
    /// (peer block, local block).
    fn copy_kv_from_peer(&mut self, _peer: &CudaIpcKv, _pairs: &[(u32, u32)]) -> Result<()> {
        Err(BackendError::Unsupported("copying KV from a peer device (CUDA IPC)".into()))
    }
}
