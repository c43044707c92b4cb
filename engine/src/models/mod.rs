//! Model architectures, written once against the backend op set.
//!
//! Llama and Qwen3 are both pre-norm dense decoders; [`dense_decoder`] runs that shape,
//! and each architecture's file says how its checkpoint names its weights and which
//! optional parts (q/k norm, rope scaling) it uses. A new architecture adds a file here
//! and a line in [`load`].

mod dense_decoder;
mod llama;
mod qwen3;
mod rope;

pub use dense_decoder::{DecoderSpec, DenseDecoder};
pub use rope::rope_table;

use crate::backend::Backend;
use crate::config::{Architecture, ModelConfig};
use crate::error::EngineError;
use crate::weights::Weights;

/// A causal language model on backend `B`.
pub trait CausalLm<B: Backend>: Send {
    /// Runs the step and returns logits [batch.logit_rows.len(), vocab].
    fn forward(&self, backend: &mut B, batch: &B::Batch) -> Result<B::Tensor, EngineError>;
}

/// Loads the model `config` describes from `weights` onto `backend`.
pub fn load<B: Backend>(config: &ModelConfig, weights: &Weights, backend: &mut B) -> Result<Box<dyn CausalLm<B>>, EngineError> {
    let spec = match config.architecture {
        Architecture::Llama => llama::spec(config),
        Architecture::Qwen3 => qwen3::spec(config),
    };
    Ok(Box::new(DenseDecoder::load(spec, weights, backend)?))
}
