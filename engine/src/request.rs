//! What callers hand the engine and what comes back per step.

use serde::{Deserialize, Serialize};

use crate::kv_transfer::{EarlyKv, KvHandoff, KvTransfer};
use crate::sampling_params::SamplingParams;

/// A tokenized generation request.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// Caller's id (appears in logs; need not be unique across time).
    pub request_id: String,
    pub prompt_token_ids: Vec<u32>,
    pub params: SamplingParams,
    /// Whether the prompt's KV is computed here, handed off, or imported.
    pub kv_transfer: KvTransfer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// EOS, a stop token or a stop string.
    Stop,
    /// max_tokens or the model's context length.
    Length,
    /// Cancelled by the caller or by shutdown.
    Abort,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

/// Why a sequence stopped with [`FinishReason::Stop`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StopReason {
    Token(u32),
    Text(String),
}

/// Log-probability of one generated token and the most likely alternatives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    pub token_id: u32,
    pub logprob: f32,
    /// (token id, log-probability), most likely first.
    pub top: Vec<(u32, f32)>,
}

/// New output of one choice (one of the request's `n` samples).
#[derive(Debug, Clone, PartialEq)]
pub struct ChoiceDelta {
    pub index: u32,
    /// Text added since the last delta (never splits a UTF-8 character; stop strings cut).
    pub text: String,
    pub token_ids: Vec<u32>,
    /// One entry per token in `token_ids` when logprobs were asked for.
    pub logprobs: Vec<TokenLogprob>,
    pub finish_reason: Option<FinishReason>,
    pub stop_reason: Option<StopReason>,
    /// Prefill only: the prompt's KV was pinned for a decode engine (see
    /// [`KvTransfer::Export`]); the choice ends here.
    pub kv_handoff: Option<KvHandoff>,
    /// Prefill with an early handoff only: the lease and blocks, announced before the
    /// prompt's last forward (a delta with no tokens).
    pub kv_ready: Option<EarlyKv>,
}

impl ChoiceDelta {
    /// The announcement of an early handoff.
    pub fn kv_ready(kv: EarlyKv) -> Self {
        ChoiceDelta {
            index: 0,
            text: String::new(),
            token_ids: Vec::new(),
            logprobs: Vec::new(),
            finish_reason: None,
            stop_reason: None,
            kv_handoff: None,
            kv_ready: Some(kv),
        }
    }
}

/// Token counts of a finished request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: usize,
}
