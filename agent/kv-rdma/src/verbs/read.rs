//! Executes a [`ReadPlan`] over connected queue pairs.

use std::ops::Range;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::qp::QueuePair;
use super::{c_str, sys};
use crate::config::{ReadOptions, TransferStats};
use crate::error::{RdmaError, Result};
use crate::plan::ReadPlan;
use crate::tracker::CompletionTracker;

/// Completions fetched per poll call.
const POLL_BATCH: usize = 32;
/// How long an aborted transfer waits for its flushed requests.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

static GENERATION: AtomicU32 = AtomicU32::new(1);

/// One plan in flight: `plan.qps[i]` is posted on `qps[i]`. Drive it with
/// [`progress`](Self::progress) from your own loop, or [`wait`](Self::wait) for all of it.
///
/// Dropping an unfinished transfer moves its queue pairs to the error state and waits
/// (bounded) for the hardware to flush them, so no READ lands in local memory after the
/// drop returns; those QPs must then be replaced.
pub struct ReadTransfer<'a> {
    qps: &'a mut [QueuePair],
    plan: &'a ReadPlan,
    tracker: CompletionTracker,
    options: ReadOptions,
    started: Instant,
    posts: usize,
    failed: bool,
    /// Per QP: requests done through the newest completion seen, error or not (drives the
    /// drain after an abort).
    seen: Vec<usize>,
    sges: Vec<sys::ibv_sge>,
    wrs: Vec<sys::ibv_send_wr>,
    wcs: Vec<sys::ibv_wc>,
}

impl<'a> ReadTransfer<'a> {
    /// Checks the plan against the queue pairs; posts nothing yet.
    pub fn start(qps: &'a mut [QueuePair], plan: &'a ReadPlan, options: ReadOptions) -> Result<Self> {
        if options.max_batch == 0 {
            return Err(RdmaError::InvalidArgument("ReadOptions::max_batch must be at least 1".into()));
        }
        if plan.qps.len() > qps.len() {
            return Err(RdmaError::InvalidArgument(format!(
                "the plan uses {} queue pairs but only {} were given",
                plan.qps.len(),
                qps.len()
            )));
        }
        for (q, requests) in plan.qps.iter().enumerate() {
            if requests.is_empty() {
                continue;
            }
            qps[q].ensure_connected()?;
            let max = qps[q].max_message_bytes();
            if let Some(r) = requests.iter().find(|r| r.len > max) {
                return Err(RdmaError::InvalidArgument(format!(
                    "a {}-byte READ exceeds the port's max message size {max}; plan with a smaller max_message_bytes",
                    r.len
                )));
            }
        }
        let tracker = CompletionTracker::new(plan, GENERATION.fetch_add(1, Ordering::Relaxed));
        let batch = options.max_batch;
        Ok(Self {
            qps,
            plan,
            tracker,
            options,
            started: Instant::now(),
            posts: 0,
            failed: false,
            seen: vec![0; plan.qps.len()],
            sges: Vec::with_capacity(batch),
            wrs: Vec::with_capacity(batch),
            // SAFETY: ibv_wc is plain data.
            wcs: vec![unsafe { std::mem::zeroed() }; POLL_BATCH],
        })
    }

    /// Posts whatever fits in the send queues, polls each queue pair once, and returns the
    /// layers that completed since the last call (in order; often empty).
    pub fn progress(&mut self) -> Result<Range<u32>> {
        self.progress_below(u32::MAX)
    }

    /// As [`progress`](Self::progress), posting only READs of layers below `layers_ready`
    /// (those the source has written: a layer-wise transfer while its forward runs).
    pub fn progress_below(&mut self, layers_ready: u32) -> Result<Range<u32>> {
        if self.failed {
            return Err(RdmaError::InvalidArgument("the transfer already failed".into()));
        }
        for q in 0..self.plan.qps.len() {
            let batch = self.tracker.next_batch_below(q, self.qps[q].max_send_wr() as usize, self.options.max_batch, layers_ready);
            if !batch.is_empty() {
                self.post(q, batch)?;
            }
        }
        for q in 0..self.plan.qps.len() {
            if self.tracker.outstanding(q) > 0 {
                self.poll(q)?;
            }
        }
        Ok(self.tracker.take_completed_layers())
    }

