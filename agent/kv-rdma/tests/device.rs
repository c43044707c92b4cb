//! Device tests (`rdma` feature). The first runs everywhere and checks the error a machine
//! without RDMA gives; the `#[ignore]`d ones need an RDMA device (a NIC, or soft-RoCE:
//! `rdma link add rxe0 type rxe netdev eth0`) and do loopback READs between two QPs of
//! one device. Run them with
//! `cargo test -p dlengine-kv-rdma --features rdma -- --ignored --test-threads 1`.
//! `DLENGINE_RDMA_DEVICE`, `DLENGINE_RDMA_PORT` and `DLENGINE_RDMA_GID_INDEX` pick the
//! device, port (1) and GID (auto) when the defaults are wrong.
#![cfg(feature = "rdma")]

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::time::Duration;

use dlengine_kv_rdma::*;

fn machine_has_rdma_devices() -> bool {
    std::fs::read_dir("/sys/class/infiniband").map(|mut d| d.next().is_some()).unwrap_or(false)
}

#[test]
fn without_a_device_open_says_so_clearly() {
    if machine_has_rdma_devices() {
        eprintln!("skipped: this machine has RDMA devices (the #[ignore]d tests cover it)");
        return;
    }
    let err = Device::open(None).unwrap_err();
    assert!(matches!(err, RdmaError::NoDevice { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.starts_with("no RDMA device found; use --kv-transport tcp or cuda-ipc"), "{msg}");
    let err = Device::open(Some("mlx5_0")).unwrap_err();
    assert!(matches!(err, RdmaError::NoDevice { .. }), "{err:?}");
    assert_eq!(Device::list().unwrap(), Vec::<String>::new());
}

/// Page-aligned, zeroed host memory that outlives its registration (declared first in
/// tests, dropped last).
struct HostBuf {
    ptr: *mut u8,
    layout: Layout,
}

impl HostBuf {
    fn new(len: usize) -> Self {
        let layout = Layout::from_size_align(len.max(1), 4096).unwrap();
        // SAFETY: non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        Self { ptr, layout }
    }
    fn bytes(&self) -> &[u8] {
        // SAFETY: allocated and initialised (zeroed) for layout.size() bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.layout.size()) }
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
    fn register(&self, pd: &ProtectionDomain, access: Access) -> MemoryRegion {
        // SAFETY: the buffer outlives the region in every test below.
        unsafe { pd.register_host(self.ptr, self.layout.size(), access) }.unwrap()
    }
}

impl Drop for HostBuf {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout.
        unsafe { dealloc(self.ptr, self.layout) };
    }
}

fn env<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Opens the test device and returns it with its endpoint and a PD.
fn device() -> (Device, EndpointInfo, ProtectionDomain) {
    let name: Option<String> = env("DLENGINE_RDMA_DEVICE");
    let device = Device::open(name.as_deref()).expect("an RDMA device (see docs/rdma.md)");
    let port = env("DLENGINE_RDMA_PORT").unwrap_or(1);
    let gid = env("DLENGINE_RDMA_GID_INDEX").map_or(GidSelector::Auto, GidSelector::Index);
    let endpoint = device.endpoint(port, gid).unwrap();
    let pd = device.alloc_pd().unwrap();
    (device, endpoint, pd)
}

/// `n` connected pairs on one device: (readers, responders). The handshake goes through
/// JSON as it would between two engines.
fn loopback_pairs(pd: &ProtectionDomain, ep: &EndpointInfo, n: usize) -> (Vec<QueuePair>, Vec<QueuePair>) {
    let config = QpConfig { max_send_wr: 16, ..QpConfig::default() };
    let mut readers: Vec<QueuePair> = (0..n).map(|_| pd.create_qp(ep, &config).unwrap()).collect();
    let mut responders: Vec<QueuePair> = (0..n).map(|_| pd.create_qp(ep, &config).unwrap()).collect();
    let offer =
        ConnectInfo::from_json(&ConnectInfo::new(ep.clone(), readers.iter().map(QueuePair::info).collect()).to_json())
            .unwrap();
    let answer = ConnectInfo::from_json(
        &ConnectInfo::new(ep.clone(), responders.iter().map(QueuePair::info).collect()).to_json(),
    )
    .unwrap();
    for (qp, info) in responders.iter_mut().zip(&offer.qps) {
        qp.connect(&offer.endpoint, info).unwrap();
    }
    for (qp, info) in readers.iter_mut().zip(&answer.qps) {
        qp.connect(&answer.endpoint, info).unwrap();
    }
    (readers, responders)
}

fn pattern(region: usize, offset: usize) -> u8 {
    (region.wrapping_mul(131) ^ offset.wrapping_mul(7) ^ (offset >> 8)) as u8 | 1
}

/// Prefill-like remote cache (one region per layer and part) read into a decode-like
/// local cache (one block-major region), checked byte for byte.
fn loopback_read(num_qps: usize, max_message_bytes: u64) {
    let shape = KvShape { layers: 4, kv_heads: 2, head_dim: 64, block_size: 16, elem_bytes: 2 };
    let remote_layout = KvMemoryLayout::separate_regions(shape, 32);
    let local_layout = KvMemoryLayout::single_region_block_major(shape, 32);

    let (_device, ep, pd) = device();
    let mut remote_bufs: Vec<HostBuf> =
        remote_layout.required_region_lens().unwrap().iter().map(|&len| HostBuf::new(len as usize)).collect();
    for (r, buf) in remote_bufs.iter_mut().enumerate() {
        for (o, b) in buf.bytes_mut().iter_mut().enumerate() {
            *b = pattern(r, o);
        }
    }
    let local_buf = HostBuf::new(local_layout.required_region_lens().unwrap()[0] as usize);
    let remote_mrs: Vec<MemoryRegion> = remote_bufs.iter().map(|b| b.register(&pd, Access::REMOTE_READ)).collect();
    let local_mr = local_buf.register(&pd, Access::LOCAL_WRITE);

    let advert =
        KvRdmaAdvert::new(ep.clone(), remote_layout, remote_mrs.iter().map(MemoryRegion::remote_region).collect());
    let advert = KvRdmaAdvert::from_json(&advert.to_json()).unwrap();
    let options = PlanOptions { num_qps, max_message_bytes, min_split_bytes: 0 };
    let planner = ReadPlanner::new(
        advert.layout.clone(),
        advert.regions.clone(),
        local_layout.clone(),
        vec![local_mr.local_region()],
        options,
    )
    .unwrap();
    let pairs = [(0, 5), (1, 6), (2, 7), (10, 20), (11, 3), (31, 0)];
    let plan = planner.plan(&pairs).unwrap();

    let (mut readers, _responders) = loopback_pairs(&pd, &ep, num_qps);
    let mut landed = Vec::new();
    let stats =
        ReadTransfer::start(&mut readers, &plan, ReadOptions { max_batch: 4, timeout: Duration::from_secs(10) })
            .unwrap()
            .wait(|layers| landed.extend(layers))
            .unwrap();
    assert_eq!(landed, vec![0, 1, 2, 3]);
    assert_eq!(stats.bytes, plan.total_bytes());

    let bb = shape.block_bytes() as usize;
    let local = local_buf.bytes();
    let mut touched = vec![false; local.len()];
    for layer in 0..shape.layers as usize {
        for (part, region) in [(0, 2 * layer), (1, 2 * layer + 1)] {
            for &(r, l) in &pairs {
                let src = r as usize * bb;
                let dst = l as usize * local_layout.block_stride as usize + (2 * layer + part) * bb;
                for k in 0..bb {
                    assert_eq!(
                        local[dst + k],
                        pattern(region, src + k),
                        "layer {layer} part {part} block {r}->{l} byte {k}"
                    );
                    touched[dst + k] = true;
                }
            }
        }
    }
    assert!(local.iter().zip(&touched).all(|(&b, &t)| t || b == 0), "bytes outside the requested blocks were written");
    for qp in &readers {
        assert!(qp.is_connected(), "a successful transfer leaves the QP usable");
    }
}

#[test]
#[ignore = "needs an RDMA device"]
fn loopback_read_one_qp() {
    loopback_read(1, 1 << 20);
}

#[test]
#[ignore = "needs an RDMA device"]
fn loopback_read_four_qps_small_messages_layer_by_layer() {
    loopback_read(4, 3000);
}

#[test]
#[ignore = "needs an RDMA device"]
fn loopback_read_gated_posts_each_layer_only_once_the_source_says_it_is_written() {
    let shape = KvShape { layers: 4, kv_heads: 2, head_dim: 64, block_size: 16, elem_bytes: 2 };
    let layout = KvMemoryLayout::separate_regions(shape, 8);
    let (_device, ep, pd) = device();
    let lens = layout.required_region_lens().unwrap();
    let (remote_bufs, local_bufs): (Vec<HostBuf>, Vec<HostBuf>) =
        (lens.iter().map(|&len| HostBuf::new(len as usize)).collect(), lens.iter().map(|&len| HostBuf::new(len as usize)).collect());
    let remote_mrs: Vec<MemoryRegion> = remote_bufs.iter().map(|b| b.register(&pd, Access::REMOTE_READ)).collect();
    let local_mrs: Vec<MemoryRegion> = local_bufs.iter().map(|b| b.register(&pd, Access::LOCAL_WRITE)).collect();
    let remote = remote_mrs.iter().map(MemoryRegion::remote_region).collect();
    let local = local_mrs.iter().map(MemoryRegion::local_region).collect();
    let options = PlanOptions { num_qps: 2, ..PlanOptions::default() };
    let plan = ReadPlanner::new(layout.clone(), remote, layout, local, options).unwrap().plan(&[(0, 1), (3, 4), (4, 5)]).unwrap();
    let (mut readers, _responders) = loopback_pairs(&pd, &ep, 2);
    // The source "writes" one more layer every 50 rounds.
    let (ready, mut rounds, mut landed) = (std::cell::Cell::new(0u32), 0, Vec::new());
    let layers_ready = || {
        rounds += 1;
        if rounds % 50 == 0 {
            ready.set((ready.get() + 1).min(shape.layers));
        }
        Ok(ready.get())
    };
    ReadTransfer::start(&mut readers, &plan, ReadOptions::default())
        .unwrap()
        .wait_gated(layers_ready, |layers| landed.extend(layers.map(|l| (l, ready.get()))))
        .unwrap();
    assert_eq!(landed.iter().map(|&(l, _)| l).collect::<Vec<_>>(), vec![0, 1, 2, 3]);
    assert!(landed.iter().all(|&(layer, written)| layer < written), "a layer landed before the source wrote it: {landed:?}");
}

#[test]
#[ignore = "needs an RDMA device"]
fn loopback_second_transfer_on_the_same_qps() {
    let (_device, ep, pd) = device();
    let src = HostBuf::new(1 << 16);
    let dst = HostBuf::new(1 << 16);
    let src_mr = src.register(&pd, Access::REMOTE_READ);
    let dst_mr = dst.register(&pd, Access::LOCAL_WRITE);
    let shape = KvShape { layers: 1, kv_heads: 1, head_dim: 256, block_size: 16, elem_bytes: 1 }; // 4 KiB blocks
    let layout = KvMemoryLayout::region_per_layer(shape, 8);
    let planner = ReadPlanner::new(
        layout.clone(),
        vec![src_mr.remote_region()],
        layout,
        vec![dst_mr.local_region()],
        PlanOptions { num_qps: 2, max_message_bytes: 4096, min_split_bytes: 0 },
    )
    .unwrap();
    let (mut readers, _responders) = loopback_pairs(&pd, &ep, 2);
    for pairs in [vec![(0, 1), (1, 2)], vec![(5, 5), (6, 6), (7, 7)]] {
        let plan = planner.plan(&pairs).unwrap();
        let mut transfer = ReadTransfer::start(&mut readers, &plan, ReadOptions::default()).unwrap();
        let mut layers = Vec::new();
        while !transfer.is_done() {
            layers.extend(transfer.progress().unwrap());
        }
        assert_eq!(layers, vec![0]);
        assert_eq!(transfer.layers_complete(), 1);
    }
}

#[test]
#[ignore = "needs an RDMA device"]
fn loopback_bad_rkey_fails_with_the_completion_status() {
    let (_device, ep, pd) = device();
    let src = HostBuf::new(8192);
    let dst = HostBuf::new(8192);
    let src_mr = src.register(&pd, Access::REMOTE_READ);
    let dst_mr = dst.register(&pd, Access::LOCAL_WRITE);
    let mut bad = src_mr.remote_region();
    bad.rkey ^= 0x00ff_ff00;
    let plan = ReadPlan {
        layers: 1,
        qps: vec![vec![ReadRequest {
            layer: 0,
            remote_addr: bad.addr,
            rkey: bad.rkey,
            local_addr: dst_mr.addr(),
            lkey: dst_mr.lkey(),
            len: 4096,
        }]],
    };
    let (mut readers, _responders) = loopback_pairs(&pd, &ep, 1);
    let err =
        read_blocks(&mut readers, &plan, ReadOptions { max_batch: 1, timeout: Duration::from_secs(10) }).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, RdmaError::WorkCompletion { .. }), "{err:?}");
    assert!(msg.contains("remote access error") || msg.contains("remote invalid request"), "{msg}");
    assert!(readers[0].unusable_reason().is_some());
    // The spent QP refuses further work instead of hanging.
    assert!(matches!(read_blocks(&mut readers, &plan, ReadOptions::default()), Err(RdmaError::QpUnusable { .. })));
}

#[test]
#[ignore = "needs an RDMA device"]
fn unknown_device_name_lists_the_devices() {
    let (device, _, _) = device();
    let err = Device::open(Some("no-such-device")).unwrap_err();
    assert!(matches!(&err, RdmaError::DeviceNotFound { available, .. } if available.contains(device.name())), "{err}");
}
