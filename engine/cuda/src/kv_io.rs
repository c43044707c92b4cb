//! Whole-block KV access for prefill/decode disaggregation. Every path is one launch of a
//! chunked copy kernel: gathering blocks into mapped pinned host memory (the TCP path's
//! send side), scattering them back out of it (receive side), and pulling them straight
//! from a peer GPU's KV cache mapped over CUDA IPC (the same-node path, over NVLink).
//! One launch keeps far more bytes in flight than a cuMemcpy per block run, each of which
//! pays its own latency (thousands of them for a long prompt with scattered blocks).

use std::collections::HashMap;
use std::ffi::c_char;
use std::ops::Range;
use std::sync::Arc;

use cudarc::driver::result;
use cudarc::driver::sys::{self, CUdeviceptr, CUipcMemHandle, CUipcMem_flags_enum, CUstream};
use dlengine_engine::backend::KvBlockIo;
use dlengine_engine::kv_transfer::{frame_buffer, CudaIpcKv, HostKvReader, HostKvWriter, KvMemory};

use crate::backend::CudaBackend;
use crate::copy_kernels::CopyKernels;
use crate::error::{op_error, OpContext, Result};
use crate::kernels::Module;
use crate::kv_progress::KvProgress;
use crate::kv_reader::DeviceKvReader;
use crate::kv_writer::DeviceKvWriter;
use crate::memory::{DeviceBuffer, PinnedBuffer};
use crate::peer_copy::{CopyStage, PeerCopies};

/// Another process's KV buffers mapped into this one: (K, V) base per layer, its
/// progress marks, and the stream copies from it run on.
pub(crate) struct PeerCache {
    layers: Vec<(CUdeviceptr, CUdeviceptr)>,
    progress: Option<CUdeviceptr>,
    stream: CUstream,
}

impl Drop for PeerCache {
    fn drop(&mut self) {
        let opened = self.layers.iter().flat_map(|&(k, v)| [k, v]).chain(self.progress).filter(|&p| p != 0);
        // SAFETY: each was opened once by cuIpcOpenMemHandle_v2; the stream is ours (its
        // pending work completes before its resources go).
        unsafe {
            for ptr in opened {
                let _ = sys::cuIpcCloseMemHandle(ptr);
            }
            let _ = result::stream::destroy(self.stream);
        }
    }
}

/// What KV block I/O keeps between calls: mapped peers, keyed by (device, pid, first
/// handle) so a restarted peer is mapped anew; the copy kernel; a device table of copy
/// chunks and a mapped pinned staging buffer, both grown on demand; copies from peers
/// under way; this cache's progress marks.
pub(crate) struct KvIo {
    peers: HashMap<(String, u32, String), PeerCache>,
    kernels: CopyKernels,
    chunk_table: Option<DeviceBuffer>,
    staging: Option<(PinnedBuffer, CUdeviceptr)>,
    peer_copies: PeerCopies,
    pub(crate) progress: KvProgress,
}

/// Bytes per copy chunk: small enough that a 1K-token prompt still spreads over every SM
/// (Qwen3-0.6B: ~900 chunks), large enough that the table stays small (its 16K-token
/// prompt: ~14K chunks, 350 KB, whose upload is host time before the copy starts).
const CHUNK_BYTES: u64 = 128 << 10;
/// CTAs per SM of a copy launch (with 512 threads each, 2048 threads per SM).
const COPY_CTAS_PER_SM: u32 = 4;
/// CTAs of a copy between the cache and host memory off the engine thread, which runs
/// beside the engine's forward: 4 (128 KB of loads in flight) still keep up with 4 TCP
/// connections and leave the other SMs to the forward. A stream decoding beside a
/// 16K-token TCP import lost 51 ms to the import's writes on every SM, 34 ms on 16 CTAs,
/// 19 ms on 4 (docs/benchmarks.md).
const HOST_COPY_CTAS: u32 = 4;
/// Host staging is filled this many bytes at a time (at least one layer): a long prompt's
/// KV is gigabytes, more than is worth pinning.
const STAGING_BYTES: usize = 64 << 20;

