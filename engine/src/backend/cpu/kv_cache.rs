//! The CPU KV cache: per layer, K and V as [num_blocks * block_size, kv_heads * head_dim].

use crate::backend::KvCacheLayout;

pub struct CpuKvCache {
    layout: KvCacheLayout,
    num_slots: usize,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl CpuKvCache {
    pub fn new(layout: KvCacheLayout, num_blocks: usize) -> Self {
        let num_slots = num_blocks * layout.block_size;
        let per_layer = num_slots * layout.kv_heads * layout.head_dim;
        Self {
            layout,
            num_slots,
            k: (0..layout.num_layers).map(|_| vec![0.0; per_layer]).collect(),
            v: (0..layout.num_layers).map(|_| vec![0.0; per_layer]).collect(),
        }
    }

    fn width(&self) -> usize {
        self.layout.kv_heads * self.layout.head_dim
    }

    pub fn write(&mut self, layer: usize, slot: usize, k: &[f32], v: &[f32]) {
        debug_assert!(slot < self.num_slots);
        let w = self.width();
        self.k[layer][slot * w..(slot + 1) * w].copy_from_slice(k);
        self.v[layer][slot * w..(slot + 1) * w].copy_from_slice(v);
    }

    /// Key and value vectors of one kv head at one slot.
    #[inline]
    pub fn head(&self, layer: usize, slot: usize, kv_head: usize) -> (&[f32], &[f32]) {
        let d = self.layout.head_dim;
        let at = slot * self.width() + kv_head * d;
        (&self.k[layer][at..at + d], &self.v[layer][at..at + d])
    }

    pub fn copy_block(&mut self, src: usize, dst: usize) {
        let span = self.layout.block_size * self.width();
        for layer in 0..self.layout.num_layers {
            self.k[layer].copy_within(src * span..(src + 1) * span, dst * span);
            self.v[layer].copy_within(src * span..(src + 1) * span, dst * span);
        }
    }
}
