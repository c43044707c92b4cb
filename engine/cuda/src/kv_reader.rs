//! Reading KV blocks to host memory from any thread: the TCP transport's send side
//! ([`HostKvReader`]). Each read runs on a stream of its own, so the engine thread goes on
//! stepping; one launch of the chunk-copy kernel gathers the blocks straight into mapped
//! pinned memory, which the socket then sends from (no copy on the host); and for an
//! early lease a one-thread kernel first waits for the last layer's progress mark, so the
//! read follows prefill's forward layer by layer.
//!
//! Reading on the engine's stream between steps, then copying into a pageable buffer,
//! held the engine thread ~40 ms per 67 MB layer and capped a TCP pull at ~1.5 GB/s.

use std::ops::Range;
use std::sync::Arc;

use cudarc::driver::sys::{self, CUdeviceptr, CUstream};
use cudarc::driver::{result, CudaContext};
use dlengine_engine::kv_transfer::{BufferPool, HostBytes, HostFrame, HostKvReader};

use crate::backend::KvCache;
use crate::copy_kernels::{CopyKernels, MARK_TIMEOUT};
use crate::error::{op_error, OpContext, Result};
use crate::kv_io::{check_aligned, chunked, layer_buffers, staging_segments};
use crate::memory::{DeviceBuffer, PinnedBuffer};

const OP: &str = "reading KV blocks to the host";
/// What the pinned pool keeps at most: up to three frames are in flight per connection
/// (one read, one queued, one sending), for several pulls at once.
const MAX_POOLED_BUFFERS: usize = 64;
const MAX_POOLED_BYTES: usize = 2 << 30;
/// Pinned buffers are allocated in multiples of this (frames vary with prompt length).
const PINNED_GRANULE: usize = 8 << 20;

pub(crate) struct DeviceKvReader {
    kv: Arc<KvCache>,
    marks: Arc<DeviceBuffer>,
    pinned: Arc<PinnedPool>,
    kernels: CopyKernels,
    ctas: u32,
    /// Last, so the context outlives what is freed in it.
    ctx: Arc<CudaContext>,
}

impl DeviceKvReader {
    pub(crate) fn new(ctx: Arc<CudaContext>, kv: Arc<KvCache>, marks: Arc<DeviceBuffer>, kernels: CopyKernels, ctas: u32) -> Self {
        let pinned = Arc::new(PinnedPool::new(ctx.clone()));
        Self { kv, marks, pinned, kernels, ctas, ctx }
    }

    fn read_frame(&self, blocks: &[u32], layers: Range<usize>, ready_mark: Option<u32>) -> Result<HostFrame> {
        self.ctx.bind_to_thread().op(OP)?;
        if layers.is_empty() || layers.end > self.kv.layers.len() {
            return Err(op_error(OP, format!("layers {layers:?} out of range (the cache has {})", self.kv.layers.len())));
        }
        let l = self.kv.layout;
        let block_bytes = (l.block_size * l.kv_heads * l.head_dim * l.dtype.size_in_bytes()) as u64;
        let len = layers.len() * 2 * blocks.len() * block_bytes as usize;
        // A failure flag for the mark's wait sits after the bytes.
        let flag_at = len.next_multiple_of(16);
        let mut buffer = self.pinned.take(flag_at + 16)?;
        buffer.host.as_mut_slice()[flag_at..flag_at + 4].fill(0);
        let stream = OwnedStream::new()?;
        let queued = self.queue_read(&stream, blocks, layers, ready_mark, buffer.device, block_bytes);
        // Whatever was queued is over before the buffer goes anywhere, even on an error.
        let waited = stream.wait_sleeping();
        let stalled = buffer.host.as_slice()[flag_at..flag_at + 4] != [0; 4];
        if let Err(e) = queued.and(waited) {
            self.pinned.give_back(buffer);
            return Err(e);
        }
        if stalled {
            self.pinned.give_back(buffer);
            return Err(op_error(OP, format!("the forward published no progress for {MARK_TIMEOUT:?} (it failed or stalled)")));
        }
        Ok(Box::new(PinnedFrame { buffer: Some(buffer), len, pool: self.pinned.clone() }))
    }