impl KvIo {
    pub(crate) fn new(kv_transfer: &Module) -> Result<Self> {
        let kernels = CopyKernels::load(kv_transfer)?;
        Ok(Self {
            peers: HashMap::new(),
            kernels,
            chunk_table: None,
            staging: None,
            peer_copies: PeerCopies::new(kernels),
            progress: KvProgress::new(kv_transfer)?,
        })
    }

    /// A device buffer of at least `bytes`, reused across calls.
    fn chunk_table(&mut self, bytes: usize) -> Result<CUdeviceptr> {
        if self.chunk_table.as_ref().is_none_or(|t| t.bytes() < bytes) {
            self.chunk_table = None; // free the old one first
            self.chunk_table = Some(DeviceBuffer::new(bytes.next_power_of_two())?);
        }
        Ok(self.chunk_table.as_ref().expect("just set").ptr())
    }

    /// Mapped pinned host memory of at least `bytes`, reused across calls.
    fn staging(&mut self, bytes: usize) -> Result<(&mut PinnedBuffer, CUdeviceptr)> {
        if self.staging.as_ref().is_none_or(|(b, _)| b.bytes() < bytes) {
            self.staging = None;
            self.staging = Some(PinnedBuffer::new_mapped(bytes.next_power_of_two())?);
        }
        let (buffer, device) = self.staging.as_mut().expect("just set");
        Ok((buffer, *device))
    }
}

/// Runs of consecutive block pairs: (first source block, first destination block, length).
fn runs(pairs: &[(u32, u32)]) -> Vec<(u32, u32, u32)> {
    let mut out: Vec<(u32, u32, u32)> = Vec::new();
    for &(src, dst) in pairs {
        match out.last_mut() {
            Some((s, d, n)) if *s + *n == src && *d + *n == dst => *n += 1,
            _ => out.push((src, dst, 1)),
        }
    }
    out
}

/// (source, destination, bytes) segments split into chunks of at most CHUNK_BYTES.
pub(crate) fn chunked(segments: impl IntoIterator<Item = [u64; 3]>) -> Vec<[u64; 3]> {
    chunked_by(segments, CHUNK_BYTES)
}

/// Segments split into chunks of at most `chunk_bytes`.
pub(crate) fn chunked_by(segments: impl IntoIterator<Item = [u64; 3]>, chunk_bytes: u64) -> Vec<[u64; 3]> {
    let mut chunks = Vec::new();
    for [src, dst, len] in segments {
        let mut at = 0;
        while at < len {
            let take = chunk_bytes.min(len - at);
            chunks.push([src + at, dst + at, take]);
            at += take;
        }
    }
    chunks
}

/// The copy kernel moves 16-byte words: every address and size must be a multiple of 16.
pub(crate) fn check_aligned(op: &'static str, chunks: &[[u64; 3]]) -> Result<()> {
    if chunks.iter().any(|c| c.iter().any(|x| x % 16 != 0)) {
        return Err(op_error(op, "KV blocks are not 16-byte aligned"));
    }
    Ok(())
}

/// Segments copying each run of blocks of each (source, destination) buffer pair.
fn block_segments(buffers: &[(CUdeviceptr, CUdeviceptr)], runs: &[(u32, u32, u32)], block_bytes: u64) -> Vec<[u64; 3]> {
    let mut out = Vec::with_capacity(buffers.len() * runs.len());
    for &(src_base, dst_base) in buffers {
        for &(src, dst, n) in runs {
            out.push([src_base + src as u64 * block_bytes, dst_base + dst as u64 * block_bytes, n as u64 * block_bytes]);
        }
    }
    out
}

/// Segments between the blocks of `buffers` (in order) and a packed staging area at
/// `staging` holding each buffer's rows of every block in turn, except the rows of the
/// first `skip` blocks, which are left alone; `to_staging` says which way.
pub(crate) fn staging_segments(buffers: &[CUdeviceptr], blocks: &[u32], skip: usize, block_bytes: u64, staging: u64, to_staging: bool) -> Vec<[u64; 3]> {
    // Runs of (index in the staging area, block).
    let indexed: Vec<(u32, u32)> = blocks.iter().enumerate().skip(skip).map(|(i, &b)| (i as u32, b)).collect();
    let runs = runs(&indexed);
    let mut out = Vec::with_capacity(buffers.len() * runs.len());
    for (j, &base) in buffers.iter().enumerate() {
        let part = staging + (j * blocks.len()) as u64 * block_bytes;
        for &(at, block, n) in &runs {
            let (packed, cache, len) = (part + at as u64 * block_bytes, base + block as u64 * block_bytes, n as u64 * block_bytes);
            out.push(if to_staging { [cache, packed, len] } else { [packed, cache, len] });
        }
    }
    out
}

