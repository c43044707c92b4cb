//! The migration descriptor: what a prefill engine answers in `kv_transfer_params` and a
//! decode engine needs to pull the prompt's KV. Opaque to the router except `lease_id`.

use dlengine_engine::config::ModelInfo;
use dlengine_engine::kv_transfer::{CudaIpcKv, EarlyKv, KvHandoff};
use dlengine_engine::request::TokenLogprob;
use dlengine_registry::KvLayout;
use serde::{Deserialize, Serialize};

use crate::openai::ApiError;

/// Bumped on an incompatible change, of the descriptor or of a transport's protocol
/// (3: TCP pulls name a range of layers); a decode engine refuses other versions.
pub const DESCRIPTOR_VERSION: u32 = 3;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationDescriptor {
    pub version: u32,
    /// Instance id of the prefill engine.
    pub engine_id: String,
    /// Served model name: decode must serve the same one.
    pub model: String,
    pub kv_layout: KvLayout,
    pub prompt_tokens: usize,
    /// XXH3-64 of the prompt's token ids, hex: decode must have tokenized the same prompt.
    pub prompt_hash: String,
    /// The token prefill sampled after the prompt; absent from an early descriptor
    /// (fetch it from `first_token_url`).
    pub first_token: Option<TokenLogprob>,
    /// Early descriptor on a backend with per-layer progress: a layer's KV is complete
    /// once prefill's progress mark for it reached this (read through CUDA IPC).
    #[serde(default)]
    pub ready_mark: Option<u32>,
    pub lease_id: String,
    /// When prefill frees the blocks by itself, Unix milliseconds.
    pub lease_expires_ms: u64,
    /// Prefill's block ids, in prompt order.
    pub blocks: Vec<u32>,
    /// Where to release the lease once the KV arrived (`POST`, body `{"lease_id"}`).
    pub free_url: String,
    /// Where to fetch the first token of an early descriptor (`POST`, body `{"lease_id"}`).
    pub first_token_url: String,
    /// Host name of prefill's node (CUDA IPC works only within one node).
    pub node: String,
    /// `host:port` of prefill's TCP KV listener.
    pub tcp: Option<String>,
    pub cuda_ipc: Option<CudaIpcKv>,
    /// Where to connect queue pairs to prefill, when it moves KV over RDMA.
    #[serde(default)]
    pub rdma_connect_url: Option<String>,
}

/// What a prefill engine says about itself in every descriptor.
#[derive(Debug, Clone)]
pub struct PrefillEndpoint {
    pub engine_id: String,
    pub model: String,
    pub free_url: String,
    pub first_token_url: String,
    pub node: String,
    pub tcp: Option<String>,
    pub cuda_ipc: Option<CudaIpcKv>,
    pub rdma_connect_url: Option<String>,
}

/// What a descriptor says about the lease, early or not.
struct Lease {
    id: u64,
    blocks: Vec<u32>,
    expires_at: std::time::Instant,
    ready_mark: Option<u32>,
}

pub fn prompt_hash(tokens: &[u32]) -> String {
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(bytemuck::cast_slice(tokens)))
}

impl MigrationDescriptor {
    /// The descriptor of a lease whose first token is known.
    pub fn new(from: &PrefillEndpoint, info: &ModelInfo, prompt: &[u32], first_token: TokenLogprob, handoff: KvHandoff) -> Self {
        let lease = Lease { id: handoff.lease_id, blocks: handoff.blocks, expires_at: handoff.expires_at, ready_mark: None };
        Self::build(from, info, prompt, Some(first_token), lease)
    }

    /// The descriptor of an early handoff, sent before the first token exists.
    pub fn early(from: &PrefillEndpoint, info: &ModelInfo, prompt: &[u32], kv: EarlyKv) -> Self {
        let lease = Lease { id: kv.lease_id, blocks: kv.blocks, expires_at: kv.expires_at, ready_mark: kv.ready_mark };
        Self::build(from, info, prompt, None, lease)
    }

    fn build(from: &PrefillEndpoint, info: &ModelInfo, prompt: &[u32], first_token: Option<TokenLogprob>, lease: Lease) -> Self {
        let remaining = lease.expires_at.saturating_duration_since(std::time::Instant::now());
        Self {
            version: DESCRIPTOR_VERSION,
            engine_id: from.engine_id.clone(),
            model: from.model.clone(),
            kv_layout: KvLayout::from(&info.kv_layout),
            prompt_tokens: prompt.len(),
            prompt_hash: prompt_hash(prompt),
            first_token,
            ready_mark: lease.ready_mark,
            lease_id: lease.id.to_string(),
            lease_expires_ms: crate::openai::ids::unix_now_ms() + remaining.as_millis() as u64,
            blocks: lease.blocks,
            free_url: from.free_url.clone(),
            first_token_url: from.first_token_url.clone(),
            node: from.node.clone(),
            tcp: from.tcp.clone(),
            cuda_ipc: from.cuda_ipc.clone(),
            rdma_connect_url: from.rdma_connect_url.clone(),
        }
    }

    /// Refuses a descriptor this engine cannot continue: another version, model or KV
    /// layout, or a prompt that tokenized differently here.
    pub fn check_compatible(&self, served_model: &str, info: &ModelInfo, prompt: &[u32]) -> Result<(), ApiError> {
        if self.version != DESCRIPTOR_VERSION {
            return Err(mismatch(format!("descriptor version {} (this engine speaks {DESCRIPTOR_VERSION})", self.version)));
        }
        if self.model != served_model {
            return Err(mismatch(format!("the KV was computed for model {:?}, this engine serves {served_model:?}", self.model)));
        }
        let local = KvLayout::from(&info.kv_layout);
        if self.kv_layout != local {
            return Err(mismatch(format!("prefill's KV layout {:?} differs from this engine's {local:?}", self.kv_layout)));
        }
        if self.prompt_tokens != prompt.len() {
            return Err(mismatch(format!(
                "the prompt tokenized to {} tokens here but prefill computed {} (different tokenizer or chat template)",
                prompt.len(),
                self.prompt_tokens
            )));
        }
        if self.prompt_hash != prompt_hash(prompt) {
            return Err(mismatch(format!(
                "the prompt's {} tokens here differ from those prefill computed (another prompt, tokenizer or chat template)",
                prompt.len()
            )));
        }
        if self.blocks.len() != prompt.len().div_ceil(local.block_size) {
            return Err(mismatch(format!("{} blocks for a prompt of {} tokens", self.blocks.len(), prompt.len())));
        }
        Ok(())
    }
}

fn mismatch(message: String) -> ApiError {
    ApiError::invalid_param("kv_transfer_params", message).with_code("kv_layout_mismatch")
}
