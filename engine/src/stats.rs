//! A snapshot of the engine's state for metrics and load reports.

use serde::Serialize;

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct EngineStats {
    /// Sequences holding KV blocks and being stepped.
    pub running_seqs: usize,
    /// Requests accepted but not yet started (including ones preempted back to waiting).
    pub waiting_requests: usize,
    pub kv_blocks_total: usize,
    pub kv_blocks_used: usize,
    /// Prompt tokens looked up in the prefix cache, and how many were found.
    pub prefix_cache_queried_tokens: u64,
    pub prefix_cache_hit_tokens: u64,
    pub preemptions: u64,
    pub steps: u64,
    /// Device time inside steps and idle between them (GPU backends; 0 elsewhere).
    pub device_busy_ms: f64,
    pub device_idle_between_steps_ms: f64,
    /// Prefill: leases on handed-off KV and the blocks they hold.
    pub kv_leases: usize,
    pub kv_blocks_leased: usize,
    /// Decode: requests whose KV arrived, waiting for room.
    pub pending_kv_imports: usize,
}

impl EngineStats {
    pub fn kv_usage(&self) -> f64 {
        if self.kv_blocks_total == 0 {
            0.0
        } else {
            self.kv_blocks_used as f64 / self.kv_blocks_total as f64
        }
    }

    pub fn prefix_hit_rate(&self) -> f64 {
        if self.prefix_cache_queried_tokens == 0 {
            0.0
        } else {
            self.prefix_cache_hit_tokens as f64 / self.prefix_cache_queried_tokens as f64
        }
    }
}
