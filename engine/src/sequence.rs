//! One sequence: a prompt and what was generated after it, plus where its KV lives.

use crate::kv::{hash_full_blocks, BlockId};

pub type SeqId = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqStatus {
    Waiting,
    Running,
}

#[derive(Debug, Clone)]
pub struct Sequence {
    pub id: SeqId,
    /// Prompt tokens followed by generated tokens.
    pub token_ids: Vec<u32>,
    pub prompt_len: usize,
    /// Tokens whose KV is in the cache.
    pub num_computed_tokens: usize,
    pub block_table: Vec<BlockId>,
    /// Prefix keys of the full blocks of `token_ids`, computed lazily.
    block_keys: Vec<u64>,
    pub status: SeqStatus,
    /// FCFS order; kept through preemption so a preempted sequence stays ahead.
    pub arrival: u64,
    /// Whether it was ever scheduled (the first admission reports prefix-cache hits).
    pub started: bool,
    /// Sequences this one will become: `n` for a request's first sequence until its
    /// samples fork, then 1. Admission reserves room for all of them.
    pub fan_out: usize,
}

impl Sequence {
    pub fn new(id: SeqId, prompt: Vec<u32>, arrival: u64) -> Self {
        Self {
            id,
            prompt_len: prompt.len(),
            token_ids: prompt,
            num_computed_tokens: 0,
            block_table: Vec::new(),
            block_keys: Vec::new(),
            status: SeqStatus::Waiting,
            arrival,
            started: false,
            fan_out: 1,
        }
    }

    pub fn len(&self) -> usize {
        self.token_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.token_ids.is_empty()
    }

    pub fn prompt(&self) -> &[u32] {
        &self.token_ids[..self.prompt_len]
    }

    pub fn output(&self) -> &[u32] {
        &self.token_ids[self.prompt_len..]
    }

    pub fn num_uncomputed(&self) -> usize {
        self.len() - self.num_computed_tokens
    }

    /// Prefix keys of the first `n` full blocks (`n` must not exceed the full blocks).
    pub fn block_keys(&mut self, n: usize, block_size: usize) -> &[u64] {
        if self.block_keys.len() < n {
            hash_full_blocks(&self.token_ids[..n * block_size], block_size, &mut self.block_keys);
        }
        &self.block_keys[..n]
    }

    /// A copy with another id that shares (by value) everything generated so far; the
    /// caller takes the block references.
    pub fn fork(&self, id: SeqId) -> Self {
        Self { id, fan_out: 1, ..self.clone() }
    }
}
