//! A stream of one read or write of KV blocks off the engine thread, destroyed with it,
//! so that transfers neither wait for the engine's forward nor make it wait for them.

use cudarc::driver::result;
use cudarc::driver::sys::{self, CUstream};

use crate::error::{OpContext, Result};

pub(crate) struct SideStream(pub(crate) CUstream);

impl SideStream {
    pub(crate) fn new(op: &'static str) -> Result<Self> {
        Ok(Self(result::stream::create(result::stream::StreamKind::NonBlocking).op(op)?))
    }

    /// Waits for the stream's work with the thread asleep: an early lease's read may wait
    /// for a whole forward, which spinning would spend a core on.
    pub(crate) fn wait_sleeping(&self, op: &'static str) -> Result<()> {
        const FLAGS: u32 = sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC as u32 | sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32;
        let mut event: sys::CUevent = std::ptr::null_mut();
        // SAFETY: a fresh event, recorded on our live stream, waited on, then destroyed.
        unsafe {
            sys::cuEventCreate(&mut event, FLAGS).result().op(op)?;
            let waited = sys::cuEventRecord(event, self.0).result().and_then(|()| sys::cuEventSynchronize(event).result());
            let _ = sys::cuEventDestroy_v2(event);
            waited.op(op)
        }
    }
}

impl Drop for SideStream {
    fn drop(&mut self) {
        // SAFETY: our stream; its pending work completes before its resources go.
        unsafe {
            let _ = result::stream::destroy(self.0);
        }
    }
}
