//! Buffers for KV frames (a layer or a few of a prompt's KV on its way between engines
//! over TCP), reused across transfers in this process. A fresh buffer of tens of
//! megabytes costs a page fault per 4 KiB on first touch: filling one took 5x as long as
//! filling a reused one (67 MB: 40 ms against 8 ms), which capped TCP pulls at ~1.3 GB/s.

use std::sync::Mutex;

/// What the pool keeps at most: enough for a few frames in flight per transfer.
const MAX_BUFFERS: usize = 16;
const MAX_BYTES: usize = 2 << 30;

static POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// An empty buffer with room for `bytes`: a pooled one if one is large enough.
pub fn frame_buffer(bytes: usize) -> Vec<u8> {
    let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    // The smallest that fits, so large buffers stay for large frames.
    let best = pool.iter().enumerate().filter(|(_, b)| b.capacity() >= bytes).min_by_key(|(_, b)| b.capacity()).map(|(i, _)| i);
    match best {
        Some(i) => pool.swap_remove(i),
        None => Vec::with_capacity(bytes),
    }
}

/// Returns a frame's buffer to the pool (or frees it, when the pool is full).
pub fn recycle_frame_buffer(mut buffer: Vec<u8>) {
    buffer.clear();
    let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    let held: usize = pool.iter().map(Vec::capacity).sum();
    if buffer.capacity() > 0 && pool.len() < MAX_BUFFERS && held + buffer.capacity() <= MAX_BYTES {
        pool.push(buffer);
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
