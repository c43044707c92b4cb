//! The synchronous engine: requests in, one step at a time, per-token events out. The
//! engine thread ([`crate::engine`]) drives it; tests drive it directly.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::backend::{Backend, DeviceTimeReport, KvCacheLayout, StepInput, StepLimits};
use crate::config::{EngineConfig, GenerationDefaults, ModelConfig, ModelInfo};
use crate::error::EngineError;
use crate::executor::{Executor, MemoryPlan, ModelExecutor};
use crate::kv::LeaseTable;
use crate::kv_transfer::{CudaIpcKv, ImportedKv, KvHandoff, KvSource, KvTransfer};
use crate::output_processor::TokenEvent;
use crate::request::{FinishReason, GenerateRequest, StopReason, TokenLogprob};
use crate::sampler::{child_seed, splitmix64, SampledToken, SamplingRow};
use crate::sampling_params::SamplingParams;
use crate::scheduler::{Scheduler, SchedulerConfig, SchedulerOutput};
use crate::sequence::{SeqId, Sequence};
use crate::stats::EngineStats;
use crate::step_input_builder::build_step_input;
use crate::weights::Weights;

pub type RequestKey = u64;

#[derive(Debug)]
pub enum StepEvent {
    Started { key: RequestKey, cached_tokens: usize },
    Token { key: RequestKey, event: TokenEvent, request_finished: bool },
    Failed { key: RequestKey, message: String, was_queued: bool },
}

struct ActiveRequest {
    params: SamplingParams,
    seed: u64,
    /// The sequence of each choice; None once it finished. Before the first token only
    /// choice 0 exists: the others are forked from it when it samples.
    choices: Vec<Option<SeqId>>,
    forked: bool,
    started: bool,
    /// EOS (unless ignored) and stop tokens: masked until `min_tokens`.
    stop_ids: Vec<u32>,
    /// Prefill only: hand the KV off after the first token.
    export_kv: bool,
}

impl ActiveRequest {
    fn awaiting_fork(&self) -> bool {
        !self.forked && self.params.n > 1
    }
    fn is_done(&self) -> bool {
        !self.awaiting_fork() && self.choices.iter().all(Option::is_none)
    }
}

pub struct EngineCore {
    executor: Box<dyn Executor>,
    scheduler: Scheduler,
    info: ModelInfo,
    requests: HashMap<RequestKey, ActiveRequest>,
    owner: HashMap<SeqId, (RequestKey, u32)>,
    next_seq: SeqId,
    next_arrival: u64,
    base_seed: u64,
    steps: u64,
    /// Handed-off prefill KV waiting for decode engines to pull it.
    leases: LeaseTable,
    /// Decode requests whose KV arrived, waiting for blocks and a running slot (FCFS).
    pending_imports: VecDeque<PendingImport>,
}

struct PendingImport {
    key: RequestKey,
    seq: Sequence,
    kv: ImportedKv,
}

fn config_error(message: String) -> EngineError {
    EngineError::Config(message)
}