/// The K and V buffers of `layers`, in the order the staging area packs them.
pub(crate) fn layer_buffers(buffers: &[(CUdeviceptr, CUdeviceptr)], layers: Range<usize>) -> Vec<CUdeviceptr> {
    buffers[layers].iter().flat_map(|&(k, v)| [k, v]).collect()
}

/// Copies `src` into `dst` on up to 8 threads, one per 8 MiB, for KV bytes that reach a
/// copy in pageable memory and must be staged into pinned memory first (TCP frames are
/// received into pinned memory; whole handoffs are not): one thread wrote ~4.6 GB/s, so a
/// 67 MB layer held the caller ~14 ms.
pub(crate) fn copy_on_threads(dst: &mut [u8], src: &[u8]) {
    const PER_THREAD: usize = 8 << 20;
    let threads = (src.len() / PER_THREAD).clamp(1, 8);
    if threads == 1 {
        return dst.copy_from_slice(src);
    }
    let part = src.len().div_ceil(threads);
    std::thread::scope(|scope| {
        for (d, s) in dst.chunks_mut(part).zip(src.chunks(part)) {
            scope.spawn(move || d.copy_from_slice(s));
        }
    });
}

/// Layers per staging round for `blocks` blocks: as many as fit STAGING_BYTES, at least one.
fn layers_per_round(blocks: usize, block_bytes: usize) -> usize {
    (STAGING_BYTES / (2 * blocks * block_bytes).max(1)).max(1)
}

fn handle_to_hex(handle: &CUipcMemHandle) -> String {
    handle.reserved.iter().map(|&b| format!("{:02x}", b as u8)).collect()
}

fn handle_from_hex(hex: &str) -> Result<CUipcMemHandle> {
    let bad = || op_error("CUDA IPC", format!("malformed IPC handle {hex:?}"));
    if hex.len() != 128 {
        return Err(bad());
    }
    let mut handle = CUipcMemHandle { reserved: [0; 64] };
    for (i, byte) in handle.reserved.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())? as c_char;
    }
    Ok(handle)
}

fn open_handle(hex: &str) -> Result<CUdeviceptr> {
    let handle = handle_from_hex(hex)?;
    let mut ptr: CUdeviceptr = 0;
    let flags = CUipcMem_flags_enum::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32;
    // SAFETY: `ptr` is written by the driver; the mapping is closed in PeerCache::drop.
    unsafe { sys::cuIpcOpenMemHandle_v2(&mut ptr, handle, flags) }.result().op("opening a peer's KV cache (CUDA IPC)")?;
    Ok(ptr)
}

impl CudaBackend {
    /// CTAs of a copy launch: enough to fill every SM.
    fn copy_ctas(&self) -> u32 {
        self.device.info.multiprocessors as u32 * COPY_CTAS_PER_SM
    }

    fn block_bytes(&self) -> Result<usize> {
        Ok(self.kv_cache("KV block I/O")?.block_bytes())
    }

