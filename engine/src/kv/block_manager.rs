//! Block allocation with reference counts and a prefix cache.
//!
//! A block is in use while its reference count is positive (several sequences share
//! prefix blocks and the forked samples of one request). A free block may still hold a
//! cached prefix: it stays findable by its key until allocation evicts it. Free blocks
//! are evicted least recently freed first; blocks holding nothing cached go first.

use std::collections::HashMap;

use super::free_queue::FreeQueue;

pub type BlockId = u32;

#[derive(Debug, Clone)]
pub struct BlockManager {
    block_size: usize,
    prefix_caching: bool,
    ref_counts: Vec<u32>,
    /// Key under which a block is registered in `cached`.
    keys: Vec<Option<u64>>,
    cached: HashMap<u64, BlockId>,
    free: FreeQueue,
}

impl BlockManager {
    pub fn new(num_blocks: usize, block_size: usize, prefix_caching: bool) -> Self {
        Self {
            block_size,
            prefix_caching,
            ref_counts: vec![0; num_blocks],
            keys: vec![None; num_blocks],
            cached: HashMap::new(),
            free: FreeQueue::full(num_blocks),
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }
    pub fn prefix_caching(&self) -> bool {
        self.prefix_caching
    }
    pub fn num_blocks(&self) -> usize {
        self.ref_counts.len()
    }
    /// Blocks that can be allocated now (free, whether or not they hold a cached prefix).
    pub fn num_free(&self) -> usize {
        self.free.len()
    }
    pub fn num_used(&self) -> usize {
        self.num_blocks() - self.num_free()
    }
    pub fn ref_count(&self, block: BlockId) -> u32 {
        self.ref_counts[block as usize]
    }
    pub fn num_cached(&self) -> usize {
        self.cached.len()
    }

    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// The longest run of cached blocks matching `keys` from the start (no references
    /// taken yet).
    pub fn match_prefix(&self, keys: &[u64]) -> Vec<BlockId> {
        if !self.prefix_caching {
            return Vec::new();
        }
        keys.iter().map_while(|k| self.cached.get(k).copied()).collect()
    }

    /// How many of `blocks` are free now (taking them costs free capacity).
    pub fn count_free(&self, blocks: &[BlockId]) -> usize {
        blocks.iter().filter(|&&b| self.ref_counts[b as usize] == 0).count()
    }

    /// A block table for `total` blocks: `hits` (cached blocks, now shared) then fresh
    /// ones. None, taking nothing, if too few blocks are free.
    pub fn claim(&mut self, hits: Vec<BlockId>, total: usize) -> Option<Vec<BlockId>> {
        let fresh = total - hits.len();
        if fresh + self.count_free(&hits) > self.num_free() {
            return None;
        }
        self.acquire(&hits);
        let mut table = hits;
        table.extend((0..fresh).map(|_| self.allocate().expect("counted free blocks")));
        Some(table)
    }

    /// Takes a reference on each block (prefix hits and forks).
    pub fn acquire(&mut self, blocks: &[BlockId]) {
        for &b in blocks {
            if self.ref_counts[b as usize] == 0 {
                self.free.remove(b);
            }
            self.ref_counts[b as usize] += 1;
        }
    }

    /// A fresh block with one reference, evicting its cached prefix if it had one.
    pub fn allocate(&mut self) -> Option<BlockId> {
        let b = self.free.pop_front()?;
        if let Some(key) = self.keys[b as usize].take() {
            self.cached.remove(&key);
        }
        self.ref_counts[b as usize] = 1;
        Some(b)
    }

    /// Drops one reference per block. Pass a sequence's blocks in order: they are queued
    /// tail first, so a sequence's last (most specific) blocks are evicted before its
    /// shared prefix.
    pub fn release(&mut self, blocks: &[BlockId]) {
        for &b in blocks.iter().rev() {
            let rc = &mut self.ref_counts[b as usize];
            assert!(*rc > 0, "block {b} released more often than acquired");
            *rc -= 1;
            if *rc == 0 {
                if self.keys[b as usize].is_some() {
                    self.free.push_back(b);
                } else {
                    self.free.push_front(b);
                }
            }
        }
    }

    /// Records that `block` now holds the full block with prefix key `key`. If another
    /// block already holds that prefix, the first one stays the cached copy.
    pub fn register(&mut self, block: BlockId, key: u64) {
        if !self.prefix_caching || self.keys[block as usize].is_some() {
            return;
        }
        if let std::collections::hash_map::Entry::Vacant(e) = self.cached.entry(key) {
            e.insert(block);
            self.keys[block as usize] = Some(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn prefix_hits_share_blocks_and_eviction_is_lru() {
        let mut bm = BlockManager::new(4, 2, true);
        let a = bm.allocate().unwrap();
        let b = bm.allocate().unwrap();
        bm.register(a, 10);
        bm.register(b, 11);
        assert_eq!(bm.match_prefix(&[10, 11, 12]), vec![a, b]);
        bm.release(&[a, b]); // b queued before a: the tail is evicted first
        assert_eq!(bm.num_free(), 4);
        // Uncached free blocks are used before cached ones.
        let c = bm.allocate().unwrap();
        let d = bm.allocate().unwrap();
        assert!(![c, d].contains(&a) && ![c, d].contains(&b));
        assert_eq!(bm.match_prefix(&[10, 11]), vec![a, b]);
        let e = bm.allocate().unwrap();
        assert_eq!(e, b, "the sequence's tail block is evicted first");
        assert_eq!(bm.match_prefix(&[10, 11]), vec![a], "evicted key is gone");
        bm.acquire(&[a]);
        assert_eq!(bm.ref_count(a), 1);
        assert!(bm.allocate().is_none());
    }

    #[test]
    fn duplicate_keys_keep_the_first_block() {
        let mut bm = BlockManager::new(2, 2, true);
        let a = bm.allocate().unwrap();
        let b = bm.allocate().unwrap();
        bm.register(a, 5);
        bm.register(b, 5);
        assert_eq!(bm.match_prefix(&[5]), vec![a]);
        bm.release(&[b]);
        assert_eq!(bm.match_prefix(&[5]), vec![a]);
    }

    #[test]
    fn no_caching_when_disabled() {
        let mut bm = BlockManager::new(2, 2, false);
        let a = bm.allocate().unwrap();
        bm.register(a, 1);
        assert!(bm.match_prefix(&[1]).is_empty());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Alloc(usize),
        Hit(usize),
        Fork(usize),
        Free(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1usize..4).prop_map(Op::Alloc),
            (0usize..8).prop_map(Op::Hit),
            (0usize..8).prop_map(Op::Fork),
            (0usize..8).prop_map(Op::Free),
        ]
    }

    proptest! {
        /// Random allocate / prefix-hit / fork / free sequences: reference counts always equal
        /// the number of holders, and once everyone let go every block is free again.
        #[test]
        fn reference_counts_match_holders_and_nothing_leaks(ops in proptest::collection::vec(op(), 1..200)) {
            let mut bm = BlockManager::new(12, 4, true);
            let mut holders: Vec<Vec<BlockId>> = Vec::new();
            let mut next_key = 0u64;
            for op in ops {
                match op {
                    Op::Alloc(n) => {
                        let mut blocks = Vec::new();
                        for _ in 0..n {
                            match bm.allocate() { Some(b) => blocks.push(b), None => break }
                        }
                        for &b in &blocks {
                            next_key += 1;
                            bm.register(b, next_key % 7); // few keys: duplicates happen
                        }
                        holders.push(blocks);
                    }
                    Op::Hit(k) => {
                        let hit = bm.match_prefix(&[k as u64 % 7]);
                        bm.acquire(&hit);
                        holders.push(hit);
                    }
                    Op::Fork(i) if !holders.is_empty() => {
                        let blocks = holders[i % holders.len()].clone();
                        bm.acquire(&blocks);
                        holders.push(blocks);
                    }
                    Op::Free(i) if !holders.is_empty() => {
                        let blocks = holders.swap_remove(i % holders.len());
                        bm.release(&blocks);
                    }
                    _ => {}
                }
                let mut expected = vec![0u32; bm.num_blocks()];
                for h in &holders { for &b in h { expected[b as usize] += 1; } }
                for b in 0..bm.num_blocks() {
                    prop_assert_eq!(bm.ref_count(b as u32), expected[b]);
                }
                prop_assert_eq!(bm.num_used(), expected.iter().filter(|&&c| c > 0).count());
            }
            for h in holders.drain(..) { bm.release(&h); }
            prop_assert_eq!(bm.num_free(), bm.num_blocks());
        }
    }
}
