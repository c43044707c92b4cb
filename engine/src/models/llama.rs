//! Llama (Llama 2 / 3 / 3.1 / 3.2 family): dense pre-norm decoder, GQA, RoPE with optional
//! `llama3` frequency scaling, no q/k norm.

use super::DecoderSpec;
use crate::config::ModelConfig;

pub fn spec(config: &ModelConfig) -> DecoderSpec {
    DecoderSpec { qk_norm: false, ..DecoderSpec::from_config(config) }
}
