//! The CPU backend: the numerical reference. Everything is f32; matrix products go
//! through the `gemm` crate (pure Rust, runtime-dispatched SIMD, multi-threaded via
//! rayon; the kernels candle uses), the rest is plain loops, parallel where worth it.

mod attention;
mod kv_cache;
mod ops;

use std::ops::Range;

use crate::backend::{Backend, DType, HostTensor, KvBlockIo, KvCacheLayout, QkvLayout, Result, StepInput};
use crate::error::BackendError;
use crate::kv_transfer::{KvLocation, KvMemory, KvRegion};
use crate::sampler::{sample_host, SampledToken, SamplingRow};

use kv_cache::CpuKvCache;

/// A row-major f32 matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuTensor {
    pub data: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
}

impl CpuTensor {
    pub fn new(data: Vec<f32>, rows: usize, cols: usize) -> Self {
        debug_assert_eq!(data.len(), rows * cols);
        Self { data, rows, cols }
    }
    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
}

pub struct CpuBackend {
    kv_budget_bytes: usize,
    kv: Option<CpuKvCache>,
}

impl CpuBackend {
    /// `kv_budget_bytes`: how much memory the KV cache may take.
    pub fn new(kv_budget_bytes: usize) -> Self {
        Self { kv_budget_bytes, kv: None }
    }

    fn kv(&mut self, op: &'static str) -> Result<&mut CpuKvCache> {
        self.kv.as_mut().ok_or(BackendError::Op { op, message: "the KV cache is not allocated".into() })
    }
}

fn check_cols(op: &'static str, t: &CpuTensor, cols: usize) -> Result<()> {
    if t.cols == cols {
        Ok(())
    } else {
        Err(BackendError::Op { op, message: format!("expected {cols} columns, got {}", t.cols) })
    }
}

impl KvBlockIo for CpuBackend {
    fn read_kv_blocks(&mut self, blocks: &[u32], layers: Range<usize>) -> Result<Vec<u8>> {
        Ok(self.kv("read_kv_blocks")?.read_blocks(blocks, layers))
    }

    fn write_kv_blocks(&mut self, blocks: &[u32], layers: Range<usize>, bytes: &[u8]) -> Result<()> {
        let op = "write_kv_blocks";
        self.kv(op)?.write_blocks(blocks, layers, bytes).map_err(|message| BackendError::Op { op, message })
    }

    fn kv_memory(&mut self, _dmabuf: bool) -> Result<Option<KvMemory>> {
        let regions = self.kv("kv_memory")?.regions().into_iter().map(|(addr, len)| KvRegion { addr, len, dmabuf: None }).collect();
        Ok(Some(KvMemory { regions, progress: None, location: KvLocation::Host }))
    }
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type Batch = StepInput;

