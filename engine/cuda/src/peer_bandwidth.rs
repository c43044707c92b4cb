//! Peer-to-peer copy bandwidth between GPUs 0 and 1 of one node, by who copies: the copy
//! engine pulling (on the destination's stream) or pushing (on the source's), the
//! chunk-copy kernel pulling with several launch shapes, or both sharing one copy. A KV
//! import over CUDA IPC is such a pull; `examples/peer_copy` prints these figures so the
//! choice in [`crate::peer_copy`] rests on a measurement of the machine at hand.

use cudarc::driver::result;
use cudarc::driver::sys::{self, CUdeviceptr, CUevent_flags, CUstream};

use crate::device::Device;
use crate::error::{OpContext, Result};
use crate::kernels::{Compiler, KV_TRANSFER};
use crate::kv_io::chunked_by;
use crate::launch::{launch, Arg, Launch};
use crate::memory::DeviceBuffer;

const OP: &str = "measuring peer copies";
/// Bytes of one block's K or V in the scattered case.
const BLOCK: u64 = 32 << 10;
/// Timed repetitions of each way; the best counts (noise only ever slows a copy).
const REPS: usize = 5;

/// One way of copying and its bandwidth, bytes copied per second (one direction).
#[derive(Debug, Clone)]
pub struct PeerCopyFigure {
    pub way: String,
    pub gb_per_s: f64,
}

/// A chunk-copy kernel launch shape.
#[derive(Debug, Clone, Copy)]
struct Shape {
    unroll: u32,
    chunk_bytes: u64,
    threads: u32,
    ctas_per_sm: u32,
}

const SHAPES: [Shape; 7] = [
    Shape { unroll: 4, chunk_bytes: 64 << 10, threads: 512, ctas_per_sm: 4 }, // kv_io's shape when measured (its chunks are 128 KiB now)
    Shape { unroll: 4, chunk_bytes: 256 << 10, threads: 512, ctas_per_sm: 4 },
    Shape { unroll: 4, chunk_bytes: 64 << 10, threads: 256, ctas_per_sm: 8 },
    Shape { unroll: 4, chunk_bytes: 64 << 10, threads: 1024, ctas_per_sm: 2 },
    Shape { unroll: 8, chunk_bytes: 64 << 10, threads: 512, ctas_per_sm: 4 },
    Shape { unroll: 8, chunk_bytes: 256 << 10, threads: 512, ctas_per_sm: 4 },
    Shape { unroll: 2, chunk_bytes: 64 << 10, threads: 512, ctas_per_sm: 4 },
];

/// Copies `bytes` from GPU 0 to GPU 1 every way; needs two GPUs with peer access.
pub fn peer_copy_bandwidth(bytes: usize) -> Result<Vec<PeerCopyFigure>> {
    let (source, dest) = (Device::open(0)?, Device::open(1)?);
    enable_peer_access(&source, &dest)?;
    enable_peer_access(&dest, &source)?;
    source.bind()?;
    let src = DeviceBuffer::new(bytes)?;
    // SAFETY: our buffer, `bytes` long, on our stream.
    unsafe { result::memset_d8_async(src.ptr(), 7, bytes, source.stream) }.op(OP)?;
    source.synchronize()?;
    dest.bind()?;
    let dst = DeviceBuffer::new(bytes)?;
    let (s, d, n) = (src.ptr(), dst.ptr(), bytes);
    let mut out = Vec::new();
    let mut record = |way: String, seconds: f64| out.push(PeerCopyFigure { way, gb_per_s: bytes as f64 / seconds / 1e9 });
    // SAFETY (all closures below): both buffers hold `bytes`; peer access is on.
    record("copy engine, pull".into(), best_time(&dest, |st| unsafe { result::memcpy_dtod_async(d, s, n, st) }.op(OP))?);
    // As a long prompt's per-buffer runs would go (times scaled to `bytes`: the 64 KiB-
    // aligned pieces cover slightly less).
    for pieces in [56, 168] {
        let piece = (n / pieces) & !0xffff;
        let split = |st| (0..pieces as u64).try_for_each(|i| unsafe { result::memcpy_dtod_async(d + i * piece as u64, s + i * piece as u64, piece, st) }.op(OP));
        record(format!("copy engine, pull in {pieces} calls of {} KiB", piece >> 10), best_time(&dest, split)? * n as f64 / (pieces * piece) as f64);
    }
    record("copy engine, push".into(), best_time(&source, |st| unsafe { result::memcpy_dtod_async(d, s, n, st) }.op(OP))?);
    for shape in SHAPES {
        let pull = KernelCopy::new(&dest, shape, s, d, n)?;
        record(format!("kernel pull, {shape:?}"), best_time(&dest, |st| pull.launch(st))?);
    }
    // A fragmented cache: one block's K (32 KiB for Qwen3-0.6B) per chunk, the source's
    // blocks in descending order (how a prefix cache's free list hands them out).
    let scattered: Vec<[u64; 3]> = (0..n as u64 / BLOCK).map(|i| [s + (n as u64 / BLOCK - 1 - i) * BLOCK, d + i * BLOCK, BLOCK]).collect();
    for shape in [SHAPES[0], SHAPES[2], SHAPES[3], SHAPES[4]] {
        let pull = KernelCopy::with_chunks(&dest, shape, &scattered)?;
        record(format!("kernel pull of scattered 32 KiB blocks, {shape:?}"), best_time(&dest, |st| pull.launch(st))?);
    }
    let per_block = |st| scattered.iter().try_for_each(|&[from, to, len]| unsafe { result::memcpy_dtod_async(to, from, len as usize, st) }.op(OP));
    record("copy engine, one call per scattered 32 KiB block".into(), best_time(&dest, per_block)?);
    let push = KernelCopy::new(&source, SHAPES[0], s, d, n)?;
    record(format!("kernel push, {:?}", SHAPES[0]), best_time(&source, |st| push.launch(st))?);
    for engine_share in [0.25, 0.5] {
        let split = ((n as f64 * engine_share) as usize) & !0xffff;
        let kernel = KernelCopy::new(&dest, SHAPES[0], s + split as u64, d + split as u64, n - split)?;
        let seconds = best_time_two_streams(&dest, |st| unsafe { result::memcpy_dtod_async(d, s, split, st) }.op(OP), |st| kernel.launch(st))?;
        record(format!("copy engine pulls {:.0}% alongside the kernel", engine_share * 100.0), seconds);
    }
    Ok(out)
}

