//! KV that reaches this host in frames of whole layers (TCP), while the request already
//! waits in the engine. The transport pushes frames as they arrive; the engine thread
//! writes them into the import's blocks between steps, one frame per step, so a long
//! prompt's gigabytes never stall the requests running beside it for more than a frame,
//! and the writes overlap the transfer instead of following it.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Mutex;

use super::frame_pool::recycle_frame_buffer;

/// KV bytes of `layers` for every block of an import, layer-major: for each layer the K
/// rows of every block in order, then the V rows of every block. Raw cache dtype, so a
/// copy is bit-exact.
#[derive(Debug)]
pub struct KvFrame {
    pub layers: Range<usize>,
    pub bytes: Vec<u8>,
}

/// Frames on their way from a transport to the engine.
#[derive(Debug)]
pub struct StreamedKv {
    num_blocks: usize,
    transport: &'static str,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    frames: VecDeque<KvFrame>,
    failed: Option<String>,
    /// The import ended (done, failed or dropped): the transport can stop.
    closed: bool,
}

impl StreamedKv {
    /// Frames of `num_blocks` blocks each, brought by `transport` (for logs).
    pub fn new(num_blocks: usize, transport: &'static str) -> Self {
        Self { num_blocks, transport, state: Mutex::default() }
    }

    /// Every layer at once: bytes already here.
    pub fn whole(num_blocks: usize, num_layers: usize, bytes: Vec<u8>) -> Self {
        let stream = Self::new(num_blocks, "host");
        stream.push(KvFrame { layers: 0..num_layers, bytes });
        stream
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn transport(&self) -> &'static str {
        self.transport
    }

    /// Queues a frame for the engine; false once the import has ended (stop sending).
    pub fn push(&self, frame: KvFrame) -> bool {
        let mut state = self.lock();
        if !state.closed {
            state.frames.push_back(frame);
        }
        !state.closed
    }

    /// The transport failed: no more frames will come, and the import fails with `why`.
    pub fn fail(&self, why: String) {
        self.lock().failed.get_or_insert(why);
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Why the transport failed, if it did.
    pub fn failure(&self) -> Option<String> {
        self.lock().failed.clone()
    }

    /// The engine's side: the next frame to write, or why none will come.
    pub(crate) fn next_frame(&self) -> Result<Option<KvFrame>, String> {
        let mut state = self.lock();
        match state.frames.pop_front() {
            Some(frame) => Ok(Some(frame)),
            None => state.failed.clone().map_or(Ok(None), Err),
        }
    }

    /// The engine's side: the import ended; drop what is queued and refuse the rest.
    pub(crate) fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        for frame in state.frames.drain(..) {
            recycle_frame_buffer(frame.bytes);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}
