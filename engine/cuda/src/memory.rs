//! Device memory. Weights and the KV cache are plain owned allocations. Activations come
//! from a pool: freed blocks go back to a free list of their size class and the next
//! request of that class reuses them, so a forward pass allocates nothing from the
//! driver once warm, and replaying the same sequence of requests yields the same
//! addresses (what CUDA-graph capture relies on). The pool never returns memory to the
//! driver; its size is the activation peak that memory planning measures.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::result;
use cudarc::driver::sys::CUdeviceptr;

use crate::error::{OpContext, Result};

/// Device memory owned by one value, freed on drop.
pub struct DeviceBuffer {
    ptr: CUdeviceptr,
    bytes: usize,
}

impl DeviceBuffer {
    pub fn new(bytes: usize) -> Result<Self> {
        // SAFETY: a plain allocation; freed exactly once in Drop.
        let ptr = unsafe { result::malloc_sync(bytes.max(256)) }.op("device allocation")?;
        Ok(Self { ptr, bytes })
    }
    pub fn ptr(&self) -> CUdeviceptr {
        self.ptr
    }
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated by malloc_sync and not freed elsewhere.
        unsafe {
            let _ = result::free_sync(self.ptr);
        }
    }
}

// SAFETY: a device address; the driver serialises use through the context.
unsafe impl Send for DeviceBuffer {}
unsafe impl Sync for DeviceBuffer {}

/// Page-locked host memory for fast, truly asynchronous copies.
pub struct PinnedBuffer {
    ptr: *mut u8,
    bytes: usize,
}

impl PinnedBuffer {
    pub fn new(bytes: usize) -> Result<Self> {
        Self::alloc(bytes, 0)
    }
    /// Pinned memory that kernels can also address (over PCIe), and its device address.
    pub fn new_mapped(bytes: usize) -> Result<(Self, CUdeviceptr)> {
        const DEVICEMAP: u32 = 0x02; // CU_MEMHOSTALLOC_DEVICEMAP
        let buffer = Self::alloc(bytes, DEVICEMAP)?;
        let mut device: CUdeviceptr = 0;
        // SAFETY: the buffer was allocated with DEVICEMAP; the driver writes `device`.
        unsafe { cudarc::driver::sys::cuMemHostGetDevicePointer_v2(&mut device, buffer.ptr as *mut std::ffi::c_void, 0) }
            .result()
            .op("mapping pinned host memory for the device")?;
        Ok((buffer, device))
    }
    fn alloc(bytes: usize, flags: u32) -> Result<Self> {
        // SAFETY: freed exactly once in Drop.
        let ptr = unsafe { result::malloc_host(bytes.max(64), flags) }.op("pinned host allocation")? as *mut u8;
        Ok(Self { ptr, bytes })
    }
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `bytes` bytes were allocated at `ptr` and we hold &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.bytes) }
    }
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: as above, shared.
        unsafe { std::slice::from_raw_parts(self.ptr, self.bytes) }
    }
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated by malloc_host.
        unsafe {
            let _ = result::free_host(self.ptr as *mut std::ffi::c_void);
        }
    }
}

// SAFETY: plain host memory.
unsafe impl Send for PinnedBuffer {}

const CHUNK_BYTES: usize = 256 << 20;

/// Rounds a request up to its size class: powers of two up to 1 MiB, then eighths of the
/// next power of two (at most 12.5% waste), so the number of classes stays small.
fn size_class(bytes: usize) -> usize {
    let b = bytes.max(256).next_multiple_of(256);
    if b <= 1 << 20 {
        return b.next_power_of_two();
    }
    let step = b.next_power_of_two() / 8;
    b.next_multiple_of(step)
}

struct PoolInner {
    chunks: Vec<DeviceBuffer>,
    /// Bytes used of the last chunk.
    cursor: usize,
    free: BTreeMap<usize, Vec<CUdeviceptr>>,
}

impl PoolInner {
    fn carve(&mut self, class: usize) -> Result<CUdeviceptr> {
        let fits = self.chunks.last().is_some_and(|c| self.cursor + class <= c.bytes());
        if !fits {
            self.chunks.push(DeviceBuffer::new(class.max(CHUNK_BYTES))?);
            self.cursor = 0;
        }
        let ptr = self.chunks.last().expect("a chunk").ptr() + self.cursor as u64;
        self.cursor += class;
        Ok(ptr)
    }
}

#[derive(Clone)]
pub struct Pool {
    inner: Arc<Mutex<PoolInner>>,
}

/// A block on loan from the pool; returned on drop.
pub struct Lease {
    pool: Arc<Mutex<PoolInner>>,
    ptr: CUdeviceptr,
    class: usize,
}

impl Lease {
    pub fn ptr(&self) -> CUdeviceptr {
        self.ptr
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut p = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        p.free.entry(self.class).or_default().push(self.ptr);
    }
}

impl Pool {
    pub fn new() -> Self {
        Self { inner: Arc::new(Mutex::new(PoolInner { chunks: Vec::new(), cursor: 0, free: BTreeMap::new() })) }
    }

    /// A block of at least `bytes` bytes (256-byte aligned). Reuses a free block of the
    /// same class, else the smallest larger free block, else carves new memory.
    pub fn alloc(&self, bytes: usize) -> Result<Lease> {
        let class = size_class(bytes);
        let mut p = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let reuse = p.free.range_mut(class..).find(|(_, list)| !list.is_empty()).map(|(c, list)| (*c, list.pop()));
        let (class, ptr) = match reuse {
            Some((c, Some(ptr))) => (c, ptr),
            _ => (class, p.carve(class)?),
        };
        Ok(Lease { pool: self.inner.clone(), ptr, class })
    }

    /// Bytes the pool holds from the driver.
    pub fn reserved_bytes(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).chunks.iter().map(DeviceBuffer::bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::size_class;

    #[test]
    fn size_classes_are_coarse_and_never_too_small() {
        for bytes in [1usize, 255, 257, 4096, 1 << 20, (1 << 20) + 1, 3 << 24, 123_456_789] {
            let c = size_class(bytes);
            assert!(c >= bytes, "{bytes} -> {c}");
            assert!(c as f64 <= (bytes.max(256) as f64) * 2.0, "{bytes} -> {c}");
        }
        assert_eq!(size_class(5 << 20), size_class((5 << 20) - 1000));
    }
}
