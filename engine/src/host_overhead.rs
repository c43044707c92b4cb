//! Measures the engine's host-side cost per step (scheduling, building the step's inputs,
//! sampling bookkeeping, emitting events) with the device work taken out: a
//! [`DeviceFreeExecutor`] stands where the model runs and returns tokens at once. On a
//! GPU this host time is what can leave the device idle between steps.

use std::time::{Duration, Instant};

use crate::backend::{DType, KvBlockIo, KvCacheLayout, StepInput};
use crate::config::{Architecture, EngineConfig, GenerationDefaults, ModelInfo};
use crate::engine_core::{EngineCore, StepEvent};
use crate::error::EngineError;
use crate::executor::Executor;
use crate::request::GenerateRequest;
use crate::sampler::{SampledToken, SamplingRow};
use crate::sampling_params::SamplingParams;

/// Answers every sampling row with a token derived from its position, instantly. Used
/// only to measure the host's share of a step.
pub struct DeviceFreeExecutor {
    vocab: u32,
}

impl Executor for DeviceFreeExecutor {
    fn describe(&self) -> String {
        "device-free (host overhead measurement)".into()
    }

    fn execute(&mut self, input: &StepInput, _: &[(u32, u32)], rows: &[SamplingRow<'_>]) -> Result<Vec<SampledToken>, EngineError> {
        std::hint::black_box(input);
        Ok(rows
            .iter()
            .map(|r| SampledToken { token: 1 + (r.step as u32 * 7 + r.logit_row as u32) % (self.vocab - 1), logprob: 0.0, top: Vec::new() })
            .collect())
    }

    fn logits(&mut self, _: &StepInput) -> Result<Vec<f32>, EngineError> {
        Err(EngineError::Request("the device-free executor computes no logits".into()))
    }

    fn device_time(&mut self) -> Option<crate::backend::DeviceTimeReport> {
        None
    }

    fn kv_io(&mut self) -> &mut dyn KvBlockIo {
        self // no cache: every block operation says it is unsupported
    }
}

impl KvBlockIo for DeviceFreeExecutor {}

#[derive(Debug, Clone, serde::Serialize)]
pub struct OverheadReport {
    pub num_seqs: usize,
    pub prompt_len: usize,
    pub steps: usize,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// Tokens emitted per timed step (equals `num_seqs` when every sequence decodes).
    pub tokens_per_step: f64,
}

/// Runs `num_seqs` sequences to steady decode, then times `steps` decode steps.
pub fn measure(num_seqs: usize, prompt_len: usize, steps: usize) -> OverheadReport {
    let block_size = 16;
    let max_len = prompt_len + steps + 64;
    let num_blocks = num_seqs * max_len.div_ceil(block_size) + 16;
    let config = EngineConfig {
        max_num_seqs: num_seqs,
        max_num_batched_tokens: num_seqs * prompt_len.max(1),
        block_size,
        num_kv_blocks: Some(num_blocks),
        ..EngineConfig::default()
    };
    let vocab = 151_936;
    let info = ModelInfo {
        architecture: Architecture::Qwen3,
        vocab_size: vocab,
        max_model_len: max_len,
        eos_token_ids: vec![0],
        kv_layout: KvCacheLayout { num_layers: 28, kv_heads: 8, head_dim: 128, block_size, dtype: DType::BF16 },
        num_kv_blocks: num_blocks,
        device: "none".into(),
        generation_defaults: GenerationDefaults::default(),
    };
    let mut core = EngineCore::new(Box::new(DeviceFreeExecutor { vocab: vocab as u32 }), info, &config);
    for i in 0..num_seqs {
        let prompt = (0..prompt_len as u32).map(|t| 1 + (t * 31 + i as u32 * 17) % 50_000).collect();
        let params = SamplingParams { max_tokens: steps + 32, temperature: 0.8, top_p: 0.95, ignore_eos: true, ..Default::default() };
        core.add_request(i as u64 + 1, GenerateRequest { request_id: i.to_string(), prompt_token_ids: prompt, params, kv_transfer: Default::default() });
    }
    // Prefill (one big step) and a few warm-up decodes.
    for _ in 0..4 {
        core.step();
    }
    let mut tokens = 0usize;
    let mut times: Vec<Duration> = (0..steps)
        .map(|_| {
            let t = Instant::now();
            let events = core.step();
            let elapsed = t.elapsed();
            tokens += events.iter().filter(|e| matches!(e, StepEvent::Token { .. })).count();
            elapsed
        })
        .collect();
    times.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    OverheadReport {
        num_seqs,
        prompt_len,
        steps,
        mean_us: times.iter().map(|d| us(*d)).sum::<f64>() / steps as f64,
        p50_us: us(times[steps / 2]),
        p99_us: us(times[(steps * 99 / 100).min(steps - 1)]),
        tokens_per_step: tokens as f64 / steps as f64,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_sequence_decodes_each_step() {
        // The measurement is meaningful only if all sequences run every step.
        let r = super::measure(8, 20, 10);
        assert_eq!(r.tokens_per_step, 8.0);
        assert!(r.p50_us > 0.0 && r.p99_us >= r.p50_us);
    }
}