    fn pci_bus_id(&self) -> Result<String> {
        let mut buf = [0 as c_char; 32];
        // SAFETY: the driver writes a NUL-terminated string of at most `len` bytes.
        unsafe { sys::cuDeviceGetPCIBusId(buf.as_mut_ptr(), buf.len() as i32, self.device.ctx.cu_device()) }
            .result()
            .op("reading the PCI bus id")?;
        let bytes: Vec<u8> = buf.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// The (K, V) base of every layer of this engine's KV cache.
    fn kv_buffers(&self, op: &'static str) -> Result<Vec<(CUdeviceptr, CUdeviceptr)>> {
        Ok(self.kv_cache(op)?.buffers())
    }

    /// Copies `segments` with one launch of the chunk-copy kernel on the engine's stream
    /// (so after the last step that touched these blocks) and waits for it.
    fn copy_segments(&mut self, op: &'static str, segments: Vec<[u64; 3]>) -> Result<()> {
        let chunks = chunked(segments);
        if chunks.is_empty() {
            return Ok(());
        }
        check_aligned(op, &chunks)?;
        let table = self.kv_io.chunk_table(chunks.len() * 24)?;
        let stream = self.device.stream;
        // SAFETY: the table holds `chunks`; the host slice outlives the synchronisation below.
        unsafe { result::memcpy_htod_async(table, chunks.as_flattened(), stream) }.op(op)?;
        self.kv_io.kernels.queue_copy(op, stream, table, chunks.len(), self.copy_ctas())?;
        // SAFETY: plain stream synchronisation: callers free or reuse the memory next.
        unsafe { result::stream::synchronize(stream) }.op(op)
    }

    fn map_peer(&mut self, peer: &CudaIpcKv) -> Result<&PeerCache> {
        let key = (peer.device.clone(), peer.pid, peer.k_handles.first().cloned().unwrap_or_default());
        if !self.kv_io.peers.contains_key(&key) {
            let layers = self.kv_cache("CUDA IPC")?.layers.len();
            if peer.k_handles.len() != layers || peer.v_handles.len() != layers {
                return Err(op_error("CUDA IPC", format!("the peer exports {} layers, this engine has {layers}", peer.k_handles.len())));
            }
            let stream = result::stream::create(result::stream::StreamKind::NonBlocking).op("creating a peer copy stream")?;
            let mut cache = PeerCache { layers: Vec::with_capacity(layers), progress: None, stream };
            if let Some(progress) = &peer.progress {
                cache.progress = Some(open_handle(progress)?);
            }
            for (k, v) in peer.k_handles.iter().zip(&peer.v_handles) {
                let k = open_handle(k)?;
                // Push K at once so Drop closes it even if V fails to open.
                cache.layers.push((k, 0));
                let v = open_handle(v)?;
                cache.layers.last_mut().expect("just pushed").1 = v;
            }
            self.kv_io.peers.insert(key.clone(), cache);
        }
        Ok(&self.kv_io.peers[&key])
    }
}

/// `layers` in rounds that fit the staging buffer.
fn rounds(layers: Range<usize>, per_round: usize) -> impl Iterator<Item = Range<usize>> {
    let end = layers.end;
    layers.step_by(per_round).map(move |l| l..(l + per_round).min(end))
}

impl KvBlockIo for CudaBackend {
    fn read_kv_blocks(&mut self, blocks: &[u32], layers: Range<usize>) -> Result<Vec<u8>> {
        self.device.bind()?;
        let block_bytes = self.block_bytes()?;
        let buffers = self.kv_buffers("read_kv_blocks")?;
        let mut out = frame_buffer(layers.len() * 2 * blocks.len() * block_bytes);
        for round in rounds(layers, layers_per_round(blocks.len(), block_bytes)) {
            let len = round.len() * 2 * blocks.len() * block_bytes;
            let (_, staging) = self.kv_io.staging(len)?;
            let segments = staging_segments(&layer_buffers(&buffers, round), blocks, 0, block_bytes as u64, staging, true);
            self.copy_segments("copying KV blocks to the host", segments)?;
            out.extend_from_slice(&self.kv_io.staging(len)?.0.as_slice()[..len]);
        }
        Ok(out)
    }

    fn write_kv_blocks(&mut self, blocks: &[u32], layers: Range<usize>, bytes: &[u8]) -> Result<()> {
        self.device.bind()?;
        let block_bytes = self.block_bytes()?;
        let expected = layers.len() * 2 * blocks.len() * block_bytes;
        if bytes.len() != expected {
            return Err(op_error("write_kv_blocks", format!("expected {expected} bytes, got {}", bytes.len())));
        }
        let buffers = self.kv_buffers("write_kv_blocks")?;
        let mut at = 0;
        for round in rounds(layers, layers_per_round(blocks.len(), block_bytes)) {
            let len = round.len() * 2 * blocks.len() * block_bytes;
            let (host, staging) = self.kv_io.staging(len)?;
            copy_on_threads(&mut host.as_mut_slice()[..len], &bytes[at..at + len]);
            at += len;
            let segments = staging_segments(&layer_buffers(&buffers, round), blocks, 0, block_bytes as u64, staging, false);
            self.copy_segments("copying KV blocks from the host", segments)?;
        }
        Ok(())
    }

