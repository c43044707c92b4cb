//! Large buffers kept for reuse (KV frames on their way between engines): allocating one
//! costs far more than filling it (page faults for a fresh Vec, page-locking for pinned
//! memory). The smallest buffer that fits is handed out; the pool keeps the largest
//! buffers its limits allow, so that small buffers left by short prompts do not turn away
//! the buffers of a long one (which then had to be allocated anew for each frame:
//! measured, four connections read a 4K-token prompt's KV at 0.3 GB/s each).

use std::sync::{Mutex, MutexGuard};

pub struct BufferPool<T> {
    /// (size in bytes, buffer)
    free: Mutex<Vec<(usize, T)>>,
    max_buffers: usize,
    max_bytes: usize,
}

impl<T> BufferPool<T> {
    pub const fn new(max_buffers: usize, max_bytes: usize) -> Self {
        Self { free: Mutex::new(Vec::new()), max_buffers, max_bytes }
    }

    /// The smallest pooled buffer of at least `bytes`, if any.
    pub fn take(&self, bytes: usize) -> Option<T> {
        let mut free = self.lock();
        let best = free.iter().enumerate().filter(|(_, (size, _))| *size >= bytes).min_by_key(|(_, (size, _))| *size).map(|(i, _)| i);
        best.map(|i| free.swap_remove(i).1)
    }

    /// Keeps `buffer` of `size` bytes; returns the buffers that no longer fit the limits,
    /// for the caller to free (largest first, the pool keeps what fits).
    pub fn give_back(&self, size: usize, buffer: T) -> Vec<T> {
        let mut free = self.lock();
        free.push((size, buffer));
        free.sort_by_key(|(size, _)| std::cmp::Reverse(*size));
        let (mut kept, mut held, mut dropped) = (Vec::new(), 0, Vec::new());
        for (size, buffer) in free.drain(..) {
            if kept.len() < self.max_buffers && held + size <= self.max_bytes {
                held += size;
                kept.push((size, buffer));
            } else {
                dropped.push(buffer);
            }
        }
        *free = kept;
        dropped
    }

    fn lock(&self) -> MutexGuard<'_, Vec<(usize, T)>> {
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::BufferPool;

    #[test]
    fn the_smallest_fitting_buffer_is_handed_out_and_the_largest_are_kept() {
        let pool = BufferPool::new(3, 100);
        for size in [10, 20, 5] {
            assert!(pool.give_back(size, size).is_empty());
        }
        assert_eq!(pool.give_back(40, 40), vec![5], "four buffers: the smallest goes");
        assert_eq!(pool.give_back(50, 50), vec![20], "over 100 bytes: 50 + 40 + 10 fit");
        assert_eq!(pool.take(30), Some(40), "the smallest that fits");
        assert_eq!(pool.take(60), None);
        assert_eq!(pool.give_back(200, 200), vec![200], "a buffer over the byte limit is not kept");
        assert_eq!((pool.take(1), pool.take(1), pool.take(1)), (Some(10), Some(50), None));
    }
}
