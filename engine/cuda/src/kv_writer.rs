//! Writing TCP frames into a decode engine's KV cache from any thread: the transport's
//! receive side ([`HostKvWriter`]). Frames are received straight into pooled mapped pinned
//! memory; each write is one launch of the chunk-copy kernel on a stream of its own,
//! scattering the frame from where it lies into the import's blocks, so the engine thread
//! goes on stepping the requests beside the import.
//!
//! Written by the engine thread instead, a 67 MB frame (a layer of a 16K-token prompt of
//! Qwen3-0.6B) held it ~6 ms: copying the frame into pinned staging on 8 threads, then
//! the scatter, once per step for every frame of the import.

use std::ops::Range;
use std::sync::Arc;

use cudarc::driver::sys::{self, CUdeviceptr};
use cudarc::driver::CudaContext;
use dlengine_engine::kv_transfer::{HostFrame, HostKvWriter};

use crate::backend::KvCache;
use crate::copy_kernels::CopyKernels;
use crate::error::{op_error, OpContext, Result};
use crate::kv_io::{check_aligned, chunked, copy_on_threads, layer_buffers, staging_segments};
use crate::pinned_pool::{MappedBuffer, PinnedFrame, PinnedPool};
use crate::side_stream::SideStream;

const OP: &str = "writing KV blocks from the host";

pub(crate) struct DeviceKvWriter {
    kv: Arc<KvCache>,
    pinned: Arc<PinnedPool>,
    kernels: CopyKernels,
    ctas: u32,
    /// Last, so the context outlives what is freed in it.
    ctx: Arc<CudaContext>,
}

impl DeviceKvWriter {
    pub(crate) fn new(ctx: Arc<CudaContext>, kv: Arc<KvCache>, kernels: CopyKernels, ctas: u32) -> Self {
        let pinned = Arc::new(PinnedPool::new(ctx.clone()));
        Self { kv, pinned, kernels, ctas, ctx }
    }

    fn write_frame(&self, frame: &[u8], layers: Range<usize>, blocks: &[u32], skip: usize) -> Result<()> {
        self.ctx.bind_to_thread().op(OP)?;
        if layers.is_empty() || layers.end > self.kv.layers.len() || skip > blocks.len() {
            return Err(op_error(OP, format!("layers {layers:?} (the cache has {}), skipping {skip} of {} blocks", self.kv.layers.len(), blocks.len())));
        }
        let block_bytes = self.kv.block_bytes() as u64;
        let len = layers.len() * 2 * blocks.len() * block_bytes as usize;
        if frame.len() != len {
            return Err(op_error(OP, format!("a frame of layers {layers:?} holds {} bytes, expected {len}", frame.len())));
        }
        // A frame received into one of our buffers is read where it lies; other bytes
        // are staged into one first.
        let (from, staged) = match mapped_address(frame) {
            Some(at) => (at, None),
            None => {
                let buffer = self.staged(frame)?;
                (buffer.device, Some(buffer))
            }
        };
        let stream = SideStream::new(OP)?;
        let chunks = chunked(staging_segments(&layer_buffers(&self.kv.buffers(), layers), blocks, skip, block_bytes, from, false));
        let queued = check_aligned(OP, &chunks).and_then(|()| self.kernels.queue_chunks(OP, stream.0, &chunks, self.ctas));
        // Whatever was queued is over before the frame's memory goes anywhere.
        let waited = stream.wait_sleeping(OP);
        if let Some(buffer) = staged {
            self.pinned.give_back(buffer);
        }
        queued.and(waited)
    }

    /// `frame` copied into a pooled mapped buffer.
    fn staged(&self, frame: &[u8]) -> Result<MappedBuffer> {
        let mut buffer = self.pinned.take(frame.len())?;
        copy_on_threads(&mut buffer.host.as_mut_slice()[..frame.len()], frame);
        Ok(buffer)
    }
}

/// Where the device sees `bytes`, if they lie in mapped pinned memory.
fn mapped_address(bytes: &[u8]) -> Option<CUdeviceptr> {
    let mut device: CUdeviceptr = 0;
    // SAFETY: the driver only looks `bytes` up among its pinned allocations and writes
    // `device`; pageable memory is an error, which is the answer "no".
    let found = unsafe { sys::cuMemHostGetDevicePointer_v2(&mut device, bytes.as_ptr() as *mut std::ffi::c_void, 0) };
    (found == sys::CUresult::CUDA_SUCCESS).then_some(device)
}

impl HostKvWriter for DeviceKvWriter {
    fn buffer(&self, len: usize) -> std::result::Result<HostFrame, String> {
        let frame = PinnedFrame::take(&self.pinned, len).map_err(|e| e.to_string())?;
        Ok(Box::new(frame))
    }

    fn write(&self, frame: &[u8], layers: Range<usize>, blocks: &[u32], skip: usize) -> std::result::Result<(), String> {
        self.write_frame(frame, layers, blocks, skip).map_err(|e| e.to_string())
    }
}

impl Drop for DeviceKvWriter {
    fn drop(&mut self) {
        // The cache may be freed with this writer: in its context.
        let _ = self.ctx.bind_to_thread();
    }
}