    fn host_reader(&mut self) -> Result<Option<Arc<dyn HostKvReader>>> {
        self.device.bind()?;
        let kv = self.shared_kv_cache("host_reader")?;
        let marks = self.kv_io.progress.marks(kv.layers.len())?;
        Ok(Some(Arc::new(DeviceKvReader::new(self.device.ctx.clone(), kv, marks, self.kv_io.kernels, HOST_COPY_CTAS))))
    }

    fn host_writer(&mut self) -> Result<Option<Arc<dyn HostKvWriter>>> {
        self.device.bind()?;
        let kv = self.shared_kv_cache("host_writer")?;
        Ok(Some(Arc::new(DeviceKvWriter::new(self.device.ctx.clone(), kv, self.kv_io.kernels, HOST_COPY_CTAS))))
    }

    fn export_kv_ipc(&mut self) -> Result<Option<CudaIpcKv>> {
        self.device.bind()?;
        let device = self.pci_bus_id()?;
        let kv = self.kv_cache("export_kv_ipc")?;
        let handle = |ptr: CUdeviceptr| -> Result<String> {
            let mut h = CUipcMemHandle { reserved: [0; 64] };
            // SAFETY: `ptr` is the base of a cuMemAlloc allocation that lives as long as the cache.
            unsafe { sys::cuIpcGetMemHandle(&mut h, ptr) }.result().op("exporting the KV cache (CUDA IPC)")?;
            Ok(handle_to_hex(&h))
        };
        let k_handles = kv.layers.iter().map(|(k, _)| handle(k.ptr())).collect::<Result<Vec<_>>>()?;
        let v_handles = kv.layers.iter().map(|(_, v)| handle(v.ptr())).collect::<Result<Vec<_>>>()?;
        let num_layers = kv.layers.len();
        let progress = Some(handle(self.kv_io.progress.marks(num_layers)?.ptr())?);
        Ok(Some(CudaIpcKv { device, pid: std::process::id(), k_handles, v_handles, progress }))
    }

    fn kv_memory(&mut self, dmabuf: bool) -> Result<Option<KvMemory>> {
        self.describe_kv_memory(dmabuf).map(Some)
    }

    fn after_remote_writes(&mut self) -> Result<()> {
        self.flush_remote_writes()
    }

    fn start_copy_from_peer(&mut self, peer: &CudaIpcKv, pairs: &[(u32, u32)], ready_mark: Option<u32>) -> Result<u64> {
        self.device.bind()?;
        if peer.device == self.pci_bus_id()? {
            return Err(op_error("CUDA IPC", "the peer runs on this same GPU; CUDA IPC needs two devices"));
        }
        let block_bytes = self.block_bytes()? as u64;
        let local = self.kv_buffers("copy_kv_from_peer")?;
        let ctas = self.copy_ctas();
        let mapped = self.map_peer(peer)?;
        let (stream, remote, progress) = (mapped.stream, mapped.layers.clone(), mapped.progress);
        let layers: Vec<[(CUdeviceptr, CUdeviceptr); 2]> =
            remote.into_iter().zip(local).map(|((rk, rv), (lk, lv))| [(rk, lk), (rv, lv)]).collect();
        let runs = runs(pairs);
        let stages: Vec<CopyStage> = match (ready_mark, progress) {
            // Layer by layer, each once prefill has written it.
            (Some(_), Some(_)) => layers
                .iter()
                .enumerate()
                .map(|(l, buffers)| CopyStage { wait_for_layer: Some(l), chunks: chunked(block_segments(buffers, &runs, block_bytes)) })
                .collect(),
            (Some(_), None) => return Err(op_error("CUDA IPC", "an early descriptor from a peer that exports no progress marks")),
            // Prefill's forward is over: one launch for everything.
            (None, _) => {
                vec![CopyStage { wait_for_layer: None, chunks: chunked(block_segments(layers.as_flattened(), &runs, block_bytes)) }]
            }
        };
        let progress = progress.zip(ready_mark);
        self.kv_io.peer_copies.start(stream, &stages, ctas, progress)
    }

    fn copy_finished(&mut self, ticket: u64) -> Result<bool> {
        self.device.bind()?;
        self.kv_io.peer_copies.finished(ticket)
    }

