//! A model bound to a backend, behind an object-safe trait so the engine core is not
//! generic over the backend. It also owns what is about the backend and the model
//! together: memory planning (a profile run before sizing the KV cache) and CUDA-graph
//! capture and replay of pure-decode steps.

use crate::backend::{Backend, DeviceTimeReport, KvBlockIo, KvCacheLayout, StepInput, StepLimits};
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

    fn device_time(&mut self) -> Option<DeviceTimeReport>;

    /// Whole-block access to the KV cache (moving KV between engines).
    fn kv_io(&mut self) -> &mut dyn KvBlockIo;
}

/// How the KV cache and graphs are sized.
#[derive(Debug, Clone, Copy)]
pub struct MemoryPlan {
    pub layout: KvCacheLayout,
    /// A fixed block count instead of the backend's budget.
    pub fixed_blocks: Option<usize>,
    pub limits: StepLimits,
    pub max_model_len: usize,
}

pub struct ModelExecutor<B: Backend> {
    backend: B,
    model: Box<dyn CausalLm<B>>,
    /// Captured decode graphs, ascending batch sizes.
    graphs: Vec<usize>,
    /// A KV block no sequence owns: padded graph rows write there.
    scratch_block: u32,
    block_size: usize,
    graph_table_stride: usize,
}

impl<B: Backend> ModelExecutor<B> {
    pub fn new(backend: B, model: Box<dyn CausalLm<B>>) -> Self {
        Self { backend, model, graphs: Vec::new(), scratch_block: 0, block_size: 1, graph_table_stride: 1 }
    }

    /// Sizes and allocates the KV cache (plus one scratch block) and returns the number of
    /// blocks sequences may use.
    pub fn allocate_kv_cache(&mut self, plan: MemoryPlan) -> Result<usize, EngineError> {
        self.backend.set_step_limits(plan.limits)?;
        self.block_size = plan.layout.block_size;
        self.graph_table_stride = plan.limits.max_blocks_per_seq;
        if self.backend.wants_profile_run() {
            self.profile_run(&plan)?;
        }
        let usable = match plan.fixed_blocks {
            Some(n) => n,
            None => (self.backend.kv_cache_budget_bytes()? / plan.layout.bytes_per_block()).saturating_sub(1),
        };
        self.backend.allocate_kv_cache(plan.layout, usable + 1)?;
        self.scratch_block = usable as u32;
        Ok(usable)
    }

    /// One forward at the largest step (sequences of at most max_model_len), so the backend
    /// learns its activation peak before the KV cache takes the rest of the memory.
    fn profile_run(&mut self, plan: &MemoryPlan) -> Result<(), EngineError> {
        let bs = plan.layout.block_size;
        let per_seq = plan.max_model_len.min(plan.limits.max_tokens).max(1);
        let num_seqs = plan.limits.max_tokens.div_ceil(per_seq).min(plan.limits.max_seqs);
        let tokens = plan.limits.max_tokens.min(num_seqs * per_seq);
        let blocks_per_seq = per_seq.div_ceil(bs);
        self.backend.allocate_kv_cache(plan.layout, num_seqs * blocks_per_seq)?;
        let mut input = StepInput { block_size: bs, block_table_stride: blocks_per_seq, ..Default::default() };
        input.query_start.push(0);
        for s in 0..num_seqs {
            let len = per_seq.min(tokens - s * per_seq);
            let first_block = (s * blocks_per_seq) as u32;
            for p in 0..len {
                input.token_ids.push((p % 7) as u32);
                input.positions.push(p as u32);
                input.slot_mapping.push((first_block + (p / bs) as u32) * bs as u32 + (p % bs) as u32);
            }
            input.query_start.push(input.token_ids.len() as u32);
            input.context_lens.push(len as u32);
            input.block_tables.extend((0..blocks_per_seq as u32).map(|b| first_block + b));
            input.logit_rows.push(input.token_ids.len() as u32 - 1);
        }
        let batch = self.backend.prepare(&input)?;
        let logits = self.model.forward(&mut self.backend, &batch)?;
        drop(logits);
        Ok(())
    }

    /// Captures a graph per batch size the backend asks for. Each is run eagerly once first
    /// so lazy initialisation (kernels, library handles, pool blocks) happens outside capture.
    pub fn capture_graphs(&mut self) -> Result<(), EngineError> {
        let mut sizes = self.backend.graph_batch_sizes();
        sizes.sort_unstable();
        for bs in sizes {
            let input = self.pad_decode(&StepInput::default(), bs);
            let batch = self.backend.prepare(&input)?;
            drop(self.model.forward(&mut self.backend, &batch)?);
            let batch = self.backend.prepare(&input)?;
            self.backend.begin_capture(bs)?;
            let output = self.model.forward(&mut self.backend, &batch);
            match output {
                Ok(out) => self.backend.end_capture(bs, out)?,
                Err(e) => return Err(e),
            }
            self.graphs.push(bs);
        }
        if !self.graphs.is_empty() {
            tracing::info!(batch_sizes = ?self.graphs, "captured decode graphs");
        }
        Ok(())
    }

    /// A decode step padded to `bs` rows; padding rows attend to the scratch block only.
    fn pad_decode(&self, input: &StepInput, bs: usize) -> StepInput {
        let stride = self.graph_table_stride;
        let scratch_slot = self.scratch_block * self.block_size as u32;
        let mut padded = StepInput {
            token_ids: input.token_ids.clone(),
            positions: input.positions.clone(),
            slot_mapping: input.slot_mapping.clone(),
            query_start: (0..=bs as u32).collect(),
            context_lens: input.context_lens.clone(),
            block_tables: vec![self.scratch_block; bs * stride],
            block_table_stride: stride,
            block_size: self.block_size,
            logit_rows: (0..bs as u32).collect(),
        };
        for s in 0..input.num_seqs() {
            let table = input.block_table(s);
            padded.block_tables[s * stride..s * stride + table.len()].copy_from_slice(table);
        }
        let pad = bs - input.num_seqs();
        padded.token_ids.extend(std::iter::repeat_n(0, pad));
        padded.positions.extend(std::iter::repeat_n(0, pad));
        padded.slot_mapping.extend(std::iter::repeat_n(scratch_slot, pad));
        padded.context_lens.extend(std::iter::repeat_n(1, pad));
        padded
    }

    fn graph_for(&self, input: &StepInput) -> Option<usize> {
        if !input.is_decode_only() {
            return None;
        }
        self.graphs.iter().copied().find(|&g| g >= input.num_seqs())
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
        if let Some(bs) = self.graph_for(input) {
            let padded = self.pad_decode(input, bs);
            self.backend.prepare(&padded)?;
            return Ok(self.backend.replay_and_sample(bs, rows)?);
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

    fn device_time(&mut self) -> Option<DeviceTimeReport> {
        self.backend.device_time()
    }

    fn kv_io(&mut self) -> &mut dyn KvBlockIo {
        &mut self.backend
    }
}
