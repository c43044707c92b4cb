//! KV that reaches this host in frames of whole layers (TCP), while the request already
//! waits in the engine. The transport hands frames over as they arrive. Once the engine
//! has allocated the import's blocks, a backend with a [`HostKvWriter`] (CUDA) has each
//! frame written by the transport's side, off the engine thread, into memory the device
//! reads directly; until then, and on other backends, frames queue for the engine thread,
//! which writes one per step, so a long prompt's gigabytes never stall the requests
//! running beside it for more than a frame. Either way the writes overlap the transfer
//! instead of following it.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use super::{pooled_frame, HostFrame, HostKvWriter};
use crate::kv::BlockId;

/// KV bytes of `layers` for every block of an import, layer-major: for each layer the K
/// rows of every block in order, then the V rows of every block. Raw cache dtype, so a
/// copy is bit-exact.
pub struct KvFrame {
    pub layers: Range<usize>,
    pub bytes: HostFrame,
}

impl std::fmt::Debug for KvFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvFrame").field("layers", &self.layers).field("bytes", &self.bytes.bytes().len()).finish()
    }
}

/// Frames on their way from a transport into an import's blocks.
pub struct StreamedKv {
    num_blocks: usize,
    transport: &'static str,
    writer: Option<Arc<dyn HostKvWriter>>,
    state: Mutex<State>,
}

/// Where an admitted import's frames go.
#[derive(Debug)]
pub(crate) struct Destination {
    pub(crate) blocks: Vec<BlockId>,
    /// Leading blocks this engine had cached: their rows in each frame are skipped.
    pub(crate) skip: usize,
    /// Bytes of one layer of every block (K and V).
    layer_bytes: usize,
}

#[derive(Default)]
struct State {
    /// Frames for the engine thread to write.
    frames: VecDeque<KvFrame>,
    failed: Option<String>,
    /// The import ended (done, failed or dropped): the transport can stop.
    closed: bool,
    /// Set once the engine allocated the import's blocks.
    destination: Option<Arc<Destination>>,
    /// Per layer: written, or being written off the engine thread.
    claimed: Vec<bool>,
    /// Writes off the engine thread in flight: the blocks must outlive them.
    writing: usize,
}

impl State {
    /// Checks that `frame` fits `destination` and brings no layer twice, and takes its
    /// layers.
    fn claim(&mut self, frame: &KvFrame, destination: &Destination) -> Result<(), String> {
        let layers = frame.layers.clone();
        if layers.is_empty() || layers.end > self.claimed.len() || self.claimed[layers.clone()].iter().any(|&c| c) {
            return Err(format!("a frame of layers {layers:?}: out of range or already written"));
        }
        let (len, expected) = (frame.bytes.bytes().len(), layers.len() * destination.layer_bytes);
        if len != expected {
            return Err(format!("a frame of layers {layers:?} holds {len} bytes, expected {expected}"));
        }
        self.claimed[layers].fill(true);
        Ok(())
    }
}

impl StreamedKv {
    /// Frames of `num_blocks` blocks each, brought by `transport` (for logs), written by
    /// the engine thread.
    pub fn new(num_blocks: usize, transport: &'static str) -> Self {
        Self { num_blocks, transport, writer: None, state: Mutex::default() }
    }

    /// Frames written by `writer` off the engine thread once the import has its blocks.
    pub fn with_writer(num_blocks: usize, transport: &'static str, writer: Option<Arc<dyn HostKvWriter>>) -> Self {
        Self { writer, ..Self::new(num_blocks, transport) }
    }

    /// Every layer at once: bytes already here.
    pub fn whole(num_blocks: usize, num_layers: usize, bytes: Vec<u8>) -> Self {
        let stream = Self::new(num_blocks, "host");
        stream.push(KvFrame { layers: 0..num_layers, bytes: pooled_frame(bytes) });
        stream
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn transport(&self) -> &'static str {
        self.transport
    }

    /// A buffer to receive a frame of `len` bytes into that the writer reads without a
    /// copy; None without a writer (receive into [`super::frame_buffer`]).
    pub fn receive_buffer(&self, len: usize) -> Option<Result<HostFrame, String>> {
        self.writer.as_ref().map(|w| w.buffer(len))
    }

