//! One step's batch as plain host data: the tokens to run and where their KV lives.
//!
//! Sequences are flattened: sequence `s` owns token rows `query_start[s]..query_start[s+1]`.
//! A row is a new token of a prefill chunk or the single token of a decode; both kinds mix
//! freely in one step.

#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepInput {
    /// Token id of each row.
    pub token_ids: Vec<u32>,
    /// Position of each row within its sequence.
    pub positions: Vec<u32>,
    /// KV-cache slot (block * block_size + offset) each row's k/v is written to.
    pub slot_mapping: Vec<u32>,
    /// Row offsets of each sequence, length num_seqs + 1.
    pub query_start: Vec<u32>,
    /// Tokens in each sequence's cache once this step's rows are written.
    pub context_lens: Vec<u32>,
    /// Each sequence's block table, padded to `block_table_stride` entries.
    pub block_tables: Vec<u32>,
    pub block_table_stride: usize,
    pub block_size: usize,
    /// Rows whose hidden state goes to the LM head (in order of sampling rows).
    pub logit_rows: Vec<u32>,
}

impl StepInput {
    pub fn num_tokens(&self) -> usize {
        self.token_ids.len()
    }
    pub fn num_seqs(&self) -> usize {
        self.context_lens.len()
    }
    /// Every sequence contributes exactly one row (a pure decode step).
    pub fn is_decode_only(&self) -> bool {
        self.num_tokens() == self.num_seqs()
    }
    pub fn block_table(&self, seq: usize) -> &[u32] {
        &self.block_tables[seq * self.block_table_stride..(seq + 1) * self.block_table_stride]
    }
    pub fn query_range(&self, seq: usize) -> std::ops::Range<usize> {
        self.query_start[seq] as usize..self.query_start[seq + 1] as usize
    }
}
