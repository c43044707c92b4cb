//! The value stored under an engine's registry key: what a router needs to know to send an
//! engine work, and (for prefill/decode disaggregation) to pair two engines whose KV caches
//! are interchangeable.
//!
//! The JSON is a contract between processes of different versions: readers ignore fields
//! they do not know, and every field added later must have a default.

use serde::{Deserialize, Serialize};

/// Bumped when a change would make an older router misroute; routers skip records whose
/// `protocol_version` they do not speak.
pub const PROTOCOL_VERSION: u32 = 1;

/// What an engine does with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Prefill and decode in one engine: serves whole requests.
    Aggregated,
    /// Computes the prompt's KV cache and hands it to a decode engine.
    Prefill,
    /// Continues generation from KV pulled from a prefill engine.
    Decode,
    /// Multimodal encoder.
    Encode,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Aggregated => "aggregated",
            Role::Prefill => "prefill",
            Role::Decode => "decode",
            Role::Encode => "encode",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        [Role::Aggregated, Role::Prefill, Role::Decode, Role::Encode].into_iter().find(|r| r.as_str() == s)
    }
}

impl From<dlengine_cli::Mode> for Role {
    fn from(mode: dlengine_cli::Mode) -> Self {
        match mode {
            dlengine_cli::Mode::Aggregated => Role::Aggregated,
            dlengine_cli::Mode::Prefill => Role::Prefill,
            dlengine_cli::Mode::Decode => Role::Decode,
            dlengine_cli::Mode::Encode => Role::Encode,
        }
    }
}

/// Shape of one KV-cache block. Two engines can exchange KV only when these are equal.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KvLayout {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Element type of the cache: "bf16", "f16" or "f32".
    pub dtype: String,
}

/// Where peers pull KV from. Opaque to the router; empty until KV transfer exists.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferEndpoints {
    /// `host:port` of the TCP transfer listener.
    #[serde(default)]
    pub tcp: Option<String>,
    /// Descriptor a process on the same host needs to open the cache over CUDA IPC.
    #[serde(default)]
    pub cuda_ipc: Option<String>,
    /// Descriptor of the RDMA endpoint (device, GID, queue pair).
    #[serde(default)]
    pub rdma: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    /// Most sequences the engine runs in one step.
    pub max_seqs: usize,
    /// KV blocks in the cache.
    pub kv_blocks: usize,
}

/// The engine's load as last published (at most about once a second).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Load {
    /// Sequences being stepped.
    #[serde(default)]
    pub running: usize,
    /// Requests accepted but not started.
    #[serde(default)]
    pub waiting: usize,
    /// Fraction of KV blocks in use, 0..=1.
    #[serde(default)]
    pub kv_usage: f64,
    /// When this load was measured, Unix milliseconds.
    #[serde(default)]
    pub updated_at: u64,
}

impl Load {
    /// Whether `self` differs enough from `published` to be worth a write to etcd: any
    /// change in the request counts, or KV usage moving by at least 5 points.
    pub fn differs_meaningfully(&self, published: &Load) -> bool {
        const KV_USAGE_STEP: f64 = 0.05;
        self.running != published.running
            || self.waiting != published.waiting
            || (self.kv_usage - published.kv_usage).abs() >= KV_USAGE_STEP
    }
}

/// One registered engine process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerRecord {
    pub protocol_version: u32,
    pub instance_id: String,
    pub namespace: String,
    pub deployment: String,
    pub revision: String,
    pub role: Role,
    /// The model the engine loaded (its directory or repository name).
    pub model: String,
    /// The name clients put in a request's `model`.
    pub served_model_name: String,
    /// Base URL of the engine's OpenAI-compatible HTTP API, without a trailing slash.
    pub url: String,
    pub kv_layout: KvLayout,
    #[serde(default)]
    pub transfer: TransferEndpoints,
    pub capacity: Capacity,
    #[serde(default)]
    pub load: Load,
    /// When the process started, Unix milliseconds.
    pub started_at: u64,
}

/// Engines whose KV caches are interchangeable: a prefill and a decode engine can be paired
/// only when these are equal (same weights, same revision, same block shape).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PairingKey {
    pub served_model_name: String,
    pub revision: String,
    pub kv_layout: KvLayout,
}

impl WorkerRecord {
    pub fn pairing_key(&self) -> PairingKey {
        PairingKey {
            served_model_name: self.served_model_name.clone(),
            revision: self.revision.clone(),
            kv_layout: self.kv_layout.clone(),
        }
    }

    pub fn to_json(&self) -> String {
        // A struct of strings and numbers always serialises; the fallback is unreachable.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_millis_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn sample_record(instance_id: &str, url: &str) -> WorkerRecord {
        WorkerRecord {
            protocol_version: PROTOCOL_VERSION,
            instance_id: instance_id.into(),
            namespace: "default".into(),
            deployment: "local".into(),
            revision: "0".into(),
            role: Role::Aggregated,
            model: "tiny".into(),
            served_model_name: "tiny".into(),
            url: url.into(),
            kv_layout: KvLayout { layers: 2, kv_heads: 2, head_dim: 16, block_size: 16, dtype: "f32".into() },
            transfer: TransferEndpoints::default(),
            capacity: Capacity { max_seqs: 8, kv_blocks: 64 },
            load: Load::default(),
            started_at: 1,
        }
    }

    #[test]
    fn json_round_trips_and_names_every_contract_field() {
        let record = sample_record("abc", "http://127.0.0.1:1");
        let json: serde_json::Value = serde_json::from_str(&record.to_json()).unwrap();
        for field in [
            "protocol_version", "instance_id", "namespace", "deployment", "revision", "role", "model",
            "served_model_name", "url", "kv_layout", "transfer", "capacity", "load", "started_at",
        ] {
            assert!(json.get(field).is_some(), "missing {field}");
        }
        assert_eq!(json["role"], "aggregated");
        assert_eq!(json["kv_layout"]["kv_heads"], 2);
        assert!(json["transfer"]["rdma"].is_null());
        let back: WorkerRecord = serde_json::from_value(json).unwrap();
        assert_eq!(back, record);
    }

    #[test]
    fn unknown_fields_are_ignored_and_load_may_be_missing() {
        let mut json: serde_json::Value = serde_json::from_str(&sample_record("a", "http://x").to_json()).unwrap();
        json["future_field"] = serde_json::json!({"x": 1});
        json.as_object_mut().unwrap().remove("load");
        let back: WorkerRecord = serde_json::from_value(json).unwrap();
        assert_eq!(back.load, Load::default());
    }

    #[test]
    fn small_kv_usage_jitter_is_not_a_meaningful_change() {
        let published = Load { running: 2, waiting: 0, kv_usage: 0.30, updated_at: 1 };
        assert!(!Load { kv_usage: 0.32, updated_at: 2, ..published }.differs_meaningfully(&published));
        assert!(Load { kv_usage: 0.36, ..published }.differs_meaningfully(&published));
        assert!(Load { waiting: 1, ..published }.differs_meaningfully(&published));
    }

    #[test]
    fn pairing_needs_the_same_layout() {
        let a = sample_record("a", "http://a");
        let mut b = sample_record("b", "http://b");
        assert_eq!(a.pairing_key(), b.pairing_key());
        b.kv_layout.block_size = 32;
        assert_ne!(a.pairing_key(), b.pairing_key());
    }
}
