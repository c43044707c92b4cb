//! Continuous batching: which sequences run in the next step and how many tokens each.
//!
//! Every step has a token budget. Running decodes go first (one token each, oldest
//! first), then running prefills continue in chunks, then waiting sequences are admitted
//! in arrival order (FCFS: a waiting sequence that does not fit blocks those behind it).
//! Prefill chunks and decodes share a step. When blocks run out, the newest running
//! sequence not yet scheduled in this step is preempted: its blocks are freed and it goes
//! back to waiting to be recomputed (the prefix cache usually makes that cheap).
//!
//! The result is a plain [`SchedulerOutput`]; tensors are the model runner's business.

use std::collections::{HashMap, HashSet, VecDeque};

use crate::kv::{BlockId, BlockManager};
use crate::sequence::{SeqId, SeqStatus, Sequence};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub block_size: usize,
    pub num_blocks: usize,
    pub enable_prefix_caching: bool,
}

/// One sequence's share of a step: tokens `start..start + num_tokens` of it are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScheduledSeq {
    pub seq_id: SeqId,
    pub start: usize,
    pub num_tokens: usize,
    /// The chunk reaches the sequence's last known token: sample its next one.
    pub sample: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SchedulerOutput {
    pub scheduled: Vec<ScheduledSeq>,
    pub num_batched_tokens: usize,
    /// Whole-block copies to run before the step (copy-on-write of forked samples).
    pub blocks_to_copy: Vec<(BlockId, BlockId)>,
    /// Sequences scheduled for the first time, with their prefix-cache hit in tokens.
    pub started: Vec<(SeqId, usize)>,
    pub preempted: Vec<SeqId>,
}

impl SchedulerOutput {
    pub fn is_empty(&self) -> bool {
        self.scheduled.is_empty()
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SchedulerStats {
    pub prefix_queried_tokens: u64,
    pub prefix_hit_tokens: u64,
    pub preemptions: u64,
}

impl SchedulerStats {
    fn count_prefix_lookup(&mut self, blocks: &BlockManager, queried_tokens: usize, hit_tokens: usize) {
        if blocks.prefix_caching() {
            self.prefix_queried_tokens += queried_tokens as u64;
            self.prefix_hit_tokens += hit_tokens as u64;
        }
    }
}

/// The blocks of `seq`'s longest cached prefix. Only blocks wholly inside the first len-1
/// tokens may hit: the last token always goes into a block of the sequence's own (computed
/// there, or copied there by an import).
fn cached_prefix(blocks: &BlockManager, seq: &mut Sequence) -> Vec<BlockId> {
    if !blocks.prefix_caching() {
        return Vec::new();
    }
    let bs = blocks.block_size();
    let candidates = seq.len().saturating_sub(1) / bs;
    blocks.match_prefix(seq.block_keys(candidates, bs))
}

/// Enters `seq`'s full blocks `range` (their KV written) into the prefix cache.
fn register_full_blocks(blocks: &mut BlockManager, seq: &mut Sequence, range: std::ops::Range<usize>) {
    if !blocks.prefix_caching() || range.is_empty() {
        return;
    }
    let keys = seq.block_keys(range.end, blocks.block_size()).to_vec();
    for b in range {
        blocks.register(seq.block_table[b], keys[b]);
    }
}

pub struct Scheduler {
    cfg: SchedulerConfig,
    blocks: BlockManager,
    seqs: HashMap<SeqId, Sequence>,
    /// Sorted by arrival.
    waiting: VecDeque<SeqId>,
    /// Sorted by arrival.
    running: Vec<SeqId>,
    pending_copies: Vec<(BlockId, BlockId)>,
    stats: SchedulerStats,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Self {
        Self {
            blocks: BlockManager::new(cfg.num_blocks, cfg.block_size, cfg.enable_prefix_caching),
            cfg,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            pending_copies: Vec::new(),
            stats: SchedulerStats::default(),
        }
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }
    pub fn block_manager(&self) -> &BlockManager {
        &self.blocks
    }
    pub fn stats(&self) -> SchedulerStats {
        self.stats
    }
    pub fn num_running(&self) -> usize {
        self.running.len()
    }
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }
    pub fn has_work(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty()
    }
    pub fn seq(&self, id: SeqId) -> Option<&Sequence> {
        self.seqs.get(&id)
    }
    pub fn seq_ids(&self) -> impl Iterator<Item = SeqId> + '_ {
        self.seqs.keys().copied()
    }

    /// Queues a new sequence.
    pub fn add(&mut self, seq: Sequence) {
        let id = seq.id;
        self.insert_waiting(id, seq.arrival);
        self.seqs.insert(id, seq);
    }

    fn insert_waiting(&mut self, id: SeqId, arrival: u64) {
        let seqs = &self.seqs;
        let pos = self.waiting.partition_point(|w| seqs.get(w).is_some_and(|s| s.arrival <= arrival));
        self.waiting.insert(pos, id);
    }

