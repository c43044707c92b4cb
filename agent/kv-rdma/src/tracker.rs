//! Completion bookkeeping for one transfer: outstanding work requests per queue pair and a
//! watermark of layers that have fully landed.
//!
//! Requests are posted in batches whose last request is signalled. On a reliable-connected
//! QP the send queue completes in order, so a completion for request `i` means requests
//! `0..=i` of that QP are done. Every request's `wr_id` therefore encodes "requests done
//! through here" (index + 1) plus a transfer generation, and a completion moves the QP's
//! done counter forward. Because each QP's requests are in layer order, layer `l` is
//! complete exactly when no QP has an unfinished request of a layer `<= l`.

use std::ops::Range;

use crate::error::TrackError;
use crate::plan::ReadPlan;

const GENERATION_SHIFT: u32 = 40;
const GENERATION_MASK: u64 = (1 << 24) - 1;
const INDEX_MASK: u64 = (1 << GENERATION_SHIFT) - 1;

#[derive(Debug, Clone)]
pub struct CompletionTracker {
    generation: u32,
    /// Layer of every request, per QP, in posting order.
    qp_layers: Vec<Vec<u32>>,
    posted: Vec<usize>,
    completed: Vec<usize>,
    /// Requests of each layer not yet completed (all QPs).
    remaining: Vec<usize>,
    /// Layers `0..watermark` are complete.
    watermark: u32,
    /// Layers `0..reported` were handed out by `take_completed_layers`.
    reported: u32,
}

impl CompletionTracker {
    /// Tracks `plan`; `generation` (24 bits used) tags this transfer's `wr_id`s so a
    /// completion left over from another transfer on the same QP is recognised.
    pub fn new(plan: &ReadPlan, generation: u32) -> Self {
        let qp_layers: Vec<Vec<u32>> = plan.qps.iter().map(|q| q.iter().map(|r| r.layer).collect()).collect();
        let mut remaining = vec![0usize; plan.layers as usize];
        for &l in qp_layers.iter().flatten() {
            // A plan's layers are < plan.layers; an out-of-range one is never counted and
            // so can never hold the watermark back.
            if let Some(n) = remaining.get_mut(l as usize) {
                *n += 1;
            }
        }
        let n = qp_layers.len();
        let mut t = Self {
            generation: generation & GENERATION_MASK as u32,
            qp_layers,
            posted: vec![0; n],
            completed: vec![0; n],
            remaining,
            watermark: 0,
            reported: 0,
        };
        t.advance_watermark();
        t
    }

    pub fn generation(&self) -> u32 {
        self.generation
    }

    pub fn num_qps(&self) -> usize {
        self.qp_layers.len()
    }

    pub fn layers(&self) -> u32 {
        self.remaining.len() as u32
    }

    /// `wr_id` for request `index` of a QP: generation, then "done through" = index + 1.
    pub fn wr_id(&self, index: usize) -> u64 {
        ((self.generation as u64) << GENERATION_SHIFT) | ((index as u64 + 1) & INDEX_MASK)
    }

    /// (generation, requests done through) of a `wr_id` made by [`wr_id`](Self::wr_id).
    pub fn decode_wr_id(wr_id: u64) -> (u32, usize) {
        (((wr_id >> GENERATION_SHIFT) & GENERATION_MASK) as u32, (wr_id & INDEX_MASK) as usize)
    }

    /// The requests to post next on `qp`: at most `max_batch`, keeping at most
    /// `max_outstanding` posted but not completed (the send queue depth).
    pub fn next_batch(&self, qp: usize, max_outstanding: usize, max_batch: usize) -> Range<usize> {
        self.next_batch_below(qp, max_outstanding, max_batch, u32::MAX)
    }

