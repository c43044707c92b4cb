//! `CudaBackend`: the engine's op set on one NVIDIA GPU. Weights and activations are
//! bf16, accumulation is f32, RoPE tables are f32; matrix products go through cuBLAS or
//! our GEMV; everything else is our kernels.

use std::path::PathBuf;
use std::sync::Arc;

use cudarc::driver::result;
use cudarc::driver::sys::{CUdeviceptr, CUfunction};
use dlengine_engine::backend::{
    Backend, DType, DeviceTimeReport, HostTensor, KvCacheLayout, QkvLayout, StepInput, StepLimits,
};
use dlengine_engine::sampler::{SampledToken, SamplingRow};

use crate::attention::Attention;
use crate::batch::{CudaBatch, StepBuffers};
use crate::device::Device;
use crate::error::{op_error, OpContext, Result};
use crate::gemm::Gemm;
use crate::graphs::{ladder, Graphs};
use crate::kv_io::KvIo;
use crate::kernels::{Compiler, Module, ELEMENTWISE, GEMV, KV_CACHE, KV_TRANSFER, SAMPLING};
use crate::launch::{launch, Arg, Launch};
use crate::memory::{DeviceBuffer, Pool};
use crate::sampling::Sampler;
use crate::tensor::{CudaTensor, Storage};
use crate::timing::StepTimer;

/// Memory kept free beyond the KV cache for graphs, library workspaces and fragmentation.
const RESERVE_BYTES: usize = 1 << 30;

#[derive(Debug, Clone)]
pub struct CudaConfig {
    pub ordinal: usize,
    /// Fraction of the card for weights, activations and KV cache.
    pub gpu_memory_utilization: f64,
    /// No CUDA graphs.
    pub enforce_eager: bool,
    pub max_graph_batch_size: usize,
    /// Where compiled kernels are cached (None: no cache).
    pub kernel_cache_dir: Option<PathBuf>,
}

struct ElementwiseKernels {
    embedding: CUfunction,
    gather_rows: CUfunction,
    rms_norm: CUfunction,
    add_rms_norm: CUfunction,
    qk_norm: CUfunction,
    rope: CUfunction,
    silu_mul: CUfunction,
    write_kv: CUfunction,
    attention_prep: CUfunction,
}

impl ElementwiseKernels {
    fn new(elementwise: &Module, kv: &Module) -> Result<Self> {
        Ok(Self {
            embedding: elementwise.function("embedding")?,
            gather_rows: elementwise.function("gather_rows")?,
            rms_norm: elementwise.function("rms_norm")?,
            add_rms_norm: elementwise.function("add_rms_norm")?,
            qk_norm: elementwise.function("qk_norm")?,
            rope: elementwise.function("rope")?,
            silu_mul: elementwise.function("silu_mul")?,
            write_kv: kv.function("write_kv")?,
            attention_prep: kv.function("attention_prep")?,
        })
    }
}

pub(crate) struct KvCache {
    pub(crate) layout: KvCacheLayout,
    /// Per layer (K, V).
    pub(crate) layers: Vec<(DeviceBuffer, DeviceBuffer)>,
}

impl KvCache {
    /// Bytes of one block of one layer's K (or V).
    pub(crate) fn block_bytes(&self) -> usize {
        let l = self.layout;
        l.block_size * l.kv_heads * l.head_dim * l.dtype.size_in_bytes()
    }

    /// The (K, V) base of every layer.
    pub(crate) fn buffers(&self) -> Vec<(CUdeviceptr, CUdeviceptr)> {
        self.layers.iter().map(|(k, v)| (k.ptr(), v.ptr())).collect()
    }
}

pub struct CudaBackend {
    config: CudaConfig,
    /// KV block I/O state (peer caches mapped over CUDA IPC, staging); declared before
    /// `device` so it is released while the context still exists.
    pub(crate) kv_io: KvIo,
    pub(crate) device: Device,
    compiler: Compiler,
    k: ElementwiseKernels,
    gemm: Gemm,
    sampler: Sampler,
    attention: Option<Attention>,
    pool: Pool,
    steps: Option<StepBuffers>,
    limits: Option<StepLimits>,
    /// Shared with the reader of its blocks off the engine thread ([`crate::kv_reader`]).
    kv: Option<Arc<KvCache>>,
    graphs: Graphs,
    timer: StepTimer,
    weight_bytes: usize,
}

