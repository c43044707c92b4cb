//! The engine as async callers see it: a cloneable handle, an engine thread that owns the
//! model and the scheduler, and one stream per request.
//!
//! The thread runs steps back to back while there is work and sleeps on its command
//! channel when there is none. Per-token events go to each request's unbounded channel;
//! the request's consumer turns them into text ([`OutputProcessor`]). Dropping a
//! [`RequestStream`] aborts its request, so a disconnected client frees its blocks at once.

use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc as tokio_mpsc, oneshot};

use crate::backend::Backend;
use crate::config::{EngineConfig, ModelInfo};
use crate::engine_core::{EngineCore, RequestKey, StepEvent};
use crate::error::{EngineError, SubmitError};
use crate::kv::LeaseDirectory;
use crate::kv_transfer::{pooled_frame, CudaIpcKv, EarlyKv, FirstTokenResult, HostFrame, HostKvReader, HostKvWriter, KvMemory, KvTransfer, LeaseExtent, StreamedKv};
use crate::output_processor::{OutputProcessor, TokenEvent};
use crate::request::{ChoiceDelta, GenerateRequest, Usage};
use crate::sampling_params::InvalidParam;
use crate::stats::EngineStats;
use crate::tokenizer::Tokenizer;

enum Command {
    Add { key: RequestKey, request: GenerateRequest, events: tokio_mpsc::UnboundedSender<RequestEvent> },
    Abort(RequestKey),
    StopChoice { key: RequestKey, choice: u32 },
    ReadLease { lease_id: u64, layers: Range<usize>, reply: oneshot::Sender<Result<Vec<u8>, EngineError>> },
    LeaseLayersRead { lease_id: u64, layers: Range<usize> },
    FreeLease { lease_id: u64, reply: oneshot::Sender<bool> },
    AwaitFirstToken { lease_id: u64, reply: oneshot::Sender<FirstTokenResult> },
    ProvideFirstToken { key: RequestKey, token: FirstTokenResult },
    KvMemory { dmabuf: bool, reply: oneshot::Sender<Result<Option<KvMemory>, EngineError>> },
    Shutdown,
}

/// What the engine thread tells one request.
#[derive(Debug)]
pub(crate) enum RequestEvent {
    /// First scheduled: how many prompt tokens came from the prefix cache.
    Started { cached_tokens: usize },
    /// An early handoff's lease and blocks, before the first token.
    KvReady(EarlyKv),
    Tokens(TokenEvent),
    Failed(String),
}

struct Shared {
    commands: Mutex<mpsc::Sender<Command>>,
    tokenizer: Arc<Tokenizer>,
    info: ModelInfo,
    config: EngineConfig,
    stats: Arc<Mutex<EngineStats>>,
    /// Requests submitted but not yet scheduled, for the waiting-queue bound.
    queued: Arc<AtomicUsize>,
    draining: AtomicBool,
    next_key: AtomicU64,
    /// CUDA IPC handles of the KV cache, for decode engines on this node.
    kv_ipc: Option<CudaIpcKv>,
    /// Leases and what of them may be read; the backend's reader off the engine thread.
    leases: LeaseDirectory,
    kv_reader: Option<Arc<dyn HostKvReader>>,
    /// The backend's writer of imported frames off the engine thread.
    kv_writer: Option<Arc<dyn HostKvWriter>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// How other processes and threads reach the KV cache.
struct KvSharing {
    ipc: Option<CudaIpcKv>,
    reader: Option<Arc<dyn HostKvReader>>,
    writer: Option<Arc<dyn HostKvWriter>>,
}

/// A cheap, cloneable handle to a running engine.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
}

