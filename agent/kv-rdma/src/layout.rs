//! Where each (layer, K/V, block) of a paged KV cache lives in registered memory.
//!
//! A layout is general enough for the usual arrangements: one buffer per layer and K/V
//! (what `engine/cuda` allocates), one buffer per layer holding K then V, one buffer for the
//! whole cache layer-major, or block-major with every layer of a block adjacent. Per layer
//! it names a (region index, base offset) for K and for V; block `b` of that half starts at
//! `base + b * block_stride` and is `shape.block_bytes()` long.

use serde::{Deserialize, Serialize};

use crate::error::{KvPart, LayoutError};

/// One block's geometry, identical on both sides of a transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KvShape {
    pub layers: u32,
    pub kv_heads: u32,
    pub head_dim: u32,
    /// Tokens per block.
    pub block_size: u32,
    /// Bytes per element of the cache dtype (2 for bf16/f16, 4 for f32).
    pub elem_bytes: u32,
}

impl KvShape {
    /// Bytes of one block of one layer's K (or V). Saturates instead of wrapping so an
    /// absurd shape fails the bounds checks rather than aliasing small numbers.
    pub fn block_bytes(&self) -> u64 {
        (self.kv_heads as u64)
            .saturating_mul(self.head_dim as u64)
            .saturating_mul(self.block_size as u64)
            .saturating_mul(self.elem_bytes as u64)
    }

    fn validate(&self) -> Result<(), LayoutError> {
        for (field, value) in [
            ("layers", self.layers),
            ("kv_heads", self.kv_heads),
            ("head_dim", self.head_dim),
            ("block_size", self.block_size),
            ("elem_bytes", self.elem_bytes),
        ] {
            if value == 0 {
                return Err(LayoutError::ZeroDimension { field });
            }
        }
        Ok(())
    }
}

/// Start of one layer's K or V blocks: a registered region and a byte offset into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Placement {
    pub region: u32,
    pub offset: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LayerPlacement {
    pub k: Placement,
    pub v: Placement,
}

impl LayerPlacement {
    pub fn part(&self, part: KvPart) -> Placement {
        match part {
            KvPart::K => self.k,
            KvPart::V => self.v,
        }
    }
}

/// The memory arrangement of one engine's KV cache.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KvMemoryLayout {
    pub shape: KvShape,
    /// Blocks in the cache; valid block ids are `0..num_blocks`.
    pub num_blocks: u32,
    /// Bytes from block `b` to block `b + 1` of the same layer and part.
    pub block_stride: u64,
    /// One entry per layer.
    pub layers: Vec<LayerPlacement>,
}

impl KvMemoryLayout {
    /// Two regions per layer: region `2l` holds layer `l`'s K blocks, `2l + 1` its V blocks,
    /// each `[num_blocks][block]` (the CUDA backend's arrangement).
    pub fn separate_regions(shape: KvShape, num_blocks: u32) -> Self {
        let layers = (0..shape.layers)
            .map(|l| LayerPlacement {
                k: Placement { region: 2 * l, offset: 0 },
                v: Placement { region: 2 * l + 1, offset: 0 },
            })
            .collect();
        Self { shape, num_blocks, block_stride: shape.block_bytes(), layers }
    }

    /// One region per layer, `[2][num_blocks][block]`: K blocks then V blocks.
    pub fn region_per_layer(shape: KvShape, num_blocks: u32) -> Self {
        let bb = shape.block_bytes();
        let half = bb.saturating_mul(num_blocks as u64);
        let layers = (0..shape.layers)
            .map(|l| LayerPlacement { k: Placement { region: l, offset: 0 }, v: Placement { region: l, offset: half } })
            .collect();
        Self { shape, num_blocks, block_stride: bb, layers }
    }

    /// One region, `[layers][2][num_blocks][block]`.
    pub fn single_region_layer_major(shape: KvShape, num_blocks: u32) -> Self {
        let bb = shape.block_bytes();
        let half = bb.saturating_mul(num_blocks as u64);
        let layers = (0..shape.layers as u64)
            .map(|l| LayerPlacement {
                k: Placement { region: 0, offset: half.saturating_mul(2 * l) },
                v: Placement { region: 0, offset: half.saturating_mul(2 * l + 1) },
            })
            .collect();
        Self { shape, num_blocks, block_stride: bb, layers }
    }

