//! Where a backend keeps its KV cache, for transports that read or write it without the
//! engine's help (RDMA: the NIC reads prefill's blocks and writes decode's).

use std::os::fd::OwnedFd;

/// The KV cache's memory: per layer a K and a V buffer, each `[num_blocks][block]`, a
/// block being `block_size * kv_heads * head_dim` elements of the cache dtype.
#[derive(Debug)]
pub struct KvMemory {
    /// Regions in layer order, K before V: region `2l` is layer `l`'s K, `2l + 1` its V.
    pub regions: Vec<KvRegion>,
    /// The per-layer progress marks (a u32 per layer) the forward writes once a layer's KV
    /// is written, where the backend publishes them: a NIC reading them lets a peer read
    /// each layer of an early handoff as soon as it is complete.
    pub progress: Option<KvRegion>,
    pub location: KvLocation,
}

/// One contiguous buffer of the cache.
#[derive(Debug)]
pub struct KvRegion {
    /// Address in this process: a host pointer, or a CUDA device pointer.
    pub addr: u64,
    pub len: u64,
    /// The buffer exported as a dma-buf (GPU memory a NIC can register directly), when
    /// asked for and the device supports it.
    pub dmabuf: Option<OwnedFd>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvLocation {
    Host,
    /// GPU memory of the CUDA device with this ordinal.
    CudaDevice(usize),
}