impl Engine {
    /// Loads the model from `model_dir` onto `backend`, sizes the KV cache and starts the
    /// engine thread. Blocks while loading.
    pub fn start<B: Backend>(model_dir: &Path, config: EngineConfig, backend: B) -> Result<Engine, EngineError> {
        let tokenizer = Arc::new(Tokenizer::from_dir(model_dir)?);
        let mut core = EngineCore::load(model_dir, &config, backend)?;
        // Like other engines, the tokenizer's EOS always ends generation too.
        if let Some(id) = tokenizer.config.eos_token.as_deref().and_then(|t| tokenizer.token_to_id(t)) {
            core.add_eos_token(id);
        }
        let kv_ipc = core.export_kv_ipc().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "the KV cache cannot be shared over CUDA IPC");
            None
        });
        let kv_reader = core.host_kv_reader().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "KV blocks will be read to the host on the engine thread");
            None
        });
        let kv_writer = core.host_kv_writer().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "imported KV frames will be written on the engine thread");
            None
        });
        let info = core.info().clone();
        tracing::info!(
            model = %model_dir.display(),
            device = %info.device,
            kv_blocks = info.num_kv_blocks,
            max_concurrent_tokens = info.num_kv_blocks * info.kv_layout.block_size,
            max_model_len = info.max_model_len,
            "engine ready"
        );
        let kv = KvSharing { ipc: kv_ipc, reader: kv_reader, writer: kv_writer };
        Ok(Self::spawn(core, tokenizer, config, info, kv))
    }

    fn spawn(core: EngineCore, tokenizer: Arc<Tokenizer>, config: EngineConfig, info: ModelInfo, kv: KvSharing) -> Engine {
        let leases = core.lease_directory();
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(Mutex::new(core.stats()));
        let queued = Arc::new(AtomicUsize::new(0));
        let loop_stats = stats.clone();
        let loop_queued = queued.clone();
        let thread = std::thread::Builder::new()
            .name("dlengine-engine".into())
            .spawn(move || engine_loop(core, rx, loop_stats, loop_queued))
            .expect("spawning the engine thread");
        Engine {
            shared: Arc::new(Shared {
                commands: Mutex::new(tx),
                tokenizer,
                info,
                config,
                stats,
                queued,
                draining: AtomicBool::new(false),
                next_key: AtomicU64::new(1),
                kv_ipc: kv.ipc,
                leases,
                kv_reader: kv.reader,
                kv_writer: kv.writer,
                thread: Mutex::new(Some(thread)),
            }),
        }
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.shared.tokenizer
    }

    pub fn info(&self) -> &ModelInfo {
        &self.shared.info
    }

    pub fn config(&self) -> &EngineConfig {
        &self.shared.config
    }

    pub fn stats(&self) -> EngineStats {
        *self.shared.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// CUDA IPC handles of this engine's KV cache (GPU backends).
    pub fn kv_ipc(&self) -> Option<&CudaIpcKv> {
        self.shared.kv_ipc.as_ref()
    }

    /// Where a transport puts the frames of an import of `num_blocks` blocks: written off
    /// the engine thread where the backend has a writer.
    pub fn streamed_kv(&self, num_blocks: usize, transport: &'static str) -> Arc<StreamedKv> {
        Arc::new(StreamedKv::with_writer(num_blocks, transport, self.shared.kv_writer.clone()))
    }

    /// Reads a lease's KV blocks of `layers` to host memory: off the engine thread where
    /// the backend has a reader (an early lease's layers each once its forward has written
    /// it); else by the engine thread between steps, so after the step that completes an
    /// early lease. Once every layer of the lease has been read, the lease ends.
    pub async fn read_lease(&self, lease_id: u64, layers: Range<usize>) -> Result<HostFrame, EngineError> {
        let extent = self.shared.leases.get(lease_id).filter(LeaseExtent::is_readable);
        if let (Some(reader), Some(extent)) = (self.shared.kv_reader.clone(), extent) {
            return self.read_lease_off_thread(reader, lease_id, extent, layers).await;
        }
        let (reply, rx) = oneshot::channel();
        if !self.send(Command::ReadLease { lease_id, layers, reply }) {
            return Err(EngineError::Stopped);
        }
        rx.await.map_err(|_| EngineError::Stopped)?.map(pooled_frame)
    }

    async fn read_lease_off_thread(
        &self,
        reader: Arc<dyn HostKvReader>,
        lease_id: u64,
        extent: LeaseExtent,
        layers: Range<usize>,
    ) -> Result<HostFrame, EngineError> {
        let read_layers = layers.clone();
        let read = tokio::task::spawn_blocking(move || reader.read(&extent.blocks, read_layers, extent.ready_mark)).await;
        let frame = read.map_err(|e| EngineError::Request(format!("reading KV lease {lease_id}: {e}")))?.map_err(EngineError::Request)?;
        // Still listed: the blocks stayed the lease's for the whole read.
        if !self.shared.leases.contains(lease_id) {
            return Err(EngineError::Request(format!("KV lease {lease_id} ended while its blocks were being read")));
        }
        self.send(Command::LeaseLayersRead { lease_id, layers });
        Ok(frame)
    }

    /// Releases a lease's blocks. False if the lease was unknown (already freed or expired).
    pub async fn free_lease(&self, lease_id: u64) -> bool {
        let (reply, rx) = oneshot::channel();
        self.send(Command::FreeLease { lease_id, reply }) && rx.await.unwrap_or(false)
    }

    /// The first token of a lease (prefill side), once sampled; an error if the lease is
    /// unknown, expired or released first, or the engine stopped.
    pub async fn first_token_of_lease(&self, lease_id: u64) -> FirstTokenResult {
        let (reply, rx) = oneshot::channel();
        if !self.send(Command::AwaitFirstToken { lease_id, reply }) {
            return Err("the engine stopped".into());
        }
        rx.await.unwrap_or_else(|_| Err("the engine stopped".into()))
    }

    /// Where the KV cache lives (for registering it with a NIC); with `dmabuf`, GPU
    /// buffers come exported as dma-bufs where the device can. None on backends that
    /// cannot say.
    pub async fn kv_memory(&self, dmabuf: bool) -> Result<Option<KvMemory>, EngineError> {
        let (reply, rx) = oneshot::channel();
        if !self.send(Command::KvMemory { dmabuf, reply }) {
            return Err(EngineError::Stopped);
        }
        rx.await.map_err(|_| EngineError::Stopped)?
    }

    /// Checks a request against the engine's limits without submitting it.
    pub fn check(&self, request: &GenerateRequest) -> Result<(), SubmitError> {
        request.params.validate()?;
        if !matches!(request.kv_transfer, KvTransfer::Local) && request.params.n != 1 {
            return Err(SubmitError::InvalidParam(InvalidParam {
                param: "n",
                message: format!("must be 1 when the KV cache moves between engines, got {}", request.params.n),
            }));
        }
        if request.params.n > self.shared.config.max_num_seqs {
            return Err(SubmitError::InvalidParam(InvalidParam {
                param: "n",
                message: format!("must not exceed max-num-seqs ({}), got {}", self.shared.config.max_num_seqs, request.params.n),
            }));
        }
        let prompt_tokens = request.prompt_token_ids.len();
        if prompt_tokens == 0 {
            return Err(SubmitError::EmptyPrompt);
        }
        let vocab_size = self.shared.info.vocab_size;
        if let Some(&token_id) = request.prompt_token_ids.iter().find(|&&t| t as usize >= vocab_size) {
            return Err(SubmitError::TokenOutOfVocab { token_id, vocab_size });
        }
        let max_model_len = self.shared.info.max_model_len;
        if prompt_tokens + request.params.max_tokens > max_model_len {
            return Err(SubmitError::TooLong { prompt_tokens, max_tokens: request.params.max_tokens, max_model_len });
        }
        Ok(())
    }

    /// Queues a request; its output arrives on the returned stream.
    pub fn submit(&self, request: GenerateRequest) -> Result<RequestStream, SubmitError> {
        if self.shared.draining.load(Ordering::Acquire) {
            return Err(SubmitError::Draining);
        }
        self.check(&request)?;
        let limit = self.shared.config.max_waiting_requests;
        if self.shared.queued.fetch_add(1, Ordering::AcqRel) >= limit {
            self.shared.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(SubmitError::QueueFull { limit });
        }
        let key = self.shared.next_key.fetch_add(1, Ordering::Relaxed);
        let (events_tx, events_rx) = tokio_mpsc::unbounded_channel();
        let processor = OutputProcessor::new(self.shared.tokenizer.clone(), &request.prompt_token_ids, &request.params);
        let prompt_tokens = request.prompt_token_ids.len();
        let sent = self.send(Command::Add { key, request, events: events_tx });
        if !sent {
            self.shared.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(SubmitError::Draining);
        }
        Ok(RequestStream {
            key,
            engine: self.clone(),
            events: events_rx,
            processor,
            usage: Usage { prompt_tokens, ..Usage::default() },
            done: false,
        })
    }

    fn send(&self, command: Command) -> bool {
        let tx = self.shared.commands.lock().unwrap_or_else(|e| e.into_inner());
        tx.send(command).is_ok()
    }

    /// Refuses new requests from now on; running ones continue.
    pub fn begin_drain(&self) {
        self.shared.draining.store(true, Ordering::Release);
    }

    pub fn is_draining(&self) -> bool {
        self.shared.draining.load(Ordering::Acquire)
    }

    /// Aborts every request and stops the engine thread.
    pub fn shutdown(&self) {
        self.begin_drain();
        self.send(Command::Shutdown);
        let handle = self.shared.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }
}