    /// Queues a frame for the engine thread; false once the import has ended (stop
    /// sending).
    pub fn push(&self, frame: KvFrame) -> bool {
        let mut state = self.lock();
        if !state.closed {
            state.frames.push_back(frame);
        }
        !state.closed
    }

    /// Hands a frame over: written at once, off the engine thread, where the writer can
    /// and the import has its blocks; else queued for the engine thread. False once the
    /// import has ended or failed (stop sending).
    pub async fn deliver(self: &Arc<Self>, frame: KvFrame) -> bool {
        let destination = self.writer.as_ref().and_then(|_| self.claim_for_writer(&frame));
        let (Some(writer), Some(destination)) = (self.writer.clone(), destination) else {
            return self.push(frame) && self.failure().is_none();
        };
        let stream = self.clone();
        // The bookkeeping is the blocking task's own: it runs to its end even if the
        // transport gives up on it (a timed-out pull), and the blocks wait for it.
        let write = move || {
            let written = writer.write(frame.bytes.bytes(), frame.layers.clone(), &destination.blocks, destination.skip);
            stream.finish_write(written)
        };
        tokio::task::spawn_blocking(write).await.unwrap_or(false)
    }

    /// The destination of `frame` if the import has its blocks, with the frame's layers
    /// taken and a write counted in flight; None to queue it (or if the import is over).
    fn claim_for_writer(&self, frame: &KvFrame) -> Option<Arc<Destination>> {
        let mut state = self.lock();
        let destination = state.destination.clone().filter(|_| !state.closed && state.failed.is_none())?;
        match state.claim(frame, &destination) {
            Ok(()) => {
                state.writing += 1;
                Some(destination)
            }
            Err(why) => {
                state.failed.get_or_insert(why);
                None
            }
        }
    }

    fn finish_write(&self, written: Result<(), String>) -> bool {
        let mut state = self.lock();
        state.writing -= 1;
        if let Err(why) = written {
            state.failed.get_or_insert(why);
        }
        !state.closed && state.failed.is_none()
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

    /// The engine's side: the import's blocks are allocated (`blocks`, of which the first
    /// `skip` are shared from the prefix cache) in a cache of `num_layers` layers whose
    /// layer of every block is `layer_bytes`.
    pub(crate) fn admit(&self, blocks: Vec<BlockId>, skip: usize, num_layers: usize, layer_bytes: usize) {
        let mut state = self.lock();
        state.claimed = vec![false; num_layers];
        state.destination = Some(Arc::new(Destination { blocks, skip, layer_bytes }));
    }

    pub(crate) fn writer(&self) -> Option<&Arc<dyn HostKvWriter>> {
        self.writer.as_ref()
    }

    /// The engine's side, once admitted: the next queued frame to write, its layers
    /// taken, and where it goes; or why the import failed.
    pub(crate) fn next_frame(&self) -> Result<Option<(KvFrame, Arc<Destination>)>, String> {
        let mut state = self.lock();
        if let Some(why) = &state.failed {
            return Err(why.clone());
        }
        let Some(destination) = state.destination.clone() else { return Ok(None) };
        let Some(frame) = state.frames.pop_front() else { return Ok(None) };
        match state.claim(&frame, &destination) {
            Ok(()) => Ok(Some((frame, destination))),
            Err(why) => Err(state.failed.get_or_insert(why).clone()),
        }
    }

    /// The engine's side: whether every layer is written (none is still being written);
    /// an error once the import failed.
    pub(crate) fn all_written(&self) -> Result<bool, String> {
        let state = self.lock();
        match &state.failed {
            Some(why) => Err(why.clone()),
            None => Ok(state.writing == 0 && !state.claimed.is_empty() && state.claimed.iter().all(|&c| c)),
        }
    }

    /// Whether a write off the engine thread may still touch the blocks.
    pub fn is_writing(&self) -> bool {
        self.lock().writing > 0
    }

    /// The engine's side: the import ended; drop what is queued and refuse the rest.
    pub(crate) fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        state.frames.clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl std::fmt::Debug for StreamedKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamedKv").field("num_blocks", &self.num_blocks).field("transport", &self.transport).finish_non_exhaustive()
    }
}