impl EngineCore {
    /// Loads a model directory onto `backend` and sizes the KV cache.
    pub fn load<B: Backend>(dir: &Path, config: &EngineConfig, mut backend: B) -> Result<Self, EngineError> {
        config.validate().map_err(config_error)?;
        let model_config = ModelConfig::from_dir(dir)?;
        let generation_defaults = GenerationDefaults::from_dir(dir)?;
        let model = {
            let weights = Weights::open(dir)?;
            crate::models::load(&model_config, &weights, &mut backend)?
        };
        let max_model_len = resolve_max_model_len(config, &model_config)?;
        let layout = KvCacheLayout {
            num_layers: model_config.num_hidden_layers,
            kv_heads: model_config.num_key_value_heads,
            head_dim: model_config.head_dim,
            block_size: config.block_size,
            dtype: backend.kv_dtype(),
        };
        let device = backend.describe();
        let mut executor = ModelExecutor::new(backend, model);
        let max_blocks_per_seq = max_model_len.div_ceil(config.block_size);
        let limits = StepLimits {
            max_tokens: config.max_num_batched_tokens,
            max_seqs: config.max_num_seqs,
            max_blocks_per_seq,
            max_sampling_rows: config.max_num_seqs,
        };
        let plan = MemoryPlan { layout, fixed_blocks: config.num_kv_blocks, limits, max_model_len };
        let num_blocks = executor.allocate_kv_cache(plan)?;
        if num_blocks * config.block_size < max_model_len {
            return Err(config_error(format!(
                "the KV cache holds {} tokens ({num_blocks} blocks of {}), fewer than max_model_len {max_model_len}; \
                 lower --max-model-len or give the KV cache more memory",
                num_blocks * config.block_size,
                config.block_size
            )));
        }
        executor.capture_graphs()?;
        let mut eos_token_ids = generation_defaults.eos_token_ids.clone();
        for id in &model_config.eos_token_ids {
            if !eos_token_ids.contains(id) {
                eos_token_ids.push(*id);
            }
        }
        let info = ModelInfo {
            architecture: model_config.architecture,
            vocab_size: model_config.vocab_size,
            max_model_len,
            eos_token_ids,
            kv_layout: layout,
            num_kv_blocks: num_blocks,
            device,
            generation_defaults,
        };
        Ok(Self::new(Box::new(executor), info, config))
    }

    pub fn new(executor: Box<dyn Executor>, info: ModelInfo, config: &EngineConfig) -> Self {
        let scheduler = Scheduler::new(SchedulerConfig {
            max_num_seqs: config.max_num_seqs,
            max_num_batched_tokens: config.max_num_batched_tokens,
            block_size: info.kv_layout.block_size,
            num_blocks: info.num_kv_blocks,
            enable_prefix_caching: config.enable_prefix_caching,
        });
        Self {
            executor,
            scheduler,
            info,
            requests: HashMap::new(),
            owner: HashMap::new(),
            next_seq: 1,
            next_arrival: 0,
            base_seed: config.seed,
            steps: 0,
            leases: LeaseTable::new(Duration::from_secs(config.kv_lease_secs), splitmix64(config.seed ^ lease_salt())),
            pending_imports: VecDeque::new(),
        }
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Adds tokens to the engine's eos set (the tokenizer's EOS when the configs lack one).
    pub fn add_eos_token(&mut self, id: u32) {
        if !self.info.eos_token_ids.contains(&id) {
            self.info.eos_token_ids.push(id);
        }
    }

    /// Device busy/idle time so far (GPU backends).
    pub fn device_time(&mut self) -> Option<DeviceTimeReport> {
        self.executor.device_time()
    }

    pub fn has_work(&self) -> bool {
        self.scheduler.has_work() || self.pending_imports.front().is_some_and(|p| self.can_admit(p))
    }

