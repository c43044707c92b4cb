//! Layer-wise RDMA for early descriptors: prefill registers its per-layer progress marks
//! with its cache (a u32 per layer, which its forward writes once the layer's KV is
//! written); decode READs them over a queue pair of their own and posts each layer's READs
//! once its mark reached the descriptor's `ready_mark`, so the transfer follows prefill's
//! forward layer by layer instead of starting after its first token.

use std::time::{Duration, Instant};

use dlengine_kv_rdma::{read_blocks, Access, MemoryRegion, ProtectionDomain, QueuePair, ReadOptions, ReadPlan, ReadRequest, RdmaError, RemoteRegion};

/// How long decode waits for prefill's forward to reach a layer: a prompt's last forward
/// takes far less; past this prefill is taken to have failed or stalled (as a CUDA IPC
/// copy's wait does).
const MARK_TIMEOUT: Duration = Duration::from_secs(10);
/// One READ of a few bytes: a round trip.
const MARK_READ_TIMEOUT: Duration = Duration::from_secs(2);

/// Reads a prefill peer's progress marks into registered memory of this process.
pub(super) struct RemoteProgress {
    plan: ReadPlan,
    /// Declared before the memory it covers: fields drop in order, so the registration
    /// goes first.
    _registration: MemoryRegion,
    landing: Box<[u32]>,
}

impl RemoteProgress {
    /// Marks of `layers` layers at `marks` in the peer's memory, landing in memory
    /// registered on `pd`.
    pub(super) fn new(pd: &ProtectionDomain, marks: RemoteRegion, layers: u32) -> Result<Self, String> {
        let mut landing = vec![0u32; layers as usize].into_boxed_slice();
        let len = layers as usize * 4;
        // SAFETY: `landing` is a heap allocation owned by this value, which drops the
        // registration first.
        let region = unsafe { pd.register_host(landing.as_mut_ptr().cast(), len, Access::LOCAL_WRITE) }.map_err(|e| e.to_string())?;
        let local = region.local_region();
        let read = ReadRequest { layer: 0, remote_addr: marks.addr, rkey: marks.rkey, local_addr: local.addr, lkey: local.lkey, len: len as u32 };
        Ok(Self { plan: ReadPlan { layers: 1, qps: vec![vec![read]] }, _registration: region, landing })
    }

    /// How many leading layers prefill's forward has written for `ready_mark`, read over
    /// `qp`; an error once `since` is [`MARK_TIMEOUT`] ago and some are still missing.
    pub(super) fn layers_ready(&self, qp: &mut QueuePair, ready_mark: u32, since: Instant) -> Result<u32, RdmaError> {
        read_blocks(std::slice::from_mut(qp), &self.plan, ReadOptions { timeout: MARK_READ_TIMEOUT, ..ReadOptions::default() })?;
        // SAFETY: the READ completed: the NIC wrote these bytes and writes no more.
        let marks = (0..self.landing.len()).map(|l| unsafe { std::ptr::read_volatile(self.landing.as_ptr().add(l)) });
        let (ready, layers) = (leading_layers_reached(marks, ready_mark), self.landing.len() as u32);
        if ready < layers && since.elapsed() > MARK_TIMEOUT {
            return Err(RdmaError::SourceStalled { waited: since.elapsed(), layers_ready: ready, layers });
        }
        Ok(ready)
    }
}

/// Leading layers whose mark reached `ready_mark`, compared modulo 2^32 as prefill's
/// device does (marks are step counters that may wrap).
fn leading_layers_reached(marks: impl Iterator<Item = u32>, ready_mark: u32) -> u32 {
    marks.take_while(|&m| m.wrapping_sub(ready_mark) as i32 >= 0).count() as u32
}

#[cfg(test)]
mod tests {
    use super::leading_layers_reached;

    #[test]
    fn a_layer_is_ready_once_its_mark_and_every_earlier_ones_reached_the_ready_mark() {
        let reached = |marks: &[u32], ready_mark| leading_layers_reached(marks.iter().copied(), ready_mark);
        assert_eq!(reached(&[7, 7, 6, 7], 7), 2, "layer 2 is not written yet, whatever layer 3 says");
        assert_eq!(reached(&[8, 9, 7], 7), 3, "later steps count too");
        assert_eq!(reached(&[0, 0], 7), 0);
        assert_eq!(reached(&[3, 1], u32::MAX - 1), 2, "marks wrap");
        assert_eq!(reached(&[u32::MAX, 5], 5), 0, "a mark just before the wrap is earlier");
    }
}