    fn publish_progress(&mut self, mark: u32) -> bool {
        self.kv_io.progress.request(mark)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_pairs_coalesce_into_runs() {
        assert_eq!(runs(&[(4, 10), (5, 11), (6, 12), (9, 13), (10, 20)]), vec![(4, 10, 3), (9, 13, 1), (10, 20, 1)]);
        assert!(runs(&[]).is_empty());
    }

    #[test]
    fn copy_chunks_cover_every_run_of_every_buffer_once() {
        let buffers = [(1 << 40, 2 << 40), (3 << 40, 4 << 40)];
        let block = CHUNK_BYTES * 3 / 4; // a run of 3 blocks: two whole chunks and a quarter
        let chunks = chunked(block_segments(&buffers, &[(2, 5, 3), (9, 0, 1)], block));
        assert_eq!(chunks.len(), 2 * (3 + 1));
        assert_eq!(chunks[0], [(1 << 40) + 2 * block, (2 << 40) + 5 * block, CHUNK_BYTES]);
        assert_eq!(chunks[2][2], 3 * block - 2 * CHUNK_BYTES);
        assert_eq!(chunks[3], [(1 << 40) + 9 * block, 2 << 40, block]);
        let total: u64 = chunks.iter().map(|c| c[2]).sum();
        assert_eq!(total, 2 * 4 * block);
        assert!(chunks.iter().all(|c| c[2] <= CHUNK_BYTES && c[2] > 0));
    }

    #[test]
    fn staging_packs_layers_then_runs_back_to_back_both_ways() {
        let block = 1024;
        let out = staging_segments(&[1 << 30, 2 << 30], &[3, 4, 8], 0, block, 7 << 40, true);
        let expected = [[(1 << 30) + 3 * block, 7 << 40, 2 * block], [(1 << 30) + 8 * block, (7 << 40) + 2 * block, block]];
        assert_eq!(out[..2], expected);
        assert_eq!(out[2], [(2 << 30) + 3 * block, (7 << 40) + 3 * block, 2 * block]);
        let back = staging_segments(&[1 << 30, 2 << 30], &[3, 4, 8], 0, block, 7 << 40, false);
        assert!(out.iter().zip(&back).all(|(a, b)| a[0] == b[1] && a[1] == b[0] && a[2] == b[2]));
    }

    #[test]
    fn skipped_blocks_keep_their_place_in_the_staging_area_and_are_not_copied() {
        let block = 1024;
        let out = staging_segments(&[1 << 30, 2 << 30], &[3, 4, 8], 1, block, 7 << 40, false);
        let expected = vec![
            [(7 << 40) + block, (1 << 30) + 4 * block, block],
            [(7 << 40) + 2 * block, (1 << 30) + 8 * block, block],
            [(7 << 40) + 4 * block, (2 << 30) + 4 * block, block],
            [(7 << 40) + 5 * block, (2 << 30) + 8 * block, block],
        ];
        assert_eq!(out, expected);
        assert!(staging_segments(&[1 << 30], &[3, 4], 2, block, 7 << 40, false).is_empty());
    }

    #[test]
    fn staging_rounds_cover_the_layers_and_fit_the_buffer() {
        let per = layers_per_round(256, 32 << 10); // 16 MiB a layer: 4 per round
        assert_eq!(per, 4);
        assert_eq!(rounds(0..10, per).collect::<Vec<_>>(), vec![0..4, 4..8, 8..10]);
        assert_eq!(layers_per_round(1 << 20, 32 << 10), 1, "a layer larger than the buffer still goes, alone");
    }

    #[test]
    fn a_copy_on_threads_copies_every_byte_in_place() {
        for len in [0, 100, (8 << 20) * 3 + 5] {
            let src: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let mut dst = vec![0u8; len];
            copy_on_threads(&mut dst, &src);
            assert!(dst == src, "{len} bytes");
        }
    }

    #[test]
    fn ipc_handles_round_trip_through_hex() {
        let mut h = CUipcMemHandle { reserved: [0; 64] };
        for (i, b) in h.reserved.iter_mut().enumerate() {
            *b = (i * 37) as u8 as c_char;
        }
        let hex = handle_to_hex(&h);
        assert_eq!(hex.len(), 128);
        assert_eq!(handle_from_hex(&hex).unwrap().reserved, h.reserved);
        assert!(handle_from_hex("zz").is_err());
    }
}
