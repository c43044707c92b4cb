//! A model bound to a backend, behind an object-safe trait so the engine core is not
//! generic over the backend.

use crate::backend::{Backend, KvCacheLayout, StepInput};
use crate::error::EngineError;
use crate::models::CausalLm;
use crate::sampler::{SampledToken, SamplingRow};

pub trait Executor: Send {
    fn describe(&self) -> String;

    /// Runs one step: block copies first, then the forward pass, then sampling.
    fn execute(
        &mut self,
        input: &StepInput,
        copies: &[(u32, u32)],
        rows: &[SamplingRow<'_>],
    ) -> Result<Vec<SampledToken>, EngineError>;

    /// Runs one step and returns the logits of its logit rows (teacher forcing, tests).
    fn logits(&mut self, input: &StepInput) -> Result<Vec<f32>, EngineError>;
}

pub struct ModelExecutor<B: Backend> {
    backend: B,
    model: Box<dyn CausalLm<B>>,
}

impl<B: Backend> ModelExecutor<B> {
    pub fn new(backend: B, model: Box<dyn CausalLm<B>>) -> Self {
        Self { backend, model }
    }

    /// Sizes and allocates the KV cache: `fixed` blocks if given, else as many as the
    /// backend's budget holds.
    pub fn allocate_kv_cache(&mut self, layout: KvCacheLayout, fixed: Option<usize>) -> Result<usize, EngineError> {
        let num_blocks = match fixed {
            Some(n) => n,
            None => self.backend.kv_cache_budget_bytes()? / layout.bytes_per_block(),
        };
        self.backend.allocate_kv_cache(layout, num_blocks)?;
        Ok(num_blocks)
    }
}

impl<B: Backend> Executor for ModelExecutor<B> {
    fn describe(&self) -> String {
        self.backend.describe()
    }

    fn execute(
        &mut self,
        input: &StepInput,
        copies: &[(u32, u32)],
        rows: &[SamplingRow<'_>],
    ) -> Result<Vec<SampledToken>, EngineError> {
        if !copies.is_empty() {
            self.backend.copy_kv_blocks(copies)?;
        }
        let batch = self.backend.prepare(input)?;
        let logits = self.model.forward(&mut self.backend, &batch)?;
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        Ok(self.backend.sample(&logits, rows)?)
    }

    fn logits(&mut self, input: &StepInput) -> Result<Vec<f32>, EngineError> {
        let batch = self.backend.prepare(input)?;
        let logits = self.model.forward(&mut self.backend, &batch)?;
        Ok(self.backend.to_host(&logits)?)
    }
}
