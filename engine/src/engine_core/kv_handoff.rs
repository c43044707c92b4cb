//! The engine core's side of prefill/decode disaggregation (docs/disaggregation.md).
//!
//! Prefill: a request's blocks end under a lease instead of being freed. An early handoff
//! reserves that lease when the prompt's last chunk is scheduled and announces it before
//! the forward runs ([`StepEvent::KvReady`]), asking the backend to publish per-layer
//! progress so a peer can read each layer as soon as it is written.
//!
//! Decode: an imported request waits for blocks (FCFS), then its copy starts; it runs
//! once the copy finished and prefill's first token is known, which it emits at once.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use super::{EngineCore, Export, RequestKey, StepEvent};
use crate::error::EngineError;
use crate::kv::{BlockId, FirstTokenReply, LeaseDirectory};
use crate::kv_transfer::{
    CudaIpcKv, EarlyKv, FirstTokenResult, HostKvReader, HostKvWriter, ImportedKv, KvFrame, KvHandoff, KvMemory, KvSource, LeaseExtent,
    RemoteCopy, StreamedKv,
};
use crate::request::TokenLogprob;
use crate::sampler::SampledToken;
use crate::scheduler::SchedulerOutput;
use crate::sequence::{SeqId, Sequence};

/// A decode request whose KV is still to come, waiting for blocks and a running slot.
pub(super) struct PendingImport {
    key: RequestKey,
    seq: Sequence,
    source: KvSource,
    first_token: Option<FirstTokenResult>,
}

impl PendingImport {
    pub(super) fn new(key: RequestKey, seq: Sequence, kv: ImportedKv) -> Self {
        Self { key, seq, source: kv.source, first_token: kv.first_token.map(Ok) }
    }

    /// Prefill said its first token will not come, or the KV's transport failed: the
    /// import fails without taking blocks.
    fn lost(&self) -> bool {
        self.why_lost().is_some()
    }

    fn why_lost(&self) -> Option<String> {
        if let Some(Err(why)) = &self.first_token {
            return Some(first_token_missing(why));
        }
        match &self.source {
            KvSource::Streamed(stream) => stream.failure().map(|why| copy_failed(&why)),
            _ => None,
        }
    }
}

fn first_token_missing(why: &str) -> String {
    format!("prefill's first token did not arrive: {why}")
}

fn copy_failed(why: &str) -> String {
    format!("copying the prompt's KV cache from prefill failed: {why}")
}

/// A copy into an import's blocks that may still be running.
#[derive(Clone)]
pub(super) enum KvCopy {
    /// The backend's, by ticket.
    Device(u64),
    /// One carried out outside the engine (RDMA).
    Remote(RemoteCopy),
    /// Frames written as they arrive (TCP): by the engine thread, or off it.
    Streamed(Arc<StreamedKv>),
}

/// A decode request whose blocks are allocated and whose copy has started.
pub(super) struct Importing {
    key: RequestKey,
    seq: Sequence,
    /// The copy still running (None: done).
    copy: Option<KvCopy>,
    /// Leading blocks of the prompt found in this engine's prefix cache: not copied.
    cached_blocks: usize,
    first_token: Option<FirstTokenResult>,
    started: Instant,
    via: &'static str,
}

impl Importing {
    /// Whether the import can run (KV and first token both here) or must fail (no token
    /// is coming) without waiting for anything more.
    fn ready(&self) -> bool {
        match &self.first_token {
            Some(Ok(_)) => self.copy.is_none(),
            Some(Err(_)) => true,
            None => false,
        }
    }
}

/// What a finished import needs to run.
enum Outcome {
    Run(TokenLogprob),
    Fail(String),
}

impl EngineCore {
    /// Blocks an imported prompt takes at most (all of them at once, its KV arriving
    /// whole; fewer are new when a prefix is cached here).
    fn import_blocks(&self, seq: &Sequence) -> usize {
        seq.len().div_ceil(self.info.kv_layout.block_size)
    }

