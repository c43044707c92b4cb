//! Leases on handed-off KV blocks: a prefill engine keeps a request's blocks referenced
//! until the decode engine says it has pulled them, or until the lease expires, so a
//! decode engine that dies never leaks them.
//!
//! An early handoff reserves its lease before the prompt's last forward runs: the lease
//! exists without blocks until the first token is sampled, and callers asking for that
//! token wait on it. Releasing a reserved lease cancels it: the request's blocks are then
//! freed instead of pinned.
//!
//! The table keeps a [`LeaseDirectory`] in step for readers off the engine thread.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::{BlockId, LeaseDirectory};
use crate::kv_transfer::{FirstTokenResult, LeaseExtent};
use crate::request::TokenLogprob;

/// Where a waiter for a lease's first token gets its answer.
pub type FirstTokenReply = oneshot::Sender<FirstTokenResult>;

#[derive(Debug)]
struct Lease {
    /// Empty while reserved.
    blocks: Vec<BlockId>,
    expires_at: Instant,
    first_token: Option<TokenLogprob>,
    waiters: Vec<FirstTokenReply>,
    /// Per layer: read to the host yet (a TCP pull)? Empty until the first read.
    layers_read: Vec<bool>,
}

impl Lease {
    fn end(self, why: &str) -> Vec<BlockId> {
        for waiter in self.waiters {
            let _ = waiter.send(Err(why.to_owned()));
        }
        self.blocks
    }
}

#[derive(Debug)]
pub struct LeaseTable {
    leases: HashMap<u64, Lease>,
    ttl: Duration,
    next_id: u64,
    directory: LeaseDirectory,
}

impl LeaseTable {
    /// `salt` makes ids distinct across restarts of one engine, so a stale id from a
    /// previous process misses instead of freeing someone else's blocks. Ids are not
    /// secrets: whoever reaches the engine's port can free a lease.
    pub fn new(ttl: Duration, salt: u64) -> Self {
        Self { leases: HashMap::new(), ttl, next_id: salt | 1, directory: LeaseDirectory::default() }
    }