fn enable_peer_access(from: &Device, to: &Device) -> Result<()> {
    from.bind()?;
    // SAFETY: both contexts are live; enabling twice is reported and ignored below.
    match unsafe { sys::cuCtxEnablePeerAccess(to.ctx.cu_ctx(), 0) } {
        sys::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED => Ok(()),
        status => status.result().op("enabling peer access"),
    }
}

/// A chunk-copy kernel compiled for one shape, with its chunk table on the device that
/// runs it.
struct KernelCopy {
    function: sys::CUfunction,
    _module: crate::kernels::Module,
    table: DeviceBuffer,
    chunks: u32,
    grid: u32,
    threads: u32,
}

impl KernelCopy {
    fn new(device: &Device, shape: Shape, src: CUdeviceptr, dst: CUdeviceptr, bytes: usize) -> Result<Self> {
        Self::with_chunks(device, shape, &chunked_by([[src, dst, bytes as u64]], shape.chunk_bytes))
    }

    fn with_chunks(device: &Device, shape: Shape, chunks: &[[u64; 3]]) -> Result<Self> {
        device.bind()?;
        let module = Compiler::new(device.arch(), None).load(KV_TRANSFER, &[("UNROLL", shape.unroll.to_string())])?;
        let table = DeviceBuffer::new(chunks.len() * 24)?;
        // SAFETY: the table holds every chunk; synchronous upload.
        unsafe { result::memcpy_htod_sync(table.ptr(), chunks.as_flattened()) }.op(OP)?;
        let grid = (device.info.multiprocessors as u32 * shape.ctas_per_sm).min(chunks.len() as u32);
        Ok(Self { function: module.function("copy_chunks")?, _module: module, table, chunks: chunks.len() as u32, grid, threads: shape.threads })
    }

    fn launch(&self, stream: CUstream) -> Result<()> {
        let args = vec![Arg::Ptr(self.table.ptr()), Arg::I32(self.chunks as i32)];
        launch(OP, self.function, stream, &Launch::new((self.grid, 1, 1), self.threads), args)
    }
}

/// Seconds of the fastest of REPS runs of `copy` on `device`'s stream, after a warm-up.
fn best_time(device: &Device, copy: impl Fn(CUstream) -> Result<()>) -> Result<f64> {
    best_time_two_streams(device, copy, |_| Ok(()))
}

/// As [`best_time`], for two copies that run side by side on two streams.
fn best_time_two_streams(device: &Device, first: impl Fn(CUstream) -> Result<()>, second: impl Fn(CUstream) -> Result<()>) -> Result<f64> {
    device.bind()?;
    let main = device.stream;
    let side = result::stream::create(result::stream::StreamKind::NonBlocking).op(OP)?;
    let event = || result::event::create(CUevent_flags::CU_EVENT_DEFAULT).op(OP);
    let (start, side_done, end) = (event()?, event()?, event()?);
    let mut best = f64::INFINITY;
    for rep in 0..=REPS {
        // SAFETY: events and streams are ours and live until destroyed below.
        unsafe {
            result::event::record(start, main).op(OP)?;
            result::stream::wait_event(side, start, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT).op(OP)?;
            first(main)?;
            second(side)?;
            result::event::record(side_done, side).op(OP)?;
            result::stream::wait_event(main, side_done, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT).op(OP)?;
            result::event::record(end, main).op(OP)?;
            result::event::synchronize(end).op(OP)?;
            if rep > 0 {
                best = best.min(result::event::elapsed(start, end).op(OP)? as f64 / 1e3);
            }
        }
    }
    // SAFETY: idle now.
    unsafe {
        for e in [start, side_done, end] {
            let _ = result::event::destroy(e);
        }
        let _ = result::stream::destroy(side);
    }
    Ok(best)
}
