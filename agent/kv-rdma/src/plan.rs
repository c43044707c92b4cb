//! Turns "copy these remote blocks into these local blocks" into RDMA READ work requests.
//!
//! For each layer, in layer order:
//! 1. every (remote block, local block) pair gives one K and one V segment of
//!    `block_bytes`, addressed through each side's [`KvMemoryLayout`] and regions;
//! 2. segments are sorted by remote address and neighbours that are contiguous on *both*
//!    sides (same rkey and lkey) are merged, so runs of consecutive blocks become one READ,
//!    and so do a block's K and V where a layout puts them side by side;
//! 3. merged segments are cut into pieces no larger than a per-layer limit: the message
//!    size cap, lowered to an even share of the layer per queue pair (but not below
//!    `min_split_bytes`) so one big run still spreads over every QP;
//! 4. each piece goes to the queue pair with the fewest bytes so far.
//!
//! Every queue pair's list is therefore in layer order: once every QP has completed its
//! requests of layer `l`, layer `l` has fully landed and decode may run it.

use serde::{Deserialize, Serialize};

use crate::error::{KvPart, LayoutError, PlanError, Side};
use crate::layout::KvMemoryLayout;
use crate::meta::{RemoteRegion, MAX_QPS_PER_CONNECTION};

/// Default cap on one READ. Large enough to amortise per-request cost, small enough
/// that several requests of a layer are in flight on every QP.
pub const DEFAULT_MAX_MESSAGE_BYTES: u64 = 1 << 20;
/// Default floor for splitting a layer across queue pairs.
pub const DEFAULT_MIN_SPLIT_BYTES: u64 = 64 << 10;
/// Pieces of a split are multiples of this where possible (cache lines, PCIe writes).
const SPLIT_ALIGN: u64 = 64;

/// A registered region on the reading side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LocalRegion {
    pub addr: u64,
    pub len: u64,
    pub lkey: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanOptions {
    /// Queue pairs to spread the requests over (1 to 64).
    pub num_qps: usize,
    /// Largest single READ, in bytes (1 to `u32::MAX`; also bounded by the port's
    /// `max_msg_sz`, which the transfer checks).
    pub max_message_bytes: u64,
    /// A layer is split across queue pairs only into pieces at least this large.
    pub min_split_bytes: u64,
}

impl Default for PlanOptions {
    fn default() -> Self {
        Self { num_qps: 1, max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES, min_split_bytes: DEFAULT_MIN_SPLIT_BYTES }
    }
}

/// One RDMA READ: `len` bytes from `remote_addr` (under `rkey`) to `local_addr` (under `lkey`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReadRequest {
    pub layer: u32,
    pub remote_addr: u64,
    pub rkey: u32,
    pub local_addr: u64,
    pub lkey: u32,
    pub len: u32,
}

/// Requests per queue pair, each list in layer order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReadPlan {
    pub layers: u32,
    pub qps: Vec<Vec<ReadRequest>>,
}

impl ReadPlan {
    pub fn total_bytes(&self) -> u64 {
        self.qp_bytes().iter().sum()
    }

    pub fn qp_bytes(&self) -> Vec<u64> {
        self.qps.iter().map(|q| q.iter().map(|r| r.len as u64).sum()).collect()
    }

    pub fn num_requests(&self) -> usize {
        self.qps.iter().map(Vec::len).sum()
    }

    pub fn requests(&self) -> impl Iterator<Item = &ReadRequest> {
        self.qps.iter().flatten()
    }
}

/// Plans READs between one remote cache and one local cache. Built once per peer (checks
/// layouts and region bounds), then asked for a plan per request.
#[derive(Debug, Clone)]
pub struct ReadPlanner {
    remote: KvMemoryLayout,
    remote_regions: Vec<RemoteRegion>,
    local: KvMemoryLayout,
    local_regions: Vec<LocalRegion>,
    options: PlanOptions,
}

#[derive(Debug, Clone, Copy)]
struct Segment {
    rkey: u32,
    raddr: u64,
    lkey: u32,
    laddr: u64,
    len: u64,
}

impl ReadPlanner {
    pub fn new(
        remote: KvMemoryLayout,
        remote_regions: Vec<RemoteRegion>,
        local: KvMemoryLayout,
        local_regions: Vec<LocalRegion>,
        options: PlanOptions,
    ) -> Result<Self, PlanError> {
        if options.num_qps == 0 || options.num_qps > MAX_QPS_PER_CONNECTION {
            return Err(PlanError::Options(format!(
                "num_qps {} is not in 1..={MAX_QPS_PER_CONNECTION}",
                options.num_qps
            )));
        }
        if options.max_message_bytes == 0 || options.max_message_bytes > u32::MAX as u64 {
            return Err(PlanError::Options(format!(
                "max_message_bytes {} is not in 1..={}",
                options.max_message_bytes,
                u32::MAX
            )));
        }
        if remote.shape != local.shape {
            return Err(PlanError::ShapeMismatch {
                remote: format!("{:?}", remote.shape),
                local: format!("{:?}", local.shape),
            });
        }
        let remote_spans: Vec<(u64, u64)> = remote_regions.iter().map(|r| (r.addr, r.len)).collect();
        let local_spans: Vec<(u64, u64)> = local_regions.iter().map(|r| (r.addr, r.len)).collect();
        check_side(Side::Remote, &remote, &remote_spans)?;
        check_side(Side::Local, &local, &local_spans)?;
        Ok(Self { remote, remote_regions, local, local_regions, options })
    }

