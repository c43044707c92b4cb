//! A step's inputs on the device. The arrays are packed back to back in one buffer
//! allocated once for the largest step, and copied with a single transfer from pinned
//! staging memory. The packing depends only on the arrays' lengths, so every decode step
//! padded to the same batch size lands at the same addresses (captured graphs read them).

use cudarc::driver::result;
use cudarc::driver::sys::CUstream;
use dlengine_engine::backend::{StepInput, StepLimits};

use crate::error::{op_error, OpContext, Result};
use crate::memory::{DeviceBuffer, PinnedBuffer};

/// Query rows per prefill attention block (must match BQ in attention.cu).
pub const PREFILL_ROWS: usize = 64;

/// Device pointers and sizes of one prepared step.
#[derive(Debug, Clone, Copy)]
pub struct CudaBatch {
    pub num_tokens: usize,
    pub num_seqs: usize,
    pub table_stride: usize,
    pub block_size: usize,
    pub num_logit_rows: usize,
    /// Prefill attention work items: (sequence, first row of a 64-row tile).
    pub num_items: usize,
    pub token_ids: u64,
    pub positions: u64,
    pub slot_mapping: u64,
    pub query_start: u64,
    pub context_lens: u64,
    pub block_tables: u64,
    pub logit_rows: u64,
    pub items: u64,
}

impl CudaBatch {
    pub fn is_decode_only(&self) -> bool {
        self.num_tokens == self.num_seqs
    }
}

pub struct StepBuffers {
    device: DeviceBuffer,
    staging: PinnedBuffer,
}

fn as_bytes(v: &[u32]) -> &[u8] {
    // SAFETY: u32 has no padding; any byte view of it is valid.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

/// Bytes the packed arrays of the largest step can take.
fn capacity(l: &StepLimits) -> usize {
    let ints = 5 * l.max_tokens + 2 * l.max_seqs + 1 + l.max_seqs * l.max_blocks_per_seq + 2 * l.max_tokens;
    ints * 4 + 8 * 16
}

impl StepBuffers {
    pub fn new(limits: &StepLimits) -> Result<Self> {
        let bytes = capacity(limits);
        Ok(Self { device: DeviceBuffer::new(bytes)?, staging: PinnedBuffer::new(bytes)? })
    }

    /// Packs `input` into staging and copies it to the device (after any previous copy has
    /// completed, so staging is free to rewrite).
    pub fn upload(&mut self, stream: CUstream, input: &StepInput) -> Result<CudaBatch> {
        // SAFETY: our stream; when it is idle (the usual case) this returns at once.
        unsafe { result::stream::synchronize(stream) }.op("stream synchronize")?;
        let items = prefill_items(input);
        let arrays: [&[u32]; 8] = [
            &input.token_ids,
            &input.positions,
            &input.slot_mapping,
            &input.query_start,
            &input.context_lens,
            &input.block_tables,
            &input.logit_rows,
            &items,
        ];
        let staging = self.staging.as_mut_slice();
        let mut offsets = [0usize; 8];
        let mut at = 0;
        for (i, a) in arrays.iter().enumerate() {
            let bytes = as_bytes(a);
            if at + bytes.len() > staging.len() {
                return Err(op_error("prepare", "the step exceeds the step limits given at start"));
            }
            staging[at..at + bytes.len()].copy_from_slice(bytes);
            offsets[i] = at;
            at = (at + bytes.len()).next_multiple_of(16);
        }
        // SAFETY: `at` bytes fit both buffers; staging is pinned and untouched until the
        // next upload, which synchronises first.
        unsafe { result::memcpy_htod_async(self.device.ptr(), &self.staging.as_slice()[..at], stream) }.op("uploading step inputs")?;
        let ptr = |i: usize| self.device.ptr() + offsets[i] as u64;
        Ok(CudaBatch {
            num_tokens: input.num_tokens(),
            num_seqs: input.num_seqs(),
            table_stride: input.block_table_stride,
            block_size: input.block_size,
            num_logit_rows: input.logit_rows.len(),
            num_items: items.len() / 2,
            token_ids: ptr(0),
            positions: ptr(1),
            slot_mapping: ptr(2),
            query_start: ptr(3),
            context_lens: ptr(4),
            block_tables: ptr(5),
            logit_rows: ptr(6),
            items: ptr(7),
        })
    }
}

/// (sequence, first row) of every 64-row query tile, as interleaved u32 pairs.
fn prefill_items(input: &StepInput) -> Vec<u32> {
    let mut items = Vec::new();
    for s in 0..input.num_seqs() {
        for tile in (0..input.query_range(s).len()).step_by(PREFILL_ROWS) {
            items.extend([s as u32, tile as u32]);
        }
    }
    items
}