    /// When an idle engine must wake up on its own: the next lease expiry.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.leases.next_expiry()
    }

    pub fn stats(&self) -> EngineStats {
        let bm = self.scheduler.block_manager();
        let s = self.scheduler.stats();
        EngineStats {
            running_seqs: self.scheduler.num_running(),
            waiting_requests: self.scheduler.num_waiting(),
            kv_blocks_total: bm.num_blocks(),
            kv_blocks_used: bm.num_used(),
            prefix_cache_queried_tokens: s.prefix_queried_tokens,
            prefix_cache_hit_tokens: s.prefix_hit_tokens,
            preemptions: s.preemptions,
            steps: self.steps,
            kv_leases: self.leases.len(),
            kv_blocks_leased: self.leases.num_blocks(),
            pending_kv_imports: self.pending_imports.len(),
            ..EngineStats::default()
        }
    }

    /// Queues a validated request.
    pub fn add_request(&mut self, key: RequestKey, request: GenerateRequest) {
        let params = request.params;
        let seed = params.seed.unwrap_or_else(|| splitmix64(self.base_seed ^ splitmix64(key)));
        let mut stop_ids = params.stop_token_ids.clone();
        if !params.ignore_eos {
            stop_ids.extend(&self.info.eos_token_ids);
        }
        let seq_id = self.new_seq_id();
        let mut choices = vec![None; params.n];
        choices[0] = Some(seq_id);
        let mut seq = Sequence::new(seq_id, request.prompt_token_ids, self.next_arrival);
        seq.fan_out = params.n;
        let export_kv = matches!(request.kv_transfer, KvTransfer::Export);
        match request.kv_transfer {
            KvTransfer::Import(kv) => self.pending_imports.push_back(PendingImport { key, seq, kv }),
            KvTransfer::Local | KvTransfer::Export => self.scheduler.add(seq),
        }
        self.next_arrival += 1;
        self.owner.insert(seq_id, (key, 0));
        self.requests.insert(key, ActiveRequest { params, seed, choices, forked: false, started: false, stop_ids, export_kv });
    }

    fn can_admit(&self, import: &PendingImport) -> bool {
        let blocks = import.seq.len().div_ceil(self.info.kv_layout.block_size);
        self.scheduler.can_admit_running(blocks)
    }

    /// Starts the imported requests that fit, in arrival order: blocks are allocated, the
    /// KV is written into them, and the first token (prefill's) is emitted.
    fn admit_imports(&mut self, events: &mut Vec<StepEvent>) -> bool {
        let mut admitted = false;
        while self.pending_imports.front().is_some_and(|p| self.can_admit(p)) {
            let import = self.pending_imports.pop_front().expect("checked front");
            let key = import.key;
            match self.import_kv(import, events) {
                Ok(()) => {}
                Err(message) => {
                    self.abort(key);
                    events.push(StepEvent::Failed { key, message, was_queued: true });
                }
            }
            if let Some(req) = self.requests.get_mut(&key) {
                req.started = true;
            }
            admitted = true;
        }
        admitted
    }

    fn import_kv(&mut self, import: PendingImport, events: &mut Vec<StepEvent>) -> Result<(), String> {
        let PendingImport { key, mut seq, kv } = import;
        let prompt_len = seq.len();
        let blocks = self.scheduler.allocate_detached(prompt_len.div_ceil(self.info.kv_layout.block_size)).ok_or("no free KV blocks")?;
        let started = Instant::now();
        let written = match &kv.source {
            KvSource::Host(payload) if payload.num_blocks != blocks.len() => {
                Err(format!("the KV payload holds {} blocks, the prompt needs {}", payload.num_blocks, blocks.len()))
            }
            KvSource::Host(payload) => {
                self.executor.kv_io().write_kv_blocks(&blocks, 0..self.info.kv_layout.num_layers, &payload.bytes).map_err(|e| e.to_string())
            }
            KvSource::CudaIpc { remote_blocks, .. } if remote_blocks.len() != blocks.len() => {
                Err(format!("the peer lease holds {} blocks, the prompt needs {}", remote_blocks.len(), blocks.len()))
            }
            KvSource::CudaIpc { peer, remote_blocks } => {
                let pairs: Vec<(u32, u32)> = remote_blocks.iter().copied().zip(blocks.iter().copied()).collect();
                self.executor.kv_io().copy_kv_from_peer(peer, &pairs).map_err(|e| e.to_string())
            }
        };
        if let Err(e) = written {
            self.scheduler.release_detached(&blocks);
            return Err(format!("importing the prompt's KV cache failed: {e}"));
        }
        let bytes = blocks.len() * self.info.kv_layout.bytes_per_block();
        let seconds = started.elapsed().as_secs_f64();
        let via = if matches!(kv.source, KvSource::Host(_)) { "host" } else { "cuda-ipc" };
        tracing::info!(tokens = prompt_len, bytes, ms = seconds * 1e3, gb_per_s = bytes as f64 / seconds / 1e9, via, "imported KV");
        let seq_id = seq.id;
        seq.block_table = blocks;
        seq.num_computed_tokens = prompt_len;
        self.scheduler.add_running(seq);
        self.scheduler.append_token(seq_id, kv.first_token.token_id);
        events.push(StepEvent::Started { key, cached_tokens: 0 });
        let first = SampledToken { token: kv.first_token.token_id, logprob: kv.first_token.logprob, top: kv.first_token.top };
        self.emit_token(seq_id, 0, first, events);
        Ok(())
    }

    /// Prefill side: hands `seq`'s blocks to a lease instead of freeing them.
    fn hand_off(&mut self, seq_id: SeqId) -> Option<KvHandoff> {
        let num_tokens = self.scheduler.seq(seq_id)?.prompt_len;
        let blocks = self.scheduler.detach(seq_id)?;
        let (lease_id, expires_at) = self.leases.pin(blocks.clone(), Instant::now());
        Some(KvHandoff { lease_id, blocks, num_tokens, expires_at })
    }

    /// Reads a lease's blocks of `layers` to the host (for the TCP transfer).
    pub fn read_lease(&mut self, lease_id: u64, layers: Range<usize>) -> Result<Vec<u8>, EngineError> {
        if layers.end > self.info.kv_layout.num_layers || layers.is_empty() {
            return Err(EngineError::Request(format!("layers {layers:?} out of range (the model has {})", self.info.kv_layout.num_layers)));
        }
        let blocks = self.leases.blocks(lease_id).ok_or_else(|| EngineError::Request(format!("unknown or expired KV lease {lease_id}")))?.to_vec();
        Ok(self.executor.kv_io().read_kv_blocks(&blocks, layers)?)
    }

    /// Ends a lease early (the decode engine pulled the KV). False if it was unknown.
    pub fn free_lease(&mut self, lease_id: u64) -> bool {
        match self.leases.take(lease_id) {
            Some(blocks) => {
                self.scheduler.release_detached(&blocks);
                true
            }
            None => false,
        }
    }

    fn expire_leases(&mut self) {
        let blocks = self.leases.take_expired(Instant::now());
        if !blocks.is_empty() {
            tracing::warn!(blocks = blocks.len(), "KV leases expired before a decode engine released them");
            self.scheduler.release_detached(&blocks);
        }
    }

    /// CUDA IPC handles of the KV cache (None on backends without them).
    pub fn export_kv_ipc(&mut self) -> Result<Option<CudaIpcKv>, EngineError> {
        Ok(self.executor.kv_io().export_kv_ipc()?)
    }

    fn new_seq_id(&mut self) -> SeqId {
        let id = self.next_seq;
        self.next_seq += 1;
        id
    }

    /// Drops a request and frees its blocks. True if it had never started.
    pub fn abort(&mut self, key: RequestKey) -> bool {
        let Some(req) = self.requests.remove(&key) else { return false };
        self.pending_imports.retain(|p| p.key != key);
        for seq in req.choices.iter().flatten() {
            self.scheduler.remove(*seq);
            self.owner.remove(seq);
        }
        !req.started
    }

    /// Ends one choice early (a stop string matched on the caller's side).
    pub fn stop_choice(&mut self, key: RequestKey, choice: u32) {
        let Some(req) = self.requests.get_mut(&key) else { return };
        if let Some(seq) = req.choices.get_mut(choice as usize).and_then(Option::take) {
            self.scheduler.remove(seq);
            self.owner.remove(&seq);
        }
        if req.is_done() {
            self.requests.remove(&key);
        }
    }

    /// Runs one step.
    pub fn step(&mut self) -> Vec<StepEvent> {
        self.expire_leases();
        let mut events = Vec::new();
        // An imported request's first token is prefill's and is ready now: hand it out
        // before running a forward, which would add a whole step to the time to first token.
        if self.admit_imports(&mut events) {
            return events;
        }
        let out = self.scheduler.schedule();
        for &(seq, cached_tokens) in &out.started {
            let Some(&(key, _)) = self.owner.get(&seq) else { continue };
            if let Some(req) = self.requests.get_mut(&key) {
                if !req.started {
                    req.started = true;
                    events.push(StepEvent::Started { key, cached_tokens });
                }
            }
        }
        if out.is_empty() {
            return events;
        }
        self.steps += 1;
        let input = build_step_input(&self.scheduler, &out);
        let (targets, result) = self.run(&input, &out);
        match result {
            Ok(sampled) => {
                self.scheduler.commit(&out);
                self.apply_samples(targets, sampled, &mut events);
            }
            Err(e) => self.fail_scheduled(&out, &e.to_string(), &mut events),
        }
        events
    }

    /// Executes the step; returns which (sequence, choice) each sampled token is for.
    fn run(&mut self, input: &StepInput, out: &SchedulerOutput) -> (Vec<(SeqId, u32)>, Result<Vec<SampledToken>, EngineError>) {
        let mut targets = Vec::new();
        let mut rows = Vec::new();
        for (logit_row, s) in out.scheduled.iter().filter(|s| s.sample).enumerate() {
            let (key, own_choice) = self.owner[&s.seq_id];
            let req = &self.requests[&key];
            let seq = self.scheduler.seq(s.seq_id).expect("scheduled sequence");
            // The first sample of an n > 1 request draws every choice from the same logits.
            let choices: Vec<u32> = if req.awaiting_fork() { (0..req.params.n as u32).collect() } else { vec![own_choice] };
            for choice in choices {
                rows.push(sampling_row(req, seq, choice, logit_row));
                targets.push((s.seq_id, choice));
            }
        }
        let result = self.executor.execute(input, &out.blocks_to_copy, &rows);
        (targets, result)
    }

    fn apply_samples(&mut self, targets: Vec<(SeqId, u32)>, sampled: Vec<SampledToken>, events: &mut Vec<StepEvent>) {
        // Forks first: children copy the parent before it gets its own new token.
        let mut seqs = Vec::with_capacity(targets.len());
        for &(seq, choice) in &targets {
            let (key, own_choice) = self.owner[&seq];
            if choice == own_choice {
                seqs.push(seq);
                continue;
            }
            let child = self.new_seq_id();
            self.scheduler.fork(seq, child);
            self.owner.insert(child, (key, choice));
            let req = self.requests.get_mut(&key).expect("active request");
            req.choices[choice as usize] = Some(child);
            req.forked = true;
            seqs.push(child);
        }
        for ((seq, (_, choice)), token) in seqs.into_iter().zip(targets).zip(sampled) {
            self.scheduler.append_token(seq, token.token);
            self.emit_token(seq, choice, token, events);
        }
    }

    fn emit_token(&mut self, seq_id: SeqId, choice: u32, token: SampledToken, events: &mut Vec<StepEvent>) {
        let (key, _) = self.owner[&seq_id];
        let seq = self.scheduler.seq(seq_id).expect("sampled sequence");
        let req = &self.requests[&key];
        let mut finish = finish_reason(req, seq.output().len(), seq.len(), self.info.max_model_len, token.token);
        let logprobs = match req.params.logprobs {
            Some(_) => vec![TokenLogprob { token_id: token.token, logprob: token.logprob, top: token.top }],
            None => Vec::new(),
        };
        // A prefill's request that goes on elsewhere ends here, its KV kept under a lease.
        let handoff = if finish.is_none() && req.export_kv { self.hand_off(seq_id) } else { None };
        if handoff.is_some() {
            finish = Some((FinishReason::Length, None));
        } else if finish.is_some() {
            self.scheduler.remove(seq_id);
        }
        if finish.is_some() {
            self.owner.remove(&seq_id);
            let req = self.requests.get_mut(&key).expect("active request");
            req.choices[choice as usize] = None;
        }
        let request_finished = self.requests[&key].is_done();
        if request_finished {
            self.requests.remove(&key);
        }
        let event = TokenEvent { choice, tokens: vec![token.token], logprobs, finish, handoff };
        events.push(StepEvent::Token { key, event, request_finished });
    }

    fn fail_scheduled(&mut self, out: &SchedulerOutput, message: &str, events: &mut Vec<StepEvent>) {
        tracing::error!(error = message, "step failed; failing its requests");
        let mut keys: Vec<RequestKey> = out.scheduled.iter().filter_map(|s| self.owner.get(&s.seq_id).map(|o| o.0)).collect();
        keys.sort_unstable();
        keys.dedup();
        for key in keys {
            let was_queued = self.abort(key);
            events.push(StepEvent::Failed { key, message: format!("the engine failed to run the request: {message}"), was_queued });
        }
    }

    /// Teacher-forced logits of every position of `tokens`, computed `chunk` tokens per
    /// step through the paged cache (so chunked prefill is what is being measured).
    /// Needs enough free blocks; running requests are not disturbed.
    pub fn score(&mut self, tokens: &[u32], chunk: usize) -> Result<Vec<f32>, EngineError> {
        let bs = self.info.kv_layout.block_size;
        let blocks = self
            .scheduler
            .allocate_detached(tokens.len().div_ceil(bs))
            .ok_or_else(|| EngineError::Request("not enough free KV blocks to score the prompt".into()))?;
        let mut logits = Vec::with_capacity(tokens.len() * self.info.vocab_size);
        let mut result = Ok(());
        for start in (0..tokens.len()).step_by(chunk.max(1)) {
            let end = (start + chunk.max(1)).min(tokens.len());
            let input = detached_input(tokens, start, end, &blocks, bs);
            match self.executor.logits(&input) {
                Ok(l) => logits.extend(l),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        self.scheduler.release_detached(&blocks);
        result.map(|()| logits)
    }
}

fn resolve_max_model_len(config: &EngineConfig, model: &ModelConfig) -> Result<usize, EngineError> {
    match config.max_model_len {
        None => Ok(model.max_position_embeddings),
        Some(n) if n == 0 => Err(config_error("max-model-len must be at least 1".into())),
        Some(n) if n > model.max_position_embeddings => Err(config_error(format!(
            "max-model-len {n} exceeds the model's max_position_embeddings {}",
            model.max_position_embeddings
        ))),
        Some(n) => Ok(n),
    }
}

fn sampling_row<'a>(req: &'a ActiveRequest, seq: &'a Sequence, choice: u32, logit_row: usize) -> SamplingRow<'a> {
    let p = &req.params;
    let generated = seq.output().len();
    SamplingRow {
        logit_row,
        temperature: p.temperature,
        top_k: p.top_k,
        top_p: p.top_p,
        min_p: p.min_p,
        seed: child_seed(req.seed, choice),
        step: generated as u64,
        presence_penalty: p.presence_penalty,
        frequency_penalty: p.frequency_penalty,
        repetition_penalty: p.repetition_penalty,
        prompt_tokens: seq.prompt(),
        output_tokens: seq.output(),
        banned_tokens: if generated < p.min_tokens { &req.stop_ids } else { &[] },
        num_logprobs: p.logprobs,
    }
}

fn finish_reason(
    req: &ActiveRequest,
    generated: usize,
    total_len: usize,
    max_model_len: usize,
    token: u32,
) -> Option<(FinishReason, Option<StopReason>)> {
    // Stop ids are masked before min_tokens, so any stop id seen here is a real stop.
    let p = &req.params;
    if p.stop_token_ids.contains(&token) {
        return Some((FinishReason::Stop, Some(StopReason::Token(token))));
    }
    if req.stop_ids.contains(&token) {
        return Some((FinishReason::Stop, None));
    }
    if generated >= p.max_tokens || total_len >= max_model_len {
        return Some((FinishReason::Length, None));
    }
    None
}

/// A single-sequence step over detached blocks, every row a logit row.
fn detached_input(tokens: &[u32], start: usize, end: usize, blocks: &[u32], bs: usize) -> StepInput {
    StepInput {
        token_ids: tokens[start..end].to_vec(),
        positions: (start as u32..end as u32).collect(),
        slot_mapping: (start..end).map(|p| blocks[p / bs] * bs as u32 + (p % bs) as u32).collect(),
        query_start: vec![0, (end - start) as u32],
        context_lens: vec![end as u32],
        block_tables: blocks.to_vec(),
        block_table_stride: blocks.len(),
        block_size: bs,
        logit_rows: (0..(end - start) as u32).collect(),
    }
}

/// Differs between processes so lease ids of a restarted engine do not repeat.
fn lease_salt() -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 32)
}