    /// Whether a sequence holding `blocks` fresh blocks can start running now (an
    /// imported prompt: its KV arrives whole, so it needs every block at once).
    pub fn can_admit_running(&self, blocks: usize) -> bool {
        self.reserved_seqs() < self.cfg.max_num_seqs && blocks <= self.blocks.num_free()
    }

    /// Adds a sequence that is already running: its blocks (from
    /// [`allocate_import`](Self::allocate_import)) hold its first
    /// `num_computed_tokens` tokens.
    pub fn add_running(&mut self, mut seq: Sequence) {
        seq.status = SeqStatus::Running;
        seq.started = true;
        self.running.push(seq.id);
        self.seqs.insert(seq.id, seq);
    }

    /// Removes a sequence but keeps its blocks referenced; they are the caller's now
    /// (a prefill handing its KV to a decode engine).
    pub fn detach(&mut self, id: SeqId) -> Option<Vec<BlockId>> {
        let mut seq = self.seqs.remove(&id)?;
        self.running.retain(|&r| r != id);
        self.waiting.retain(|&w| w != id);
        Some(std::mem::take(&mut seq.block_table))
    }

    /// Removes a sequence wherever it is and frees its blocks at once.
    pub fn remove(&mut self, id: SeqId) -> Option<Sequence> {
        let seq = self.seqs.remove(&id)?;
        self.running.retain(|&r| r != id);
        self.waiting.retain(|&w| w != id);
        self.blocks.release(&seq.block_table);
        Some(seq)
    }

    /// Decides the next step.
    pub fn schedule(&mut self) -> SchedulerOutput {
        let mut out = SchedulerOutput { blocks_to_copy: std::mem::take(&mut self.pending_copies), ..Default::default() };
        let mut budget = self.cfg.max_num_batched_tokens;
        let mut scheduled = HashSet::new();
        // Decodes first so a long prefill never stalls them, then prefill chunks.
        for decode_pass in [true, false] {
            let mut i = 0;
            while i < self.running.len() && budget > 0 {
                let id = self.running[i];
                let uncomputed = self.seqs[&id].num_uncomputed();
                if (uncomputed == 1) != decode_pass || uncomputed == 0 || scheduled.contains(&id) {
                    i += 1;
                    continue;
                }
                let n = uncomputed.min(budget);
                if self.make_room(id, n, &scheduled, &mut out) {
                    self.push_scheduled(id, n, &mut out);
                    scheduled.insert(id);
                    budget -= n;
                    i += 1;
                } else if self.running.get(i) == Some(&id) {
                    i += 1; // does not fit this step; try the others
                } // else it preempted itself and `i` already points at the next one
            }
        }
        if out.preempted.is_empty() {
            self.admit_waiting(&mut budget, &mut out);
        }
        out
    }

    /// Allocates blocks so `id` can hold `n` more tokens, preempting the newest running
    /// sequences not scheduled in this step if needed. False if it does not fit now.
    fn make_room(&mut self, id: SeqId, n: usize, scheduled: &HashSet<SeqId>, out: &mut SchedulerOutput) -> bool {
        loop {
            let seq = &self.seqs[&id];
            let need = self.blocks.blocks_for(seq.num_computed_tokens + n).saturating_sub(seq.block_table.len());
            if need <= self.blocks.num_free() {
                for _ in 0..need {
                    let b = self.blocks.allocate().expect("counted free blocks");
                    self.seqs.get_mut(&id).expect("running sequence").block_table.push(b);
                }
                return true;
            }
            let victim = self.running.iter().rev().copied().find(|v| !scheduled.contains(v));
            match victim {
                Some(v) => {
                    self.preempt(v, out);
                    if v == id {
                        return false;
                    }
                }
                None => return false,
            }
        }
    }

    fn preempt(&mut self, id: SeqId, out: &mut SchedulerOutput) {
        self.running.retain(|&r| r != id);
        let seq = self.seqs.get_mut(&id).expect("preempting a known sequence");
        let table = std::mem::take(&mut seq.block_table);
        seq.num_computed_tokens = 0;
        seq.status = SeqStatus::Waiting;
        let arrival = seq.arrival;
        self.blocks.release(&table);
        self.insert_waiting(id, arrival);
        self.stats.preemptions += 1;
        out.preempted.push(id);
    }

    fn push_scheduled(&mut self, id: SeqId, n: usize, out: &mut SchedulerOutput) {
        let seq = &self.seqs[&id];
        let start = seq.num_computed_tokens;
        out.scheduled.push(ScheduledSeq { seq_id: id, start, num_tokens: n, sample: start + n == seq.len() });
        out.num_batched_tokens += n;
    }

    /// Running sequences plus the ones unforked requests will still add.
    fn reserved_seqs(&self) -> usize {
        self.running.iter().map(|r| self.seqs[r].fan_out).sum()
    }

