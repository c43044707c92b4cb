//! A pre-norm dense decoder (embedding, N x [attention, MLP], final norm, LM head), the
//! shape Llama and Qwen3 share, using Hugging Face's weight names.
//!
//! q/k/v and gate/up projections are fused at load time into one matrix each, so a layer
//! runs four matrix products instead of seven.

use super::rope::rope_table;
use super::CausalLm;
use crate::backend::{Backend, HostTensor, QkvLayout};
use crate::config::{ModelConfig, RopeScaling};
use crate::error::EngineError;
use crate::weights::Weights;

/// What differs between architectures of this shape.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderSpec {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub vocab: usize,
    pub qkv: QkvLayout,
    pub eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: Option<RopeScaling>,
    pub max_positions: usize,
    pub tied_embeddings: bool,
    /// RMSNorm over each q and k head before RoPE (Qwen3).
    pub qk_norm: bool,
}

impl DecoderSpec {
    pub fn from_config(c: &ModelConfig) -> Self {
        Self {
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
            layers: c.num_hidden_layers,
            vocab: c.vocab_size,
            qkv: QkvLayout { q_heads: c.num_attention_heads, kv_heads: c.num_key_value_heads, head_dim: c.head_dim },
            eps: c.rms_norm_eps,
            rope_theta: c.rope_theta,
            rope_scaling: c.rope_scaling,
            max_positions: c.max_position_embeddings,
            tied_embeddings: c.tie_word_embeddings,
            qk_norm: false,
        }
    }
}

struct Layer<T> {
    input_norm: T,
    qkv: T,
    q_norm: Option<T>,
    k_norm: Option<T>,
    o_proj: T,
    post_attention_norm: T,
    gate_up: T,
    down: T,
}

pub struct DenseDecoder<B: Backend> {
    spec: DecoderSpec,
    embed: B::Tensor,
    layers: Vec<Layer<B::Tensor>>,
    final_norm: B::Tensor,
    /// None when the LM head is tied to the embedding.
    lm_head: Option<B::Tensor>,
    cos_sin: B::Tensor,
}

struct Loader<'a, B: Backend> {
    weights: &'a Weights,
    backend: &'a mut B,
}

impl<B: Backend> Loader<'_, B> {
    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<B::Tensor, EngineError> {
        let host = self.weights.get_shaped(name, shape)?;
        Ok(self.backend.weight(&host)?)
    }

    /// Loads matrices with equal column counts and stacks them row-wise.
    fn fused(&mut self, parts: &[(String, usize)], cols: usize) -> Result<B::Tensor, EngineError> {
        let hosts = parts
            .iter()
            .map(|(name, rows)| self.weights.get_shaped(name, &[*rows, cols]))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(self.backend.weight(&HostTensor::concat_rows(&hosts))?)
    }

    fn layer(&mut self, s: &DecoderSpec, i: usize) -> Result<Layer<B::Tensor>, EngineError> {
        let p = format!("model.layers.{i}");
        let (h, d) = (s.hidden, s.qkv.head_dim);
        let qkv = self.fused(
            &[
                (format!("{p}.self_attn.q_proj.weight"), s.qkv.q_width()),
                (format!("{p}.self_attn.k_proj.weight"), s.qkv.kv_width()),
                (format!("{p}.self_attn.v_proj.weight"), s.qkv.kv_width()),
            ],
            h,
        )?;
        let (q_norm, k_norm) = if s.qk_norm {
            (
                Some(self.tensor(&format!("{p}.self_attn.q_norm.weight"), &[d])?),
                Some(self.tensor(&format!("{p}.self_attn.k_norm.weight"), &[d])?),
            )
        } else {
            (None, None)
        };
        let gate_up = self.fused(
            &[(format!("{p}.mlp.gate_proj.weight"), s.intermediate), (format!("{p}.mlp.up_proj.weight"), s.intermediate)],
            h,
        )?;
        Ok(Layer {
            input_norm: self.tensor(&format!("{p}.input_layernorm.weight"), &[h])?,
            qkv,
            q_norm,
            k_norm,
            o_proj: self.tensor(&format!("{p}.self_attn.o_proj.weight"), &[h, s.qkv.q_width()])?,
            post_attention_norm: self.tensor(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
            gate_up,
            down: self.tensor(&format!("{p}.mlp.down_proj.weight"), &[h, s.intermediate])?,
        })
    }
}

impl<B: Backend> DenseDecoder<B> {
    pub fn load(spec: DecoderSpec, weights: &Weights, backend: &mut B) -> Result<Self, EngineError> {
        let mut l = Loader { weights, backend };
        let embed = l.tensor("model.embed_tokens.weight", &[spec.vocab, spec.hidden])?;
        let layers = (0..spec.layers).map(|i| l.layer(&spec, i)).collect::<Result<Vec<_>, _>>()?;
        let final_norm = l.tensor("model.norm.weight", &[spec.hidden])?;
        let lm_head =
            if spec.tied_embeddings { None } else { Some(l.tensor("lm_head.weight", &[spec.vocab, spec.hidden])?) };
        let d = spec.qkv.head_dim;
        let table = rope_table(d, spec.rope_theta, spec.rope_scaling, spec.max_positions);
        let cos_sin = backend.f32_table(&table, spec.max_positions, d)?;
        Ok(Self { spec, embed, layers, final_norm, lm_head, cos_sin })
    }
}

impl<B: Backend> CausalLm<B> for DenseDecoder<B> {
    fn forward(&self, b: &mut B, batch: &B::Batch) -> Result<B::Tensor, EngineError> {
        let s = &self.spec;
        let scale = 1.0 / (s.qkv.head_dim as f32).sqrt();
        let mut residual = b.embedding(&self.embed, batch)?;
        let h = b.rms_norm(&residual, &self.layers[0].input_norm, s.eps)?;
        let mut qkv = b.linear(&h, &self.layers[0].qkv)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let qk_norm = layer.q_norm.as_ref().zip(layer.k_norm.as_ref()).map(|(q, k)| (q, k, s.eps));
            b.attention_prep(&mut qkv, s.qkv, qk_norm, &self.cos_sin, i, batch)?;
            let attn = b.attention(&qkv, s.qkv, i, scale, batch)?;
            let o = b.linear(&attn, &layer.o_proj)?;
            let gate_up = b.add_rms_norm_linear(&o, &mut residual, &layer.post_attention_norm, s.eps, &layer.gate_up)?;
            let act = b.silu_mul(&gate_up)?;
            let down = b.linear(&act, &layer.down)?;
            // The residual add feeds the next layer's normed q/k/v projection, or the final norm.
            match self.layers.get(i + 1) {
                Some(next) => qkv = b.add_rms_norm_linear(&down, &mut residual, &next.input_norm, s.eps, &next.qkv)?,
                None => {
                    let h = b.add_rms_norm(&down, &mut residual, &self.final_norm, s.eps)?;
                    let rows = b.gather_logit_rows(&h, batch)?;
                    return Ok(b.linear(&rows, self.lm_head.as_ref().unwrap_or(&self.embed))?);
                }
            }
        }
        unreachable!("a decoder has at least one layer and returns from the last one")
    }
}
