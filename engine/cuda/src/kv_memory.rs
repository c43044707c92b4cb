//! The KV cache as memory a NIC can use (RDMA): each layer's K and V buffer, exported as
//! a dma-buf where the device supports it, and the flush that makes a NIC's writes
//! visible to the kernels launched after them.

use std::os::fd::{FromRawFd, OwnedFd};

use cudarc::driver::sys::{self, CUdevice_attribute, CUdeviceptr};
use dlengine_engine::kv_transfer::{KvLocation, KvMemory, KvRegion};

use crate::backend::CudaBackend;
use crate::error::{OpContext, Result};

/// dma-buf ranges must start and end on host pages.
const HOST_PAGE: u64 = 4096;

impl CudaBackend {
    pub(crate) fn describe_kv_memory(&mut self, dmabuf: bool) -> Result<KvMemory> {
        self.device.bind()?;
        let supported = dmabuf && self.device.ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED).op("dma-buf support")? == 1;
        let kv = self.shared_kv_cache("kv_memory")?;
        let buffers = kv.layers.iter().flat_map(|(k, v)| [(k.ptr(), k.bytes() as u64), (v.ptr(), v.bytes() as u64)]);
        let region = |(addr, len): (CUdeviceptr, u64)| -> Result<KvRegion> {
            Ok(KvRegion { addr, len, dmabuf: if supported { Some(export_dmabuf(addr, len)?) } else { None } })
        };
        let regions = buffers.map(region).collect::<Result<Vec<_>>>()?;
        let marks = self.kv_io.progress.marks(kv.layers.len())?;
        let progress = Some(region((marks.ptr(), marks.bytes() as u64))?);
        Ok(KvMemory { regions, progress, location: KvLocation::CudaDevice(self.device.ctx.ordinal()) })
    }

    /// Orders the NIC's writes before the work launched next (a no-op on devices whose
    /// GPUDirect RDMA writes are already ordered for their owner).
    pub(crate) fn flush_remote_writes(&mut self) -> Result<()> {
        self.device.bind()?;
        // SAFETY: plain driver call on the current context.
        unsafe {
            sys::cuFlushGPUDirectRDMAWrites(
                sys::CUflushGPUDirectRDMAWritesTarget::CU_FLUSH_GPU_DIRECT_RDMA_WRITES_TARGET_CURRENT_CTX,
                sys::CUflushGPUDirectRDMAWritesScope::CU_FLUSH_GPU_DIRECT_RDMA_WRITES_TO_OWNER,
            )
        }
        .result()
        .op("flushing GPUDirect RDMA writes")
    }
}

/// `len` bytes at `addr`, as a dma-buf file descriptor. The length is rounded up to a
/// host page: allocations are made in much larger granules, so the tail is mapped.
fn export_dmabuf(addr: CUdeviceptr, len: u64) -> Result<OwnedFd> {
    let mut fd: i32 = -1;
    let size = len.div_ceil(HOST_PAGE) * HOST_PAGE;
    // SAFETY: `addr` is the base of a live cuMemAlloc allocation (page aligned); the
    // driver writes an int file descriptor.
    unsafe {
        sys::cuMemGetHandleForAddressRange(
            (&mut fd as *mut i32).cast(),
            addr,
            size as usize,
            sys::CUmemRangeHandleType::CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD,
            0,
        )
    }
    .result()
    .op("exporting the KV cache as a dma-buf")?;
    // SAFETY: a fresh descriptor the driver handed over to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
