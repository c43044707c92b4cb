//! The backend boundary: the op set every model is written against.
//!
//! A backend owns device memory (weights, activations, the paged KV cache) and runs the
//! ops below. Model code (crate::models) calls only these ops and never learns which
//! backend it runs on; the scheduler never sees tensors at all. The CPU backend is the
//! reference (f32 math); the CUDA backend (crate `dlengine-cuda`) stores bf16 and
//! accumulates in f32.
//!
//! Activations are 2-D, row-major, one row per token of the step. The attention input is
//! the packed `qkv` projection: each row holds `q_heads` query heads, then `kv_heads` key
//! heads, then `kv_heads` value heads, each `head_dim` wide ([`QkvLayout`]).

pub mod cpu;
mod host_tensor;
mod kv_block_io;
mod step_input;

pub use host_tensor::{DType, HostTensor};
pub use kv_block_io::KvBlockIo;
pub use step_input::StepInput;

use crate::error::BackendError;
use crate::sampler::{SampledToken, SamplingRow};

pub type Result<T> = std::result::Result<T, BackendError>;

/// Shape of the packed q/k/v projection of one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QkvLayout {
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl QkvLayout {
    pub fn width(&self) -> usize {
        (self.q_heads + 2 * self.kv_heads) * self.head_dim
    }
    pub fn q_width(&self) -> usize {
        self.q_heads * self.head_dim
    }
    pub fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

/// Geometry of the paged KV cache. Per layer the backend keeps K and V blocks of
/// `block_size` tokens x `kv_heads` x `head_dim`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KvCacheLayout {
    pub num_layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    pub dtype: DType,
}

impl KvCacheLayout {
    /// Bytes one block takes over all layers, K and V.
    pub fn bytes_per_block(&self) -> usize {
        2 * self.num_layers * self.block_size * self.kv_heads * self.head_dim * self.dtype.size_in_bytes()
    }
}

/// The largest step the engine will ever run, told to the backend before the first one so
/// it can allocate fixed input buffers (CUDA graphs need fixed addresses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepLimits {
    pub max_tokens: usize,
    pub max_seqs: usize,
    pub max_blocks_per_seq: usize,
    /// Most sampling rows in one step (`n > 1` fans one sequence out to n rows).
    pub max_sampling_rows: usize,
}

/// Device time spent on steps and between them (GPU backends).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct DeviceTimeReport {
    pub steps: u64,
    /// Time the device spent inside steps.
    pub busy_ms: f64,
    /// Time the device sat idle between the end of one step and the start of the next.
    pub idle_between_steps_ms: f64,
}

