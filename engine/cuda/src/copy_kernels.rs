//! The two kernels every KV block copy is made of (`kernels/kv_transfer.cu`): the chunk
//! copy, and the one-thread wait for a layer's progress mark that holds a stream until a
//! forward has written that layer. Shared by the engine thread's host staging
//! ([`crate::kv_io`]), peer copies ([`crate::peer_copy`]), and reads and writes off the engine
//! thread ([`crate::kv_reader`], [`crate::kv_writer`]).

use std::time::Duration;

use cudarc::driver::result;
use cudarc::driver::sys::{CUdeviceptr, CUfunction, CUstream};

use crate::error::{OpContext, Result};
use crate::kernels::Module;
use crate::launch::{launch, Arg, Launch};

/// How long a wait holds its stream for a mark: a prompt's last forward takes far less;
/// past this the forward is taken to have failed or stalled.
pub(crate) const MARK_TIMEOUT: Duration = Duration::from_secs(10);
/// Threads per CTA of the copy kernel: 2048 threads per SM (at 4 CTAs per SM), each with
/// four 16-byte loads in flight, hide NVLink's and PCIe's latency.
const COPY_THREADS: u32 = 512;

#[derive(Clone, Copy)]
pub(crate) struct CopyKernels {
    copy_chunks: CUfunction,
    wait_progress: CUfunction,
}

// SAFETY: immutable driver handles, valid in the context they were loaded in, which every
// caller binds to its thread before launching; launches from several threads are allowed.
unsafe impl Send for CopyKernels {}
unsafe impl Sync for CopyKernels {}

impl CopyKernels {
    pub(crate) fn load(kv_transfer: &Module) -> Result<Self> {
        Ok(Self { copy_chunks: kv_transfer.function("copy_chunks")?, wait_progress: kv_transfer.function("wait_progress")?})
    }

    /// Queues the copy of the `count` chunks (source, destination, bytes) in device memory
    /// at `table`, on at most `ctas` CTAs.
    pub(crate) fn queue_copy(&self, op: &'static str, stream: CUstream, table: CUdeviceptr, count: usize, ctas: u32) -> Result<()> {
        let grid = ctas.min(count.max(1) as u32);
        launch(op, self.copy_chunks, stream, &Launch::new((grid, 1, 1), COPY_THREADS), vec![Arg::Ptr(table), Arg::I32(count as i32)])
    }

    /// Queues the copy of `chunks` on `stream`, their table uploaded into memory allocated
    /// and freed in stream order: for copies off the engine thread, which share no
    /// buffer with it.
    pub(crate) fn queue_chunks(&self, op: &'static str, stream: CUstream, chunks: &[[u64; 3]], ctas: u32) -> Result<()> {
        // SAFETY: stream-ordered allocation, upload, use and free, all on `stream`; the
        // upload is from pageable memory, so the driver stages it before returning.
        let table = unsafe { result::malloc_async(stream, (chunks.len() * 24).max(24)) }.op(op)?;
        unsafe { result::memcpy_htod_async(table, chunks.as_flattened(), stream) }.op(op)?;
        let launched = self.queue_copy(op, stream, table, chunks.len(), ctas);
        unsafe { result::free_async(table, stream) }.op(op)?;
        launched
    }

    /// Holds `stream` until `marks[layer]` reaches `mark`; past [`MARK_TIMEOUT`] it sets the
    /// u32 at `failed` (mapped host memory) and lets the stream go on.
    pub(crate) fn queue_wait(&self, op: &'static str, stream: CUstream, marks: CUdeviceptr, layer: usize, mark: u32, failed: CUdeviceptr) -> Result<()> {
        let args = vec![Arg::Ptr(marks), Arg::I32(layer as i32), Arg::U32(mark), Arg::U64(MARK_TIMEOUT.as_nanos() as u64), Arg::Ptr(failed)];
        launch(op, self.wait_progress, stream, &Launch::new((1, 1, 1), 1), args)
    }
}