fn engine_loop(
    mut core: EngineCore,
    rx: mpsc::Receiver<Command>,
    stats: Arc<Mutex<EngineStats>>,
    queued: Arc<AtomicUsize>,
) {
    let mut streams: std::collections::HashMap<RequestKey, tokio_mpsc::UnboundedSender<RequestEvent>> =
        Default::default();
    let mut running = true;
    while running {
        // Sleep on the channel unless a step is due; otherwise just drain what arrived.
        let first = if core.needs_step() { rx.try_recv().ok() } else { wait_for_command(&rx, wake_at(&core)) };
        for command in first.into_iter().chain(std::iter::from_fn(|| rx.try_recv().ok())) {
            match command {
                Command::Add { key, request, events } => {
                    streams.insert(key, events);
                    core.add_request(key, request);
                }
                Command::Abort(key) => {
                    if core.abort(key) {
                        queued.fetch_sub(1, Ordering::AcqRel);
                    }
                    streams.remove(&key);
                }
                Command::StopChoice { key, choice } => core.stop_choice(key, choice),
                // Replies that free blocks go after the stats show it, as events do.
                Command::ReadLease { lease_id, layers, reply } => {
                    let read = core.read_lease(lease_id, layers);
                    publish_stats(&mut core, &stats);
                    let _ = reply.send(read);
                }
                Command::LeaseLayersRead { lease_id, layers } => core.lease_layers_read(lease_id, layers),
                Command::FreeLease { lease_id, reply } => {
                    let freed = core.free_lease(lease_id);
                    publish_stats(&mut core, &stats);
                    let _ = reply.send(freed);
                }
                Command::AwaitFirstToken { lease_id, reply } => core.await_first_token(lease_id, reply),
                Command::ProvideFirstToken { key, token } => core.provide_first_token(key, token),
                Command::KvMemory { dmabuf, reply } => {
                    let _ = reply.send(core.kv_memory(dmabuf));
                }
                Command::Shutdown => running = false,
            }
        }
        if !running {
            break;
        }
        let due = core.has_work() || core.next_deadline().is_some_and(|d| d <= Instant::now());
        let events = if due { core.step_announcing(&mut |event| deliver(vec![event], &mut streams, &queued)) } else { Vec::new() };
        // Stats first: whoever sees an event, then reads the stats, sees this step's.
        publish_stats(&mut core, &stats);
        deliver(events, &mut streams, &queued);
    }
    for (key, tx) in streams.drain() {
        core.abort(key);
        let _ = tx.send(RequestEvent::Failed("the engine shut down".into()));
    }
}