// SAFETY: all driver handles inside are used only with the context bound to the calling
// thread (`Device::bind` at every entry point that can start on a new thread).
unsafe impl Send for CudaBackend {}

/// Threads for a row-wise kernel over `cols` columns.
fn row_threads(cols: usize) -> u32 {
    (cols.div_ceil(4).next_multiple_of(32)).clamp(32, 1024) as u32
}

impl CudaBackend {
    /// After a layer's KV writes: its progress mark, if this forward publishes one.
    fn layer_written(&self, layer: usize) -> Result<()> {
        if self.graphs.is_capturing() {
            return Ok(());
        }
        self.kv_io.progress.layers_written(self.device.stream, layer, 1)
    }

    /// Opens the GPU and compiles (or loads cached) kernels. Fails with
    /// `BackendError::Unavailable` when CUDA libraries or a GPU are missing.
    pub fn new(config: CudaConfig) -> Result<Self> {
        let device = Device::open(config.ordinal)?;
        let compiler = Compiler::new(device.arch(), config.kernel_cache_dir.clone());
        let elementwise = compiler.load(ELEMENTWISE, &[])?;
        let kv = compiler.load(KV_CACHE, &[])?;
        let gemv = compiler.load(GEMV, &[])?;
        let sampling = compiler.load(SAMPLING, &[])?;
        let kv_io = KvIo::new(&compiler.load(KV_TRANSFER, &[])?)?;
        let k = ElementwiseKernels::new(&elementwise, &kv)?;
        let gemm = Gemm::new(device.stream, &gemv, device.info.multiprocessors)?;
        let sampler =
            Sampler::new(sampling.function("sample")?, sampling.function("logprobs")?, sampling.function("adjust_logits")?)?;
        Ok(Self {
            config,
            compiler,
            k,
            gemm,
            sampler,
            attention: None,
            pool: Pool::new(),
            steps: None,
            limits: None,
            kv: None,
            graphs: Graphs::default(),
            timer: StepTimer::new()?,
            weight_bytes: 0,
            kv_io,
            device,
        })
    }

    fn alloc(&self, rows: usize, cols: usize) -> Result<CudaTensor> {
        let lease = self.pool.alloc(rows * cols * 2)?;
        Ok(CudaTensor::new(Storage::Pooled(lease), rows, cols, DType::BF16))
    }

    fn upload_owned(&mut self, bytes: &[u8], rows: usize, cols: usize, dtype: DType) -> Result<CudaTensor> {
        self.device.bind()?;
        let buf = DeviceBuffer::new(bytes.len())?;
        // SAFETY: the buffer holds bytes.len() bytes.
        unsafe { result::memcpy_htod_sync(buf.ptr(), bytes) }.op("uploading a weight")?;
        self.weight_bytes += bytes.len();
        Ok(CudaTensor::new(Storage::Owned(Arc::new(buf)), rows, cols, dtype))
    }

    fn stream(&self) -> cudarc::driver::sys::CUstream {
        self.device.stream
    }

    pub(crate) fn kv_cache(&self, op: &'static str) -> Result<&KvCache> {
        self.kv.as_deref().ok_or_else(|| op_error(op, "the KV cache is not allocated"))
    }

    pub(crate) fn shared_kv_cache(&self, op: &'static str) -> Result<Arc<KvCache>> {
        self.kv.clone().ok_or_else(|| op_error(op, "the KV cache is not allocated"))
    }

    fn kv_layer(&self, layer: usize, op: &'static str) -> Result<(u64, u64)> {
        let kv = self.kv_cache(op)?;
        let (k, v) = kv.layers.get(layer).ok_or_else(|| op_error(op, format!("no KV cache for layer {layer}")))?;
        Ok((k.ptr(), v.ptr()))
    }

