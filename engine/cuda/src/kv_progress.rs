//! Per-layer progress of the KV cache, for early handoffs: when the engine asks
//! ([`KvBlockIo::publish_progress`](dlengine_engine::backend::KvBlockIo)), the next
//! forward writes a mark for each layer right after that layer's KV writes. A decode
//! engine on another GPU of the node maps the marks over CUDA IPC and copies each layer
//! as soon as its mark is there, overlapping the copy with the rest of the forward.
//!
//! Marks are not published during graph capture (a captured launch would replay a stale
//! mark forever); a replayed step publishes every layer's mark once it has run.

use std::sync::Arc;

use cudarc::driver::result;
use cudarc::driver::sys::{CUfunction, CUstream};

use crate::error::{OpContext, Result};
use crate::kernels::Module;
use crate::launch::{launch, Arg, Launch};
use crate::memory::DeviceBuffer;

/// Bytes allocated for the marks: the driver's large-allocation granule.
const MARKS_ALLOCATION: usize = 2 << 20;

pub(crate) struct KvProgress {
    publish: CUfunction,
    /// One u32 mark per layer, zeroed at allocation; exported over CUDA IPC, shared with
    /// this cache's reader off the engine thread.
    marks: Option<Arc<DeviceBuffer>>,
    /// Asked for the next forward.
    pending: Option<u32>,
    /// Being published by the current forward.
    active: Option<u32>,
}

impl KvProgress {
    pub(crate) fn new(kv_transfer: &Module) -> Result<Self> {
        Ok(Self { publish: kv_transfer.function("publish_progress")?, marks: None, pending: None, active: None })
    }

    /// The marks buffer (allocated and zeroed on first use), for export.
    pub(crate) fn marks(&mut self, num_layers: usize) -> Result<Arc<DeviceBuffer>> {
        if self.marks.is_none() {
            // An allocation of its own granule (2 MiB), page-aligned, so that it can be
            // exported as a dma-buf for a NIC too.
            let buffer = DeviceBuffer::new((num_layers.max(1) * 4).max(MARKS_ALLOCATION))?;
            // SAFETY: the buffer holds at least `num_layers` u32s.
            unsafe { result::memset_d8_sync(buffer.ptr(), 0, num_layers * 4) }.op("zeroing KV progress marks")?;
            self.marks = Some(Arc::new(buffer));
        }
        Ok(self.marks.clone().expect("just set"))
    }

    /// Publishes `mark` during the next forward; false until the marks are exported.
    pub(crate) fn request(&mut self, mark: u32) -> bool {
        self.pending = Some(mark);
        self.marks.is_some()
    }

    /// A step starts: the pending mark (if any) is this forward's.
    pub(crate) fn step_started(&mut self) {
        self.active = self.pending.take();
    }

    /// After layers `first..first + count` of the current forward wrote their KV.
    pub(crate) fn layers_written(&self, stream: CUstream, first: usize, count: usize) -> Result<()> {
        let (Some(mark), Some(marks)) = (self.active, &self.marks) else {
            return Ok(());
        };
        let args = vec![Arg::Ptr(marks.ptr()), Arg::I32(first as i32), Arg::I32(count as i32), Arg::U32(mark)];
        launch("publishing KV progress", self.publish, stream, &Launch::new((1, 1, 1), 32), args)
    }
}
