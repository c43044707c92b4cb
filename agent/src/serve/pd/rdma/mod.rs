//! KV transfer over RDMA (docs/rdma.md): decode pulls a lease's blocks out of prefill's
//! cache with one-sided READs that land straight in its own cache, posted by the
//! `dlengine-kv-rdma` crate. Both engines register their whole KV cache once at start-up
//! (GPU memory through dma-buf, else nvidia-peermem; host memory as is). Decode connects
//! to each prefill peer once (`POST /pd/rdma/connect`, [`connect`]) and keeps its queue
//! pairs for later requests; a failed transfer leaves them unusable and the next request
//! connects anew.

mod connect;
mod layout;
mod progress;
mod reader;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use dlengine_cli::TransferArgs;
use dlengine_engine::engine::Engine;
use dlengine_engine::kv_transfer::{KvLocation, KvMemory, KvRegion};
use dlengine_kv_rdma::{
    Access, Device, EndpointInfo, GidSelector, KvMemoryLayout, KvRdmaAdvert, LocalRegion, MemoryRegion, ProtectionDomain,
};

pub use connect::rdma_connect;
use connect::Accepted;
use reader::PeerLink;

/// This engine's RDMA side: its device, its registered cache, the queue pairs it keeps.
pub struct RdmaKv {
    pd: ProtectionDomain,
    endpoint: EndpointInfo,
    /// The cache's registrations, region `2l` layer `l`'s K and `2l + 1` its V. The engine
    /// allocates its cache once and keeps it for the life of the process.
    regions: Vec<MemoryRegion>,
    /// The registration of the per-layer progress marks, where the backend publishes them.
    progress: Option<MemoryRegion>,
    layout: KvMemoryLayout,
    qps_per_peer: usize,
    /// Prefill side: queue pairs connected to decode engines (their HCA answers READs).
    accepted: Mutex<Accepted>,
    /// Decode side: links to prefill engines, by their engine id.
    peers: Mutex<HashMap<String, Arc<PeerLink>>>,
    /// One handshake at a time: two for one peer would have prefill replace the first
    /// one's queue pairs while a transfer may be using them.
    connecting: tokio::sync::Mutex<()>,
}

impl RdmaKv {
    /// Opens the device and registers the engine's KV cache with it.
    pub async fn open(args: &TransferArgs, engine: &Engine) -> Result<RdmaKv, String> {
        let device = Device::open(args.rdma_device.as_deref()).map_err(|e| e.to_string())?;
        let gid = args.rdma_gid_index.map_or(GidSelector::Auto, GidSelector::Index);
        let endpoint = device.endpoint(args.rdma_port, gid).map_err(|e| e.to_string())?;
        let pd = device.alloc_pd().map_err(|e| e.to_string())?;
        let memory = engine.kv_memory(true).await.map_err(|e| e.to_string())?.ok_or("this backend cannot expose its KV cache")?;
        let info = engine.info();
        let layout = layout::kv_memory_layout(&info.kv_layout, info.num_kv_blocks, &memory)?;
        let (regions, progress) = register(&pd, memory)?;
        let layer_wise = progress.is_some();
        tracing::info!(device = %endpoint.device, port = endpoint.port, gid = %endpoint.gid, regions = regions.len(), layer_wise, "RDMA KV transfer ready");
        let qps_per_peer = args.rdma_qps as usize;
        Ok(RdmaKv {
            pd,
            endpoint,
            regions,
            progress,
            layout,
            qps_per_peer,
            accepted: Mutex::default(),
            peers: Mutex::default(),
            connecting: tokio::sync::Mutex::default(),
        })
    }

    /// What a decode engine plans its READs against.
    fn advert(&self) -> KvRdmaAdvert {
        KvRdmaAdvert::new(self.endpoint.clone(), self.layout.clone(), self.regions.iter().map(MemoryRegion::remote_region).collect())
            .with_progress(self.progress.as_ref().map(MemoryRegion::remote_region))
    }

    fn local_regions(&self) -> Vec<LocalRegion> {
        self.regions.iter().map(MemoryRegion::local_region).collect()
    }

    /// For the registry: `device:port`.
    pub fn summary(&self) -> String {
        format!("{}:{}", self.endpoint.device, self.endpoint.port)
    }
}

/// Registers every buffer of the cache for local writes (decode) and remote reads
/// (prefill), and its progress marks for remote reads.
fn register(pd: &ProtectionDomain, memory: KvMemory) -> Result<(Vec<MemoryRegion>, Option<MemoryRegion>), String> {
    let on_gpu = matches!(memory.location, KvLocation::CudaDevice(_));
    let access = Access::LOCAL_WRITE | Access::REMOTE_READ;
    let regions = memory.regions.iter().map(|region| register_region(pd, region, access, on_gpu)).collect::<Result<Vec<_>, _>>()?;
    let progress = memory.progress.as_ref().map(|marks| register_region(pd, marks, Access::REMOTE_READ, on_gpu)).transpose()?;
    Ok((regions, progress))
}

fn register_region(pd: &ProtectionDomain, region: &KvRegion, access: Access, on_gpu: bool) -> Result<MemoryRegion, String> {
    let registered = match &region.dmabuf {
        // SAFETY: the engine keeps its cache and marks allocated for the life of the process.
        Some(fd) => unsafe { pd.register_dmabuf(std::os::fd::AsFd::as_fd(fd), 0, region.len as usize, region.addr, access) },
        // SAFETY: as above; a device pointer registers only with nvidia-peermem loaded.
        None => unsafe { pd.register_host(region.addr as *mut u8, region.len as usize, access) },
    };
    registered.map_err(|e| {
        let hint = if on_gpu && region.dmabuf.is_none() { " (the GPU exports no dma-buf: load nvidia-peermem for GPUDirect RDMA)" } else { "" };
        format!("registering the KV cache with the RDMA device: {e}{hint}")
    })
}