    fn expect_bf16(op: &'static str, t: &CudaTensor, cols: usize) -> Result<()> {
        if t.dtype != DType::BF16 || t.cols != cols {
            return Err(op_error(op, format!("expected a bf16 tensor with {cols} columns, got {:?} with {}", t.dtype, t.cols)));
        }
        Ok(())
    }
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;
    type Batch = CudaBatch;

    fn describe(&self) -> String {
        let i = &self.device.info;
        format!(
            "cuda:{} {} (sm_{}{}, {} SMs, {:.0} GiB)",
            self.config.ordinal,
            i.name,
            i.compute_capability.0,
            i.compute_capability.1,
            i.multiprocessors,
            i.total_memory as f64 / (1u64 << 30) as f64
        )
    }

    fn kv_dtype(&self) -> DType {
        DType::BF16
    }

    fn weight(&mut self, host: &HostTensor<'_>) -> Result<CudaTensor> {
        let (rows, cols) = host.rows_cols();
        let data = host.to_bf16();
        // SAFETY: bf16 is two plain bytes.
        let bytes = unsafe { std::slice::from_raw_parts(data.as_ptr() as *const u8, data.len() * 2) };
        self.upload_owned(bytes, rows, cols, DType::BF16)
    }

    fn f32_table(&mut self, data: &[f32], rows: usize, cols: usize) -> Result<CudaTensor> {
        // SAFETY: f32 is four plain bytes.
        let bytes = unsafe { std::slice::from_raw_parts(data.as_ptr() as *const u8, data.len() * 4) };
        self.upload_owned(bytes, rows, cols, DType::F32)
    }

    fn set_step_limits(&mut self, limits: StepLimits) -> Result<()> {
        self.device.bind()?;
        self.steps = Some(StepBuffers::new(&limits)?);
        self.attention = Some(Attention::new(limits.max_seqs, self.device.info.multiprocessors));
        self.limits = Some(limits);
        Ok(())
    }

    fn wants_profile_run(&self) -> bool {
        true
    }

    fn kv_cache_budget_bytes(&mut self) -> Result<usize> {
        self.device.bind()?;
        self.device.synchronize()?;
        self.kv = None; // the profile run's cache is not part of the budget
        let (free, total) = result::mem_get_info().op("memory info")?;
        let used = total - free;
        let allowed = (total as f64 * self.config.gpu_memory_utilization) as usize;
        let budget = allowed.saturating_sub(used + RESERVE_BYTES);
        tracing::info!(
            total_gib = total as f64 / (1u64 << 30) as f64,
            weights_gib = self.weight_bytes as f64 / (1u64 << 30) as f64,
            activations_gib = self.pool.reserved_bytes() as f64 / (1u64 << 30) as f64,
            kv_budget_gib = budget as f64 / (1u64 << 30) as f64,
            "memory plan"
        );
        Ok(budget)
    }

    fn allocate_kv_cache(&mut self, layout: KvCacheLayout, num_blocks: usize) -> Result<()> {
        self.device.bind()?;
        self.kv = None;
        let per_layer = num_blocks * layout.block_size * layout.kv_heads * layout.head_dim * 2;
        let layers = (0..layout.num_layers)
            .map(|_| Ok((DeviceBuffer::new(per_layer)?, DeviceBuffer::new(per_layer)?)))
            .collect::<Result<Vec<_>>>()?;
        self.kv = Some(Arc::new(KvCache { layout, layers }));
        Ok(())
    }

    fn copy_kv_blocks(&mut self, pairs: &[(u32, u32)]) -> Result<()> {
        self.device.bind()?;
        let kv = self.kv_cache("copy_kv_blocks")?;
        let l = kv.layout;
        let block_bytes = l.block_size * l.kv_heads * l.head_dim * 2;
        for (k, v) in &kv.layers {
            for &(src, dst) in pairs {
                for base in [k.ptr(), v.ptr()] {
                    let (s, d) = (base + src as u64 * block_bytes as u64, base + dst as u64 * block_bytes as u64);
                    // SAFETY: both blocks lie inside the layer's buffer.
                    unsafe { result::memcpy_dtod_async(d, s, block_bytes, self.device.stream) }.op("copying KV blocks")?;
                }
            }
        }
        Ok(())
    }

