//! A frame of KV bytes in host memory on its way between a KV cache and a socket: read
//! out of prefill's cache for the TCP transport's send side, or received by decode and
//! written into its cache. Whoever allocated the buffer gets it back when the frame is
//! dropped (a pool of this process's buffers; on a GPU, pinned memory the device maps).

use super::frame_pool::recycle_frame_buffer;

/// Bytes of one frame, layer-major as in [`super::KvFrame`].
pub trait HostBytes: Send {
    fn bytes(&self) -> &[u8];
    /// The same bytes, to receive a frame into.
    fn bytes_mut(&mut self) -> &mut [u8];
}

pub type HostFrame = Box<dyn HostBytes>;

/// A frame in a pooled buffer of this process ([`super::frame_buffer`]).
struct PooledFrame(Vec<u8>);

impl HostBytes for PooledFrame {
    fn bytes(&self) -> &[u8] {
        &self.0
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
}

impl Drop for PooledFrame {
    fn drop(&mut self) {
        recycle_frame_buffer(std::mem::take(&mut self.0));
    }
}

/// `bytes` (from [`super::frame_buffer`]) as a frame that recycles its buffer.
pub fn pooled_frame(bytes: Vec<u8>) -> HostFrame {
    Box::new(PooledFrame(bytes))
}
