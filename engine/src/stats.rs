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
    /// Decode: imports ended since start, by transport.
    pub kv_imports: KvImportsByTransport,
}

/// Decode: the imports of one transport that ended since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct KvImports {
    /// Imports whose KV and first token arrived; the bytes copied (not blocks this
    /// engine had cached); the seconds from admission until then (an early descriptor's
    /// include waiting for prefill's forward).
    pub done: u64,
    pub bytes: u64,
    pub seconds: f64,
    /// Imports that failed (transport, missing first token, no room); aborted ones are
    /// not counted.
    pub failed: u64,
}

/// [`KvImports`] of each transport.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct KvImportsByTransport {
    pub tcp: KvImports,
    pub cuda_ipc: KvImports,
    pub rdma: KvImports,
    /// Bytes handed to the engine whole (tests, tools).
    pub other: KvImports,
}

impl KvImportsByTransport {
    /// The counts of `transport`, as sources name it ("tcp", "cuda-ipc", "rdma").
    pub fn of_mut(&mut self, transport: &str) -> &mut KvImports {
        match transport {
            "tcp" => &mut self.tcp,
            "cuda-ipc" => &mut self.cuda_ipc,
            "rdma" => &mut self.rdma,
            _ => &mut self.other,
        }
    }

    /// Each serving transport's name and counts (not `other`).
    pub fn all(&self) -> [(&'static str, KvImports); 3] {
        [("tcp", self.tcp), ("cuda-ipc", self.cuda_ipc), ("rdma", self.rdma)]
    }
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
