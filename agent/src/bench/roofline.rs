//! The batch-1 decode ceiling: device copy bandwidth over the bytes of weights one token
//! must read (every matrix once; the embedding table only if it doubles as the LM head).

use dlengine_engine::config::ModelConfig;
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Roofline {
    pub copy_bandwidth_gbps: f64,
    pub weight_bytes_per_token: u64,
    pub tokens_per_second: f64,
}

/// bf16 bytes of the weights a decode step reads.
pub fn weight_bytes_per_token(c: &ModelConfig) -> u64 {
    let (h, i, d) = (c.hidden_size as u64, c.intermediate_size as u64, c.head_dim as u64);
    let (q, kv) = (c.num_attention_heads as u64, c.num_key_value_heads as u64);
    let per_layer = h * (q + 2 * kv) * d + q * d * h + 3 * h * i + 2 * h;
    let lm_head = c.vocab_size as u64 * h;
    2 * (c.num_hidden_layers as u64 * per_layer + lm_head + h)
}

/// Measures the device's copy bandwidth (CUDA only) and derives the roofline.
pub fn measure(config: &ModelConfig, device: &str) -> Option<Roofline> {
    if !device.starts_with("cuda") {
        return None;
    }
    let bw = match dlengine_cuda::copy_bandwidth_gbps(0, 1 << 30) {
        Ok(bw) => bw,
        Err(e) => {
            tracing::warn!("copy bandwidth not measured: {e}");
            return None;
        }
    };
    let bytes = weight_bytes_per_token(config);
    Some(Roofline { copy_bandwidth_gbps: bw, weight_bytes_per_token: bytes, tokens_per_second: bw * 1e9 / bytes as f64 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use dlengine_engine::config::Architecture;

    #[test]
    fn llama3_8b_reads_about_15_gb_per_token() {
        let c = ModelConfig {
            architecture: Architecture::Llama,
            hidden_size: 4096,
            intermediate_size: 14336,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: 8,
            head_dim: 128,
            vocab_size: 128256,
            max_position_embeddings: 8192,
            rms_norm_eps: 1e-5,
            rope_theta: 5e5,
            rope_scaling: None,
            tie_word_embeddings: false,
            eos_token_ids: vec![],
        };
        // 8.03B parameters minus the 0.53B embedding table that decode never reads whole.
        let gb = weight_bytes_per_token(&c) as f64 / 1e9;
        assert!((gb - 15.0).abs() < 0.1, "{gb}");
    }
}
