//! Copies from a peer GPU's KV cache (CUDA IPC) that run while the engine goes on: each
//! is queued on the peer's own copy stream, off the compute stream, so decode steps of
//! other requests never wait behind it, and one stalled peer never holds up another.
//! A copy is polled by ticket; its chunk table lives in stream-ordered memory so that
//! freeing it never synchronizes the device.
//!
//! Long contiguous runs go to the copy engine (one cuMemcpyAsync each): it reaches the
//! link's full bandwidth and takes no SMs from the decode steps running meanwhile. Short
//! runs (a fragmented cache's scattered blocks) go to the chunk-copy kernel, whose one
//! launch covers thousands of them where the driver would pay a call each.
//!
//! An early handoff's copy goes layer by layer: a one-thread kernel waits for the peer's
//! progress mark of the layer ([`crate::kv_progress`]), then the layer's chunks are
//! copied, while prefill is still computing the layers after it.

use std::collections::HashMap;
use std::time::Duration;

use cudarc::driver::result;
use cudarc::driver::sys::{self, CUdeviceptr, CUevent, CUfunction, CUstream};

use crate::error::{op_error, OpContext, Result};
use crate::kernels::Module;
use crate::kv_io::{check_aligned, chunked, COPY_THREADS};
use crate::launch::{launch, Arg, Launch};
use crate::memory::PinnedBuffer;

/// How long a layer waits for the peer's mark: a prompt's last forward takes far less;
/// past this the peer is taken to have died or stalled.
const MARK_TIMEOUT: Duration = Duration::from_secs(10);
/// Failure flags in mapped pinned memory, one per ticket modulo this.
const FAILURE_SLOTS: usize = 1024;

const OP: &str = "copying KV blocks from a peer device";

/// Runs at least this long go to the copy engine. Below it, a driver call (a few µs of
/// host time) would take longer than the copy itself at NVLink speed.
const COPY_ENGINE_MIN_BYTES: u64 = 1 << 20;

/// One layer's (or, with no mark to wait for, the whole copy's) segments, as
/// (source, destination, bytes).
pub(crate) struct CopyStage {
    /// Wait for the peer's mark of this layer first.
    pub wait_for_layer: Option<usize>,
    pub segments: Vec<[u64; 3]>,
}

/// A stage's segments split by who copies them: (copy engine, kernel chunks).
fn split_by_engine(segments: &[[u64; 3]]) -> (Vec<[u64; 3]>, Vec<[u64; 3]>) {
    let (long, short): (Vec<[u64; 3]>, Vec<[u64; 3]>) = segments.iter().partition(|s| s[2] >= COPY_ENGINE_MIN_BYTES);
    (long, chunked(short))
}

struct InFlight {
    done: CUevent,
    slot: usize,
}

pub(crate) struct PeerCopies {
    copy_chunks: CUfunction,
    wait_progress: CUfunction,
    in_flight: HashMap<u64, InFlight>,
    next_ticket: u64,
    failures: Option<(PinnedBuffer, CUdeviceptr)>,
}

impl PeerCopies {
    pub(crate) fn new(kv_transfer: &Module) -> Result<Self> {
        Ok(Self {
            copy_chunks: kv_transfer.function("copy_chunks")?,
            wait_progress: kv_transfer.function("wait_progress")?,
            in_flight: HashMap::new(),
            next_ticket: 1,
            failures: None,
        })
    }

    /// Queues `stages` on `stream` (a peer's copy stream), `ctas` CTAs per kernel launch;
    /// `progress` is the peer's marks and `mark` what each waiting stage waits for.
    pub(crate) fn start(&mut self, stream: CUstream, stages: &[CopyStage], ctas: u32, progress: Option<(CUdeviceptr, u32)>) -> Result<u64> {
        let split: Vec<_> = stages.iter().map(|s| split_by_engine(&s.segments)).collect();
        for (long, chunks) in &split {
            check_aligned(OP, long)?;
            check_aligned(OP, chunks)?;
        }
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let slot = ticket as usize % FAILURE_SLOTS;
        let failed = self.failure_flag(slot)?;
        let flat: Vec<u64> = split.iter().flat_map(|(_, chunks)| chunks.iter().flatten().copied()).collect();
        // SAFETY: stream-ordered allocation, upload, use and free, all on `stream`. The
        // upload is from pageable memory, so the driver stages it before returning.
        let table = unsafe { result::malloc_async(stream, (flat.len() * 8).max(24)) }.op(OP)?;
        unsafe { result::memcpy_htod_async(table, &flat, stream) }.op(OP)?;
        let mut at = 0u64;
        for (stage, (long, chunks)) in stages.iter().zip(&split) {
            if let (Some(layer), Some((marks, mark))) = (stage.wait_for_layer, progress) {
                let args = vec![
                    Arg::Ptr(marks),
                    Arg::I32(layer as i32),
                    Arg::U32(mark),
                    Arg::U64(MARK_TIMEOUT.as_nanos() as u64),
                    Arg::Ptr(failed),
                ];
                launch(OP, self.wait_progress, stream, &Launch::new((1, 1, 1), 1), args)?;
            }
            for &[src, dst, len] in long {
                // SAFETY: both ranges lie in live KV buffers (ours, or the peer's mapped
                // ones, which stay mapped while the peer is known).
                unsafe { result::memcpy_dtod_async(dst, src, len as usize, stream) }.op(OP)?;
            }
            if !chunks.is_empty() {
                let count = chunks.len() as u32;
                let args = vec![Arg::Ptr(table + at * 24), Arg::I32(count as i32)];
                launch(OP, self.copy_chunks, stream, &Launch::new((ctas.min(count), 1, 1), COPY_THREADS), args)?;
                at += count as u64;
            }
        }
        unsafe { result::free_async(table, stream) }.op(OP)?;
        let done = result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING).op(OP)?;
        // SAFETY: a fresh event recorded on a live stream; destroyed in `finished`.
        unsafe { result::event::record(done, stream) }.op(OP)?;
        self.in_flight.insert(ticket, InFlight { done, slot });
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
        // SAFETY: complete, so nothing waits on it any more.
        unsafe { result::event::destroy(copy.done) }.op(OP)?;
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
                let _ = result::event::destroy(copy.done);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_runs_go_to_the_copy_engine_and_short_ones_to_kernel_chunks() {
        let long = [1 << 40, 2 << 40, 3 * COPY_ENGINE_MIN_BYTES];
        let short = [3 << 40, 4 << 40, COPY_ENGINE_MIN_BYTES - 16];
        let (engine, chunks) = split_by_engine(&[short, long, short]);
        assert_eq!(engine, vec![long], "a long run is one copy, never chunked");
        let chunked_bytes: u64 = chunks.iter().map(|c| c[2]).sum();
        assert_eq!(chunked_bytes, 2 * short[2], "every short byte is in a kernel chunk");
        assert!(chunks.iter().all(|c| c[0] >= 3 << 40), "no long-run byte is chunked");
    }
}
