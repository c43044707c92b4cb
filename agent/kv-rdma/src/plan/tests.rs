use std::collections::HashMap;

use proptest::prelude::*;

use super::*;
use crate::layout::KvShape;

const REMOTE_BASE: u64 = 0x7f00_0000_0000;
const LOCAL_BASE: u64 = 0x5500_0000_0000;

fn shape() -> KvShape {
    // 32-byte blocks, 2 layers.
    KvShape { layers: 2, kv_heads: 2, head_dim: 4, block_size: 2, elem_bytes: 2 }
}

fn remote_regions(layout: &KvMemoryLayout) -> Vec<RemoteRegion> {
    let lens = layout.required_region_lens().unwrap();
    lens.iter()
        .enumerate()
        .map(|(i, &len)| RemoteRegion { addr: REMOTE_BASE + ((i as u64) << 32), rkey: 1000 + i as u32, len })
        .collect()
}

fn local_regions(layout: &KvMemoryLayout) -> Vec<LocalRegion> {
    let lens = layout.required_region_lens().unwrap();
    lens.iter()
        .enumerate()
        .map(|(i, &len)| LocalRegion {
            addr: LOCAL_BASE + ((i as u64) << 32) + 64 * i as u64,
            lkey: 2000 + i as u32,
            len,
        })
        .collect()
}

fn planner(remote: KvMemoryLayout, local: KvMemoryLayout, options: PlanOptions) -> ReadPlanner {
    let (rr, lr) = (remote_regions(&remote), local_regions(&local));
    ReadPlanner::new(remote, rr, local, lr, options).unwrap()
}

fn one_qp_big_messages() -> PlanOptions {
    PlanOptions { num_qps: 1, max_message_bytes: 1 << 20, min_split_bytes: 0 }
}

/// (layer, remote region index, remote offset, local region index, local offset, len)
fn describe(plan: &ReadPlan) -> Vec<(u32, u32, u64, u32, u64, u32)> {
    plan.requests()
        .map(|r| {
            let rreg = r.rkey - 1000;
            let lreg = r.lkey - 2000;
            (
                r.layer,
                rreg,
                r.remote_addr - REMOTE_BASE - ((rreg as u64) << 32),
                lreg,
                r.local_addr - LOCAL_BASE - ((lreg as u64) << 32) - 64 * lreg as u64,
                r.len,
            )
        })
        .collect()
}

#[test]
fn consecutive_blocks_on_both_sides_become_one_read_per_layer_and_part() {
    let p = planner(
        KvMemoryLayout::separate_regions(shape(), 16),
        KvMemoryLayout::separate_regions(shape(), 16),
        one_qp_big_messages(),
    );
    let plan = p.plan(&[(0, 10), (1, 11), (2, 12)]).unwrap();
    assert_eq!(plan.layers, 2);
    assert_eq!(
        describe(&plan),
        vec![(0, 0, 0, 0, 320, 96), (0, 1, 0, 1, 320, 96), (1, 2, 0, 2, 320, 96), (1, 3, 0, 3, 320, 96)]
    );
    assert_eq!(plan.total_bytes(), 2 * 2 * 3 * 32);
}

#[test]
fn a_gap_on_either_side_breaks_the_run() {
    let p = planner(
        KvMemoryLayout::separate_regions(shape(), 16),
        KvMemoryLayout::separate_regions(shape(), 16),
        one_qp_big_messages(),
    );
    // Local side jumps between the first and second pair; remote side between the 2nd and 3rd.
    let plan = p.plan(&[(0, 10), (1, 12), (3, 13)]).unwrap();
    let layer0_k: Vec<_> = describe(&plan).into_iter().filter(|d| d.0 == 0 && d.1 == 0).collect();
    assert_eq!(layer0_k, vec![(0, 0, 0, 0, 320, 32), (0, 0, 32, 0, 384, 32), (0, 0, 96, 0, 416, 32)]);
}

#[test]
fn pair_order_does_not_matter() {
    let p = planner(
        KvMemoryLayout::separate_regions(shape(), 16),
        KvMemoryLayout::separate_regions(shape(), 16),
        one_qp_big_messages(),
    );
    assert_eq!(p.plan(&[(2, 12), (0, 10), (1, 11)]).unwrap(), p.plan(&[(0, 10), (1, 11), (2, 12)]).unwrap());
}