    fn can_admit(&self, import: &PendingImport) -> bool {
        self.scheduler.can_admit_running(self.import_blocks(&import.seq))
    }

    /// Whether imports need a step now: one can be admitted, or one is ready to run or to
    /// fail. (Waiting only for a first token is not: that arrives as a command; nor is a
    /// copy in flight: see [`Self::copies_in_flight`].)
    pub(super) fn imports_need_step(&self) -> bool {
        self.pending_imports.front().is_some_and(|p| self.can_admit(p))
            || self.pending_imports.iter().any(PendingImport::lost)
            || self.importing.iter().any(Importing::ready)
    }

    /// Whether copies are in flight whose end only a step notices, by polling them.
    pub fn copies_in_flight(&self) -> bool {
        self.importing.iter().any(|i| i.copy.is_some()) || !self.orphaned_copies.is_empty()
    }

    /// Admits the imports that fit (their copy starts), then starts the imports whose KV
    /// and first token are both here. True if a first token (or failure) went out: the
    /// step returns at once rather than run a forward after it, which would add a whole
    /// step to the time to first token.
    pub(super) fn advance_imports(&mut self, events: &mut Vec<StepEvent>) -> bool {
        self.reap_orphaned_copies();
        self.fail_lost_pending_imports(events);
        while self.pending_imports.front().is_some_and(|p| self.can_admit(p)) {
            let import = self.pending_imports.pop_front().expect("checked front");
            self.begin_import(import, events);
        }
        let mut emitted = false;
        for i in (0..self.importing.len()).rev() {
            if let Some(outcome) = self.import_outcome(i) {
                let import = self.importing.swap_remove(i);
                self.finish_import(import, outcome, events);
                emitted = true;
            }
        }
        emitted
    }

    /// Fails the queued imports whose first token or KV will not come, before they take
    /// blocks.
    fn fail_lost_pending_imports(&mut self, events: &mut Vec<StepEvent>) {
        if !self.pending_imports.iter().any(PendingImport::lost) {
            return;
        }
        let (lost, kept) = std::mem::take(&mut self.pending_imports).into_iter().partition(PendingImport::lost);
        self.pending_imports = kept;
        for pending in lost {
            let why = pending.why_lost().expect("partitioned on it");
            close_stream_of(&pending.source);
            self.fail_import(pending.key, transport_of(&pending.source), why, events);
        }
    }

    fn begin_import(&mut self, import: PendingImport, events: &mut Vec<StepEvent>) {
        let PendingImport { key, mut seq, source, first_token } = import;
        if let Some(req) = self.requests.get_mut(&key) {
            req.started = true;
        }
        events.push(StepEvent::Started { key, cached_tokens: 0 });
        let via = transport_of(&source);
        let Some((blocks, cached_blocks)) = self.scheduler.allocate_import(&mut seq) else {
            return self.fail_import(key, via, "no free KV blocks".into(), events);
        };
        let started = Instant::now();
        match self.start_copy(&source, &blocks, cached_blocks) {
            Ok(copy) => {
                seq.block_table = blocks;
                self.importing.push(Importing { key, seq, copy, cached_blocks, first_token, started, via });
            }
            Err(e) => {
                self.scheduler.release_detached(&blocks);
                self.fail_import(key, via, format!("importing the prompt's KV cache failed: {e}"), events);
            }
        }
    }

