//! The synchronous engine: requests in, one step at a time, per-token events out. The
//! engine thread ([`crate::engine`]) drives it; tests drive it directly.

mod kv_handoff;

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::backend::{Backend, DeviceTimeReport, KvCacheLayout, StepInput, StepLimits};
use crate::config::{EngineConfig, GenerationDefaults, ModelConfig, ModelInfo};
use crate::error::EngineError;
use crate::executor::{Executor, MemoryPlan, ModelExecutor};
use crate::kv::BlockId;
use crate::kv::LeaseTable;
use crate::kv_transfer::{EarlyKv, KvTransfer};
use crate::output_processor::TokenEvent;
use crate::request::{FinishReason, GenerateRequest, StopReason, TokenLogprob};
use crate::sampler::{child_seed, splitmix64, SampledToken, SamplingRow};
use crate::sampling_params::SamplingParams;
use crate::scheduler::{Scheduler, SchedulerConfig, SchedulerOutput};
use crate::sequence::{SeqId, Sequence};
use crate::stats::{EngineStats, KvImportsByTransport};
use crate::step_input_builder::build_step_input;
use crate::weights::Weights;
use kv_handoff::{Importing, PendingImport};

pub type RequestKey = u64;

#[derive(Debug)]
pub enum StepEvent {
    Started { key: RequestKey, cached_tokens: usize },
    /// An early handoff's lease and blocks, announced before the forward that completes
    /// the prompt's KV (delivered ahead of the step's other events).
    KvReady { key: RequestKey, kv: EarlyKv },
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
    export: Export,
    /// The lease an early handoff reserved when its last prompt chunk was scheduled.
    early_lease: Option<u64>,
}

/// Whether and how a request hands its KV off ([`KvTransfer`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Export {
    No,
    Late,
    Early,
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
    /// Decode requests waiting for blocks and a running slot (FCFS).
    pending_imports: VecDeque<PendingImport>,
    /// Decode requests whose copy started, waiting for it and for the first token.
    importing: Vec<Importing>,
    /// Blocks of dropped imports whose copy may still write into them.
    orphaned_copies: Vec<(kv_handoff::KvCopy, Vec<BlockId>)>,
    /// Imports ended since start, by transport.
    kv_imports: KvImportsByTransport,
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
            importing: Vec::new(),
            orphaned_copies: Vec::new(),
            kv_imports: KvImportsByTransport::default(),
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

    /// Whether anything is unfinished that steps will advance.
    pub fn has_work(&self) -> bool {
        self.needs_step() || self.copies_in_flight()
    }

    /// Whether a step now would do more than poll copies in flight.
    pub fn needs_step(&self) -> bool {
        self.scheduler.has_work() || self.imports_need_step()
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
            pending_kv_imports: self.pending_imports.len() + self.importing.len(),
            kv_imports: self.kv_imports,
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
        let export = match request.kv_transfer {
            KvTransfer::Export => Export::Late,
            KvTransfer::ExportEarly => Export::Early,
            KvTransfer::Local | KvTransfer::Import(_) => Export::No,
        };
        match request.kv_transfer {
            KvTransfer::Import(kv) => self.pending_imports.push_back(PendingImport::new(key, seq, kv)),
            KvTransfer::Local | KvTransfer::Export | KvTransfer::ExportEarly => self.scheduler.add(seq),
        }
        self.next_arrival += 1;
        self.owner.insert(seq_id, (key, 0));
        self.requests
            .insert(key, ActiveRequest { params, seed, choices, forked: false, started: false, stop_ids, export, early_lease: None });
    }

    fn new_seq_id(&mut self) -> SeqId {
        let id = self.next_seq;
        self.next_seq += 1;
        id
    }

    /// Drops a request and frees its blocks. True if it had never started.
    pub fn abort(&mut self, key: RequestKey) -> bool {
        let Some(req) = self.requests.remove(&key) else { return false };
        self.drop_import(key);
        // A reserved lease not filled yet dies with its request (decode's wait fails).
        if let Some(lease) = req.early_lease {
            self.free_lease(lease);
        }
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

    /// Runs one step; early-handoff announcements come first in the returned events.
    pub fn step(&mut self) -> Vec<StepEvent> {
        let mut announced = Vec::new();
        let events = self.step_announcing(&mut |event| announced.push(event));
        announced.extend(events);
        announced
    }

    /// Runs one step, passing early-handoff announcements to `announce` before the
    /// forward runs (the engine thread delivers them at once).
    pub fn step_announcing(&mut self, announce: &mut dyn FnMut(StepEvent)) -> Vec<StepEvent> {
        self.expire_leases();
        let mut events = Vec::new();
        // An imported request's first token is prefill's and is ready now: hand it out
        // before running a forward, which would add a whole step to the time to first token.
        if self.advance_imports(&mut events) {
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
        self.announce_early_handoffs(&out, announce);
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
        let (exporting, early_lease, wants_logprobs) = (req.export != Export::No, req.early_lease, req.params.logprobs.is_some());
        // A prefill's request ends on its first token, its KV kept under a lease.
        let handoff = if exporting { self.hand_off(seq_id, early_lease, &token, finish.is_some()) } else { None };
        if exporting && finish.is_none() {
            finish = Some((FinishReason::Length, None));
        }
        let logprobs =
            if wants_logprobs { vec![TokenLogprob { token_id: token.token, logprob: token.logprob, top: token.top }] } else { Vec::new() };
        if handoff.is_none() && finish.is_some() {
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