#[test]
fn block_major_merges_k_and_v_of_a_block() {
    let l = KvMemoryLayout::single_region_block_major(shape(), 8);
    let p = planner(l.clone(), l, one_qp_big_messages());
    let plan = p.plan(&[(3, 5)]).unwrap();
    // Per layer one READ covering K then V (64 bytes); block stride is 2 layers * 2 * 32.
    assert_eq!(describe(&plan), vec![(0, 0, 3 * 128, 0, 5 * 128, 64), (1, 0, 3 * 128 + 64, 0, 5 * 128 + 64, 64)]);
}

#[test]
fn region_per_layer_to_separate_regions_keeps_k_and_v_apart() {
    let p = planner(
        KvMemoryLayout::region_per_layer(shape(), 4),
        KvMemoryLayout::separate_regions(shape(), 4),
        one_qp_big_messages(),
    );
    let plan = p.plan(&[(0, 0), (1, 1), (2, 2), (3, 3)]).unwrap();
    // Remote K blocks 0..4 are followed by V block 0 in the same region, but locally V is
    // another region: K and V stay two reads.
    assert_eq!(
        describe(&plan),
        vec![(0, 0, 0, 0, 0, 128), (0, 0, 128, 1, 0, 128), (1, 1, 0, 2, 0, 128), (1, 1, 128, 3, 0, 128)]
    );
}

#[test]
fn long_runs_are_split_at_the_message_limit() {
    let p = planner(
        KvMemoryLayout::separate_regions(shape(), 64),
        KvMemoryLayout::separate_regions(shape(), 64),
        PlanOptions { num_qps: 1, max_message_bytes: 100, min_split_bytes: 0 },
    );
    let pairs: Vec<(u32, u32)> = (0..10).map(|b| (b, b + 20)).collect();
    let plan = p.plan(&pairs).unwrap();
    assert!(plan.requests().all(|r| r.len <= 100));
    // 320 bytes per (layer, part) in whole cache lines of 64: five pieces each.
    assert_eq!(plan.num_requests(), 2 * 2 * 5);
    assert!(plan.requests().all(|r| r.len == 64));
    assert_eq!(plan.total_bytes(), 2 * 2 * 320);
}

#[test]
fn one_big_layer_is_spread_evenly_over_queue_pairs() {
    let big = KvShape { layers: 2, kv_heads: 8, head_dim: 128, block_size: 16, elem_bytes: 2 }; // 32 KiB blocks
    let p = planner(
        KvMemoryLayout::separate_regions(big, 64),
        KvMemoryLayout::separate_regions(big, 64),
        PlanOptions { num_qps: 4, max_message_bytes: 1 << 20, min_split_bytes: 64 << 10 },
    );
    let pairs: Vec<(u32, u32)> = (0..16).map(|b| (b, b)).collect(); // 512 KiB per (layer, part)
    let plan = p.plan(&pairs).unwrap();
    assert_eq!(plan.qp_bytes(), vec![512 << 10; 4]);
    for (q, reqs) in plan.qps.iter().enumerate() {
        let per_layer: Vec<u64> =
            (0..2).map(|l| reqs.iter().filter(|r| r.layer == l).map(|r| r.len as u64).sum()).collect();
        assert_eq!(per_layer, vec![256 << 10; 2], "qp {q}");
    }
}

#[test]
fn min_split_keeps_small_layers_whole() {
    let p = planner(
        KvMemoryLayout::separate_regions(shape(), 16),
        KvMemoryLayout::separate_regions(shape(), 16),
        PlanOptions { num_qps: 4, max_message_bytes: 1 << 20, min_split_bytes: 64 << 10 },
    );
    let plan = p.plan(&[(0, 0), (1, 1)]).unwrap();
    assert_eq!(plan.num_requests(), 4, "{plan:?}");
    assert_eq!(plan.qp_bytes(), vec![64; 4]);
}

#[test]
fn empty_request_gives_an_empty_plan() {
    let p = planner(
        KvMemoryLayout::separate_regions(shape(), 4),
        KvMemoryLayout::separate_regions(shape(), 4),
        PlanOptions { num_qps: 3, ..Default::default() },
    );
    let plan = p.plan(&[]).unwrap();
    assert_eq!(plan.layers, 2);
    assert_eq!(plan.qps.len(), 3);
    assert_eq!(plan.num_requests(), 0);
}

