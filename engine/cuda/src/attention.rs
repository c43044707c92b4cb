//! Dispatch of the attention kernels, specialised per model (head dim, GQA group, kv heads,
//! block size) at first use: flash-decoding for pure decode steps, the tensor-core prefill
//! kernel when any sequence brings several query rows.

use std::collections::HashMap;

use cudarc::driver::result;
use cudarc::driver::sys::{CUfunction, CUfunction_attribute, CUstream};
use dlengine_engine::backend::QkvLayout;

use crate::batch::CudaBatch;
use crate::error::{op_error, OpContext, Result};
use crate::kernels::{Compiler, ATTENTION};
use crate::launch::{launch, Arg, Launch};
use crate::memory::DeviceBuffer;

/// Keys per decode partition (PART in attention.cu).
const PARTITION: usize = 128;
/// Most splits of one sequence's context in flash-decoding.
pub const MAX_SPLITS: usize = 32;
const PREFILL_KEYS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Spec {
    head_dim: usize,
    group: usize,
    kv_heads: usize,
    block_size: usize,
}

struct Kernels {
    decode: CUfunction,
    reduce: CUfunction,
    prefill: CUfunction,
    prefill_smem: u32,
}

pub struct Attention {
    kernels: HashMap<Spec, Kernels>,
    /// Split partials: f32 [seqs, q_heads, MAX_SPLITS, head_dim] and [.., 2] (max, sum).
    partial_acc: Option<DeviceBuffer>,
    partial_ml: Option<DeviceBuffer>,
    max_seqs: usize,
    multiprocessors: usize,
}

// SAFETY: function handles are plain driver handles valid in our context.
unsafe impl Send for Attention {}

/// Splits per sequence: enough blocks to fill the GPU at small batch, never more than
/// the block table could need. Depends only on sizes fixed for a captured graph.
fn splits(batch: &CudaBatch, kv_heads: usize, multiprocessors: usize) -> usize {
    let capacity = batch.table_stride * batch.block_size;
    let for_occupancy = (2 * multiprocessors).div_ceil(batch.num_seqs.max(1) * kv_heads);
    for_occupancy.clamp(1, MAX_SPLITS).min(capacity.div_ceil(PARTITION).max(1))
}

impl Attention {
    pub fn new(max_seqs: usize, multiprocessors: usize) -> Self {
        Self { kernels: HashMap::new(), partial_acc: None, partial_ml: None, max_seqs, multiprocessors }
    }

    fn kernels(&mut self, compiler: &Compiler, spec: Spec, q_heads: usize) -> Result<&Kernels> {
        if !self.kernels.contains_key(&spec) {
            if spec.head_dim % 16 != 0 || spec.head_dim > 256 {
                return Err(op_error("attention", format!("head_dim {} is not supported (a multiple of 16 up to 256)", spec.head_dim)));
            }
            let module = compiler.load(
                ATTENTION,
                &[
                    ("HEAD_DIM", spec.head_dim.to_string()),
                    ("GROUP", spec.group.to_string()),
                    ("KV_HEADS", spec.kv_heads.to_string()),
                    ("BLOCK_SIZE", spec.block_size.to_string()),
                ],
            )?;
            let prefill = module.function("prefill_attention")?;
            let smem = ((PREFILL_KEYS * (spec.head_dim + 8) + spec.head_dim * (PREFILL_KEYS + 8)) * 2) as u32;
            // SAFETY: valid function handle; raising the dynamic shared memory limit.
            unsafe {
                result::function::set_function_attribute(
                    prefill,
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    smem as i32,
                )
            }
            .op("prefill shared memory limit")?;
            let k = Kernels { decode: module.function("decode_attention")?, reduce: module.function("decode_reduce")?, prefill, prefill_smem: smem };
            self.kernels.insert(spec, k);
            let floats = self.max_seqs * q_heads * MAX_SPLITS * spec.head_dim;
            self.partial_acc = Some(DeviceBuffer::new(floats * 4)?);
            self.partial_ml = Some(DeviceBuffer::new(self.max_seqs * q_heads * MAX_SPLITS * 2 * 4)?);
        }
        Ok(&self.kernels[&spec])
    }

    /// out[rows, q_heads * head_dim] = attention of the batch's queries over the cache.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &mut self,
        compiler: &Compiler,
        stream: CUstream,
        layout: QkvLayout,
        qkv: u64,
        k_cache: u64,
        v_cache: u64,
        scale: f32,
        batch: &CudaBatch,
        out: u64,
    ) -> Result<()> {
        let spec = Spec {
            head_dim: layout.head_dim,
            group: layout.q_heads / layout.kv_heads,
            kv_heads: layout.kv_heads,
            block_size: batch.block_size,
        };
        let multiprocessors = self.multiprocessors;
        let k = self.kernels(compiler, spec, layout.q_heads)?;
        let (decode, reduce, prefill, smem) = (k.decode, k.reduce, k.prefill, k.prefill_smem);
        if batch.is_decode_only() {
            let splits = splits(batch, layout.kv_heads, multiprocessors);
            let acc = self.partial_acc.as_ref().map_or(0, DeviceBuffer::ptr);
            let ml = self.partial_ml.as_ref().map_or(0, DeviceBuffer::ptr);
            let grid = (batch.num_seqs as u32, layout.kv_heads as u32, splits as u32);
            launch(
                "decode_attention",
                decode,
                stream,
                &Launch::new(grid, 128),
                vec![
                    Arg::Ptr(qkv),
                    Arg::Ptr(k_cache),
                    Arg::Ptr(v_cache),
                    Arg::Ptr(batch.query_start),
                    Arg::Ptr(batch.context_lens),
                    Arg::Ptr(batch.block_tables),
                    Arg::I32(batch.table_stride as i32),
                    Arg::F32(scale),
                    Arg::Ptr(acc),
                    Arg::Ptr(ml),
                ],
            )?;
            let grid = (batch.num_seqs as u32, layout.q_heads as u32, 1);
            return launch(
                "decode_reduce",
                reduce,
                stream,
                &Launch::new(grid, layout.head_dim as u32),
                vec![Arg::Ptr(acc), Arg::Ptr(ml), Arg::Ptr(batch.query_start), Arg::I32(splits as i32), Arg::Ptr(out)],
            );
        }
        let mut cfg = Launch::new((batch.num_items as u32, layout.q_heads as u32, 1), 128);
        cfg.shared_bytes = smem;
        launch(
            "prefill_attention",
            prefill,
            stream,
            &cfg,
            vec![
                Arg::Ptr(qkv),
                Arg::Ptr(k_cache),
                Arg::Ptr(v_cache),
                Arg::Ptr(batch.query_start),
                Arg::Ptr(batch.positions),
                Arg::Ptr(batch.block_tables),
                Arg::I32(batch.table_stride as i32),
                Arg::Ptr(batch.items),
                Arg::F32(scale),
                Arg::Ptr(out),
            ],
        )
    }
}
