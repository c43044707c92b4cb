//! A step's inputs on the device. The buffers are allocated once, at the largest step the
//! engine will run, so their addresses never change (captured graphs read them), and each
//! step copies only the used part of each array from pinned staging memory.

use cudarc::driver::result;
use cudarc::driver::sys::CUstream;
use dlengine_engine::backend::{StepInput, StepLimits};

use crate::error::{op_error, OpContext, Result};
use crate::memory::{DeviceBuffer, PinnedBuffer};

/// Query rows per prefill attention block (must match BQ in attention.cu).
pub const PREFILL_ROWS: usize = 64;

#[derive(Debug, Clone, Copy)]
struct Region {
    offset: usize,
    capacity: usize,
}

#[derive(Debug, Clone, Copy)]
struct Layout {
    token_ids: Region,
    positions: Region,
    slot_mapping: Region,
    query_start: Region,
    context_lens: Region,
    block_tables: Region,
    logit_rows: Region,
    items: Region,
    total: usize,
}

impl Layout {
    fn new(l: &StepLimits) -> Self {
        let mut at = 0;
        let mut region = |bytes: usize| {
            let r = Region { offset: at, capacity: bytes };
            at = (at + bytes).next_multiple_of(256);
            r
        };
        let ints = |n: usize| n * 4;
        Self {
            token_ids: region(ints(l.max_tokens)),
            positions: region(ints(l.max_tokens)),
            slot_mapping: region(ints(l.max_tokens)),
            query_start: region(ints(l.max_seqs + 1)),
            context_lens: region(ints(l.max_seqs)),
            block_tables: region(ints(l.max_seqs * l.max_blocks_per_seq)),
            logit_rows: region(ints(l.max_tokens)),
            items: region(8 * l.max_tokens),
            total: at,
        }
    }
}

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
    layout: Layout,
    device: DeviceBuffer,
    staging: PinnedBuffer,
}

fn as_bytes(v: &[u32]) -> &[u8] {
    // SAFETY: u32 has no padding; any byte view of it is valid.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

impl StepBuffers {
    pub fn new(limits: &StepLimits) -> Result<Self> {
        let layout = Layout::new(limits);
        Ok(Self { device: DeviceBuffer::new(layout.total)?, staging: PinnedBuffer::new(layout.total)?, layout })
    }

    fn stage(&mut self, name: &'static str, region: Region, data: &[u8]) -> Result<()> {
        if data.len() > region.capacity {
            return Err(op_error("prepare", format!("{name}: {} bytes exceed the step limit of {}", data.len(), region.capacity)));
        }
        self.staging.as_mut_slice()[region.offset..region.offset + data.len()].copy_from_slice(data);
        Ok(())
    }

    fn copy(&self, stream: CUstream, region: Region, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        let src = &self.staging.as_slice()[region.offset..region.offset + bytes];
        // SAFETY: destination lies inside our device buffer; the staging memory is pinned
        // and not rewritten before the copy completes (upload synchronises first).
        unsafe { result::memcpy_htod_async(self.device.ptr() + region.offset as u64, src, stream) }.op("uploading step inputs")
    }

    /// Copies `input` to the device (after any previous upload has completed).
    pub fn upload(&mut self, stream: CUstream, input: &StepInput) -> Result<CudaBatch> {
        // SAFETY: our stream; waiting here means the staging memory is free to rewrite.
        unsafe { result::stream::synchronize(stream) }.op("stream synchronize")?;
        let items = prefill_items(input);
        let l = self.layout;
        let arrays: [(&'static str, Region, &[u8]); 8] = [
            ("token_ids", l.token_ids, as_bytes(&input.token_ids)),
            ("positions", l.positions, as_bytes(&input.positions)),
            ("slot_mapping", l.slot_mapping, as_bytes(&input.slot_mapping)),
            ("query_start", l.query_start, as_bytes(&input.query_start)),
            ("context_lens", l.context_lens, as_bytes(&input.context_lens)),
            ("block_tables", l.block_tables, as_bytes(&input.block_tables)),
            ("logit_rows", l.logit_rows, as_bytes(&input.logit_rows)),
            ("items", l.items, as_bytes(&items)),
        ];
        for (name, region, data) in arrays {
            self.stage(name, region, data)?;
            self.copy(stream, region, data.len())?;
        }
        let base = self.device.ptr();
        let at = |r: Region| base + r.offset as u64;
        Ok(CudaBatch {
            num_tokens: input.num_tokens(),
            num_seqs: input.num_seqs(),
            table_stride: input.block_table_stride,
            block_size: input.block_size,
            num_logit_rows: input.logit_rows.len(),
            num_items: items.len() / 2,
            token_ids: at(l.token_ids),
            positions: at(l.positions),
            slot_mapping: at(l.slot_mapping),
            query_start: at(l.query_start),
            context_lens: at(l.context_lens),
            block_tables: at(l.block_tables),
            logit_rows: at(l.logit_rows),
            items: at(l.items),
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
