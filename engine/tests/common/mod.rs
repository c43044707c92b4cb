//! Loading the committed fixtures (fixtures/README.md describes them).

#![allow(dead_code)]

use std::path::PathBuf;

use dlengine_engine::backend::cpu::CpuBackend;
use dlengine_engine::config::EngineConfig;
use dlengine_engine::engine_core::{EngineCore, StepEvent};
use dlengine_engine::request::GenerateRequest;
use dlengine_engine::sampling_params::SamplingParams;
use dlengine_engine::weights::Weights;

pub const MODELS: [&str; 4] = ["qwen3-tiny", "qwen3-tiny-mha", "llama-tiny", "llama-tiny-tied"];

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn model_dir(name: &str) -> PathBuf {
    repo().join("fixtures/models").join(name)
}

pub struct GreedyRef {
    pub prompt_ids: Vec<u32>,
    pub generated_ids: Vec<u32>,
}

pub fn greedy_refs(name: &str) -> Vec<GreedyRef> {
    let path = repo().join("fixtures/reference").join(name).join("greedy.json");
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let ids = |v: &serde_json::Value| v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
    json["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| GreedyRef { prompt_ids: ids(&p["prompt_ids"]), generated_ids: ids(&p["generated_ids"]) })
        .collect()
}

/// Reference logits of prompt `i`: [len * vocab] row-major.
pub fn reference_logits(name: &str, i: usize) -> Vec<f32> {
    let w = Weights::open(&repo().join("fixtures/reference").join(name)).unwrap();
    w.get(&format!("prompt{i}.logits")).unwrap().to_f32()
}

pub fn core(name: &str, config: EngineConfig) -> EngineCore {
    EngineCore::load(&model_dir(name), &config, CpuBackend::new(64 << 20)).unwrap()
}

pub fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams { temperature: 0.0, max_tokens, ignore_eos: true, ..SamplingParams::default() }
}

/// Runs requests to completion on a core; returns each request's tokens per choice.
pub fn run_to_end(core: &mut EngineCore, requests: Vec<(Vec<u32>, SamplingParams)>) -> Vec<Vec<Vec<u32>>> {
    let mut outputs: Vec<Vec<Vec<u32>>> = requests.iter().map(|(_, p)| vec![Vec::new(); p.n]).collect();
    for (i, (prompt, params)) in requests.into_iter().enumerate() {
        core.add_request(i as u64, GenerateRequest { request_id: i.to_string(), prompt_token_ids: prompt, params, kv_transfer: Default::default() });
    }
    let mut steps = 0;
    while core.has_work() {
        for event in core.step() {
            match event {
                StepEvent::Token { key, event, .. } => outputs[key as usize][event.choice as usize].extend(event.tokens),
                StepEvent::Failed { message, .. } => panic!("request failed: {message}"),
                StepEvent::Started { .. } | StepEvent::KvReady { .. } => {}
            }
        }
        steps += 1;
        assert!(steps < 100_000, "engine did not finish");
    }
    outputs
}
