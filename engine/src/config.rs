//! Configuration: the model's `config.json` and `generation_config.json`, the engine's
//! sizing, and what the engine reports about itself once loaded.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::backend::KvCacheLayout;
use crate::error::LoadError;

/// Architectures this engine runs (config.json's `architectures[0]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Architecture {
    Llama,
    Qwen3,
}

impl Architecture {
    const SUPPORTED: &'static [(&'static str, Architecture)] =
        &[("LlamaForCausalLM", Architecture::Llama), ("Qwen3ForCausalLM", Architecture::Qwen3)];

    fn from_hf_name(name: &str) -> Option<Self> {
        Self::SUPPORTED.iter().find(|(n, _)| *n == name).map(|(_, a)| *a)
    }

    fn supported_names() -> String {
        Self::SUPPORTED.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
    }
}

/// `rope_scaling` variants we implement.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum RopeScaling {
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 { factor: f32, low_freq_factor: f32, high_freq_factor: f32, original_max_position_embeddings: usize },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: Option<RopeScaling>,
    pub tie_word_embeddings: bool,
    pub eos_token_ids: Vec<u32>,
}

fn invalid(path: &Path, message: impl Into<String>) -> LoadError {
    LoadError::Invalid { path: path.to_owned(), message: message.into() }
}

pub(crate) fn read_json(path: &Path) -> Result<Value, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io { path: path.to_owned(), source })?;
    serde_json::from_str(&text).map_err(|source| LoadError::Json { path: path.to_owned(), source })
}

/// `eos_token_id` may be one id or a list.
fn token_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|x| x as u32).collect(),
        _ => Vec::new(),
    }
}

struct Fields<'a> {
    json: &'a Value,
    path: &'a Path,
}

impl Fields<'_> {
    fn usize(&self, key: &str) -> Result<usize, LoadError> {
        self.json
            .get(key)
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| invalid(self.path, format!("`{key}` is missing or not a non-negative integer")))
    }
    fn usize_or(&self, key: &str, default: usize) -> Result<usize, LoadError> {
        match self.json.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(_) => self.usize(key),
        }
    }
    fn f32_or(&self, key: &str, default: f32) -> Result<f32, LoadError> {
        match self.json.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v.as_f64().map(|x| x as f32).ok_or_else(|| invalid(self.path, format!("`{key}` is not a number"))),
        }
    }
    fn bool_or(&self, key: &str, default: bool) -> bool {
        self.json.get(key).and_then(Value::as_bool).unwrap_or(default)
    }
}

fn parse_rope_scaling(v: Option<&Value>, path: &Path) -> Result<Option<RopeScaling>, LoadError> {
    let Some(obj) = v.filter(|v| !v.is_null()) else { return Ok(None) };
    let kind = obj.get("rope_type").or_else(|| obj.get("type")).and_then(Value::as_str).unwrap_or("default");
    let f = Fields { json: obj, path };
    match kind {
        "default" => Ok(None),
        "llama3" => Ok(Some(RopeScaling::Llama3 {
            factor: f.f32_or("factor", 8.0)?,
            low_freq_factor: f.f32_or("low_freq_factor", 1.0)?,
            high_freq_factor: f.f32_or("high_freq_factor", 4.0)?,
            original_max_position_embeddings: f.usize_or("original_max_position_embeddings", 8192)?,
        })),
        other => Err(invalid(path, format!("rope_scaling type {other:?} is not supported (supported: default, llama3)"))),
    }
}

impl ModelConfig {
    /// Parses `config.json` of a model directory.
    pub fn from_dir(dir: &Path) -> Result<Self, LoadError> {
        let path = dir.join("config.json");
        let json = read_json(&path)?;
        Self::from_json(&json, &path)
    }

