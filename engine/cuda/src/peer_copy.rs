//! Copies from a peer GPU's KV cache (CUDA IPC) that run while the engine goes on: each
//! is queued on the peer's own copy stream, off the compute stream, so decode steps of
//! other requests never wait behind it, and one stalled peer never holds up another.
//! A copy is polled by ticket; its chunk table lives in stream-ordered memory so that
//! freeing it never synchronizes the device.
//!
//! The kernel, not the copy engine, moves the bytes: a cuMemcpyAsync per run pays a fixed
//! cost that a long prompt's many runs add up (on the H200 pair, 168 calls for one 1.8 GB
//! pull ran at 75 % of a single call's bandwidth, one call per scattered block at 1 %),
//! while one launch of the chunk-copy kernel reaches 94 % of it however the blocks lie
//! (`examples/peer_copy` measures all of these).
//!
//! An early handoff's copy goes layer by layer: a one-thread kernel waits for the peer's
//! progress mark of the layer ([`crate::kv_progress`]), then the layer's chunks are
//! copied, while prefill is still computing the layers after it.

use std::collections::HashMap;

use cudarc::driver::result;
use cudarc::driver::sys::{self, CUdeviceptr, CUevent, CUstream};

use crate::copy_kernels::{CopyKernels, MARK_TIMEOUT};
use crate::error::{op_error, OpContext, Result};
use crate::kv_io::check_aligned;
use crate::memory::PinnedBuffer;

/// Failure flags in mapped pinned memory, one per ticket modulo this.
const FAILURE_SLOTS: usize = 1024;

const OP: &str = "copying KV blocks from a peer device";

/// One layer's (or, with no mark to wait for, the whole copy's) chunks.
pub(crate) struct CopyStage {
    /// Wait for the peer's mark of this layer first.
    pub wait_for_layer: Option<usize>,
    pub chunks: Vec<[u64; 3]>,
}

/// An event with timing, recorded on `stream` now; the caller destroys it.
fn timing_event(stream: CUstream) -> Result<CUevent> {
    let event = result::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT).op(OP)?;
    // SAFETY: a fresh event recorded on a live stream.
    unsafe { result::event::record(event, stream) }.op(OP)?;
    Ok(event)
}

struct InFlight {
    started: CUevent,
    /// After the chunk table's upload: what comes before it is host-side staging.
    uploaded: CUevent,
    done: CUevent,
    slot: usize,
    /// For the log.
    bytes: u64,
    chunks: usize,
}

pub(crate) struct PeerCopies {
    kernels: CopyKernels,
    in_flight: HashMap<u64, InFlight>,
    next_ticket: u64,
    failures: Option<(PinnedBuffer, CUdeviceptr)>,
}

impl PeerCopies {
    pub(crate) fn new(kernels: CopyKernels) -> Self {
        Self { kernels, in_flight: HashMap::new(), next_ticket: 1, failures: None }
    }

    /// Queues `stages` on `stream` (a peer's copy stream), `ctas` CTAs per copy launch;
    /// `progress` is the peer's marks and `mark` what each waiting stage waits for.
    pub(crate) fn start(&mut self, stream: CUstream, stages: &[CopyStage], ctas: u32, progress: Option<(CUdeviceptr, u32)>) -> Result<u64> {
        let total: usize = stages.iter().map(|s| s.chunks.len()).sum();
        for stage in stages {
            check_aligned(OP, &stage.chunks)?;
        }
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let slot = ticket as usize % FAILURE_SLOTS;
        let failed = self.failure_flag(slot)?;
        let flat: Vec<u64> = stages.iter().flat_map(|s| s.chunks.iter().flatten().copied()).collect();
        let started = timing_event(stream)?;
        // SAFETY: stream-ordered allocation, upload, use and free, all on `stream`. The
        // upload is from pageable memory, so the driver stages it before returning.
        let table = unsafe { result::malloc_async(stream, (total * 24).max(24)) }.op(OP)?;
        unsafe { result::memcpy_htod_async(table, &flat, stream) }.op(OP)?;
        let uploaded = timing_event(stream)?;
        let mut at = 0u64;
        for stage in stages {
            if let (Some(layer), Some((marks, mark))) = (stage.wait_for_layer, progress) {
                self.kernels.queue_wait(OP, stream, marks, layer, mark, failed)?;
            }
            self.kernels.queue_copy(OP, stream, table + at * 24, stage.chunks.len(), ctas)?;
            at += stage.chunks.len() as u64;
        }
        unsafe { result::free_async(table, stream) }.op(OP)?;
        let done = timing_event(stream)?;
        let bytes = stages.iter().flat_map(|s| &s.chunks).map(|c| c[2]).sum();
        self.in_flight.insert(ticket, InFlight { started, uploaded, done, slot, bytes, chunks: total });
        Ok(ticket)
    }

    /// Whether `ticket`'s copy is over; Err if it failed or waited for a mark in vain.
    pub(crate) fn finished(&mut self, ticket: u64) -> Result<bool> {
        let Some(copy) = self.in_flight.get(&ticket) else {
            return Err(op_error(OP, format!("unknown copy ticket {ticket}")));
        };
        // SAFETY: a live event of ours.
        match unsafe { sys::cuEventQuery(copy.done) } {
            sys::CUresult::CUDA_ERROR_NOT_READY => return Ok(false),
            status => status.result().op(OP)?,
        }
        let copy = self.in_flight.remove(&ticket).expect("checked");
        // SAFETY: all complete, so nothing waits on them any more.
        let table_ms = unsafe { result::event::elapsed(copy.started, copy.uploaded) }.op(OP)? as f64;
        let ms = unsafe { result::event::elapsed(copy.uploaded, copy.done) }.op(OP)? as f64;
        for event in [copy.started, copy.uploaded, copy.done] {
            unsafe { result::event::destroy(event) }.op(OP)?;
        }
        // Device time of the copy proper (with an early handoff, waiting for prefill's
        // layers included), apart from the chunk table's upload before it.
        let gb_per_s = copy.bytes as f64 / ms / 1e6;
        tracing::info!(bytes = copy.bytes, chunks = copy.chunks, table_ms, ms, gb_per_s, "peer copy done");
        let flags = self.failures.as_ref().expect("allocated by start").0.as_slice();
        if u32::from_ne_bytes(flags[copy.slot * 4..copy.slot * 4 + 4].try_into().expect("4 bytes")) != 0 {
            return Err(op_error(OP, format!("prefill published no progress for {MARK_TIMEOUT:?} (it died or stalled)")));
        }
        Ok(true)
    }

    /// The device address of `slot`'s failure flag, cleared.
    fn failure_flag(&mut self, slot: usize) -> Result<CUdeviceptr> {
        if self.failures.is_none() {
            self.failures = Some(PinnedBuffer::new_mapped(FAILURE_SLOTS * 4)?);
        }
        let (buffer, device) = self.failures.as_mut().expect("just set");
        buffer.as_mut_slice()[slot * 4..slot * 4 + 4].fill(0);
        Ok(*device + slot as u64 * 4)
    }
}

impl Drop for PeerCopies {
    fn drop(&mut self) {
        for copy in self.in_flight.values() {
            // SAFETY: our events; destroying an incomplete event is allowed.
            unsafe {
                for event in [copy.started, copy.uploaded, copy.done] {
                    let _ = result::event::destroy(event);
                }
            }
        }
    }
}
