//! Opening the GPU: context, stream and properties. Libraries are loaded dynamically
//! (the crate builds without CUDA); a missing library makes cudarc panic on first use, so
//! the first touch of each library is fenced and turned into a clear error.

use std::sync::Arc;

use cudarc::driver::result;
use cudarc::driver::sys::{CUdevice_attribute, CUstream};
use cudarc::driver::CudaContext;
use dlengine_engine::error::BackendError;

use crate::error::{OpContext, Result};

/// What `probe` finds.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub name: String,
    pub compute_capability: (i32, i32),
    pub total_memory: usize,
    pub multiprocessors: usize,
}

pub struct Device {
    pub ctx: Arc<CudaContext>,
    pub stream: CUstream,
    pub info: DeviceInfo,
}

// SAFETY: the stream handle is only used with the context bound to the calling thread
// (`bind`), and the backend is used from one thread at a time.
unsafe impl Send for Device {}

/// Runs `f`, turning a panic (cudarc's reaction to a missing shared library) into an error.
fn fenced<T>(what: &str, f: impl FnOnce() -> T + std::panic::UnwindSafe) -> std::result::Result<T, String> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let out = std::panic::catch_unwind(f);
    std::panic::set_hook(hook);
    out.map_err(|panic| {
        let msg = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        format!("{what} is not available: {msg}")
    })
}

/// Checks that the driver, NVRTC and cuBLAS load and a GPU is present.
pub fn probe() -> std::result::Result<DeviceInfo, String> {
    fenced("the CUDA driver (libcuda)", result::init)?.map_err(|e| format!("cuInit failed: {e:?}"))?;
    let count = result::device::get_count().map_err(|e| format!("no CUDA device: {e:?}"))?;
    if count < 1 {
        return Err("no CUDA device found".into());
    }
    fenced("NVRTC (libnvrtc)", || {
        let (mut major, mut minor) = (0, 0);
        // SAFETY: plain out-parameters.
        unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }
    })?;
    fenced("cuBLAS (libcublas)", || unsafe { cudarc::cublas::sys::cublasGetVersion_v2(std::ptr::null_mut(), std::ptr::null_mut()) })?;
    let ctx = CudaContext::new(0).map_err(|e| format!("creating a CUDA context: {e:?}"))?;
    info(&ctx).map_err(|e| e.to_string())
}

fn info(ctx: &CudaContext) -> Result<DeviceInfo> {
    Ok(DeviceInfo {
        name: ctx.name().op("device name")?,
        compute_capability: ctx.compute_capability().op("compute capability")?,
        total_memory: ctx.total_mem().op("total memory")?,
        multiprocessors: ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT).op("SM count")? as usize,
    })
}

impl Device {
    pub fn open(ordinal: usize) -> Result<Self> {
        probe().map_err(BackendError::Unavailable)?;
        let ctx = CudaContext::new(ordinal).op("creating a CUDA context")?;
        let info = info(&ctx)?;
        ctx.bind_to_thread().op("binding the context")?;
        let stream = result::stream::create(result::stream::StreamKind::NonBlocking).op("creating a stream")?;
        Ok(Self { ctx, stream, info })
    }

    /// Makes the context current on this thread (the engine thread differs from the
    /// thread that created the backend).
    pub fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().op("binding the context")
    }

    pub fn synchronize(&self) -> Result<()> {
        // SAFETY: our own live stream.
        unsafe { result::stream::synchronize(self.stream) }.op("stream synchronize")
    }

    /// The NVRTC target: `sm_90a` on Hopper (wgmma and friends), `sm_XY` elsewhere.
    pub fn arch(&self) -> String {
        match self.info.compute_capability {
            (9, 0) => "sm_90a".into(),
            (major, minor) => format!("sm_{major}{minor}"),
        }
    }
}
