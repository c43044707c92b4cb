//! Free blocks in eviction order, as an intrusive doubly linked list over block ids, so a
//! cached free block that gets a prefix hit leaves the queue in O(1).

const NONE: u32 = u32::MAX;

#[derive(Debug, Clone)]
pub struct FreeQueue {
    prev: Vec<u32>,
    next: Vec<u32>,
    queued: Vec<bool>,
    head: u32,
    tail: u32,
    len: usize,
}

impl FreeQueue {
    /// A queue holding every block, lowest id first.
    pub fn full(num_blocks: usize) -> Self {
        let mut q = Self {
            prev: vec![NONE; num_blocks],
            next: vec![NONE; num_blocks],
            queued: vec![false; num_blocks],
            head: NONE,
            tail: NONE,
            len: 0,
        };
        for b in 0..num_blocks as u32 {
            q.push_back(b);
        }
        q
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn contains(&self, block: u32) -> bool {
        self.queued[block as usize]
    }

    pub fn push_back(&mut self, block: u32) {
        debug_assert!(!self.contains(block));
        let b = block as usize;
        self.prev[b] = self.tail;
        self.next[b] = NONE;
        if self.tail == NONE {
            self.head = block;
        } else {
            self.next[self.tail as usize] = block;
        }
        self.tail = block;
        self.queued[b] = true;
        self.len += 1;
    }

    pub fn push_front(&mut self, block: u32) {
        debug_assert!(!self.contains(block));
        let b = block as usize;
        self.next[b] = self.head;
        self.prev[b] = NONE;
        if self.head == NONE {
            self.tail = block;
        } else {
            self.prev[self.head as usize] = block;
        }
        self.head = block;
        self.queued[b] = true;
        self.len += 1;
    }

    pub fn pop_front(&mut self) -> Option<u32> {
        if self.head == NONE {
            return None;
        }
        let block = self.head;
        self.remove(block);
        Some(block)
    }

    pub fn remove(&mut self, block: u32) {
        let b = block as usize;
        if !self.queued[b] {
            return;
        }
        let (p, n) = (self.prev[b], self.next[b]);
        if p == NONE {
            self.head = n;
        } else {
            self.next[p as usize] = n;
        }
        if n == NONE {
            self.tail = p;
        } else {
            self.prev[n as usize] = p;
        }
        self.queued[b] = false;
        self.len -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_order_through_removals() {
        let mut q = FreeQueue::full(4);
        q.remove(1);
        q.push_back(1);
        q.remove(0);
        q.push_front(0);
        assert_eq!(std::iter::from_fn(|| q.pop_front()).collect::<Vec<_>>(), vec![0, 2, 3, 1]);
        assert_eq!(q.len(), 0);
    }
}