/// One step of work for a backend. Implementations may keep state (KV cache, workspaces,
/// captured graphs); ops take `&mut self` so no interior mutability is needed.
pub trait Backend: KvBlockIo + Send + 'static {
    /// A 2-D tensor living on the backend's device.
    type Tensor: Send;
    /// A step's batch metadata, uploaded once and read by several ops.
    type Batch: Send;

    /// Human-readable device description for logs.
    fn describe(&self) -> String;

    /// Storage dtype of the KV cache this backend uses.
    fn kv_dtype(&self) -> DType;

    /// Uploads a weight read from disk, converting to the backend's storage dtype.
    fn weight(&mut self, host: &HostTensor<'_>) -> Result<Self::Tensor>;

    /// Uploads a table kept in f32 whatever the storage dtype (e.g. RoPE cos/sin).
    fn f32_table(&mut self, data: &[f32], rows: usize, cols: usize) -> Result<Self::Tensor>;

    /// Told once, before any step.
    fn set_step_limits(&mut self, _limits: StepLimits) -> Result<()> {
        Ok(())
    }

    /// Whether memory planning needs one forward at the largest step before the KV cache
    /// is sized (to learn the activation peak).
    fn wants_profile_run(&self) -> bool {
        false
    }

    /// Bytes the KV cache may take, asked after weights are loaded and, if wanted, the
    /// profile run.
    fn kv_cache_budget_bytes(&mut self) -> Result<usize>;

    /// Allocates the KV cache (replacing any earlier one).
    fn allocate_kv_cache(&mut self, layout: KvCacheLayout, num_blocks: usize) -> Result<()>;

    /// Copies whole KV blocks (all layers): copy-on-write when `n > 1` samples fork.
    fn copy_kv_blocks(&mut self, pairs: &[(u32, u32)]) -> Result<()>;

    /// Uploads the step's metadata.
    fn prepare(&mut self, input: &StepInput) -> Result<Self::Batch>;

    /// Rows of `table` picked by the step's token ids.
    fn embedding(&mut self, table: &Self::Tensor, batch: &Self::Batch) -> Result<Self::Tensor>;

    /// RMSNorm of each row: x / sqrt(mean(x^2) + eps) * weight.
    fn rms_norm(&mut self, x: &Self::Tensor, weight: &Self::Tensor, eps: f32) -> Result<Self::Tensor>;

    /// `residual += x`, then returns RMSNorm(residual) (the fused pre-norm of the next block).
    fn add_rms_norm(
        &mut self,
        x: &Self::Tensor,
        residual: &mut Self::Tensor,
        weight: &Self::Tensor,
        eps: f32,
    ) -> Result<Self::Tensor>;

    /// `x · wᵀ` for x [n, k] and a weight in Hugging Face layout [m, k]: result [n, m].
    fn linear(&mut self, x: &Self::Tensor, weight: &Self::Tensor) -> Result<Self::Tensor>;

    /// In place, RMSNorm over each q head (with `q_weight`) and each k head (with
    /// `k_weight`) of the packed qkv rows (Qwen3's q/k norm).
    fn qk_norm(
        &mut self,
        qkv: &mut Self::Tensor,
        layout: QkvLayout,
        q_weight: &Self::Tensor,
        k_weight: &Self::Tensor,
        eps: f32,
    ) -> Result<()>;

    /// In place, rotary embedding (neox layout: the first and second halves of each head
    /// are the pairs) of the q and k heads, at the step's positions. `cos_sin` is an f32
    /// table [max_positions, head_dim]: cos in the first half of each row, sin in the second.
    fn rope(
        &mut self,
        qkv: &mut Self::Tensor,
        layout: QkvLayout,
        cos_sin: &Self::Tensor,
        batch: &Self::Batch,
    ) -> Result<()>;

    /// Writes the step's k and v heads into the paged cache of `layer` at the step's slots.
    fn write_kv(&mut self, qkv: &Self::Tensor, layout: QkvLayout, layer: usize, batch: &Self::Batch) -> Result<()>;

    /// Causal attention of the step's queries over the cached keys/values of their
    /// sequences (cached prefix plus the step's own tokens, already written): [n, q_width].
    fn attention(
        &mut self,
        qkv: &Self::Tensor,
        layout: QkvLayout,
        layer: usize,
        scale: f32,
        batch: &Self::Batch,
    ) -> Result<Self::Tensor>;

    /// One layer's attention preparation, in place: q/k RMSNorm when given (weights and
    /// eps), RoPE, then the k/v write into the cache. Backends may fuse the three.
    fn attention_prep(
        &mut self,
        qkv: &mut Self::Tensor,
        layout: QkvLayout,
        qk_norm: Option<(&Self::Tensor, &Self::Tensor, f32)>,
        cos_sin: &Self::Tensor,
        layer: usize,
        batch: &Self::Batch,
    ) -> Result<()> {
        if let Some((q_weight, k_weight, eps)) = qk_norm {
            self.qk_norm(qkv, layout, q_weight, k_weight, eps)?;
        }
        self.rope(qkv, layout, cos_sin, batch)?;
        self.write_kv(qkv, layout, layer, batch)
    }

    /// `residual += x`, then `linear(RMSNorm(residual), weight)`: the pre-norm in front of
    /// a projection. Backends may fuse the three.
    fn add_rms_norm_linear(
        &mut self,
        x: &Self::Tensor,
        residual: &mut Self::Tensor,
        norm: &Self::Tensor,
        eps: f32,
        weight: &Self::Tensor,
    ) -> Result<Self::Tensor> {
        let h = self.add_rms_norm(x, residual, norm, eps)?;
        self.linear(&h, weight)
    }

    /// silu(gate) * up, for x = [gate | up] of width 2i: result [n, i].
    fn silu_mul(&mut self, gate_up: &Self::Tensor) -> Result<Self::Tensor>;

    /// The rows of `x` whose logits the step needs (the batch's `logit_rows`).
    fn gather_logit_rows(&mut self, x: &Self::Tensor, batch: &Self::Batch) -> Result<Self::Tensor>;

    /// Samples one token per row description from `logits` [rows, vocab].
    fn sample(&mut self, logits: &Self::Tensor, rows: &[SamplingRow<'_>]) -> Result<Vec<SampledToken>>;

    /// Copies a tensor to the host as f32 (tests, teacher-forced logits).
    fn to_host(&mut self, x: &Self::Tensor) -> Result<Vec<f32>>;

    /// Batch sizes of pure-decode steps to capture as replayable graphs (none by default).
    fn graph_batch_sizes(&self) -> Vec<usize> {
        Vec::new()
    }

    /// Starts recording the ops that follow as the graph for `batch_size`.
    fn begin_capture(&mut self, _batch_size: usize) -> Result<()> {
        Err(BackendError::Unsupported("graph capture".into()))
    }

    /// Ends recording; the forward's `output` stays alive with the graph.
    fn end_capture(&mut self, _batch_size: usize, _output: Self::Tensor) -> Result<()> {
        Err(BackendError::Unsupported("graph capture".into()))
    }

    /// Replays the graph of `batch_size` (its inputs just prepared) and samples from it.
    fn replay_and_sample(&mut self, _batch_size: usize, _rows: &[SamplingRow<'_>]) -> Result<Vec<SampledToken>> {
        Err(BackendError::Unsupported("graph replay".into()))
    }

    /// Device busy and idle time so far, where the backend measures it.
    fn device_time(&mut self) -> Option<DeviceTimeReport> {
        None
    }
}