    /// Queues on `stream` the wait for `ready_mark` (its failure flag right after the
    /// frame's bytes at `into`) and the gather of `layers` of `blocks` into `into`.
    fn queue_read(&self, stream: &OwnedStream, blocks: &[u32], layers: Range<usize>, ready_mark: Option<u32>, into: CUdeviceptr, block_bytes: u64) -> Result<()> {
        let len = (layers.len() * 2 * blocks.len()) as u64 * block_bytes;
        if let Some(mark) = ready_mark {
            // Marks are published in layer order: the last layer's covers the frame.
            self.kernels.queue_wait(OP, stream.0, self.marks.ptr(), layers.end - 1, mark, into + len.next_multiple_of(16))?;
        }
        let caches: Vec<(CUdeviceptr, CUdeviceptr)> = self.kv.layers.iter().map(|(k, v)| (k.ptr(), v.ptr())).collect();
        let chunks = chunked(staging_segments(&layer_buffers(&caches, layers), blocks, block_bytes, into, true));
        check_aligned(OP, &chunks)?;
        // SAFETY: stream-ordered allocation, upload, use and free, all on `stream`; the
        // upload is from pageable memory, so the driver stages it before returning.
        let table = unsafe { result::malloc_async(stream.0, (chunks.len() * 24).max(24)) }.op(OP)?;
        unsafe { result::memcpy_htod_async(table, chunks.as_flattened(), stream.0) }.op(OP)?;
        let launched = self.kernels.queue_copy(OP, stream.0, table, chunks.len(), self.ctas);
        unsafe { result::free_async(table, stream.0) }.op(OP)?;
        launched
    }
}

impl HostKvReader for DeviceKvReader {
    fn read(&self, blocks: &[u32], layers: Range<usize>, ready_mark: Option<u32>) -> std::result::Result<HostFrame, String> {
        self.read_frame(blocks, layers, ready_mark).map_err(|e| e.to_string())
    }
}

impl Drop for DeviceKvReader {
    fn drop(&mut self) {
        // The cache and marks may be freed with this reader: in its context.
        let _ = self.ctx.bind_to_thread();
    }
}

/// A stream of one read, destroyed with it.
struct OwnedStream(CUstream);

impl OwnedStream {
    fn new() -> Result<Self> {
        Ok(Self(result::stream::create(result::stream::StreamKind::NonBlocking).op(OP)?))
    }

    /// Waits for the stream's work with the thread asleep: an early lease's read may wait
    /// for a whole forward, which spinning would spend a core on.
    fn wait_sleeping(&self) -> Result<()> {
        const FLAGS: u32 = sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC as u32 | sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32;
        let mut event: sys::CUevent = std::ptr::null_mut();
        // SAFETY: a fresh event, recorded on our live stream, waited on, then destroyed.
        unsafe {
            sys::cuEventCreate(&mut event, FLAGS).result().op(OP)?;
            let waited = sys::cuEventRecord(event, self.0).result().and_then(|()| sys::cuEventSynchronize(event).result());
            let _ = sys::cuEventDestroy_v2(event);
            waited.op(OP)
        }
    }
}

impl Drop for OwnedStream {
    fn drop(&mut self) {
        // SAFETY: our stream; its pending work completes before its resources go.
        unsafe {
            let _ = result::stream::destroy(self.0);
        }
    }
}

/// Pinned host memory mapped into the device's address space.
struct MappedBuffer {
    host: PinnedBuffer,
    device: CUdeviceptr,
}

/// Mapped pinned buffers reused across reads: pinning tens of megabytes takes longer than
/// reading them.
struct PinnedPool {
    ctx: Arc<CudaContext>,
    free: BufferPool<MappedBuffer>,
}

impl PinnedPool {
    fn new(ctx: Arc<CudaContext>) -> Self {
        Self { ctx, free: BufferPool::new(MAX_POOLED_BUFFERS, MAX_POOLED_BYTES) }
    }

    /// A pooled buffer of at least `bytes`, or a new one.
    fn take(&self, bytes: usize) -> Result<MappedBuffer> {
        if let Some(buffer) = self.free.take(bytes) {
            return Ok(buffer);
        }
        let (host, device) = PinnedBuffer::new_mapped(bytes.next_multiple_of(PINNED_GRANULE))?;
        Ok(MappedBuffer { host, device })
    }

    fn give_back(&self, buffer: MappedBuffer) {
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

/// A frame read into a pooled pinned buffer, which goes back to the pool when dropped.
struct PinnedFrame {
    buffer: Option<MappedBuffer>,
    len: usize,
    pool: Arc<PinnedPool>,
}

impl HostBytes for PinnedFrame {
    fn bytes(&self) -> &[u8] {
        &self.buffer.as_ref().expect("held until dropped").host.as_slice()[..self.len]
    }
}

impl Drop for PinnedFrame {
    fn drop(&mut self) {
        if let Some(buffer) = self.buffer.take() {
            self.pool.give_back(buffer);
        }
    }
}
