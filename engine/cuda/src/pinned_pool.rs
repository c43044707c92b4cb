//! Pinned host memory mapped into the device's address space, pooled for KV frames on
//! their way between the cache and a socket: prefill reads frames into it for the socket
//! to send from, decode receives frames into it for the copy kernel to read from. Pinning
//! tens of megabytes takes longer than moving them, so buffers are reused.

use std::sync::Arc;

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::CudaContext;
use dlengine_engine::kv_transfer::{BufferPool, HostBytes};

use crate::error::{OpContext, Result};
use crate::memory::PinnedBuffer;

/// What the pool keeps at most: up to three frames are in flight per connection (one
/// read or written, one queued, one on the wire), for several transfers at once.
const MAX_POOLED_BUFFERS: usize = 64;
const MAX_POOLED_BYTES: usize = 2 << 30;
/// Buffers are allocated in multiples of this (frames vary with prompt length).
const PINNED_GRANULE: usize = 8 << 20;

/// Pinned host memory and the address the device sees it at.
pub(crate) struct MappedBuffer {
    pub(crate) host: PinnedBuffer,
    pub(crate) device: CUdeviceptr,
}

pub(crate) struct PinnedPool {
    ctx: Arc<CudaContext>,
    free: BufferPool<MappedBuffer>,
}

impl PinnedPool {
    pub(crate) fn new(ctx: Arc<CudaContext>) -> Self {
        Self { ctx, free: BufferPool::new(MAX_POOLED_BUFFERS, MAX_POOLED_BYTES) }
    }

    /// A pooled buffer of at least `bytes`, or a new one.
    pub(crate) fn take(&self, bytes: usize) -> Result<MappedBuffer> {
        if let Some(buffer) = self.free.take(bytes) {
            return Ok(buffer);
        }
        self.ctx.bind_to_thread().op("pinning host memory")?;
        let (host, device) = PinnedBuffer::new_mapped(bytes.next_multiple_of(PINNED_GRANULE))?;
        Ok(MappedBuffer { host, device })
    }

    pub(crate) fn give_back(&self, buffer: MappedBuffer) {
        let evicted = self.free.give_back(buffer.host.bytes(), buffer);
        if !evicted.is_empty() {
            let _ = self.ctx.bind_to_thread();
        }
    }
}

impl Drop for PinnedPool {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
    }
}

/// The first `len` bytes of a pooled buffer, which goes back to the pool when dropped.
pub(crate) struct PinnedFrame {
    buffer: Option<MappedBuffer>,
    len: usize,
    pool: Arc<PinnedPool>,
}

impl PinnedFrame {
    /// A frame of `len` bytes in a buffer of `pool`.
    pub(crate) fn take(pool: &Arc<PinnedPool>, len: usize) -> Result<Self> {
        Ok(Self::of(pool.take(len)?, len, pool.clone()))
    }

    pub(crate) fn of(buffer: MappedBuffer, len: usize, pool: Arc<PinnedPool>) -> Self {
        Self { buffer: Some(buffer), len, pool }
    }

    fn buffer(&self) -> &MappedBuffer {
        self.buffer.as_ref().expect("held until dropped")
    }
}

impl HostBytes for PinnedFrame {
    fn bytes(&self) -> &[u8] {
        &self.buffer().host.as_slice()[..self.len]
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        let len = self.len;
        &mut self.buffer.as_mut().expect("held until dropped").host.as_mut_slice()[..len]
    }
}

impl Drop for PinnedFrame {
    fn drop(&mut self) {
        if let Some(buffer) = self.buffer.take() {
            self.pool.give_back(buffer);
        }
    }
}