    /// Starts a device or remote copy, or the writing of streamed frames, into `blocks`
    /// but the first `cached` (this engine's prefix cache holds them already).
    fn start_copy(&mut self, source: &KvSource, blocks: &[BlockId], cached: usize) -> Result<Option<KvCopy>, String> {
        let held = match source {
            KvSource::Streamed(stream) => stream.num_blocks(),
            KvSource::CudaIpc { remote_blocks, .. } | KvSource::Remote { remote_blocks, .. } => remote_blocks.len(),
        };
        if held != blocks.len() {
            return Err(format!("prefill's lease holds {held} blocks, the prompt needs {}", blocks.len()));
        }
        let pairs = |remote: &[BlockId]| -> Vec<(BlockId, BlockId)> { remote.iter().copied().zip(blocks.iter().copied()).skip(cached).collect() };
        match source {
            KvSource::Streamed(stream) => {
                let layout = &self.info.kv_layout;
                let layer_bytes = blocks.len() * layout.bytes_per_block() / layout.num_layers;
                stream.admit(blocks.to_vec(), cached, layout.num_layers, layer_bytes);
                Ok(Some(KvCopy::Streamed(stream.clone())))
            }
            KvSource::CudaIpc { peer, remote_blocks, ready_mark } => {
                let ticket =
                    self.executor.kv_io().start_copy_from_peer(peer, &pairs(remote_blocks), *ready_mark).map_err(|e| e.to_string())?;
                Ok(Some(KvCopy::Device(ticket)))
            }
            KvSource::Remote { reader, remote_blocks, ready_mark } => Ok(Some(KvCopy::Remote(reader.start(pairs(remote_blocks), *ready_mark)))),
        }
    }

    /// Whether `copy` is over; an error ends it too. A remote copy's writes are made
    /// visible to the device's next work before it counts as over; a streamed one writes
    /// its next queued frame, if one came.
    fn copy_done(&mut self, copy: &KvCopy) -> Result<bool, String> {
        match copy {
            KvCopy::Streamed(stream) => self.write_next_frame(stream),
            KvCopy::Device(ticket) => self.executor.kv_io().copy_finished(*ticket).map_err(|e| e.to_string()),
            KvCopy::Remote(remote) => match remote.poll() {
                None => Ok(false),
                Some(Ok(())) => self.executor.kv_io().after_remote_writes().map(|()| true).map_err(|e| e.to_string()),
                Some(Err(e)) => Err(e),
            },
        }
    }

    /// Writes one queued frame of a streamed import, if there is one (one per step bounds
    /// the time other requests wait for it); true once every layer is written. Done or
    /// failed, the stream is closed: its transport can stop.
    fn write_next_frame(&mut self, stream: &StreamedKv) -> Result<bool, String> {
        let written = self.write_queued_frame(stream).and_then(|()| stream.all_written());
        if !matches!(written, Ok(false)) {
            stream.close();
        }
        written
    }

    fn write_queued_frame(&mut self, stream: &StreamedKv) -> Result<(), String> {
        let Some((KvFrame { layers, bytes }, to)) = stream.next_frame()? else { return Ok(()) };
        let written = match stream.writer() {
            Some(writer) => writer.write(bytes.bytes(), layers, &to.blocks, to.skip),
            None => {
                // K, then V, of one layer of one block.
                let row_bytes = self.info.kv_layout.bytes_per_block() / self.info.kv_layout.num_layers / 2;
                let rows = match to.skip {
                    0 => Cow::Borrowed(bytes.bytes()),
                    cached => Cow::Owned(skip_leading_rows(bytes.bytes(), to.blocks.len(), cached, row_bytes)),
                };
                self.executor.kv_io().write_kv_blocks(&to.blocks[to.skip..], layers, &rows).map_err(|e| e.to_string())
            }
        };
        written.inspect_err(|why| stream.fail(why.clone()))
    }

    /// Polls import `i`: None while its copy runs or its first token is awaited.
    fn import_outcome(&mut self, i: usize) -> Option<Outcome> {
        // No token is coming: fail now rather than after the copy (which may wait for a
        // prefill that is gone); its blocks wait for the copy in `finish_import`.
        if let Some(Err(why)) = &self.importing[i].first_token {
            return Some(Outcome::Fail(first_token_missing(why)));
        }
        if let Some(copy) = self.importing[i].copy.clone() {
            match self.copy_done(&copy) {
                Ok(false) => return None,
                Ok(true) => self.importing[i].copy = None,
                // Kept: `finish_import` frees the blocks once nothing writes them.
                Err(e) => return Some(Outcome::Fail(copy_failed(&e))),
            }
        }
        // An error was handled above: only a token can be here.
        let Some(Ok(token)) = self.importing[i].first_token.take() else { return None };
        Some(Outcome::Run(token))
    }

