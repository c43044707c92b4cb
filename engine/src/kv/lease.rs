//! Leases on handed-off KV blocks: a prefill engine keeps a request's blocks referenced
//! until the decode engine says it has pulled them, or until the lease expires, so a
//! decode engine that dies never leaks them.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::BlockId;

#[derive(Debug)]
struct Lease {
    blocks: Vec<BlockId>,
    expires_at: Instant,
}

#[derive(Debug)]
pub struct LeaseTable {
    leases: HashMap<u64, Lease>,
    ttl: Duration,
    next_id: u64,
}

impl LeaseTable {
    /// `salt` makes ids distinct across restarts of one engine, so a stale id from a
    /// previous process misses instead of freeing someone else's blocks. Ids are not
    /// secrets: whoever reaches the engine's port can free a lease.
    pub fn new(ttl: Duration, salt: u64) -> Self {
        Self { leases: HashMap::new(), ttl, next_id: salt | 1 }
    }

    pub fn len(&self) -> usize {
        self.leases.len()
    }

    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }

    /// Blocks held by leases.
    pub fn num_blocks(&self) -> usize {
        self.leases.values().map(|l| l.blocks.len()).sum()
    }

    /// Pins `blocks` (the caller hands over its references); returns the lease id and
    /// when it expires.
    pub fn pin(&mut self, blocks: Vec<BlockId>, now: Instant) -> (u64, Instant) {
        let id = self.next_id;
        // An odd-constant step walks all of u64 before repeating.
        self.next_id = self.next_id.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let expires_at = now + self.ttl;
        self.leases.insert(id, Lease { blocks, expires_at });
        (id, expires_at)
    }

    pub fn blocks(&self, id: u64) -> Option<&[BlockId]> {
        self.leases.get(&id).map(|l| l.blocks.as_slice())
    }

    /// Ends a lease; its blocks are the caller's to release.
    pub fn take(&mut self, id: u64) -> Option<Vec<BlockId>> {
        self.leases.remove(&id).map(|l| l.blocks)
    }

    /// Ends every lease that expired by `now`; returns their blocks.
    pub fn take_expired(&mut self, now: Instant) -> Vec<BlockId> {
        let expired: Vec<u64> = self.leases.iter().filter(|(_, l)| l.expires_at <= now).map(|(&id, _)| id).collect();
        expired.into_iter().flat_map(|id| self.take(id).unwrap_or_default()).collect()
    }

    /// Ends every lease (shutdown).
    pub fn take_all(&mut self) -> Vec<BlockId> {
        self.leases.drain().flat_map(|(_, l)| l.blocks).collect()
    }

    /// The earliest expiry, so an idle engine knows when to wake up.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.leases.values().map(|l| l.expires_at).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_taken_once_and_expires_on_time() {
        let t0 = Instant::now();
        let mut table = LeaseTable::new(Duration::from_secs(10), 42);
        let (a, expires) = table.pin(vec![1, 2], t0);
        let (b, _) = table.pin(vec![3], t0 + Duration::from_secs(5));
        assert_ne!(a, b);
        assert_eq!(expires, t0 + Duration::from_secs(10));
        assert_eq!(table.num_blocks(), 3);
        assert_eq!(table.next_expiry(), Some(expires));
        assert!(table.take_expired(t0 + Duration::from_secs(9)).is_empty());
        assert_eq!(table.take_expired(t0 + Duration::from_secs(10)), vec![1, 2]);
        assert_eq!(table.take(a), None, "expired lease is gone");
        assert_eq!(table.take(b), Some(vec![3]));
        assert!(table.is_empty());
    }
}
