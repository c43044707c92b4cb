//! Whole-block KV access for prefill/decode disaggregation: host copies (the TCP path)
//! and CUDA IPC (the same-node path: a decode process maps the prefill process's KV
//! buffers and copies blocks device to device, over NVLink between two GPUs).

use std::collections::HashMap;
use std::ffi::c_char;
use std::ops::Range;

use cudarc::driver::result;
use cudarc::driver::sys::{self, CUdeviceptr, CUipcMemHandle, CUipcMem_flags_enum, CUstream};
use dlengine_engine::backend::KvBlockIo;
use dlengine_engine::kv_transfer::CudaIpcKv;

use crate::backend::CudaBackend;
use crate::error::{op_error, OpContext, Result};

/// Runs of consecutive blocks, as (first, first, length).
fn block_runs(blocks: &[u32]) -> Vec<(u32, u32, u32)> {
    runs(&blocks.iter().map(|&b| (b, b)).collect::<Vec<_>>())
}

/// Another process's KV buffers mapped into this one: (K, V) base per layer.
pub(crate) struct PeerCache {
    layers: Vec<(CUdeviceptr, CUdeviceptr)>,
}

impl Drop for PeerCache {
    fn drop(&mut self) {
        for &(k, v) in &self.layers {
            // SAFETY: each was opened once by cuIpcOpenMemHandle_v2.
            unsafe {
                let _ = sys::cuIpcCloseMemHandle(k);
                let _ = sys::cuIpcCloseMemHandle(v);
            }
        }
    }
}

/// Mapped peers, keyed by (device, pid, first handle) so a restarted peer is mapped anew,
/// and the streams peer copies run on.
#[derive(Default)]
pub(crate) struct PeerCaches {
    peers: HashMap<(String, u32, String), PeerCache>,
    streams: Vec<CUstream>,
}

/// Peer copies in flight at once: one stream leaves NVLink idle between copies of a few
/// MiB (each pays ~20 µs of latency); four keep it busy.
const PEER_COPY_STREAMS: usize = 4;

impl PeerCaches {
    fn streams(&mut self) -> Result<&[CUstream]> {
        while self.streams.len() < PEER_COPY_STREAMS {
            let stream = result::stream::create(result::stream::StreamKind::NonBlocking).op("creating a peer-copy stream")?;
            self.streams.push(stream);
        }
        Ok(&self.streams)
    }
}