    /// One region, `[num_blocks][layers][2][block]`: a block's whole KV is contiguous.
    pub fn single_region_block_major(shape: KvShape, num_blocks: u32) -> Self {
        let bb = shape.block_bytes();
        let layers = (0..shape.layers as u64)
            .map(|l| LayerPlacement {
                k: Placement { region: 0, offset: bb.saturating_mul(2 * l) },
                v: Placement { region: 0, offset: bb.saturating_mul(2 * l + 1) },
            })
            .collect();
        Self { shape, num_blocks, block_stride: bb.saturating_mul(2 * shape.layers as u64), layers }
    }

    /// Regions the layout refers to (highest index + 1).
    pub fn region_count(&self) -> usize {
        self.layers.iter().flat_map(|p| [p.k.region, p.v.region]).max().map_or(0, |r| r as usize + 1)
    }

    /// Offset of `block` of `layer`'s `part` inside its region. The layout must be valid
    /// and the indices in range (the planner checks both before calling).
    pub(crate) fn block_offset(&self, layer: u32, part: KvPart, block: u32) -> (u32, u64) {
        let p = self.layers[layer as usize].part(part);
        (p.region, p.offset + block as u64 * self.block_stride)
    }

    /// End (exclusive) of the last block of one layer's part, relative to its region.
    fn span_end(&self, layer: u32, part: KvPart) -> Result<u64, LayoutError> {
        let p = self.layers[layer as usize].part(part);
        (self.num_blocks as u64 - 1)
            .checked_mul(self.block_stride)
            .and_then(|last| last.checked_add(p.offset))
            .and_then(|last| last.checked_add(self.shape.block_bytes()))
            .ok_or(LayoutError::Overflow { layer, part, offset: p.offset })
    }

    /// Checks that the layout describes a real cache: dimensions set, one placement per
    /// layer, blocks no closer than their size, and no two blocks of any layer/part sharing
    /// a byte (so a plan writes each destination byte at most once).
    pub fn validate(&self) -> Result<(), LayoutError> {
        self.shape.validate()?;
        if self.num_blocks == 0 {
            return Err(LayoutError::NoBlocks);
        }
        if self.layers.len() != self.shape.layers as usize {
            return Err(LayoutError::LayerCount { layers: self.shape.layers, placements: self.layers.len() });
        }
        let bb = self.shape.block_bytes();
        if self.num_blocks > 1 && self.block_stride < bb {
            return Err(LayoutError::StrideTooSmall { stride: self.block_stride, block_bytes: bb });
        }
        let mut slabs = Vec::with_capacity(2 * self.layers.len());
        for layer in 0..self.shape.layers {
            for part in [KvPart::K, KvPart::V] {
                self.span_end(layer, part)?;
                let p = self.layers[layer as usize].part(part);
                slabs.push((p.region, p.offset, layer, part));
            }
        }
        // Two slabs with the same stride overlap when some pair of their blocks does; with
        // d = b - a >= 0, that is |d - k * stride| < block_bytes for some k in 0..num_blocks.
        slabs.sort_unstable();
        for (i, a) in slabs.iter().enumerate() {
            for b in slabs[i + 1..].iter().take_while(|b| b.0 == a.0) {
                let d = b.1 - a.1;
                let last = self.num_blocks as u64 - 1;
                let k0 = d.checked_div(self.block_stride).map_or(0, |k| k.min(last));
                let hit = [k0, (k0 + 1).min(last)].iter().any(|&k| {
                    let at = k * self.block_stride; // no overflow: bounded by span_end above
                    d.abs_diff(at) < bb
                });
                if hit {
                    return Err(LayoutError::Overlap {
                        region: a.0,
                        a_layer: a.2,
                        a_part: a.3,
                        b_layer: b.2,
                        b_part: b.3,
                    });
                }
            }
        }
        Ok(())
    }

    /// Checks that registered regions of the given lengths hold every block of the layout.
    pub fn check_regions(&self, region_lens: &[u64]) -> Result<(), LayoutError> {
        for layer in 0..self.shape.layers {
            for part in [KvPart::K, KvPart::V] {
                let region = self.layers[layer as usize].part(part).region;
                let Some(&len) = region_lens.get(region as usize) else {
                    return Err(LayoutError::MissingRegion { layer, part, region, regions: region_lens.len() });
                };
                let needed = self.span_end(layer, part)?;
                if needed > len {
                    return Err(LayoutError::RegionTooSmall { region, len, needed });
                }
            }
        }
        Ok(())
    }