    fn prepare(&mut self, input: &StepInput) -> Result<CudaBatch> {
        self.device.bind()?;
        let stream = self.device.stream;
        let steps = self.steps.as_mut().ok_or_else(|| op_error("prepare", "step limits were not set"))?;
        let batch = steps.upload(stream, input)?;
        if !self.graphs.is_capturing() {
            self.timer.step_started(stream)?;
            self.kv_io.progress.step_started();
        }
        Ok(batch)
    }

    fn embedding(&mut self, table: &CudaTensor, batch: &CudaBatch) -> Result<CudaTensor> {
        let out = self.alloc(batch.num_tokens, table.cols)?;
        let cfg = Launch::new((batch.num_tokens as u32, 1, 1), row_threads(table.cols));
        launch("embedding", self.k.embedding, self.stream(), &cfg, vec![Arg::Ptr(table.ptr), Arg::Ptr(batch.token_ids), Arg::Ptr(out.ptr), Arg::I32(table.cols as i32)])?;
        Ok(out)
    }

    fn rms_norm(&mut self, x: &CudaTensor, weight: &CudaTensor, eps: f32) -> Result<CudaTensor> {
        Self::expect_bf16("rms_norm", x, weight.cols)?;
        let out = self.alloc(x.rows, x.cols)?;
        let cfg = Launch::new((x.rows as u32, 1, 1), row_threads(x.cols));
        launch("rms_norm", self.k.rms_norm, self.stream(), &cfg, vec![Arg::Ptr(x.ptr), Arg::Ptr(weight.ptr), Arg::Ptr(out.ptr), Arg::I32(x.cols as i32), Arg::F32(eps)])?;
        Ok(out)
    }

    fn add_rms_norm(&mut self, x: &CudaTensor, residual: &mut CudaTensor, weight: &CudaTensor, eps: f32) -> Result<CudaTensor> {
        Self::expect_bf16("add_rms_norm", x, residual.cols)?;
        let out = self.alloc(x.rows, x.cols)?;
        let cfg = Launch::new((x.rows as u32, 1, 1), row_threads(x.cols));
        let args = vec![Arg::Ptr(x.ptr), Arg::Ptr(residual.ptr), Arg::Ptr(weight.ptr), Arg::Ptr(out.ptr), Arg::I32(x.cols as i32), Arg::F32(eps)];
        launch("add_rms_norm", self.k.add_rms_norm, self.stream(), &cfg, args)?;
        Ok(out)
    }

    fn add_rms_norm_linear(
        &mut self,
        x: &CudaTensor,
        residual: &mut CudaTensor,
        norm: &CudaTensor,
        eps: f32,
        weight: &CudaTensor,
    ) -> Result<CudaTensor> {
        Self::expect_bf16("add_rms_norm_linear", x, residual.cols)?;
        if !Gemm::gemv_fits(x.rows, x.cols) {
            let h = self.add_rms_norm(x, residual, norm, eps)?;
            return self.linear(&h, weight);
        }
        Self::expect_bf16("add_rms_norm_linear", weight, x.cols)?;
        let new_residual = self.alloc(x.rows, x.cols)?;
        let out = self.alloc(x.rows, weight.rows)?;
        let dims = (x.rows, x.cols, weight.rows);
        self.gemm.add_rms_linear(self.stream(), x.ptr, residual.ptr, new_residual.ptr, norm.ptr, eps, weight.ptr, out.ptr, dims)?;
        *residual = new_residual;
        Ok(out)
    }

    fn linear(&mut self, x: &CudaTensor, weight: &CudaTensor) -> Result<CudaTensor> {
        Self::expect_bf16("linear", x, weight.cols)?;
        let out = self.alloc(x.rows, weight.rows)?;
        self.gemm.linear(self.stream(), x.ptr, weight.ptr, out.ptr, x.rows, x.cols, weight.rows)?;
        Ok(out)
    }

