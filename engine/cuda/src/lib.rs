//! The CUDA backend of the dlengine engine, for NVIDIA GPUs (tuned on the H200).
//!
//! Owns: device memory (weights, activation pool, paged KV cache), our NVRTC-compiled
//! kernels (kernels/*.cu), cuBLAS matrix products, CUDA graphs of decode steps, device
//! sampling. Must not: know about models, scheduling or requests; everything it does is
//! an op of `dlengine_engine::backend::Backend`.
//!
//! CUDA libraries are loaded at run time, so this crate builds and its non-GPU tests run on
//! machines without CUDA; `probe` says whether a usable GPU is present.

mod attention;
mod backend;
mod bandwidth;
mod batch;
mod copy_kernels;
mod device;
mod error;
mod gemm;
mod graphs;
mod kernels;
mod kv_io;
mod kv_memory;
mod kv_progress;
mod kv_reader;
mod kv_writer;
mod launch;
mod memory;
mod peer_bandwidth;
mod peer_copy;
mod pinned_pool;
mod sampling;
mod side_stream;
mod tensor;
mod timing;

pub use backend::{CudaBackend, CudaConfig};
pub use bandwidth::copy_bandwidth_gbps;
pub use device::{probe, DeviceInfo};
pub use peer_bandwidth::{peer_copy_bandwidth, PeerCopyFigure};
pub use tensor::CudaTensor;
