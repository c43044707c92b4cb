//! The engine's KV cache as the RDMA planner sees it: both backends keep a K and a V
//! buffer per layer, `[num_blocks][block]`, which is [`KvMemoryLayout::separate_regions`].

use dlengine_engine::backend::KvCacheLayout;
use dlengine_engine::kv_transfer::KvMemory;
use dlengine_kv_rdma::{KvMemoryLayout, KvShape};

pub fn kv_memory_layout(l: &KvCacheLayout, num_blocks: usize, memory: &KvMemory) -> Result<KvMemoryLayout, String> {
    let shape = KvShape {
        layers: l.num_layers as u32,
        kv_heads: l.kv_heads as u32,
        head_dim: l.head_dim as u32,
        block_size: l.block_size as u32,
        elem_bytes: l.dtype.size_in_bytes() as u32,
    };
    let layout = KvMemoryLayout::separate_regions(shape, num_blocks as u32);
    if memory.regions.len() != 2 * l.num_layers {
        return Err(format!("the KV cache has {} buffers, expected a K and a V per layer ({})", memory.regions.len(), 2 * l.num_layers));
    }
    let lens: Vec<u64> = memory.regions.iter().map(|r| r.len).collect();
    layout.check_regions(&lens).map_err(|e| format!("the KV cache does not hold its layout: {e}"))?;
    Ok(layout)
}

#[cfg(test)]
mod tests {
    //! What a NIC would do, done by memcpy: the planner's READs between two real CPU
    //! caches, described by [`kv_memory_layout`], must copy exactly the asked blocks.
    //! (The verbs themselves need a device: agent/kv-rdma/tests/device.rs.)

    use dlengine_engine::backend::cpu::CpuBackend;
    use dlengine_engine::backend::{Backend, DType, KvBlockIo, KvCacheLayout};
    use dlengine_kv_rdma::{LocalRegion, PlanOptions, ReadPlanner, RemoteRegion};

    use super::kv_memory_layout;

    const BLOCKS: usize = 12;

    fn cache(layout: KvCacheLayout) -> CpuBackend {
        let mut backend = CpuBackend::new(64 << 20);
        backend.allocate_kv_cache(layout, BLOCKS).unwrap();
        backend
    }

    #[test]
    fn planned_reads_copy_exactly_the_leased_blocks() {
        let layout = KvCacheLayout { num_layers: 3, kv_heads: 2, head_dim: 4, block_size: 4, dtype: DType::F32 };
        let (mut prefill, mut decode) = (cache(layout), cache(layout));
        let all: Vec<u32> = (0..BLOCKS as u32).collect();
        let bytes: Vec<u8> = (0..BLOCKS * layout.bytes_per_block()).map(|i| (i * 7 % 251) as u8).collect();
        prefill.write_kv_blocks(&all, 0..3, &bytes).unwrap();

        let remote = prefill.kv_memory(false).unwrap().unwrap();
        let local = decode.kv_memory(false).unwrap().unwrap();
        let remote_regions = remote.regions.iter().map(|r| RemoteRegion { addr: r.addr, rkey: 1, len: r.len }).collect();
        let local_regions = local.regions.iter().map(|r| LocalRegion { addr: r.addr, len: r.len, lkey: 2 }).collect();
        let planner = ReadPlanner::new(
            kv_memory_layout(&layout, BLOCKS, &remote).unwrap(),
            remote_regions,
            kv_memory_layout(&layout, BLOCKS, &local).unwrap(),
            local_regions,
            PlanOptions { num_qps: 3, ..PlanOptions::default() },
        )
        .unwrap();
        // A lease of scattered blocks lands in other scattered blocks.
        let pairs = [(7, 0), (2, 5), (3, 6), (11, 1)];
        for request in planner.plan(&pairs).unwrap().requests() {
            // SAFETY: the planner keeps every READ inside the registered (live) buffers.
            unsafe { std::ptr::copy_nonoverlapping(request.remote_addr as *const u8, request.local_addr as *mut u8, request.len as usize) };
        }
        let (remote_blocks, local_blocks): (Vec<u32>, Vec<u32>) = pairs.iter().copied().unzip();
        assert_eq!(decode.read_kv_blocks(&local_blocks, 0..3).unwrap(), prefill.read_kv_blocks(&remote_blocks, 0..3).unwrap());
        let untouched: Vec<u32> = all.iter().copied().filter(|b| !local_blocks.contains(b)).collect();
        assert!(decode.read_kv_blocks(&untouched, 0..3).unwrap().iter().all(|&b| b == 0), "only the leased blocks are written");
    }

    #[test]
    fn a_cache_that_does_not_hold_its_layout_is_refused() {
        let layout = KvCacheLayout { num_layers: 2, kv_heads: 1, head_dim: 4, block_size: 2, dtype: DType::F32 };
        let mut backend = cache(layout);
        let mut memory = backend.kv_memory(false).unwrap().unwrap();
        memory.regions[3].len -= 1;
        assert!(kv_memory_layout(&layout, BLOCKS, &memory).unwrap_err().contains("does not hold its layout"));
        memory.regions.pop();
        assert!(kv_memory_layout(&layout, BLOCKS, &memory).unwrap_err().contains("3 buffers, expected a K and a V per layer (4)"));
    }
}