    fn qk_norm(&mut self, qkv: &mut CudaTensor, layout: QkvLayout, q_weight: &CudaTensor, k_weight: &CudaTensor, eps: f32) -> Result<()> {
        Self::expect_bf16("qk_norm", qkv, layout.width())?;
        let cfg = Launch::new((qkv.rows as u32, (layout.q_heads + layout.kv_heads) as u32, 1), 32);
        let args = vec![
            Arg::Ptr(qkv.ptr),
            Arg::Ptr(q_weight.ptr),
            Arg::Ptr(k_weight.ptr),
            Arg::I32(layout.q_heads as i32),
            Arg::I32(layout.kv_heads as i32),
            Arg::I32(layout.head_dim as i32),
            Arg::F32(eps),
        ];
        launch("qk_norm", self.k.qk_norm, self.stream(), &cfg, args)
    }

    fn rope(&mut self, qkv: &mut CudaTensor, layout: QkvLayout, cos_sin: &CudaTensor, batch: &CudaBatch) -> Result<()> {
        Self::expect_bf16("rope", qkv, layout.width())?;
        let cfg = Launch::new((qkv.rows as u32, (layout.q_heads + layout.kv_heads) as u32, 1), (layout.head_dim / 2) as u32);
        let args = vec![
            Arg::Ptr(qkv.ptr),
            Arg::Ptr(batch.positions),
            Arg::Ptr(cos_sin.ptr),
            Arg::I32(layout.q_heads as i32),
            Arg::I32(layout.kv_heads as i32),
            Arg::I32(layout.head_dim as i32),
        ];
        launch("rope", self.k.rope, self.stream(), &cfg, args)
    }

    fn write_kv(&mut self, qkv: &CudaTensor, layout: QkvLayout, layer: usize, batch: &CudaBatch) -> Result<()> {
        Self::expect_bf16("write_kv", qkv, layout.width())?;
        let (k, v) = self.kv_layer(layer, "write_kv")?;
        let cfg = Launch::new((qkv.rows as u32, layout.kv_heads as u32, 1), layout.head_dim.min(128) as u32);
        let args = vec![
            Arg::Ptr(qkv.ptr),
            Arg::Ptr(batch.slot_mapping),
            Arg::Ptr(k),
            Arg::Ptr(v),
            Arg::I32(layout.q_heads as i32),
            Arg::I32(layout.kv_heads as i32),
            Arg::I32(layout.head_dim as i32),
            Arg::I32(batch.block_size as i32),
        ];
        launch("write_kv", self.k.write_kv, self.stream(), &cfg, args)?;
        self.layer_written(layer)
    }

    fn attention(&mut self, qkv: &CudaTensor, layout: QkvLayout, layer: usize, scale: f32, batch: &CudaBatch) -> Result<CudaTensor> {
        Self::expect_bf16("attention", qkv, layout.width())?;
        let (k, v) = self.kv_layer(layer, "attention")?;
        let out = self.alloc(qkv.rows, layout.q_width())?;
        let stream = self.device.stream;
        let attention = self.attention.as_mut().ok_or_else(|| op_error("attention", "step limits were not set"))?;
        attention.run(&self.compiler, stream, layout, qkv.ptr, k, v, scale, batch, out.ptr)?;
        Ok(out)
    }

    fn attention_prep(
        &mut self,
        qkv: &mut CudaTensor,
        layout: QkvLayout,
        qk_norm: Option<(&CudaTensor, &CudaTensor, f32)>,
        cos_sin: &CudaTensor,
        layer: usize,
        batch: &CudaBatch,
    ) -> Result<()> {
        Self::expect_bf16("attention_prep", qkv, layout.width())?;
        let (k, v) = self.kv_layer(layer, "attention_prep")?;
        let (q_w, k_w, eps) = qk_norm.map_or((0, 0, 0.0), |(q, k, eps)| (q.ptr, k.ptr, eps));
        let heads = layout.q_heads + 2 * layout.kv_heads;
        let threads = (layout.head_dim / 2).next_multiple_of(32) as u32;
        let cfg = Launch::new((qkv.rows as u32, heads as u32, 1), threads);
        let args = vec![
            Arg::Ptr(qkv.ptr),
            Arg::Ptr(batch.positions),
            Arg::Ptr(batch.slot_mapping),
            Arg::Ptr(cos_sin.ptr),
            Arg::Ptr(q_w),
            Arg::Ptr(k_w),
            Arg::F32(eps),
            Arg::Ptr(k),
            Arg::Ptr(v),
            Arg::I32(layout.q_heads as i32),
            Arg::I32(layout.kv_heads as i32),
            Arg::I32(layout.head_dim as i32),
            Arg::I32(batch.block_size as i32),
        ];
        launch("attention_prep", self.k.attention_prep, self.stream(), &cfg, args)?;
        self.layer_written(layer)
    }