impl Drop for PeerCaches {
    fn drop(&mut self) {
        self.peers.clear(); // unmap before the streams go
        for &stream in &self.streams {
            // SAFETY: created by stream::create, destroyed once.
            unsafe {
                let _ = result::stream::destroy(stream);
            }
        }
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
    fn block_bytes(&self) -> Result<usize> {
        let kv = self.kv_cache("KV block I/O")?;
        let l = kv.layout;
        Ok(l.block_size * l.kv_heads * l.head_dim * l.dtype.size_in_bytes())
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

    fn map_peer(&mut self, peer: &CudaIpcKv) -> Result<&PeerCache> {
        let key = (peer.device.clone(), peer.pid, peer.k_handles.first().cloned().unwrap_or_default());
        if !self.peers.peers.contains_key(&key) {
            let layers = self.kv_cache("CUDA IPC")?.layers.len();
            if peer.k_handles.len() != layers || peer.v_handles.len() != layers {
                return Err(op_error("CUDA IPC", format!("the peer exports {} layers, this engine has {layers}", peer.k_handles.len())));
            }
            let mut cache = PeerCache { layers: Vec::with_capacity(layers) };
            for (k, v) in peer.k_handles.iter().zip(&peer.v_handles) {
                let k = open_handle(k)?;
                // Push K at once so Drop closes it even if V fails to open.
                cache.layers.push((k, 0));
                let v = open_handle(v)?;
                cache.layers.last_mut().expect("just pushed").1 = v;
            }
            self.peers.peers.insert(key.clone(), cache);
        }
        Ok(&self.peers.peers[&key])
    }
}

impl KvBlockIo for CudaBackend {
    fn read_kv_blocks(&mut self, blocks: &[u32], layers: Range<usize>) -> Result<Vec<u8>> {
        self.device.bind()?;
        let block_bytes = self.block_bytes()?;
        let kv = self.kv_cache("read_kv_blocks")?;
        let mut out = vec![0u8; layers.len() * 2 * blocks.len() * block_bytes];
        let mut at = 0;
        for layer in layers {
            let (k, v) = &kv.layers[layer];
            for base in [k.ptr(), v.ptr()] {
                for (src, _, n) in block_runs(blocks) {
                    let len = n as usize * block_bytes;
                    // SAFETY: the run lies inside the layer buffer; `out` outlives the sync below.
                    unsafe { result::memcpy_dtoh_async(&mut out[at..at + len], base + src as u64 * block_bytes as u64, self.device.stream) }
                        .op("copying KV blocks to the host")?;
                    at += len;
                }
            }
        }
        // SAFETY: waits for the copies above before `out` is handed out.
        unsafe { result::stream::synchronize(self.device.stream) }.op("copying KV blocks to the host")?;
        Ok(out)
    }

    fn write_kv_blocks(&mut self, blocks: &[u32], layers: Range<usize>, bytes: &[u8]) -> Result<()> {
        self.device.bind()?;
        let block_bytes = self.block_bytes()?;
        let expected = layers.len() * 2 * blocks.len() * block_bytes;
        if bytes.len() != expected {
            return Err(op_error("write_kv_blocks", format!("expected {expected} bytes, got {}", bytes.len())));
        }
        let kv = self.kv_cache("write_kv_blocks")?;
        let mut at = 0;
        for layer in layers {
            let (k, v) = &kv.layers[layer];
            for base in [k.ptr(), v.ptr()] {
                for (dst, _, n) in block_runs(blocks) {
                    let len = n as usize * block_bytes;
                    // SAFETY: the run lies inside the layer buffer; `bytes` outlives the sync below.
                    unsafe { result::memcpy_htod_async(base + dst as u64 * block_bytes as u64, &bytes[at..at + len], self.device.stream) }
                        .op("copying KV blocks from the host")?;
                    at += len;
                }
            }
        }
        // SAFETY: the host source must stay valid until the copies finished.
        unsafe { result::stream::synchronize(self.device.stream) }.op("copying KV blocks from the host")
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
        Ok(Some(CudaIpcKv { device, pid: std::process::id(), k_handles, v_handles }))
    }

    fn copy_kv_from_peer(&mut self, peer: &CudaIpcKv, pairs: &[(u32, u32)]) -> Result<()> {
        self.device.bind()?;
        if peer.device == self.pci_bus_id()? {
            return Err(op_error("CUDA IPC", "the peer runs on this same GPU; CUDA IPC needs two devices"));
        }
        let block_bytes = self.block_bytes()? as u64;
        // Freshly allocated local blocks may have been read by the last step: let it end.
        self.device.synchronize()?;
        let local: Vec<(CUdeviceptr, CUdeviceptr)> =
            self.kv_cache("copy_kv_from_peer")?.layers.iter().map(|(k, v)| (k.ptr(), v.ptr())).collect();
        let remote = self.map_peer(peer)?.layers.clone();
        let streams = self.peers.streams()?.to_vec();
        let runs = runs(pairs);
        let copies = remote.into_iter().zip(local).flat_map(|((rk, rv), (lk, lv))| [(rk, lk), (rv, lv)]);
        for (i, (src_base, dst_base)) in copies.enumerate() {
            let stream = streams[i % streams.len()];
            for &(src, dst, n) in &runs {
                // SAFETY: both runs lie inside their layer buffers (the peer's layout was
                // checked equal to ours before the request was admitted).
                unsafe {
                    result::memcpy_dtod_async(dst_base + dst as u64 * block_bytes, src_base + src as u64 * block_bytes, (n as u64 * block_bytes) as usize, stream)
                }
                .op("copying KV blocks from a peer device")?;
            }
        }
        // The peer frees its blocks once we return: the copies must have landed.
        for stream in streams {
            // SAFETY: plain stream synchronisation.
            unsafe { result::stream::synchronize(stream) }.op("copying KV blocks from a peer device")?;
        }
        Ok(())
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