#[test]
fn rejects_bad_blocks() {
    let p = planner(
        KvMemoryLayout::separate_regions(shape(), 4),
        KvMemoryLayout::separate_regions(shape(), 8),
        PlanOptions::default(),
    );
    assert_eq!(p.plan(&[(4, 0)]), Err(PlanError::BlockOutOfRange { side: Side::Remote, block: 4, num_blocks: 4 }));
    assert_eq!(p.plan(&[(0, 8)]), Err(PlanError::BlockOutOfRange { side: Side::Local, block: 8, num_blocks: 8 }));
    assert_eq!(p.plan(&[(0, 1), (2, 1)]), Err(PlanError::DuplicateLocalBlock { block: 1 }));
    // One remote block to two local blocks is a legitimate copy.
    assert_eq!(p.plan(&[(0, 1), (0, 2)]).unwrap().total_bytes(), 2 * 2 * 2 * 32);
}

#[test]
fn rejects_bad_construction() {
    let l = KvMemoryLayout::separate_regions(shape(), 4);
    let (rr, lr) = (remote_regions(&l), local_regions(&l));
    let new = |remote: KvMemoryLayout, rr: Vec<RemoteRegion>, lr: Vec<LocalRegion>, o: PlanOptions| {
        ReadPlanner::new(remote, rr, l.clone(), lr, o).map(|_| ())
    };
    assert!(matches!(
        new(l.clone(), rr.clone(), lr.clone(), PlanOptions { num_qps: 0, ..Default::default() }),
        Err(PlanError::Options(_))
    ));
    assert!(matches!(
        new(l.clone(), rr.clone(), lr.clone(), PlanOptions { num_qps: 65, ..Default::default() }),
        Err(PlanError::Options(_))
    ));
    assert!(matches!(
        new(l.clone(), rr.clone(), lr.clone(), PlanOptions { max_message_bytes: 1 << 32, ..Default::default() }),
        Err(PlanError::Options(_))
    ));
    let mut other = shape();
    other.head_dim = 8;
    let wide = KvMemoryLayout::separate_regions(other, 4);
    assert!(matches!(
        new(wide.clone(), remote_regions(&wide), lr.clone(), PlanOptions::default()),
        Err(PlanError::ShapeMismatch { .. })
    ));
    let mut short = rr.clone();
    short[1].len -= 1;
    assert!(matches!(
        new(l.clone(), short, lr.clone(), PlanOptions::default()),
        Err(PlanError::Layout { side: Side::Remote, source: LayoutError::RegionTooSmall { region: 1, .. } })
    ));
    let mut missing = lr.clone();
    missing.pop();
    assert!(matches!(
        new(l.clone(), rr.clone(), missing, PlanOptions::default()),
        Err(PlanError::Layout { side: Side::Local, source: LayoutError::MissingRegion { .. } })
    ));
    let mut wraps = rr.clone();
    wraps[0].addr = u64::MAX - 10;
    assert!(matches!(
        new(l.clone(), wraps, lr, PlanOptions::default()),
        Err(PlanError::RegionWraps { side: Side::Remote, region: 0, .. })
    ));
}

#[test]
fn split_sizes() {
    assert_eq!(split(320, 64).collect::<Vec<_>>(), vec![64; 5]);
    assert_eq!(split(300, 128).collect::<Vec<_>>(), vec![128, 128, 44]);
    assert_eq!(split(10, 3).collect::<Vec<_>>(), vec![3, 3, 3, 1]);
    assert_eq!(split(7, 100).collect::<Vec<_>>(), vec![7]);
    assert_eq!(split(130, 128).collect::<Vec<_>>(), vec![128, 2]);
}

fn layout_of(kind: u8, shape: KvShape, blocks: u32) -> KvMemoryLayout {
    match kind % 4 {
        0 => KvMemoryLayout::separate_regions(shape, blocks),
        1 => KvMemoryLayout::region_per_layer(shape, blocks),
        2 => KvMemoryLayout::single_region_layer_major(shape, blocks),
        _ => KvMemoryLayout::single_region_block_major(shape, blocks),
    }
}

#[derive(Debug, Clone)]
struct Case {
    shape: KvShape,
    remote_kind: u8,
    local_kind: u8,
    remote_blocks: u32,
    local_blocks: u32,
    pairs: Vec<(u32, u32)>,
    options: PlanOptions,
}

