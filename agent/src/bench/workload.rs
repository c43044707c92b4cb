//! Deterministic random prompts and timed requests shared by the benchmark modes.

use std::time::{Duration, Instant};

use anyhow::Context;
use dlengine_engine::engine::{Engine, RequestStream};
use dlengine_engine::request::GenerateRequest;
use dlengine_engine::sampler::splitmix64;
use dlengine_engine::sampling_params::SamplingParams;

/// `len` token ids drawn from the lower 90% of the vocabulary (random-weight models have no
/// preference; the fixture vocabularies keep their special tokens at the top).
pub fn random_prompt(len: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let range = (vocab as u64 * 9 / 10).max(2);
    (0..len as u64).map(|i| (splitmix64(seed.wrapping_mul(1_000_003) ^ i) % range) as u32).collect()
}

pub fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams { temperature: 0.0, max_tokens, ignore_eos: true, ..SamplingParams::default() }
}

pub fn submit(engine: &Engine, id: usize, prompt: Vec<u32>, params: SamplingParams) -> anyhow::Result<RequestStream> {
    let request = GenerateRequest { request_id: format!("bench-{id}"), prompt_token_ids: prompt, params, kv_transfer: Default::default() };
    engine.submit(request).map_err(|e| anyhow::anyhow!("submitting a benchmark request: {e}"))
}

/// When the first and the last token of one request arrived.
#[derive(Debug, Clone, Copy)]
pub struct Timed {
    pub ttft: Duration,
    pub total: Duration,
    pub tokens: usize,
}

impl Timed {
    /// Decode speed after the first token.
    pub fn decode_tokens_per_second(&self) -> f64 {
        (self.tokens.saturating_sub(1)) as f64 / (self.total - self.ttft).as_secs_f64().max(1e-9)
    }
}

/// Runs one request alone and times it.
pub fn timed(engine: &Engine, id: usize, prompt: Vec<u32>, max_tokens: usize) -> anyhow::Result<Timed> {
    let started = Instant::now();
    let mut stream = submit(engine, id, prompt, greedy(max_tokens))?;
    let (mut ttft, mut tokens) = (None, 0);
    while let Some(delta) = stream.next_blocking() {
        let delta = delta.context("benchmark request failed")?;
        if !delta.token_ids.is_empty() && ttft.is_none() {
            ttft = Some(started.elapsed());
        }
        tokens += delta.token_ids.len();
    }
    Ok(Timed { ttft: ttft.unwrap_or_default(), total: started.elapsed(), tokens })
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    if v.is_empty() {
        return 0.0;
    }
    v[v.len() / 2]
}

pub fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    if v.is_empty() {
        return 0.0;
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}
