//! Protection domains and memory registration.

use std::ffi::c_int;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;

use super::device::{Context, Device};
use super::sys;
use crate::config::Access;
use crate::error::{RdmaError, Result};
use crate::meta::RemoteRegion;
use crate::plan::LocalRegion;

pub(crate) struct PdInner {
    pub(crate) raw: *mut sys::ibv_pd,
    pub(crate) ctx: Arc<Context>,
}

// SAFETY: a PD is an immutable handle used by thread-safe verbs; freed only in Drop, after
// every MR and QP (which hold an Arc to it).
unsafe impl Send for PdInner {}
unsafe impl Sync for PdInner {}

impl Drop for PdInner {
    fn drop(&mut self) {
        // SAFETY: raw came from ibv_alloc_pd and has no children left.
        let rc = unsafe { sys::ibv_dealloc_pd(self.raw) };
        if rc != 0 {
            tracing::warn!(device = %self.ctx.name, error = %io::Error::from_raw_os_error(rc), "ibv_dealloc_pd failed");
        }
    }
}

/// A protection domain: memory regions and queue pairs that may be used together.
#[derive(Clone)]
pub struct ProtectionDomain {
    pub(crate) inner: Arc<PdInner>,
}

impl std::fmt::Debug for ProtectionDomain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProtectionDomain").field("device", &self.inner.ctx.name).finish()
    }
}

impl Device {
    pub fn alloc_pd(&self) -> Result<ProtectionDomain> {
        // SAFETY: the context is open.
        let raw = unsafe { sys::ibv_alloc_pd(self.ctx.raw) };
        if raw.is_null() {
            return Err(self.ctx.verbs_error("ibv_alloc_pd", io::Error::last_os_error(), ""));
        }
        Ok(ProtectionDomain { inner: Arc::new(PdInner { raw, ctx: self.ctx.clone() }) })
    }
}

const PINNING_HINT: &str =
    "registering memory pins it: raise RLIMIT_MEMLOCK (`ulimit -l unlimited`) or grant CAP_IPC_LOCK";

impl ProtectionDomain {
    pub fn device(&self) -> &str {
        &self.inner.ctx.name
    }

    /// Registers `len` bytes at `addr` (`ibv_reg_mr`). Host memory; also a CUDA device
    /// pointer when the `nvidia-peermem` kernel module is loaded.
    ///
    /// # Safety
    /// The range must be mapped memory that stays allocated until the region is dropped,
    /// and must not be accessed in ways that race with RDMA the caller starts on it.
    pub unsafe fn register_host(&self, addr: *mut u8, len: usize, access: Access) -> Result<MemoryRegion> {
        if addr.is_null() || len == 0 {
            return Err(RdmaError::InvalidArgument(format!("cannot register {len} bytes at {addr:p}")));
        }
        // SAFETY: the PD is alive; the caller vouches for the range.
        let raw = unsafe { sys::dlk_reg_mr(self.inner.raw, addr.cast(), len, access.bits()) };
        if raw.is_null() {
            let e = io::Error::last_os_error();
            let hint = match e.raw_os_error() {
                Some(12 /* ENOMEM */) | Some(1 /* EPERM */) | Some(11 /* EAGAIN */) => PINNING_HINT.to_string(),
                Some(14 /* EFAULT */) => format!("{addr:p} + {len} is not mapped memory"),
                _ => String::new(),
            };
            return Err(self.inner.ctx.verbs_error("ibv_reg_mr", e, hint));
        }
        Ok(MemoryRegion::new(raw, addr as u64, len as u64, RegionKind::Host, self.inner.clone()))
    }