    fn finish_import(&mut self, import: Importing, outcome: Outcome, events: &mut Vec<StepEvent>) {
        let Importing { key, mut seq, started, via, copy, cached_blocks, .. } = import;
        let first = match outcome {
            Outcome::Run(token) => token,
            Outcome::Fail(message) => {
                self.release_import_blocks(copy, seq.block_table);
                return self.fail_import(key, via, message, events);
            }
        };
        let prompt_len = seq.len();
        let bytes = (seq.block_table.len() - cached_blocks) * self.info.kv_layout.bytes_per_block();
        let seconds = started.elapsed().as_secs_f64();
        // From admission to the first token: for an early descriptor this includes waiting
        // for prefill's forward, so gb_per_s is a bandwidth only for a late one.
        let (ms, gb_per_s) = (seconds * 1e3, bytes as f64 / seconds / 1e9);
        tracing::info!(tokens = prompt_len, cached_blocks, bytes, ms, gb_per_s, via, "imported KV");
        let counts = self.kv_imports.of_mut(via);
        (counts.done, counts.bytes, counts.seconds) = (counts.done + 1, counts.bytes + bytes as u64, counts.seconds + seconds);
        let seq_id = seq.id;
        seq.num_computed_tokens = prompt_len;
        self.scheduler.register_prompt_blocks(&mut seq);
        self.scheduler.add_running(seq);
        self.scheduler.append_token(seq_id, first.token_id);
        let token = SampledToken { token: first.token_id, logprob: first.logprob, top: first.top };
        self.emit_token(seq_id, 0, token, events);
    }

    fn fail_import(&mut self, key: RequestKey, via: &'static str, message: String, events: &mut Vec<StepEvent>) {
        self.kv_imports.of_mut(via).failed += 1;
        self.abort(key);
        events.push(StepEvent::Failed { key, message, was_queued: false });
    }

    /// Decode side: prefill's first token for an import started from an early descriptor
    /// (or why it will not come, which fails the request).
    pub fn provide_first_token(&mut self, key: RequestKey, token: FirstTokenResult) {
        if let Some(import) = self.importing.iter_mut().find(|i| i.key == key) {
            import.first_token = Some(token);
        } else if let Some(pending) = self.pending_imports.iter_mut().find(|p| p.key == key) {
            pending.first_token = Some(token);
        }
    }

    /// Drops an import wherever it is.
    pub(super) fn drop_import(&mut self, key: RequestKey) {
        if let Some(i) = self.pending_imports.iter().position(|p| p.key == key) {
            let pending = self.pending_imports.remove(i).expect("found");
            close_stream_of(&pending.source);
        }
        let Some(i) = self.importing.iter().position(|i| i.key == key) else { return };
        let import = self.importing.swap_remove(i);
        self.release_import_blocks(import.copy, import.seq.block_table);
    }

    /// Frees an ended import's blocks, or, while `copy` may still write into them, leaves
    /// them to [`Self::reap_orphaned_copies`]: given to another request now, they could
    /// be overwritten.
    fn release_import_blocks(&mut self, copy: Option<KvCopy>, blocks: Vec<BlockId>) {
        if let Some(KvCopy::Streamed(stream)) = &copy {
            stream.close(); // no write starts after this
        }
        match copy {
            Some(copy) if !self.copy_over(&copy) => self.orphaned_copies.push((copy, blocks)),
            _ => self.scheduler.release_detached(&blocks),
        }
    }

    /// Whether an ended import's copy can no longer write into its blocks (a failed one is
    /// over too).
    fn copy_over(&mut self, copy: &KvCopy) -> bool {
        match copy {
            KvCopy::Streamed(stream) => !stream.is_writing(),
            other => self.copy_done(other).unwrap_or(true),
        }
    }