    /// As [`next_batch`](Self::next_batch), of the requests of layers below
    /// `layers_ready` only (the source has written no further yet: a layer-wise
    /// transfer while the peer's forward runs).
    pub fn next_batch_below(&self, qp: usize, max_outstanding: usize, max_batch: usize, layers_ready: u32) -> Range<usize> {
        let Some(layers) = self.qp_layers.get(qp) else { return 0..0 };
        let start = self.posted[qp];
        let room = max_outstanding.saturating_sub(start - self.completed[qp]);
        let end = (start + room.min(max_batch)).min(layers.len());
        // Each QP's requests are in layer order: the ready ones come first.
        let ready = layers[start..end].partition_point(|&l| l < layers_ready);
        start..start + ready
    }

    pub fn on_posted(&mut self, qp: usize, count: usize) -> Result<(), TrackError> {
        let planned = self.check_qp(qp)?.len();
        if self.posted[qp] + count > planned {
            return Err(TrackError::OverPosted { qp, count, posted: self.posted[qp], planned });
        }
        self.posted[qp] += count;
        Ok(())
    }

    /// Records a successful completion on `qp`: every request up to the one `wr_id` names
    /// is done.
    pub fn on_completed(&mut self, qp: usize, wr_id: u64) -> Result<(), TrackError> {
        self.check_qp(qp)?;
        let (generation, end) = Self::decode_wr_id(wr_id);
        if generation != self.generation {
            return Err(TrackError::StaleCompletion { wr_id, found: generation, expected: self.generation });
        }
        if end > self.posted[qp] {
            return Err(TrackError::BeyondPosted { qp, end, posted: self.posted[qp] });
        }
        if end <= self.completed[qp] {
            return Err(TrackError::Regressed { qp, end, completed: self.completed[qp] });
        }
        for &l in &self.qp_layers[qp][self.completed[qp]..end] {
            if let Some(n) = self.remaining.get_mut(l as usize) {
                *n -= 1;
            }
        }
        self.completed[qp] = end;
        self.advance_watermark();
        Ok(())
    }

    /// Layers that completed since the last call (in order; empty when none did).
    pub fn take_completed_layers(&mut self) -> Range<u32> {
        let new = self.reported..self.watermark;
        self.reported = self.watermark;
        new
    }

    /// Layers `0..layers_complete()` have fully landed.
    pub fn layers_complete(&self) -> u32 {
        self.watermark
    }

    pub fn outstanding(&self, qp: usize) -> usize {
        self.posted.get(qp).zip(self.completed.get(qp)).map_or(0, |(p, c)| p - c)
    }

    pub fn total_outstanding(&self) -> usize {
        (0..self.num_qps()).map(|q| self.outstanding(q)).sum()
    }

    /// Requests of `qp` posted so far.
    pub fn posted(&self, qp: usize) -> usize {
        self.posted.get(qp).copied().unwrap_or(0)
    }

    /// Requests of `qp` not yet posted.
    pub fn unposted(&self, qp: usize) -> usize {
        self.qp_layers.get(qp).map_or(0, |l| l.len() - self.posted[qp])
    }

    pub fn is_done(&self) -> bool {
        self.completed.iter().zip(&self.qp_layers).all(|(&c, l)| c == l.len())
    }

    fn check_qp(&self, qp: usize) -> Result<&[u32], TrackError> {
        self.qp_layers.get(qp).map(Vec::as_slice).ok_or(TrackError::UnknownQp { qp, qps: self.qp_layers.len() })
    }