    fn describe(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn kv_dtype(&self) -> DType {
        DType::F32
    }

    fn weight(&mut self, host: &HostTensor<'_>) -> Result<CpuTensor> {
        let (rows, cols) = host.rows_cols();
        Ok(CpuTensor::new(host.to_f32(), rows, cols))
    }

    fn f32_table(&mut self, data: &[f32], rows: usize, cols: usize) -> Result<CpuTensor> {
        Ok(CpuTensor::new(data.to_vec(), rows, cols))
    }

    fn kv_cache_budget_bytes(&mut self) -> Result<usize> {
        Ok(self.kv_budget_bytes)
    }

    fn allocate_kv_cache(&mut self, layout: KvCacheLayout, num_blocks: usize) -> Result<()> {
        self.kv = Some(CpuKvCache::new(layout, num_blocks));
        Ok(())
    }

    fn copy_kv_blocks(&mut self, pairs: &[(u32, u32)]) -> Result<()> {
        let kv = self.kv("copy_kv_blocks")?;
        for &(src, dst) in pairs {
            kv.copy_block(src as usize, dst as usize);
        }
        Ok(())
    }

    fn prepare(&mut self, input: &StepInput) -> Result<StepInput> {
        Ok(input.clone())
    }

    fn embedding(&mut self, table: &CpuTensor, batch: &StepInput) -> Result<CpuTensor> {
        ops::embedding(table, &batch.token_ids)
    }

    fn rms_norm(&mut self, x: &CpuTensor, weight: &CpuTensor, eps: f32) -> Result<CpuTensor> {
        check_cols("rms_norm", x, weight.cols)?;
        let mut out = x.clone();
        ops::rms_norm_rows(&mut out.data, x.cols, &weight.data, eps);
        Ok(out)
    }

    fn add_rms_norm(&mut self, x: &CpuTensor, residual: &mut CpuTensor, weight: &CpuTensor, eps: f32) -> Result<CpuTensor> {
        check_cols("add_rms_norm", x, residual.cols)?;
        residual.data.iter_mut().zip(&x.data).for_each(|(r, v)| *r += v);
        self.rms_norm(residual, weight, eps)
    }

    fn linear(&mut self, x: &CpuTensor, weight: &CpuTensor) -> Result<CpuTensor> {
        check_cols("linear", x, weight.cols)?;
        Ok(ops::matmul_transposed(x, weight))
    }

    fn qk_norm(&mut self, qkv: &mut CpuTensor, layout: QkvLayout, q_weight: &CpuTensor, k_weight: &CpuTensor, eps: f32) -> Result<()> {
        check_cols("qk_norm", qkv, layout.width())?;
        let d = layout.head_dim;
        for row in qkv.data.chunks_mut(layout.width()) {
            let (q, rest) = row.split_at_mut(layout.q_width());
            ops::rms_norm_rows(q, d, &q_weight.data, eps);
            ops::rms_norm_rows(&mut rest[..layout.kv_width()], d, &k_weight.data, eps);
        }
        Ok(())
    }

    fn rope(&mut self, qkv: &mut CpuTensor, layout: QkvLayout, cos_sin: &CpuTensor, batch: &StepInput) -> Result<()> {
        check_cols("rope", qkv, layout.width())?;
        let heads = layout.q_heads + layout.kv_heads;
        for (row, &pos) in qkv.data.chunks_mut(layout.width()).zip(&batch.positions) {
            let table = cos_sin.row(pos as usize);
            for head in row[..heads * layout.head_dim].chunks_mut(layout.head_dim) {
                ops::rotate_neox(head, table);
            }
        }
        Ok(())
    }

    fn write_kv(&mut self, qkv: &CpuTensor, layout: QkvLayout, layer: usize, batch: &StepInput) -> Result<()> {
        check_cols("write_kv", qkv, layout.width())?;
        let kv = self.kv("write_kv")?;
        for (row, &slot) in qkv.data.chunks(layout.width()).zip(&batch.slot_mapping) {
            let k = &row[layout.q_width()..layout.q_width() + layout.kv_width()];
            let v = &row[layout.q_width() + layout.kv_width()..];
            kv.write(layer, slot as usize, k, v);
        }
        Ok(())
    }

    fn attention(&mut self, qkv: &CpuTensor, layout: QkvLayout, layer: usize, scale: f32, batch: &StepInput) -> Result<CpuTensor> {
        check_cols("attention", qkv, layout.width())?;
        let kv = self.kv("attention")?;
        Ok(attention::paged_attention(qkv, layout, kv, layer, scale, batch))
    }

    fn silu_mul(&mut self, gate_up: &CpuTensor) -> Result<CpuTensor> {
        Ok(ops::silu_mul(gate_up))
    }

    fn gather_logit_rows(&mut self, x: &CpuTensor, batch: &StepInput) -> Result<CpuTensor> {
        let mut data = Vec::with_capacity(batch.logit_rows.len() * x.cols);
        for &r in &batch.logit_rows {
            data.extend_from_slice(x.row(r as usize));
        }
        Ok(CpuTensor::new(data, batch.logit_rows.len(), x.cols))
    }

    fn sample(&mut self, logits: &CpuTensor, rows: &[SamplingRow<'_>]) -> Result<Vec<SampledToken>> {
        Ok(sample_host(&logits.data, logits.cols, rows))
    }

    fn to_host(&mut self, x: &CpuTensor) -> Result<Vec<f32>> {
        Ok(x.data.clone())
    }
}