    fn reap_orphaned_copies(&mut self) {
        let mut i = 0;
        while i < self.orphaned_copies.len() {
            let copy = self.orphaned_copies[i].0.clone();
            if self.copy_over(&copy) {
                let (_, blocks) = self.orphaned_copies.swap_remove(i);
                self.scheduler.release_detached(&blocks);
            } else {
                i += 1;
            }
        }
    }

    /// Prefill side: reserves the lease of every early-handoff request whose last prompt
    /// chunk this step computes, and announces it before the forward runs.
    pub(super) fn announce_early_handoffs(&mut self, out: &SchedulerOutput, announce: &mut dyn FnMut(StepEvent)) {
        let mut ready_mark = None;
        for s in out.scheduled.iter().filter(|s| s.sample) {
            let Some(&(key, _)) = self.owner.get(&s.seq_id) else { continue };
            let Some(req) = self.requests.get(&key) else { continue };
            if req.export != Export::Early || req.early_lease.is_some() {
                continue;
            }
            let seq = self.scheduler.seq(s.seq_id).expect("scheduled sequence");
            let num_tokens = seq.prompt_len;
            let blocks = seq.block_table[..num_tokens.div_ceil(self.info.kv_layout.block_size)].to_vec();
            let mark = *ready_mark.get_or_insert_with(|| {
                let mark = self.steps as u32;
                self.executor.kv_io().publish_progress(mark).then_some(mark)
            });
            // Readable before the token only where each layer's progress is published.
            let readable = mark.map(|m| LeaseExtent { blocks: blocks.clone(), ready_mark: Some(m) }).unwrap_or_default();
            let (lease_id, expires_at) = self.leases.reserve(Instant::now(), readable);
            self.requests.get_mut(&key).expect("active request").early_lease = Some(lease_id);
            announce(StepEvent::KvReady { key, kv: EarlyKv { lease_id, blocks, num_tokens, expires_at, ready_mark: mark } });
        }
    }

    /// Prefill side, at an exporting request's first token: hands `seq_id`'s blocks to a
    /// lease instead of freeing them. An early handoff (its reserved `early_lease`) always
    /// does, decode may be reading already, unless the lease was released meanwhile; a
    /// late one only if the request goes on.
    pub(super) fn hand_off(&mut self, seq_id: SeqId, early_lease: Option<u64>, token: &SampledToken, finished: bool) -> Option<KvHandoff> {
        if early_lease.is_none() && finished {
            return None;
        }
        let first_token = TokenLogprob { token_id: token.token, logprob: token.logprob, top: token.top.clone() };
        let num_tokens = self.scheduler.seq(seq_id)?.prompt_len;
        let blocks = self.scheduler.detach(seq_id)?;
        let now = Instant::now();
        let (lease_id, expires_at) = match early_lease {
            None => self.leases.pin(blocks.clone(), first_token, now),
            Some(id) => match self.leases.fill(id, blocks.clone(), first_token) {
                Ok(expires_at) => (id, expires_at),
                Err(blocks) => {
                    self.scheduler.release_detached(&blocks);
                    return None;
                }
            },
        };
        Some(KvHandoff { lease_id, blocks, num_tokens, expires_at })
    }

    /// Answers `reply` with a lease's first token, now or once sampled.
    pub fn await_first_token(&mut self, lease_id: u64, reply: FirstTokenReply) {
        self.leases.await_first_token(lease_id, reply);
    }

    /// Reads a lease's blocks of `layers` to the host (for the TCP transfer). Once every
    /// layer has been read, the bytes are out of the blocks and the lease ends here: a
    /// decode engine dying right after its first token could not release it.
    pub fn read_lease(&mut self, lease_id: u64, layers: std::ops::Range<usize>) -> Result<Vec<u8>, EngineError> {
        if layers.end > self.info.kv_layout.num_layers || layers.is_empty() {
            return Err(EngineError::Request(format!("layers {layers:?} out of range (the model has {})", self.info.kv_layout.num_layers)));
        }
        let blocks = self.leases.blocks(lease_id).ok_or_else(|| EngineError::Request(format!("unknown or expired KV lease {lease_id}")))?;
        if blocks.is_empty() {
            return Err(EngineError::Request(format!("KV lease {lease_id} is not ready: prefill has not sampled its first token yet")));
        }
        let blocks = blocks.to_vec();
        let bytes = self.executor.kv_io().read_kv_blocks(&blocks, layers.clone())?;
        self.lease_layers_read(lease_id, layers);
        Ok(bytes)
    }