fn publish_stats(core: &mut EngineCore, stats: &Mutex<EngineStats>) {
    let mut snapshot = core.stats();
    if let Some(device) = core.device_time() {
        snapshot.device_busy_ms = device.busy_ms;
        snapshot.device_idle_between_steps_ms = device.idle_between_steps_ms;
    }
    *stats.lock().unwrap_or_else(|e| e.into_inner()) = snapshot;
}

/// How often an engine with nothing to do but copies in flight polls them: their ends
/// arrive as no command, and stepping back to back only to poll them would keep a core
/// busy for as long as a transfer lasts.
const COPY_POLL: Duration = Duration::from_micros(50);

/// When an engine thread with no step due must wake up on its own: the next lease
/// expiry, or the next poll of copies in flight.
fn wake_at(core: &EngineCore) -> Option<Instant> {
    let poll = core.copies_in_flight().then(|| Instant::now() + COPY_POLL);
    [core.next_deadline(), poll].into_iter().flatten().min()
}

/// Sleeps until a command arrives or `deadline` passes (None: a timeout, not a command).
/// A closed channel means every handle is gone: shut down.
fn wait_for_command(rx: &mpsc::Receiver<Command>, deadline: Option<Instant>) -> Option<Command> {
    match deadline {
        None => Some(rx.recv().unwrap_or(Command::Shutdown)),
        Some(at) => match rx.recv_timeout(at.saturating_duration_since(Instant::now())) {
            Ok(command) => Some(command),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => Some(Command::Shutdown),
        },
    }
}

