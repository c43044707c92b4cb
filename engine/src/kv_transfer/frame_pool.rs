//! Buffers for KV frames (a layer or a few of a prompt's KV on its way between engines
//! over TCP), reused across transfers in this process. A fresh buffer of tens of
//! megabytes costs a page fault per 4 KiB on first touch: filling one took 5x as long as
//! filling a reused one (67 MB: 40 ms against 8 ms), which capped TCP pulls at ~1.3 GB/s.

use super::buffer_pool::BufferPool;

/// Enough for a few frames in flight per connection, for several pulls at once.
static POOL: BufferPool<Vec<u8>> = BufferPool::new(64, 2 << 30);

/// An empty buffer with room for `bytes`: a pooled one if one is large enough.
pub fn frame_buffer(bytes: usize) -> Vec<u8> {
    POOL.take(bytes).unwrap_or_else(|| Vec::with_capacity(bytes))
}

/// Returns a frame's buffer to the pool (or frees it, when the pool holds larger ones).
pub fn recycle_frame_buffer(mut buffer: Vec<u8>) {
    buffer.clear();
    if buffer.capacity() > 0 {
        drop(POOL.give_back(buffer.capacity(), buffer));
    }
}

#[cfg(test)]
mod tests {
    use super::{frame_buffer, recycle_frame_buffer};

    #[test]
    fn a_recycled_buffer_comes_back_empty_for_a_frame_it_fits() {
        let mut buffer = frame_buffer(3 << 20);
        buffer.extend_from_slice(&[7; 100]);
        let at = buffer.as_ptr();
        recycle_frame_buffer(buffer);
        // Other tests may use the pool at the same time: look for ours among a few.
        let taken: Vec<Vec<u8>> = (0..16).map(|_| frame_buffer(3 << 20)).collect();
        let ours = taken.iter().find(|b| b.as_ptr() == at).expect("the recycled buffer is handed out again");
        assert!(ours.is_empty() && ours.capacity() >= 3 << 20);
        assert!(frame_buffer(4 << 20).capacity() >= 4 << 20, "a larger frame gets a buffer that fits");
    }
}