    /// Records that `layers` of a lease were read to the host (by this thread or a
    /// [`HostKvReader`](crate::kv_transfer::HostKvReader)); the lease ends once every
    /// layer was.
    pub fn lease_layers_read(&mut self, lease_id: u64, layers: std::ops::Range<usize>) {
        if let Some(blocks) = self.leases.mark_read(lease_id, layers, self.info.kv_layout.num_layers) {
            self.scheduler.release_detached(&blocks);
        }
    }

    /// The leases that exist, for readers off this thread.
    pub fn lease_directory(&self) -> LeaseDirectory {
        self.leases.directory()
    }

    /// The backend's reader of KV blocks off this thread, if it has one.
    pub fn host_kv_reader(&mut self) -> Result<Option<Arc<dyn HostKvReader>>, EngineError> {
        Ok(self.executor.kv_io().host_reader()?)
    }

    /// The backend's writer of imported frames off the engine thread, if it has one.
    pub fn host_kv_writer(&mut self) -> Result<Option<Arc<dyn HostKvWriter>>, EngineError> {
        Ok(self.executor.kv_io().host_writer()?)
    }

    /// Ends a lease early (the decode engine pulled the KV, or the router gave up on the
    /// pair). False if it was unknown.
    pub fn free_lease(&mut self, lease_id: u64) -> bool {
        match self.leases.take(lease_id) {
            Some(blocks) => {
                self.scheduler.release_detached(&blocks);
                true
            }
            None => false,
        }
    }

    pub(super) fn expire_leases(&mut self) {
        let blocks = self.leases.take_expired(Instant::now());
        if !blocks.is_empty() {
            tracing::warn!(blocks = blocks.len(), "KV leases expired before a decode engine released them");
            self.scheduler.release_detached(&blocks);
        }
    }

    /// Where the KV cache lives (None on backends that cannot say).
    pub fn kv_memory(&mut self, dmabuf: bool) -> Result<Option<KvMemory>, EngineError> {
        Ok(self.executor.kv_io().kv_memory(dmabuf)?)
    }

    /// CUDA IPC handles of the KV cache (None on backends without them).
    pub fn export_kv_ipc(&mut self) -> Result<Option<CudaIpcKv>, EngineError> {
        Ok(self.executor.kv_io().export_kv_ipc()?)
    }
}

/// The transport an import's KV comes by, as its source names it.
fn transport_of(source: &KvSource) -> &'static str {
    match source {
        KvSource::Streamed(stream) => stream.transport(),
        KvSource::CudaIpc { .. } => "cuda-ipc",
        KvSource::Remote { reader, .. } => reader.transport(),
    }
}

/// Tells a queued streamed import's transport that nothing more will be written.
fn close_stream_of(source: &KvSource) {
    if let KvSource::Streamed(stream) = source {
        stream.close();
    }
}

/// A frame's bytes without the rows of its first `skip` blocks: per layer, the K rows of
/// `num_blocks` blocks, then their V rows, each `row_bytes` long.
fn skip_leading_rows(frame: &[u8], num_blocks: usize, skip: usize, row_bytes: usize) -> Vec<u8> {
    let part = num_blocks * row_bytes; // one layer's K (or V) rows
    let mut out = Vec::with_capacity(frame.len() / num_blocks * (num_blocks - skip));
    for rows in frame.chunks_exact(part) {
        out.extend_from_slice(&rows[skip * row_bytes..]);
    }
    out
}