    /// The directory this table keeps in step.
    pub fn directory(&self) -> LeaseDirectory {
        self.directory.clone()
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

    /// Reserves a lease whose blocks and first token come later ([`Self::fill`]);
    /// returns its id and when it expires. `readable` is what a reader may read of it
    /// before then (the announced blocks, with the progress mark to wait for).
    pub fn reserve(&mut self, now: Instant, readable: LeaseExtent) -> (u64, Instant) {
        let id = self.next_id;
        // An odd-constant step walks all of u64 before repeating.
        self.next_id = self.next_id.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let expires_at = now + self.ttl;
        self.leases.insert(id, Lease { blocks: Vec::new(), expires_at, first_token: None, waiters: Vec::new(), layers_read: Vec::new() });
        self.directory.insert(id, readable);
        (id, expires_at)
    }

    /// Pins `blocks` (the caller hands over its references) under a reserved lease and
    /// answers the first token's waiters. A lease released or expired meanwhile gives the
    /// blocks back (Err): they are the caller's to free.
    pub fn fill(&mut self, id: u64, blocks: Vec<BlockId>, first_token: TokenLogprob) -> Result<Instant, Vec<BlockId>> {
        let Some(lease) = self.leases.get_mut(&id) else {
            return Err(blocks);
        };
        for waiter in lease.waiters.drain(..) {
            let _ = waiter.send(Ok(first_token.clone()));
        }
        self.directory.insert(id, LeaseExtent { blocks: blocks.clone(), ready_mark: None });
        lease.blocks = blocks;
        lease.first_token = Some(first_token);
        Ok(lease.expires_at)
    }

    /// Pins `blocks` under a new lease at once; returns its id and expiry.
    pub fn pin(&mut self, blocks: Vec<BlockId>, first_token: TokenLogprob, now: Instant) -> (u64, Instant) {
        let (id, _) = self.reserve(now, LeaseExtent::default());
        let expires_at = self.fill(id, blocks, first_token).expect("the lease was just reserved");
        (id, expires_at)
    }

    /// The lease's blocks: None if unknown, empty while reserved.
    pub fn blocks(&self, id: u64) -> Option<&[BlockId]> {
        self.leases.get(&id).map(|l| l.blocks.as_slice())
    }

    /// Records that `layers` of lease `id` (of `num_layers`) were read to the host; once
    /// every layer was, the lease has done its work and ends: its blocks are returned.
    pub fn mark_read(&mut self, id: u64, layers: std::ops::Range<usize>, num_layers: usize) -> Option<Vec<BlockId>> {
        let lease = self.leases.get_mut(&id)?;
        lease.layers_read.resize(num_layers, false);
        lease.layers_read[layers].fill(true);
        if lease.layers_read.iter().all(|&r| r) {
            return self.take(id);
        }
        None
    }

    /// Answers `reply` with the lease's first token now if it is known, else once it is.
    pub fn await_first_token(&mut self, id: u64, reply: FirstTokenReply) {
        match self.leases.get_mut(&id) {
            None => {
                let _ = reply.send(Err(format!("unknown or expired KV lease {id}")));
            }
            Some(Lease { first_token: Some(token), .. }) => {
                let _ = reply.send(Ok(token.clone()));
            }
            Some(lease) => lease.waiters.push(reply),
        }
    }

    /// Ends a lease (reserved or not); its blocks are the caller's to release.
    pub fn take(&mut self, id: u64) -> Option<Vec<BlockId>> {
        self.directory.remove(id);
        self.leases.remove(&id).map(|l| l.end("the KV lease was released before prefill sampled its first token"))
    }

    /// Ends every lease that expired by `now`; returns their blocks.
    pub fn take_expired(&mut self, now: Instant) -> Vec<BlockId> {
        let expired: Vec<u64> = self.leases.iter().filter(|(_, l)| l.expires_at <= now).map(|(&id, _)| id).collect();
        for &id in &expired {
            self.directory.remove(id);
        }
        expired.into_iter().filter_map(|id| self.leases.remove(&id)).flat_map(|l| l.end("the KV lease expired")).collect()
    }

    /// Ends every lease (shutdown).
    pub fn take_all(&mut self) -> Vec<BlockId> {
        for &id in self.leases.keys() {
            self.directory.remove(id);
        }
        self.leases.drain().flat_map(|(_, l)| l.end("the engine shut down")).collect()
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
        let (a, expires) = table.pin(vec![1, 2], token(1), t0);
        let (b, _) = table.pin(vec![3], token(2), t0 + Duration::from_secs(5));
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

    fn token(token_id: u32) -> TokenLogprob {
        TokenLogprob { token_id, logprob: -0.5, top: Vec::new() }
    }

    fn waiter(table: &mut LeaseTable, id: u64) -> oneshot::Receiver<FirstTokenResult> {
        let (tx, rx) = oneshot::channel();
        table.await_first_token(id, tx);
        rx
    }

    #[test]
    fn a_reserved_lease_answers_its_waiters_when_filled_and_later_callers_at_once() {
        let mut table = LeaseTable::new(Duration::from_secs(10), 7);
        let (id, _) = table.reserve(Instant::now(), LeaseExtent::default());
        let mut early = waiter(&mut table, id);
        assert!(early.try_recv().is_err(), "no token yet");
        assert_eq!(table.blocks(id), Some(&[][..]));
        assert!(table.fill(id, vec![4, 5], token(9)).is_ok());
        assert_eq!(early.try_recv().unwrap(), Ok(token(9)));
        assert_eq!(waiter(&mut table, id).try_recv().unwrap(), Ok(token(9)));
        assert_eq!(table.num_blocks(), 2);
    }

    #[test]
    fn releasing_or_expiring_a_reserved_lease_fails_its_waiters_and_refuses_the_blocks() {
        let t0 = Instant::now();
        let mut table = LeaseTable::new(Duration::from_secs(10), 7);
        let (released, _) = table.reserve(t0, LeaseExtent::default());
        let mut w = waiter(&mut table, released);
        assert_eq!(table.take(released), Some(Vec::new()));
        assert!(w.try_recv().unwrap().unwrap_err().contains("released"));
        assert_eq!(table.fill(released, vec![1], token(3)), Err(vec![1]), "the caller frees the blocks");
        let (expired, _) = table.reserve(t0, LeaseExtent::default());
        let mut w = waiter(&mut table, expired);
        assert!(table.take_expired(t0 + Duration::from_secs(10)).is_empty());
        assert!(w.try_recv().unwrap().unwrap_err().contains("expired"));
        assert!(waiter(&mut table, expired).try_recv().unwrap().unwrap_err().contains("unknown or expired"));
    }

    #[test]
    fn the_directory_lists_what_may_be_read_until_the_lease_ends_however_it_ends() {
        let t0 = Instant::now();
        let mut table = LeaseTable::new(Duration::from_secs(10), 7);
        let directory = table.directory();
        let announced = LeaseExtent { blocks: vec![4, 5], ready_mark: Some(12) };
        let (early, _) = table.reserve(t0, announced.clone());
        assert_eq!(directory.get(early), Some(announced), "readable once each layer reaches the mark");
        table.fill(early, vec![4, 5], token(1)).unwrap();
        assert_eq!(directory.get(early), Some(LeaseExtent { blocks: vec![4, 5], ready_mark: None }), "written: no wait");
        assert!(table.mark_read(early, 0..1, 2).is_none());
        assert!(directory.contains(early), "half read");
        assert_eq!(table.mark_read(early, 1..2, 2), Some(vec![4, 5]));
        assert!(!directory.contains(early), "gone before its blocks are freed");
        let (late, _) = table.pin(vec![6], token(2), t0);
        assert!(directory.get(late).is_some_and(|e| e.is_readable()));
        let (unannounced, _) = table.reserve(t0, LeaseExtent::default());
        assert!(!directory.get(unannounced).unwrap().is_readable(), "no progress published: wait for the token");
        let (taken, _) = table.pin(vec![7], token(3), t0 + Duration::from_secs(5));
        table.take(taken);
        assert_eq!(table.take_expired(t0 + Duration::from_secs(10)), vec![6]);
        assert!(![late, unannounced, taken].iter().any(|&id| directory.contains(id)));
        table.pin(vec![8], token(4), t0);
        table.take_all();
        assert!(directory.is_empty());
    }
}