    fn admit_waiting(&mut self, budget: &mut usize, out: &mut SchedulerOutput) {
        let mut reserved = self.reserved_seqs();
        while *budget > 0 {
            let Some(&id) = self.waiting.front() else { break };
            if reserved + self.seqs[&id].fan_out > self.cfg.max_num_seqs {
                break;
            }
            let seq = self.seqs.get_mut(&id).expect("waiting sequence");
            let hits = cached_prefix(&self.blocks, seq);
            let cached = hits.len() * self.cfg.block_size;
            let n = (seq.len() - cached).min(*budget);
            let Some(table) = self.blocks.claim(hits, self.blocks.blocks_for(cached + n)) else { break };
            seq.block_table = table;
            seq.num_computed_tokens = cached;
            seq.status = SeqStatus::Running;
            self.stats.count_prefix_lookup(&self.blocks, seq.len(), cached);
            if !seq.started {
                seq.started = true;
                out.started.push((id, cached));
            }
            self.waiting.pop_front();
            let pos = self.running.partition_point(|r| self.seqs[r].arrival <= self.seqs[&id].arrival);
            self.running.insert(pos, id);
            self.push_scheduled(id, n, out);
            *budget -= n;
            reserved += self.seqs[&id].fan_out;
        }
    }

    /// Records that the step ran: computed counts advance and newly full blocks enter the
    /// prefix cache.
    pub fn commit(&mut self, out: &SchedulerOutput) {
        let bs = self.cfg.block_size;
        for s in &out.scheduled {
            let Some(seq) = self.seqs.get_mut(&s.seq_id) else { continue };
            let full_before = seq.num_computed_tokens / bs;
            seq.num_computed_tokens = s.start + s.num_tokens;
            let full_after = seq.num_computed_tokens / bs;
            register_full_blocks(&mut self.blocks, seq, full_before..full_after);
        }
    }

    /// Blocks outside any sequence (scoring a prompt in tests and tools). None if too few
    /// are free.
    pub fn allocate_detached(&mut self, n: usize) -> Option<Vec<BlockId>> {
        if n > self.blocks.num_free() {
            return None;
        }
        Some((0..n).map(|_| self.blocks.allocate().expect("counted free blocks")).collect())
    }

    pub fn release_detached(&mut self, blocks: &[BlockId]) {
        self.blocks.release(blocks);
    }

    /// Blocks for `seq`'s prompt, whose KV comes from another engine: the longest prefix
    /// this engine has cached (shared, and counted as a prefix-cache hit), then fresh
    /// blocks for the rest. The last prompt token's block is always fresh, as in
    /// [`admit_waiting`](Self::admit_waiting), so every import copies something. Returns
    /// the table and how many of its blocks were cached; None if too few are free.
    pub fn allocate_import(&mut self, seq: &mut Sequence) -> Option<(Vec<BlockId>, usize)> {
        let hits = cached_prefix(&self.blocks, seq);
        let cached = hits.len();
        let table = self.blocks.claim(hits, self.blocks.blocks_for(seq.len()))?;
        self.stats.count_prefix_lookup(&self.blocks, seq.len(), cached * self.cfg.block_size);
        Some((table, cached))
    }

    /// Enters an imported prompt's full blocks into the prefix cache, once their KV is
    /// written, as [`commit`](Self::commit) does for a computed prompt.
    pub fn register_prompt_blocks(&mut self, seq: &mut Sequence) {
        let full = seq.len() / self.cfg.block_size;
        register_full_blocks(&mut self.blocks, seq, 0..full);
    }

    /// Appends a sampled token.
    pub fn append_token(&mut self, id: SeqId, token: u32) {
        if let Some(seq) = self.seqs.get_mut(&id) {
            seq.token_ids.push(token);
        }
    }

    /// Creates `child` as a copy of running sequence `parent` sharing its blocks. A partly
    /// filled last block is copied (both will write into it). If no block is free for the
    /// copy, the child goes to waiting and is recomputed later.
    pub fn fork(&mut self, parent: SeqId, child: SeqId) {
        let Some(p) = self.seqs.get_mut(&parent) else { return };
        p.fan_out = 1;
        let mut c = p.fork(child);
        self.blocks.acquire(&c.block_table);
        let partial = c.num_computed_tokens % self.cfg.block_size != 0;
        if partial {
            let last = c.block_table.len() - 1;
            match self.blocks.allocate() {
                Some(fresh) => {
                    let shared = c.block_table[last];
                    self.pending_copies.push((shared, fresh));
                    self.blocks.release(&[shared]);
                    c.block_table[last] = fresh;
                }
                None => {
                    self.blocks.release(&c.block_table);
                    c.block_table.clear();
                    c.num_computed_tokens = 0;
                    c.status = SeqStatus::Waiting;
                    let arrival = c.arrival;
                    self.seqs.insert(child, c);
                    self.insert_waiting(child, arrival);
                    return;
                }
            }
        }
        let pos = self.running.iter().position(|&r| r == parent).map_or(self.running.len(), |p| p + 1);
        self.running.insert(pos, child);
        self.seqs.insert(child, c);
    }
}

#[cfg(test)]
mod tests;
