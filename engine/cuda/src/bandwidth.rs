//! Device-to-device copy bandwidth, the ceiling for memory-bound decode (benchmarks print
//! their batch-1 roofline against it).

use cudarc::driver::result;
use cudarc::driver::sys::CUevent_flags;

use crate::device::Device;
use crate::error::{OpContext, Result};
use crate::memory::DeviceBuffer;

/// GB/s counting bytes read plus bytes written, over `bytes`-sized copies.
pub fn copy_bandwidth_gbps(ordinal: usize, bytes: usize) -> Result<f64> {
    let device = Device::open(ordinal)?;
    let (src, dst) = (DeviceBuffer::new(bytes)?, DeviceBuffer::new(bytes)?);
    let stream = device.stream;
    let reps = 20;
    // SAFETY: both buffers hold `bytes` bytes; events and stream are ours.
    unsafe {
        result::memset_d8_async(src.ptr(), 7, bytes, stream).op("memset")?;
        for _ in 0..3 {
            result::memcpy_dtod_async(dst.ptr(), src.ptr(), bytes, stream).op("copy")?;
        }
        let start = result::event::create(CUevent_flags::CU_EVENT_DEFAULT).op("event")?;
        let end = result::event::create(CUevent_flags::CU_EVENT_DEFAULT).op("event")?;
        result::event::record(start, stream).op("event")?;
        for _ in 0..reps {
            result::memcpy_dtod_async(dst.ptr(), src.ptr(), bytes, stream).op("copy")?;
        }
        result::event::record(end, stream).op("event")?;
        result::event::synchronize(end).op("event")?;
        let ms = result::event::elapsed(start, end).op("event")? as f64;
        let _ = result::event::destroy(start);
        let _ = result::event::destroy(end);
        Ok(2.0 * bytes as f64 * reps as f64 / (ms / 1e3) / 1e9)
    }
}
