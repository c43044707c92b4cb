//! Building an engine from flags: pick the device, size the engine, load the model.

use anyhow::{bail, Context};
use dlengine_cli::{Device, EngineArgs, ServeArgs};
use dlengine_cuda::{CudaBackend, CudaConfig};
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
        ..EngineConfig::default()
    }
}

/// Loads the model on the requested device (blocking).
pub fn load(model: &std::path::Path, args: &EngineArgs, max_waiting_requests: usize) -> anyhow::Result<Engine> {
    load_with(model, args, engine_config(args, max_waiting_requests))
}

fn load_with(model: &std::path::Path, args: &EngineArgs, config: EngineConfig) -> anyhow::Result<Engine> {
    if args.gpu_memory_utilization <= 0.0 || args.gpu_memory_utilization > 1.0 {
        bail!("--gpu-memory-utilization must be in (0, 1], got {}", args.gpu_memory_utilization);
    }
    if args.tensor_parallel_size != 1 {
        bail!("--tensor-parallel-size {} is not supported yet: this build runs one device per engine", args.tensor_parallel_size);
    }
    let engine = match args.device {
        Device::Cpu => start_cpu(model, args, config),
        Device::Cuda => start_cuda(model, args, config),
        Device::Auto => match dlengine_cuda::probe() {
            Ok(gpu) => {
                tracing::info!(gpu = %gpu.name, "--device auto: using CUDA");
                start_cuda(model, args, config)
            }
            Err(why) => {
                tracing::info!(reason = %why, "--device auto: no usable GPU, using the CPU");
                start_cpu(model, args, config)
            }
        },
    };
    engine.with_context(|| format!("loading {}", model.display()))
}

fn start_cuda(model: &std::path::Path, args: &EngineArgs, config: EngineConfig) -> anyhow::Result<Engine> {
    let backend = CudaBackend::new(cuda_config(args)).context("--device cuda")?;
    Ok(Engine::start(model, config, backend)?)
}

/// The CUDA backend's settings from the engine flags.
pub fn cuda_config(args: &EngineArgs) -> CudaConfig {
    CudaConfig {
        ordinal: args.cuda_device,
        gpu_memory_utilization: args.gpu_memory_utilization,
        enforce_eager: args.enforce_eager,
        max_graph_batch_size: args.max_cuda_graph_batch_size,
        kernel_cache_dir: kernel_cache_dir(),
    }
}

/// Compiled kernels are cached under the user's cache directory.
fn kernel_cache_dir() -> Option<std::path::PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cache")))?;
    Some(base.join("dlengine").join("kernels"))
}

fn start_cpu(model: &std::path::Path, args: &EngineArgs, config: EngineConfig) -> anyhow::Result<Engine> {
    let backend = CpuBackend::new(args.cpu_kv_cache_mib * 1024 * 1024);
    Ok(Engine::start(model, config, backend)?)
}

/// `dlengine serve`'s engine.
pub fn load_engine(args: &ServeArgs) -> anyhow::Result<Engine> {
    let config = EngineConfig { kv_lease_secs: args.transfer.kv_lease_secs, ..engine_config(&args.engine, args.max_waiting_requests) };
    load_with(&args.model, &args.engine, config)
}