    /// Registers `len` bytes at `offset` of a dma-buf (`ibv_reg_dmabuf_mr`), e.g. GPU
    /// memory exported with `cuMemGetHandleForAddressRange(..., CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD, ...)`.
    /// `iova` is the address peers and local work requests use for the region's first
    /// byte; pass the CUDA device pointer so advertised addresses are the cache's own.
    /// The kernel holds its own reference to the dma-buf, so `fd` may be closed afterwards.
    ///
    /// # Safety
    /// The exported memory must stay allocated until the region is dropped.
    pub unsafe fn register_dmabuf(
        &self,
        fd: BorrowedFd<'_>,
        offset: u64,
        len: usize,
        iova: u64,
        access: Access,
    ) -> Result<MemoryRegion> {
        const PAGE: u64 = 4096;
        if len == 0 || iova.checked_add(len as u64).is_none() {
            return Err(RdmaError::InvalidArgument(format!("cannot register {len} bytes at iova {iova:#x}")));
        }
        if offset % PAGE != iova % PAGE {
            return Err(RdmaError::InvalidArgument(format!(
                "dma-buf offset {offset:#x} and iova {iova:#x} must have the same offset within a page"
            )));
        }
        let raw = unsafe {
            // SAFETY: the PD is alive; the kernel validates the fd and range.
            sys::ibv_reg_dmabuf_mr(self.inner.raw, offset, len, iova, fd.as_raw_fd(), access.bits() as c_int)
        };
        if raw.is_null() {
            let e = io::Error::last_os_error();
            let hint = match e.raw_os_error() {
                Some(95 /* EOPNOTSUPP */) | Some(93 /* EPROTONOSUPPORT */) | Some(38 /* ENOSYS */) => {
                    "dma-buf MRs need Linux 5.12+, rdma-core 34+, a device driver with dma-buf support and a \
                     GPU driver that exports dma-bufs; otherwise load nvidia-peermem and use register_host"
                        .to_string()
                }
                Some(12 /* ENOMEM */) => PINNING_HINT.to_string(),
                _ => String::new(),
            };
            return Err(self.inner.ctx.verbs_error("ibv_reg_dmabuf_mr", e, hint));
        }
        Ok(MemoryRegion::new(raw, iova, len as u64, RegionKind::DmaBuf, self.inner.clone()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RegionKind {
    Host,
    DmaBuf,
}

/// A registered memory region. Deregistered on drop.
pub struct MemoryRegion {
    raw: *mut sys::ibv_mr,
    addr: u64,
    len: u64,
    lkey: u32,
    rkey: u32,
    kind: RegionKind,
    pd: Arc<PdInner>,
}

// SAFETY: the MR handle is immutable after registration; verbs on it are thread-safe.
unsafe impl Send for MemoryRegion {}
unsafe impl Sync for MemoryRegion {}

impl MemoryRegion {
    fn new(raw: *mut sys::ibv_mr, addr: u64, len: u64, kind: RegionKind, pd: Arc<PdInner>) -> Self {
        // SAFETY: raw is a freshly registered, non-null MR.
        let (lkey, rkey) = unsafe { ((*raw).lkey, (*raw).rkey) };
        Self { raw, addr, len, lkey, rkey, kind, pd }
    }

    /// Address of the first byte as work requests name it (virtual address or IOVA).
    pub fn addr(&self) -> u64 {
        self.addr
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn lkey(&self) -> u32 {
        self.lkey
    }

    pub fn rkey(&self) -> u32 {
        self.rkey
    }

    /// What a peer needs to READ this region (advertise it only if registered with
    /// [`Access::REMOTE_READ`]).
    pub fn remote_region(&self) -> RemoteRegion {
        RemoteRegion { addr: self.addr, rkey: self.rkey, len: self.len }
    }

    /// What the planner needs to READ into this region (needs [`Access::LOCAL_WRITE`]).
    pub fn local_region(&self) -> LocalRegion {
        LocalRegion { addr: self.addr, len: self.len, lkey: self.lkey }
    }
}

impl std::fmt::Debug for MemoryRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryRegion")
            .field("kind", &self.kind)
            .field("addr", &format_args!("{:#x}", self.addr))
            .field("len", &self.len)
            .field("lkey", &format_args!("{:#x}", self.lkey))
            .field("rkey", &format_args!("{:#x}", self.rkey))
            .finish()
    }
}

impl Drop for MemoryRegion {
    fn drop(&mut self) {
        // SAFETY: raw came from a successful registration and is deregistered once.
        let rc = unsafe { sys::ibv_dereg_mr(self.raw) };
        if rc != 0 {
            tracing::warn!(device = %self.pd.ctx.name, error = %io::Error::from_raw_os_error(rc), "ibv_dereg_mr failed");
        }
    }
}
