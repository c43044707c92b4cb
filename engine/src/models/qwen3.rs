//! Qwen3 dense: like Llama plus an RMSNorm over each query and key head before RoPE
//! (`self_attn.q_norm` / `self_attn.k_norm`), and an explicit `head_dim`.

use super::DecoderSpec;
use crate::config::ModelConfig;

pub fn spec(config: &ModelConfig) -> DecoderSpec {
    DecoderSpec { qk_norm: true, ..DecoderSpec::from_config(config) }
}