    fn advance_watermark(&mut self) {
        while (self.watermark as usize) < self.remaining.len() && self.remaining[self.watermark as usize] == 0 {
            self.watermark += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::ReadRequest;

    fn plan(qps: &[&[u32]], layers: u32) -> ReadPlan {
        let req = |layer| ReadRequest { layer, remote_addr: 0, rkey: 1, local_addr: 0, lkey: 2, len: 8 };
        ReadPlan { layers, qps: qps.iter().map(|q| q.iter().map(|&l| req(l)).collect()).collect() }
    }

    /// Posts everything that fits on every QP, as the transfer loop does.
    fn post_all(t: &mut CompletionTracker, max_outstanding: usize, max_batch: usize) -> Vec<(usize, Range<usize>)> {
        let mut posted = Vec::new();
        for q in 0..t.num_qps() {
            let b = t.next_batch(q, max_outstanding, max_batch);
            if !b.is_empty() {
                t.on_posted(q, b.len()).unwrap();
                posted.push((q, b));
            }
        }
        posted
    }

    #[test]
    fn watermark_advances_only_when_every_qp_finished_the_layer() {
        // QP0: layers 0,0,1,2   QP1: layers 0,1,1,2
        let p = plan(&[&[0, 0, 1, 2], &[0, 1, 1, 2]], 3);
        let mut t = CompletionTracker::new(&p, 7);
        assert_eq!(post_all(&mut t, 16, 16), vec![(0, 0..4), (1, 0..4)]);
        assert_eq!(t.total_outstanding(), 8);

        // QP0 finishes layers 0 and 1; QP1 has not finished layer 0.
        t.on_completed(0, t.wr_id(2)).unwrap();
        assert_eq!(t.layers_complete(), 0);
        assert_eq!(t.take_completed_layers(), 0..0);
        // QP1 finishes its layer-0 request: layer 0 is done, layer 1 waits on QP1.
        t.on_completed(1, t.wr_id(0)).unwrap();
        assert_eq!(t.take_completed_layers(), 0..1);
        // QP1 finishes everything: layer 1 done, layer 2 still waits on QP0.
        t.on_completed(1, t.wr_id(3)).unwrap();
        assert_eq!(t.take_completed_layers(), 1..2);
        assert!(!t.is_done());
        t.on_completed(0, t.wr_id(3)).unwrap();
        assert_eq!(t.take_completed_layers(), 2..3);
        assert!(t.is_done());
        assert_eq!(t.total_outstanding(), 0);
        assert_eq!(t.take_completed_layers(), 3..3);
    }

    #[test]
    fn batches_respect_the_send_queue_depth() {
        let p = plan(&[&[0; 10]], 1);
        let mut t = CompletionTracker::new(&p, 1);
        assert_eq!(t.next_batch(0, 4, 3), 0..3);
        t.on_posted(0, 3).unwrap();
        // One slot left of four.
        assert_eq!(t.next_batch(0, 4, 3), 3..4);
        t.on_posted(0, 1).unwrap();
        assert_eq!(t.next_batch(0, 4, 3), 4..4);
        // The signalled last request of the first batch frees three slots.
        t.on_completed(0, t.wr_id(2)).unwrap();
        assert_eq!(t.outstanding(0), 1);
        assert_eq!(t.next_batch(0, 4, 3), 4..7);
        assert_eq!(t.unposted(0), 6);
    }

    #[test]
    fn a_batch_holds_only_requests_of_layers_the_source_has_written() {
        let p = plan(&[&[0, 0, 1, 2, 2], &[1, 2]], 3);
        let mut t = CompletionTracker::new(&p, 1);
        assert_eq!(t.next_batch_below(0, 16, 16, 0), 0..0, "nothing is ready");
        assert_eq!(t.next_batch_below(0, 16, 16, 1), 0..2);
        assert_eq!(t.next_batch_below(1, 16, 16, 1), 0..0, "QP1 starts at layer 1");
        t.on_posted(0, 2).unwrap();
        assert_eq!(t.next_batch_below(0, 16, 16, 2), 2..3);
        assert_eq!(t.next_batch_below(0, 16, 2, 3), 2..4, "the batch limit still holds");
        assert_eq!(t.next_batch_below(0, 16, 16, 3), t.next_batch(0, 16, 16), "every layer ready: as ungated");
    }

    #[test]
    fn next_batch_stops_at_the_end_of_the_plan() {
        let p = plan(&[&[0, 1]], 2);
        let mut t = CompletionTracker::new(&p, 1);
        assert_eq!(t.next_batch(0, 64, 32), 0..2);
        t.on_posted(0, 2).unwrap();
        assert_eq!(t.next_batch(0, 64, 32), 2..2);
        assert!(matches!(t.on_posted(0, 1), Err(TrackError::OverPosted { .. })));
        assert_eq!(t.next_batch(5, 64, 32), 0..0);
    }

    #[test]
    fn rejects_completions_that_do_not_fit() {
        let p = plan(&[&[0, 0, 0]], 1);
        let mut t = CompletionTracker::new(&p, 3);
        t.on_posted(0, 2).unwrap();
        assert_eq!(t.on_completed(0, t.wr_id(2)), Err(TrackError::BeyondPosted { qp: 0, end: 3, posted: 2 }));
        let other = CompletionTracker::new(&p, 4);
        assert!(matches!(
            t.on_completed(0, other.wr_id(0)),
            Err(TrackError::StaleCompletion { found: 4, expected: 3, .. })
        ));
        t.on_completed(0, t.wr_id(1)).unwrap();
        assert_eq!(t.on_completed(0, t.wr_id(0)), Err(TrackError::Regressed { qp: 0, end: 1, completed: 2 }));
        assert_eq!(t.on_completed(0, t.wr_id(1)), Err(TrackError::Regressed { qp: 0, end: 2, completed: 2 }));
        assert_eq!(t.on_completed(2, t.wr_id(0)), Err(TrackError::UnknownQp { qp: 2, qps: 1 }));
    }

    #[test]
    fn wr_ids_round_trip_and_generations_wrap_to_24_bits() {
        let t = CompletionTracker::new(&plan(&[&[0]], 1), (1 << 24) + 5);
        assert_eq!(t.generation(), 5);
        assert_eq!(CompletionTracker::decode_wr_id(t.wr_id(41)), (5, 42));
    }

    #[test]
    fn layers_without_requests_are_complete_at_once() {
        // Empty plan: every layer is complete before anything is posted.
        let mut t = CompletionTracker::new(&plan(&[&[], &[]], 4), 1);
        assert!(t.is_done());
        assert_eq!(t.take_completed_layers(), 0..4);
        // Layer 1 has no requests: it completes together with layer 0.
        let p = plan(&[&[0, 2]], 3);
        let mut t = CompletionTracker::new(&p, 1);
        t.on_posted(0, 2).unwrap();
        t.on_completed(0, t.wr_id(0)).unwrap();
        assert_eq!(t.take_completed_layers(), 0..2);
    }

    #[test]
    fn completions_follow_a_real_plan() {
        use crate::layout::{KvMemoryLayout, KvShape};
        use crate::meta::RemoteRegion;
        use crate::plan::{LocalRegion, PlanOptions, ReadPlanner};
        let shape = KvShape { layers: 4, kv_heads: 2, head_dim: 16, block_size: 4, elem_bytes: 2 };
        let layout = KvMemoryLayout::separate_regions(shape, 32);
        let lens = layout.required_region_lens().unwrap();
        let rr = lens
            .iter()
            .enumerate()
            .map(|(i, &len)| RemoteRegion { addr: (i as u64 + 1) << 30, rkey: i as u32, len })
            .collect();
        let lr = lens
            .iter()
            .enumerate()
            .map(|(i, &len)| LocalRegion { addr: (i as u64 + 9) << 30, lkey: i as u32, len })
            .collect();
        let options = PlanOptions { num_qps: 3, max_message_bytes: 256, min_split_bytes: 0 };
        let planner = ReadPlanner::new(layout.clone(), rr, layout, lr, options).unwrap();
        let plan = planner.plan(&(0..8).map(|b| (b, 31 - b)).collect::<Vec<_>>()).unwrap();
        let mut t = CompletionTracker::new(&plan, 9);
        let mut seen = Vec::new();
        // Small queues and batches: many rounds of post, complete the oldest batch per QP.
        while !t.is_done() {
            for (q, batch) in post_all(&mut t, 4, 2) {
                t.on_completed(q, t.wr_id(batch.end - 1)).unwrap();
            }
            let new = t.take_completed_layers();
            seen.extend(new);
        }
        assert_eq!(seen, (0..4).collect::<Vec<_>>());
    }
}