    pub fn options(&self) -> &PlanOptions {
        &self.options
    }

    /// Plans the READs that copy each `(remote block, local block)` pair, for every layer,
    /// K and V. Order of `pairs` does not matter; a local block may appear only once.
    pub fn plan(&self, pairs: &[(u32, u32)]) -> Result<ReadPlan, PlanError> {
        let (rn, ln) = (self.remote.num_blocks, self.local.num_blocks);
        for &(r, l) in pairs {
            if r >= rn {
                return Err(PlanError::BlockOutOfRange { side: Side::Remote, block: r, num_blocks: rn });
            }
            if l >= ln {
                return Err(PlanError::BlockOutOfRange { side: Side::Local, block: l, num_blocks: ln });
            }
        }
        let mut locals: Vec<u32> = pairs.iter().map(|p| p.1).collect();
        locals.sort_unstable();
        if let Some(w) = locals.windows(2).find(|w| w[0] == w[1]) {
            return Err(PlanError::DuplicateLocalBlock { block: w[0] });
        }

        let n = self.options.num_qps;
        let layers = self.remote.shape.layers;
        let bb = self.remote.shape.block_bytes();
        let mut plan = ReadPlan { layers, qps: vec![Vec::new(); n] };
        let mut load = vec![0u64; n];
        let mut segments: Vec<Segment> = Vec::with_capacity(2 * pairs.len());
        let mut merged: Vec<Segment> = Vec::with_capacity(2 * pairs.len());
        for layer in 0..layers {
            segments.clear();
            for part in [KvPart::K, KvPart::V] {
                for &(r, l) in pairs {
                    let (rreg, roff) = self.remote.block_offset(layer, part, r);
                    let (lreg, loff) = self.local.block_offset(layer, part, l);
                    let rr = &self.remote_regions[rreg as usize];
                    let lr = &self.local_regions[lreg as usize];
                    // No overflow: `new` checked addr + len and that each block ends inside its region.
                    segments.push(Segment {
                        rkey: rr.rkey,
                        raddr: rr.addr + roff,
                        lkey: lr.lkey,
                        laddr: lr.addr + loff,
                        len: bb,
                    });
                }
            }
            segments.sort_unstable_by_key(|s| (s.rkey, s.raddr, s.lkey, s.laddr));
            merged.clear();
            for s in &segments {
                match merged.last_mut() {
                    Some(p)
                        if p.rkey == s.rkey
                            && p.lkey == s.lkey
                            && p.raddr + p.len == s.raddr
                            && p.laddr + p.len == s.laddr =>
                    {
                        p.len += s.len
                    }
                    _ => merged.push(*s),
                }
            }
            let layer_bytes: u64 = merged.iter().map(|s| s.len).sum();
            let limit = self.piece_limit(layer_bytes);
            for s in &merged {
                let mut done = 0;
                for piece in split(s.len, limit) {
                    let q = (0..n).min_by_key(|&q| (load[q], q)).unwrap_or(0);
                    plan.qps[q].push(ReadRequest {
                        layer,
                        remote_addr: s.raddr + done,
                        rkey: s.rkey,
                        local_addr: s.laddr + done,
                        lkey: s.lkey,
                        len: piece as u32, // piece <= max_message_bytes <= u32::MAX
                    });
                    load[q] += piece;
                    done += piece;
                }
            }
        }
        Ok(plan)
    }

    /// Largest piece for a layer of `layer_bytes`: the message cap, or an even share per
    /// QP when that is smaller (never below `min_split_bytes`), rounded down to whole cache
    /// lines when it is at least one.
    fn piece_limit(&self, layer_bytes: u64) -> u64 {
        let o = &self.options;
        let share = layer_bytes.div_ceil(o.num_qps as u64);
        let limit = share.max(o.min_split_bytes).min(o.max_message_bytes).max(1);
        if limit >= SPLIT_ALIGN {
            limit / SPLIT_ALIGN * SPLIT_ALIGN
        } else {
            limit
        }
    }
}

/// Cuts `len` into the fewest pieces of at most `limit`, of near-equal size (whole cache
/// lines where the limit allows), the remainder last.
fn split(len: u64, limit: u64) -> impl Iterator<Item = u64> {
    let pieces = len.div_ceil(limit).max(1);
    let mut chunk = len.div_ceil(pieces);
    if limit >= SPLIT_ALIGN {
        chunk = chunk.div_ceil(SPLIT_ALIGN) * SPLIT_ALIGN;
        chunk = chunk.min(limit);
    }
    let mut left = len;
    std::iter::from_fn(move || {
        (left > 0).then(|| {
            let take = chunk.min(left);
            left -= take;
            take
        })
    })
}

fn check_side(side: Side, layout: &KvMemoryLayout, spans: &[(u64, u64)]) -> Result<(), PlanError> {
    let err = |source: LayoutError| PlanError::Layout { side, source };
    layout.validate().map_err(err)?;
    let lens: Vec<u64> = spans.iter().map(|s| s.1).collect();
    layout.check_regions(&lens).map_err(err)?;
    for (i, &(addr, len)) in spans.iter().enumerate() {
        if addr.checked_add(len).is_none() {
            return Err(PlanError::RegionWraps { side, region: i as u32, addr, len });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
