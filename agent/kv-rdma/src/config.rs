//! Plain settings and results of the device API, compiled with or without the `rdma`
//! feature so callers can build them either way.

use std::time::Duration;

/// Memory-region access rights (the `IBV_ACCESS_*` bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Access(u32);

impl Access {
    /// The HCA may write the region locally: needed by the *destination* of an RDMA READ.
    pub const LOCAL_WRITE: Access = Access(1);
    pub const REMOTE_WRITE: Access = Access(2);
    /// Peers may RDMA READ the region: needed by the *source* (prefill's KV cache).
    pub const REMOTE_READ: Access = Access(4);
    /// Lets the HCA reorder PCIe writes; a large win for GPU memory on many platforms.
    /// Optional: ignored by devices without support.
    pub const RELAXED_ORDERING: Access = Access(1 << 20);

    pub const fn bits(self) -> u32 {
        self.0
    }

    pub const fn union(self, other: Access) -> Access {
        Access(self.0 | other.0)
    }

    pub const fn contains(self, other: Access) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for Access {
    type Output = Access;
    fn bitor(self, rhs: Access) -> Access {
        self.union(rhs)
    }
}

/// Which GID of a port to use as the source GID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GidSelector {
    /// InfiniBand: index 0. RoCE: prefer a RoCE v2 GID of an IPv4 address, then any
    /// routable RoCE v2 GID, then RoCE v2 link-local, then RoCE v1.
    #[default]
    Auto,
    Index(u8),
}

/// Queue-pair settings. Defaults suit a data-centre fabric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpConfig {
    /// Send queue depth: most READs posted and not yet completed. Capped by the device.
    pub max_send_wr: u32,
    /// READs the peer may have in flight against this QP (capped by the device).
    pub responder_resources: u8,
    /// READs this QP keeps in flight (capped by the device and by the peer's responder
    /// resources).
    pub initiator_depth: u8,
    /// Local ACK timeout, 4.096 us * 2^timeout (14: about 67 ms).
    pub timeout: u8,
    /// Transport retries before a request fails (at most 7).
    pub retry_cnt: u8,
    /// Service level (InfiniBand) / priority mapping (RoCE).
    pub service_level: u8,
    /// RoCE: IP traffic class (DSCP << 2) of the GRH, for lossless-queue mapping.
    pub traffic_class: u8,
    /// RoCE: hop limit (IP TTL) of the GRH.
    pub hop_limit: u8,
}

impl Default for QpConfig {
    fn default() -> Self {
        Self {
            max_send_wr: 512,
            responder_resources: crate::meta::DEFAULT_RD_ATOMIC,
            initiator_depth: crate::meta::DEFAULT_RD_ATOMIC,
            timeout: 14,
            retry_cnt: 7,
            service_level: 0,
            traffic_class: 0,
            hop_limit: 64,
        }
    }
}

/// How a transfer posts and waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadOptions {
    /// Most work requests chained into one post (one doorbell); the last one is signalled.
    pub max_batch: usize,
    /// `ReadTransfer::wait` gives up (and moves the QPs to the error state) after this
    /// long; callers driving `progress` themselves keep their own deadline and drop the
    /// transfer to abort it.
    pub timeout: Duration,
}

impl Default for ReadOptions {
    fn default() -> Self {
        Self { max_batch: 32, timeout: Duration::from_secs(30) }
    }
}

/// Limits a device reports (`ibv_query_device`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeviceLimits {
    pub max_qp_wr: u32,
    pub max_cqe: u32,
    /// Most READs a QP can accept in flight as responder.
    pub max_qp_rd_atom: u32,
    /// Most READs a QP can issue in flight as requester.
    pub max_qp_init_rd_atom: u32,
    pub max_mr_size: u64,
}

/// What a finished transfer did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TransferStats {
    pub bytes: u64,
    pub requests: usize,
    /// `ibv_post_send` calls (doorbells).
    pub posts: usize,
    pub elapsed: Duration,
}

/// Kind of a GID table entry, as `ibv_query_gid_ex` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(feature = "rdma"), allow(dead_code))]
pub(crate) enum GidKind {
    Ib,
    RoceV1,
    RoceV2,
}

/// Preference of a RoCE GID for [`GidSelector::Auto`] (higher is better; None: unusable).
/// RoCE v2 is routable (UDP/IP) and what RoCE fabrics are configured for; an IPv4-mapped
/// GID follows the interface address the cluster network uses.
#[cfg_attr(not(feature = "rdma"), allow(dead_code))]
pub(crate) fn roce_gid_rank(gid: &crate::meta::Gid, kind: GidKind) -> Option<u8> {
    if gid.is_zero() {
        return None;
    }
    Some(match kind {
        GidKind::RoceV2 if gid.is_ipv4_mapped() => 4,
        GidKind::RoceV2 if !gid.is_link_local() => 3,
        GidKind::RoceV2 => 2,
        GidKind::RoceV1 => 1,
        GidKind::Ib => 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::Gid;

    #[test]
    fn roce_gid_preference() {
        let v4 = Gid::from_hex("00000000000000000000ffff0a000001").unwrap();
        let v6 = Gid::from_hex("20010db8000000000000000000000001").unwrap();
        let ll = Gid::from_hex("fe800000000000000000000000000001").unwrap();
        let ranks: Vec<_> =
            [(v4, GidKind::RoceV2), (v6, GidKind::RoceV2), (ll, GidKind::RoceV2), (v4, GidKind::RoceV1)]
                .iter()
                .map(|(g, k)| roce_gid_rank(g, *k))
                .collect();
        assert_eq!(ranks, vec![Some(4), Some(3), Some(2), Some(1)]);
        assert_eq!(roce_gid_rank(&Gid::default(), GidKind::RoceV2), None);
    }

    #[test]
    fn access_bits_combine() {
        let a = Access::LOCAL_WRITE | Access::REMOTE_READ;
        assert_eq!(a.bits(), 5);
        assert!(a.contains(Access::REMOTE_READ));
        assert!(!a.contains(Access::REMOTE_WRITE));
        assert!(!Access::default().contains(Access::LOCAL_WRITE));
    }
}