    /// Layers `0..layers_complete()` have landed in local memory.
    pub fn layers_complete(&self) -> u32 {
        self.tracker.layers_complete()
    }

    pub fn is_done(&self) -> bool {
        self.tracker.is_done()
    }

    /// Runs the transfer to the end, calling `on_layers` with each range of layers as it
    /// lands (layer-wise completion: decode may start layer `i` once it is reported).
    /// Spins on the CQs (yielding now and then): run it on a thread meant for it.
    pub fn wait(self, on_layers: impl FnMut(Range<u32>)) -> Result<TransferStats> {
        self.wait_gated(|| Ok(u32::MAX), on_layers)
    }

    /// As [`wait`](Self::wait), posting each layer's READs only once `layers_ready` (asked
    /// again on every round until it covers the plan) says the source has written it.
    pub fn wait_gated(mut self, mut layers_ready: impl FnMut() -> Result<u32>, mut on_layers: impl FnMut(Range<u32>)) -> Result<TransferStats> {
        let (mut idle, mut ready) = (0u32, 0u32);
        loop {
            if ready < self.plan.layers {
                ready = layers_ready().inspect_err(|_| self.abort("waiting for the source's layers failed"))?;
            }
            let layers = self.progress_below(ready)?;
            if !layers.is_empty() {
                on_layers(layers);
                idle = 0;
            }
            if self.tracker.is_done() {
                break;
            }
            if self.started.elapsed() > self.options.timeout {
                self.abort("transfer timed out");
                return Err(RdmaError::Timeout {
                    waited: self.started.elapsed(),
                    outstanding: self.tracker.total_outstanding(),
                    layers_complete: self.tracker.layers_complete(),
                    layers: self.tracker.layers(),
                });
            }
            idle = idle.wrapping_add(1);
            if idle & 1023 == 0 {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        Ok(TransferStats {
            bytes: self.plan.total_bytes(),
            requests: self.plan.num_requests(),
            posts: self.posts,
            elapsed: self.started.elapsed(),
        })
    }

    fn post(&mut self, q: usize, batch: Range<usize>) -> Result<()> {
        let plan = self.plan;
        let requests = &plan.qps[q][batch.clone()];
        self.sges.clear();
        self.wrs.clear();
        for r in requests {
            self.sges.push(sys::ibv_sge { addr: r.local_addr, length: r.len, lkey: r.lkey });
        }
        let last = requests.len() - 1;
        for (i, r) in requests.iter().enumerate() {
            // SAFETY: plain data; zero means no flags, no next, no immediate.
            let mut wr: sys::ibv_send_wr = unsafe { std::mem::zeroed() };
            wr.wr_id = self.tracker.wr_id(batch.start + i);
            wr.num_sge = 1;
            wr.opcode = sys::IBV_WR_RDMA_READ;
            // Only the last READ of a batch asks for a completion: on an RC QP completions
            // are in order, so it stands for the whole batch (and frees its queue slots).
            wr.send_flags = if i == last { sys::IBV_SEND_SIGNALED } else { 0 };
            wr.wr.rdma.remote_addr = r.remote_addr;
            wr.wr.rdma.rkey = r.rkey;
            self.wrs.push(wr);
        }
        // Link the chain only now: the vectors no longer move.
        let sges = self.sges.as_mut_ptr();
        let wrs = self.wrs.as_mut_ptr();
        for i in 0..self.wrs.len() {
            // SAFETY: i and i + 1 are in bounds of vectors that outlive the post call.
            unsafe {
                (*wrs.add(i)).sg_list = sges.add(i);
                if i < last {
                    (*wrs.add(i)).next = wrs.add(i + 1);
                }
            }
        }
        match self.qps[q].post_send(&mut self.wrs) {
            Ok(()) => {
                self.posts += 1;
                self.tracker.on_posted(q, requests.len())?;
                Ok(())
            }
            Err((source, posted)) => {
                // Part of the chain may be in the send queue without a signalled request:
                // the only way to learn when it is done is to flush it.
                let _ = self.tracker.on_posted(q, posted);
                let device = self.qps[q].device_name().to_string();
                self.abort("ibv_post_send failed");
                Err(RdmaError::Verbs {
                    op: "ibv_post_send",
                    device,
                    source,
                    hint: format!("{posted} of {} posted", last + 1),
                })
            }
        }
    }

    fn poll(&mut self, q: usize) -> Result<()> {
        let got = match self.qps[q].poll(&mut self.wcs) {
            Ok(n) => n,
            Err(e) => {
                self.abort("ibv_poll_cq failed");
                return Err(e);
            }
        };
        self.note_seen(q, got);
        for i in 0..got {
            let wc = self.wcs[i];
            if wc.status != sys::IBV_WC_SUCCESS {
                let err = self.completion_error(q, &wc);
                self.abort("a READ completed in error");
                return Err(err);
            }
            if let Err(e) = self.tracker.on_completed(q, wc.wr_id) {
                self.abort("unexpected completion");
                return Err(e.into());
            }
        }
        Ok(())
    }

    fn completion_error(&self, q: usize, wc: &sys::ibv_wc) -> RdmaError {
        // SAFETY: returns a static string for any value.
        let status = c_str(unsafe { sys::ibv_wc_status_str(wc.status) }, "unknown status");
        let (_, end) = CompletionTracker::decode_wr_id(wc.wr_id);
        let request = end
            .checked_sub(1)
            .and_then(|i| self.plan.qps[q].get(i).map(|r| (i, r)))
            .map(|(i, r)| {
                format!(
                    "request {i} on QP slot {q}: layer {}, {} bytes from {:#x} (rkey {:#x}) to {:#x} (lkey {:#x})",
                    r.layer, r.len, r.remote_addr, r.rkey, r.local_addr, r.lkey
                )
            })
            .unwrap_or_default();
        RdmaError::WorkCompletion {
            device: self.qps[q].device_name().to_string(),
            qp_num: wc.qp_num,
            status,
            code: wc.status,
            vendor_err: wc.vendor_err,
            request,
        }
    }

    /// Moves every queue pair with requests in flight to the error state and waits for the
    /// flush of its last posted request (which always produces a completion: it was
    /// signalled, and flushed requests complete regardless).
    fn abort(&mut self, reason: &str) {
        if self.failed {
            return;
        }
        self.failed = true;
        let used: Vec<usize> = (0..self.plan.qps.len()).filter(|&q| self.tracker.outstanding(q) > 0).collect();
        for &q in &used {
            self.qps[q].mark_unusable(reason);
        }
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        for q in used {
            while self.seen[q] < self.tracker.posted(q) {
                if Instant::now() >= deadline {
                    tracing::warn!(
                        qp = self.qps[q].qp_num(),
                        "aborted RDMA QP did not flush in time; its READs may still land"
                    );
                    break;
                }
                let Ok(got) = self.qps[q].poll(&mut self.wcs) else { break };
                self.note_seen(q, got);
                if got == 0 {
                    std::thread::yield_now();
                }
            }
        }
    }

    /// Records the newest request the first `got` polled completions of `q` account for.
    fn note_seen(&mut self, q: usize, got: usize) {
        for wc in &self.wcs[..got] {
            let (generation, end) = CompletionTracker::decode_wr_id(wc.wr_id);
            if generation == self.tracker.generation() {
                self.seen[q] = self.seen[q].max(end);
            }
        }
    }
}

impl Drop for ReadTransfer<'_> {
    fn drop(&mut self) {
        if !self.failed && self.tracker.total_outstanding() > 0 {
            self.abort("transfer dropped before it finished");
        }
    }
}

/// Runs `plan` to completion on `qps` (see [`ReadTransfer::wait`]).
pub fn read_blocks(qps: &mut [QueuePair], plan: &ReadPlan, options: ReadOptions) -> Result<TransferStats> {
    ReadTransfer::start(qps, plan, options)?.wait(|_| {})
}