fn case() -> impl Strategy<Value = Case> {
    (
        1u32..=3,
        1u32..=2,
        1u32..=3,
        1u32..=3,
        1u32..=2,
        0u8..4,
        0u8..4,
        1u32..=10,
        1u32..=10,
        1usize..=4,
        1u64..=80,
        0u64..=64,
    )
        .prop_flat_map(
            |(layers, kv_heads, head_dim, block_size, elem_bytes, rk, lk, rn, ln, num_qps, max_msg, min_split)| {
                let shape = KvShape { layers, kv_heads, head_dim, block_size, elem_bytes };
                let locals =
                    proptest::sample::subsequence((0..ln).collect::<Vec<u32>>(), 0..=ln as usize).prop_shuffle();
                let remotes = proptest::collection::vec(0..rn, ln as usize);
                (locals, remotes).prop_map(move |(locals, remotes)| Case {
                    shape,
                    remote_kind: rk,
                    local_kind: lk,
                    remote_blocks: rn,
                    local_blocks: ln,
                    pairs: locals.iter().zip(&remotes).map(|(&l, &r)| (r, l)).collect(),
                    options: PlanOptions { num_qps, max_message_bytes: max_msg, min_split_bytes: min_split },
                })
            },
        )
}

/// (local region, offset) -> every (remote region, offset) copied there.
type Writes = HashMap<(u32, u64), Vec<(u32, u64)>>;

/// Executes a plan on simulated memory: every local byte records which remote bytes were
/// copied into it.
fn simulate(plan: &ReadPlan, remote: &[RemoteRegion], local: &[LocalRegion]) -> Result<Writes, String> {
    let mut writes = Writes::new();
    for r in plan.requests() {
        let rreg = remote.iter().position(|x| x.rkey == r.rkey).ok_or("unknown rkey")?;
        let lreg = local.iter().position(|x| x.lkey == r.lkey).ok_or("unknown lkey")?;
        let (rr, lr) = (&remote[rreg], &local[lreg]);
        if r.remote_addr < rr.addr || r.remote_addr + r.len as u64 > rr.addr + rr.len {
            return Err(format!("{r:?} reads outside remote region {rreg}"));
        }
        if r.local_addr < lr.addr || r.local_addr + r.len as u64 > lr.addr + lr.len {
            return Err(format!("{r:?} writes outside local region {lreg}"));
        }
        for k in 0..r.len as u64 {
            writes
                .entry((lreg as u32, r.local_addr + k - lr.addr))
                .or_default()
                .push((rreg as u32, r.remote_addr + k - rr.addr));
        }
    }
    Ok(writes)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn plan_copies_every_requested_byte_exactly_once(c in case()) {
        let remote = layout_of(c.remote_kind, c.shape, c.remote_blocks);
        let local = layout_of(c.local_kind, c.shape, c.local_blocks);
        let (rr, lr) = (remote_regions(&remote), local_regions(&local));
        let planner = ReadPlanner::new(remote.clone(), rr.clone(), local.clone(), lr.clone(), c.options).unwrap();
        let plan = planner.plan(&c.pairs).unwrap();

        prop_assert_eq!(plan.qps.len(), c.options.num_qps);
        for r in plan.requests() {
            prop_assert!(r.len > 0 && r.len as u64 <= c.options.max_message_bytes, "{:?}", r);
        }
        // Layer order within every queue pair.
        for q in &plan.qps {
            prop_assert!(q.windows(2).all(|w| w[0].layer <= w[1].layer));
        }
        // Byte balance: greedy least-loaded placement keeps QPs within one piece.
        let bytes = plan.qp_bytes();
        let max_piece = plan.requests().map(|r| r.len as u64).max().unwrap_or(0);
        let (lo, hi) = (bytes.iter().min().copied().unwrap_or(0), bytes.iter().max().copied().unwrap_or(0));
        prop_assert!(hi - lo <= max_piece, "{:?} max piece {}", bytes, max_piece);

        let writes = simulate(&plan, &rr, &lr).map_err(TestCaseError::fail)?;
        let bb = c.shape.block_bytes();
        let mut expected = 0usize;
        for layer in 0..c.shape.layers {
            for part in [KvPart::K, KvPart::V] {
                for &(r, l) in &c.pairs {
                    let (rreg, roff) = remote.block_offset(layer, part, r);
                    let (lreg, loff) = local.block_offset(layer, part, l);
                    for k in 0..bb {
                        let got = writes.get(&(lreg, loff + k));
                        prop_assert_eq!(got, Some(&vec![(rreg, roff + k)]), "layer {} {} pair ({}, {}) byte {}", layer, part, r, l, k);
                        expected += 1;
                    }
                }
            }
        }
        // Nothing else was written.
        prop_assert_eq!(writes.len(), expected);
        prop_assert_eq!(plan.total_bytes(), expected as u64);
    }
}