    pub fn from_json(json: &Value, path: &Path) -> Result<Self, LoadError> {
        let arch_name = json
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str)
            .ok_or_else(|| invalid(path, "`architectures` is missing"))?;
        let architecture = Architecture::from_hf_name(arch_name).ok_or_else(|| LoadError::UnknownArchitecture {
            path: path.to_owned(),
            architecture: arch_name.to_owned(),
            supported: Architecture::supported_names(),
        })?;
        let f = Fields { json, path };
        // transformers 5 keeps RoPE settings in `rope_parameters`; older configs at the top.
        let rope = match json.get("rope_parameters") {
            Some(p) if p.get("rope_theta").is_some() => Fields { json: p, path },
            _ => Fields { json, path },
        };
        for unsupported in ["attention_bias", "mlp_bias", "use_sliding_window"] {
            if f.bool_or(unsupported, false) {
                return Err(invalid(path, format!("`{unsupported}: true` is not supported")));
            }
        }
        if let Some(act) = json.get("hidden_act").and_then(Value::as_str) {
            if act != "silu" {
                return Err(invalid(path, format!("hidden_act {act:?} is not supported (supported: silu)")));
            }
        }
        if let Some(types) = json.get("layer_types").and_then(Value::as_array) {
            if let Some(other) = types.iter().filter_map(Value::as_str).find(|t| *t != "full_attention") {
                return Err(invalid(path, format!("layer type {other:?} is not supported (supported: full_attention)")));
            }
        }
        let hidden_size = f.usize("hidden_size")?;
        let num_attention_heads = f.usize("num_attention_heads")?;
        let config = ModelConfig {
            architecture,
            hidden_size,
            intermediate_size: f.usize("intermediate_size")?,
            num_hidden_layers: f.usize("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads: f.usize_or("num_key_value_heads", num_attention_heads)?,
            head_dim: f.usize_or("head_dim", hidden_size / num_attention_heads.max(1))?,
            vocab_size: f.usize("vocab_size")?,
            max_position_embeddings: f.usize_or("max_position_embeddings", 4096)?,
            rms_norm_eps: f.f32_or("rms_norm_eps", 1e-6)?,
            rope_theta: rope.f32_or("rope_theta", 10_000.0)?,
            rope_scaling: parse_rope_scaling(json.get("rope_scaling").or(json.get("rope_parameters")), path)?,
            tie_word_embeddings: f.bool_or("tie_word_embeddings", false),
            eos_token_ids: token_ids(json.get("eos_token_id")),
        };
        config.check(path)?;
        Ok(config)
    }

    fn check(&self, path: &Path) -> Result<(), LoadError> {
        if self.num_attention_heads == 0 || self.num_key_value_heads == 0 || self.head_dim == 0 {
            return Err(invalid(path, "attention heads and head_dim must be positive"));
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return Err(invalid(
                path,
                format!(
                    "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                    self.num_attention_heads, self.num_key_value_heads
                ),
            ));
        }
        if self.head_dim % 2 != 0 {
            return Err(invalid(path, format!("head_dim must be even for rotary embeddings, got {}", self.head_dim)));
        }
        Ok(())
    }
}

/// Defaults from `generation_config.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GenerationDefaults {
    pub eos_token_ids: Vec<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
}

impl GenerationDefaults {
    pub fn from_dir(dir: &Path) -> Result<Self, LoadError> {
        let path = dir.join("generation_config.json");
        if !path.exists() {
            return Ok(Self::default());
        }
        let json = read_json(&path)?;
        let num = |k: &str| json.get(k).and_then(Value::as_f64).map(|v| v as f32);
        Ok(Self {
            eos_token_ids: token_ids(json.get("eos_token_id")),
            temperature: num("temperature"),
            top_p: num("top_p"),
            top_k: json.get("top_k").and_then(Value::as_u64).map(|v| v as usize),
            min_p: num("min_p"),
            repetition_penalty: num("repetition_penalty"),
        })
    }
}

/// Engine sizing, built once from flags.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineConfig {
    /// Longest prompt + completion; None: the model's max_position_embeddings.
    pub max_model_len: Option<usize>,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub block_size: usize,
    /// Fixed KV block count; None: derive from the backend's memory budget.
    pub num_kv_blocks: Option<usize>,
    pub enable_prefix_caching: bool,
    pub max_waiting_requests: usize,
    /// Seed of the generator that seeds requests without their own seed.
    pub seed: u64,
    /// Seconds a prefill keeps handed-off KV pinned for a decode engine to pull.
    pub kv_lease_secs: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_model_len: None,
            max_num_seqs: 256,
            max_num_batched_tokens: 8192,
            block_size: 16,
            num_kv_blocks: None,
            enable_prefix_caching: true,
            max_waiting_requests: 1024,
            seed: 0,
            kv_lease_secs: 30,
        }
    }
}

impl EngineConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.block_size == 0 || !self.block_size.is_power_of_two() || self.block_size > 256 {
            return Err(format!("kvcache-block-size must be a power of two in 1..=256, got {}", self.block_size));
        }
        if self.max_num_seqs == 0 {
            return Err("max-num-seqs must be at least 1".into());
        }
        if self.max_num_batched_tokens == 0 {
            return Err("max-num-batched-tokens must be at least 1".into());
        }
        Ok(())
    }
}

/// What a loaded engine reports about itself.
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub max_model_len: usize,
    pub eos_token_ids: Vec<u32>,
    pub kv_layout: KvCacheLayout,
    pub num_kv_blocks: usize,
    pub device: String,
    pub generation_defaults: GenerationDefaults,
}