fn deliver(
    events: Vec<StepEvent>,
    streams: &mut std::collections::HashMap<RequestKey, tokio_mpsc::UnboundedSender<RequestEvent>>,
    queued: &AtomicUsize,
) {
    for event in events {
        let (key, message, last) = match event {
            StepEvent::Started { key, cached_tokens } => {
                queued.fetch_sub(1, Ordering::AcqRel);
                (key, RequestEvent::Started { cached_tokens }, false)
            }
            StepEvent::KvReady { key, kv } => (key, RequestEvent::KvReady(kv), false),
            StepEvent::Token { key, event, request_finished } => (key, RequestEvent::Tokens(event), request_finished),
            StepEvent::Failed { key, message, was_queued } => {
                if was_queued {
                    queued.fetch_sub(1, Ordering::AcqRel);
                }
                (key, RequestEvent::Failed(message), true)
            }
        };
        if let Some(tx) = streams.get(&key) {
            let _ = tx.send(message);
        }
        if last {
            streams.remove(&key);
        }
    }
}

/// The output of one request. Dropping it aborts the request.
pub struct RequestStream {
    key: RequestKey,
    engine: Engine,
    events: tokio_mpsc::UnboundedReceiver<RequestEvent>,
    processor: OutputProcessor,
    usage: Usage,
    done: bool,
}

impl RequestStream {
    /// The next delta of any choice; None once every choice finished.
    pub async fn next(&mut self) -> Option<Result<ChoiceDelta, EngineError>> {
        while !self.done {
            let Some(event) = self.events.recv().await else {
                self.done = true;
                return Some(Err(EngineError::Stopped));
            };
            if let Some(out) = self.handle(event) {
                return Some(out);
            }
        }
        None
    }

    /// Blocking variant of [`next`](Self::next) for callers without an async runtime.
    pub fn next_blocking(&mut self) -> Option<Result<ChoiceDelta, EngineError>> {
        while !self.done {
            let Some(event) = self.events.blocking_recv() else {
                self.done = true;
                return Some(Err(EngineError::Stopped));
            };
            if let Some(out) = self.handle(event) {
                return Some(out);
            }
        }
        None
    }

    fn handle(&mut self, event: RequestEvent) -> Option<Result<ChoiceDelta, EngineError>> {
        match event {
            RequestEvent::Started { cached_tokens } => {
                self.usage.cached_tokens = cached_tokens;
                None
            }
            RequestEvent::KvReady(kv) => Some(Ok(ChoiceDelta::kv_ready(kv))),
            RequestEvent::Failed(message) => {
                self.done = true;
                Some(Err(EngineError::Request(message)))
            }
            RequestEvent::Tokens(ev) => {
                let choice = ev.choice;
                let processed = self.processor.process(ev)?;
                self.usage.completion_tokens += processed.delta.token_ids.len();
                if processed.stop_engine {
                    self.engine.send(Command::StopChoice { key: self.key, choice });
                }
                self.done = self.processor.all_finished();
                Some(Ok(processed.delta))
            }
        }
    }

    /// Where prefill's first token goes for a request submitted from an early descriptor.
    pub fn first_token_sink(&self) -> FirstTokenSink {
        FirstTokenSink { engine: self.engine.clone(), key: self.key }
    }

    /// Token counts so far (final once the stream has ended).
    pub fn usage(&self) -> Usage {
        self.usage
    }

    pub fn is_finished(&self) -> bool {
        self.done
    }
}

/// Hands a decode request prefill's first token (or why it will not come, which fails
/// the request); a request that has ended meanwhile ignores it.
pub struct FirstTokenSink {
    engine: Engine,
    key: RequestKey,
}

impl FirstTokenSink {
    pub fn provide(&self, token: FirstTokenResult) {
        self.engine.send(Command::ProvideFirstToken { key: self.key, token });
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        if !self.done {
            self.engine.send(Command::Abort(self.key));
        }
    }
}
