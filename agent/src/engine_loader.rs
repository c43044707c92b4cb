//! Building an engine from flags: pick the device, size the engine, load the model.

use anyhow::{bail, Context};
use dlengine_cli::{Device, EngineArgs, ServeArgs};
use dlengine_engine::backend::cpu::CpuBackend;
use dlengine_engine::config::EngineConfig;
use dlengine_engine::engine::Engine;

/// The engine sizing the flags describe.
pub fn engine_config(args: &EngineArgs, max_waiting_requests: usize) -> EngineConfig {
    EngineConfig {
        max_model_len: args.max_model_len,
        max_num_seqs: args.max_num_seqs,
        max_num_batched_tokens: args.max_num_batched_tokens,
        block_size: args.kvcache_block_size,
        num_kv_blocks: args.num_kv_blocks,
        enable_prefix_caching: args.prefix_caching(),
        max_waiting_requests,
        seed: args.seed,
    }
}

/// Loads the model on the requested device (blocking).
pub fn load(model: &std::path::Path, args: &EngineArgs, max_waiting_requests: usize) -> anyhow::Result<Engine> {
    if args.tensor_parallel_size != 1 {
        bail!("--tensor-parallel-size {} is not supported yet: this build runs one device per engine", args.tensor_parallel_size);
    }
    let config = engine_config(args, max_waiting_requests);
    let engine = match args.device {
        Device::Cpu => start_cpu(model, args, config),
        Device::Auto => {
            tracing::info!("--device auto: no CUDA backend in this build, using the CPU");
            start_cpu(model, args, config)
        }
        Device::Cuda => bail!("--device cuda: this build has no CUDA backend"),
    };
    engine.with_context(|| format!("loading {}", model.display()))
}

fn start_cpu(model: &std::path::Path, args: &EngineArgs, config: EngineConfig) -> anyhow::Result<Engine> {
    let backend = CpuBackend::new(args.cpu_kv_cache_mib * 1024 * 1024);
    Ok(Engine::start(model, config, backend)?)
}

/// `dlengine serve`'s engine.
pub fn load_engine(args: &ServeArgs) -> anyhow::Result<Engine> {
    load(&args.model, &args.engine, args.max_waiting_requests)
}
