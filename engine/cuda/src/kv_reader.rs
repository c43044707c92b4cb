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

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::CudaContext;
use dlengine_engine::kv_transfer::{HostFrame, HostKvReader};

use crate::backend::KvCache;
use crate::copy_kernels::{CopyKernels, MARK_TIMEOUT};
use crate::error::{op_error, OpContext, Result};
use crate::kv_io::{check_aligned, chunked, layer_buffers, staging_segments};
use crate::memory::DeviceBuffer;
use crate::pinned_pool::{PinnedFrame, PinnedPool};
use crate::side_stream::SideStream;

const OP: &str = "reading KV blocks to the host";

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
        let block_bytes = self.kv.block_bytes() as u64;
        let len = layers.len() * 2 * blocks.len() * block_bytes as usize;
        // A failure flag for the mark's wait sits after the bytes.
        let flag_at = len.next_multiple_of(16);
        let mut buffer = self.pinned.take(flag_at + 16)?;
        buffer.host.as_mut_slice()[flag_at..flag_at + 4].fill(0);
        let stream = SideStream::new(OP)?;
        let queued = self.queue_read(&stream, blocks, layers, ready_mark, buffer.device, block_bytes);
        // Whatever was queued is over before the buffer goes anywhere, even on an error.
        let waited = stream.wait_sleeping(OP);
        let stalled = buffer.host.as_slice()[flag_at..flag_at + 4] != [0; 4];
        if let Err(e) = queued.and(waited) {
            self.pinned.give_back(buffer);
            return Err(e);
        }
        if stalled {
            self.pinned.give_back(buffer);
            return Err(op_error(OP, format!("the forward published no progress for {MARK_TIMEOUT:?} (it failed or stalled)")));
        }
        Ok(Box::new(PinnedFrame::of(buffer, len, self.pinned.clone())))
    }

    /// Queues on `stream` the wait for `ready_mark` (its failure flag right after the
    /// frame's bytes at `into`) and the gather of `layers` of `blocks` into `into`.
    fn queue_read(&self, stream: &SideStream, blocks: &[u32], layers: Range<usize>, ready_mark: Option<u32>, into: CUdeviceptr, block_bytes: u64) -> Result<()> {
        let len = (layers.len() * 2 * blocks.len()) as u64 * block_bytes;
        if let Some(mark) = ready_mark {
            // Marks are published in layer order: the last layer's covers the frame.
            self.kernels.queue_wait(OP, stream.0, self.marks.ptr(), layers.end - 1, mark, into + len.next_multiple_of(16))?;
        }
        let chunks = chunked(staging_segments(&layer_buffers(&self.kv.buffers(), layers), blocks, 0, block_bytes, into, true));
        check_aligned(OP, &chunks)?;
        self.kernels.queue_chunks(OP, stream.0, &chunks, self.ctas)
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