    /// Bytes each region must have at least (for allocating or registering a cache).
    pub fn required_region_lens(&self) -> Result<Vec<u64>, LayoutError> {
        let mut lens = vec![0u64; self.region_count()];
        for layer in 0..self.shape.layers {
            for part in [KvPart::K, KvPart::V] {
                let region = self.layers[layer as usize].part(part).region as usize;
                lens[region] = lens[region].max(self.span_end(layer, part)?);
            }
        }
        Ok(lens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> KvShape {
        KvShape { layers: 3, kv_heads: 2, head_dim: 4, block_size: 2, elem_bytes: 2 }
    }

    #[test]
    fn constructors_are_valid_and_size_their_regions() {
        let s = shape();
        let bb = s.block_bytes();
        assert_eq!(bb, 32);
        let cases = [
            (KvMemoryLayout::separate_regions(s, 5), vec![5 * bb; 6]),
            (KvMemoryLayout::region_per_layer(s, 5), vec![10 * bb; 3]),
            (KvMemoryLayout::single_region_layer_major(s, 5), vec![30 * bb]),
            (KvMemoryLayout::single_region_block_major(s, 5), vec![30 * bb]),
        ];
        for (layout, lens) in cases {
            layout.validate().unwrap();
            assert_eq!(layout.required_region_lens().unwrap(), lens, "{layout:?}");
            layout.check_regions(&lens).unwrap();
        }
    }

    #[test]
    fn block_major_offsets_interleave_layers() {
        let l = KvMemoryLayout::single_region_block_major(shape(), 4);
        assert_eq!(l.block_offset(0, KvPart::K, 0), (0, 0));
        assert_eq!(l.block_offset(0, KvPart::V, 0), (0, 32));
        assert_eq!(l.block_offset(2, KvPart::V, 1), (0, 6 * 32 + 5 * 32));
    }

    #[test]
    fn rejects_zero_dimensions_and_wrong_layer_count() {
        let mut s = shape();
        s.head_dim = 0;
        assert_eq!(
            KvMemoryLayout::separate_regions(s, 4).validate(),
            Err(LayoutError::ZeroDimension { field: "head_dim" })
        );
        let mut l = KvMemoryLayout::separate_regions(shape(), 4);
        l.layers.pop();
        assert!(matches!(l.validate(), Err(LayoutError::LayerCount { .. })));
        let l = KvMemoryLayout::separate_regions(shape(), 0);
        assert_eq!(l.validate(), Err(LayoutError::NoBlocks));
    }

    #[test]
    fn rejects_stride_smaller_than_a_block() {
        let mut l = KvMemoryLayout::separate_regions(shape(), 4);
        l.block_stride = 16;
        assert!(matches!(l.validate(), Err(LayoutError::StrideTooSmall { .. })));
    }

    #[test]
    fn rejects_overlapping_parts() {
        let mut l = KvMemoryLayout::region_per_layer(shape(), 4);
        // V starts inside K's last block.
        l.layers[1].v.offset = 3 * 32 + 8;
        assert!(matches!(l.validate(), Err(LayoutError::Overlap { region: 1, .. })), "{:?}", l.validate());
        // Interleaved with a wide stride is fine when blocks do not touch...
        let mut l = KvMemoryLayout::single_region_block_major(shape(), 4);
        l.validate().unwrap();
        // ...but not when one part is shifted onto another's blocks.
        l.layers[2].k.offset = 32 + 6 * 32; // block 1 of layer 0's V
        assert!(matches!(l.validate(), Err(LayoutError::Overlap { .. })));
    }

    #[test]
    fn rejects_offsets_that_overflow() {
        let mut l = KvMemoryLayout::separate_regions(shape(), 4);
        l.layers[0].v.offset = u64::MAX - 10;
        assert!(matches!(l.validate(), Err(LayoutError::Overflow { layer: 0, part: KvPart::V, .. })));
    }

    #[test]
    fn check_regions_names_missing_and_short_regions() {
        let l = KvMemoryLayout::separate_regions(shape(), 4);
        assert!(matches!(l.check_regions(&[128; 5]), Err(LayoutError::MissingRegion { region: 5, .. })));
        let mut lens = vec![128; 6];
        lens[3] = 127;
        assert_eq!(l.check_regions(&lens), Err(LayoutError::RegionTooSmall { region: 3, len: 127, needed: 128 }));
    }
}