    fn silu_mul(&mut self, gate_up: &CudaTensor) -> Result<CudaTensor> {
        let inter = gate_up.cols / 2;
        let out = self.alloc(gate_up.rows, inter)?;
        let cfg = Launch::new((gate_up.rows as u32, inter.div_ceil(256) as u32, 1), 256);
        launch("silu_mul", self.k.silu_mul, self.stream(), &cfg, vec![Arg::Ptr(gate_up.ptr), Arg::Ptr(out.ptr), Arg::I32(inter as i32)])?;
        Ok(out)
    }

    fn gather_logit_rows(&mut self, x: &CudaTensor, batch: &CudaBatch) -> Result<CudaTensor> {
        let out = self.alloc(batch.num_logit_rows, x.cols)?;
        let cfg = Launch::new((batch.num_logit_rows as u32, 1, 1), row_threads(x.cols));
        launch("gather_rows", self.k.gather_rows, self.stream(), &cfg, vec![Arg::Ptr(x.ptr), Arg::Ptr(batch.logit_rows), Arg::Ptr(out.ptr), Arg::I32(x.cols as i32)])?;
        Ok(out)
    }

    fn sample(&mut self, logits: &CudaTensor, rows: &[SamplingRow<'_>]) -> Result<Vec<SampledToken>> {
        let stream = self.device.stream;
        let out = self.sampler.sample(&self.pool, stream, logits, rows)?;
        self.timer.step_finished(stream)?;
        Ok(out)
    }

    fn to_host(&mut self, x: &CudaTensor) -> Result<Vec<f32>> {
        self.device.synchronize()?;
        let mut bytes = vec![0u8; x.bytes()];
        // SAFETY: the tensor holds x.bytes() bytes; the stream is idle.
        unsafe { result::memcpy_dtoh_sync(&mut bytes, x.ptr) }.op("copying to the host")?;
        self.timer.step_finished(self.device.stream)?;
        Ok(match x.dtype {
            DType::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            DType::BF16 => bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            DType::F16 => bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        })
    }

    fn graph_batch_sizes(&self) -> Vec<usize> {
        if self.config.enforce_eager {
            return Vec::new();
        }
        let limits = self.limits.map_or(0, |l| l.max_seqs.min(l.max_tokens));
        ladder(self.config.max_graph_batch_size.min(limits))
    }

    fn begin_capture(&mut self, batch_size: usize) -> Result<()> {
        self.device.synchronize()?;
        self.graphs.begin(self.device.stream, batch_size)
    }

    fn end_capture(&mut self, batch_size: usize, output: CudaTensor) -> Result<()> {
        self.graphs.end(self.device.stream, batch_size, output)
    }

    fn replay_and_sample(&mut self, batch_size: usize, rows: &[SamplingRow<'_>]) -> Result<Vec<SampledToken>> {
        let stream = self.device.stream;
        let logits = self.graphs.replay(stream, batch_size)?;
        let num_layers = self.kv.as_ref().map_or(0, |kv| kv.layout.num_layers);
        self.kv_io.progress.layers_written(stream, 0, num_layers)?;
        let out = self.sampler.sample(&self.pool, stream, logits, rows)?;
        self.timer.step_finished(stream)?;
        Ok(out)
    }

    fn device_time(&mut self) -> Option<DeviceTimeReport> {
        Some(self.timer.report())
    }
}
