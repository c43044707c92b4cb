//! Teacher-forced logits of a token list on a device, written as raw little-endian f32
//! [len, vocab] (scripts/gpu/hf_compare.py compares them with transformers).
//!
//! usage: score MODEL_DIR TOKENS.json OUT.f32 [--cpu] [--chunk N]

use std::path::PathBuf;
use std::time::Instant;

use dlengine_cuda::{CudaBackend, CudaConfig};
use dlengine_engine::backend::cpu::CpuBackend;
use dlengine_engine::config::EngineConfig;
use dlengine_engine::engine_core::EngineCore;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        return Err("usage: score MODEL_DIR TOKENS.json OUT.f32 [--cpu] [--chunk N]".into());
    }
    let (model, tokens_path, out) = (PathBuf::from(&args[1]), &args[2], &args[3]);
    let tokens: Vec<u32> = serde_json::from_str(&std::fs::read_to_string(tokens_path)?)?;
    let chunk = args.iter().position(|a| a == "--chunk").and_then(|i| args.get(i + 1)).and_then(|c| c.parse().ok()).unwrap_or(tokens.len());
    let config = EngineConfig {
        num_kv_blocks: Some(tokens.len() / 16 + 64),
        max_model_len: Some(tokens.len() + 16),
        max_num_seqs: 8,
        max_num_batched_tokens: tokens.len().max(chunk),
        ..EngineConfig::default()
    };
    let started = Instant::now();
    let mut core = if args.iter().any(|a| a == "--cpu") {
        EngineCore::load(&model, &config, CpuBackend::new(1 << 30))?
    } else {
        let cuda = CudaConfig { ordinal: 0, gpu_memory_utilization: 0.9, enforce_eager: true, max_graph_batch_size: 0, kernel_cache_dir: Some(std::env::temp_dir().join("dlengine-kernels")) };
        EngineCore::load(&model, &config, CudaBackend::new(cuda)?)?
    };
    eprintln!("loaded {} in {:.1}s on {}", model.display(), started.elapsed().as_secs_f64(), core.info().device);
    let started = Instant::now();
    let logits = core.score(&tokens, chunk)?;
    eprintln!("scored {} tokens (chunk {chunk}) in {:.1} ms", tokens.len(), started.elapsed().as_secs_f64() * 1e3);
    let bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(out, bytes)?;
    Ok(())
}
