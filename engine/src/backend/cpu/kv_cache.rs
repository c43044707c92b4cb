//! The CPU KV cache: per layer, K and V as [num_blocks * block_size, kv_heads * head_dim].

use std::ops::Range;

use crate::backend::KvCacheLayout;
use crate::kv_transfer::frame_buffer;

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

    /// The buffers, layer by layer, K before V: (address, length in bytes).
    pub fn regions(&self) -> Vec<(u64, u64)> {
        let region = |buf: &Vec<f32>| (buf.as_ptr() as u64, std::mem::size_of_val(buf.as_slice()) as u64);
        self.k.iter().zip(&self.v).flat_map(|(k, v)| [region(k), region(v)]).collect()
    }

    fn block_span(&self, block: u32) -> Range<usize> {
        let span = self.layout.block_size * self.width();
        block as usize * span..(block as usize + 1) * span
    }

    /// Whole blocks as bytes, layer-major, K then V (see `KvBlockIo::read_kv_blocks`).
    pub fn read_blocks(&self, blocks: &[u32], layers: Range<usize>) -> Vec<u8> {
        let block_bytes = self.layout.block_size * self.width() * 4;
        let mut out = frame_buffer(layers.len() * 2 * blocks.len() * block_bytes);
        for layer in layers {
            for cache in [&self.k[layer], &self.v[layer]] {
                for &b in blocks {
                    out.extend_from_slice(bytemuck::cast_slice(&cache[self.block_span(b)]));
                }
            }
        }
        out
    }

    /// The inverse of [`read_blocks`](Self::read_blocks); `bytes` must be exactly as long.
    pub fn write_blocks(&mut self, blocks: &[u32], layers: Range<usize>, bytes: &[u8]) -> Result<(), String> {
        let block_bytes = self.layout.block_size * self.width() * 4;
        let expected = layers.len() * 2 * blocks.len() * block_bytes;
        if bytes.len() != expected {
            return Err(format!("expected {expected} bytes for {} blocks x {} layers, got {}", blocks.len(), layers.len(), bytes.len()));
        }
        let mut chunks = bytes.chunks_exact(block_bytes);
        for layer in layers {
            for kv in 0..2 {
                for &b in blocks {
                    let span = self.block_span(b);
                    let cache = if kv == 0 { &mut self.k[layer] } else { &mut self.v[layer] };
                    let chunk = chunks.next().expect("length checked");
                    // Unaligned source: copy element by element through from_le_bytes.
                    for (dst, src) in cache[span].iter_mut().zip(chunk.chunks_exact(4)) {
                        *dst = f32::from_le_bytes([src[0], src[1], src[2], src[3]]);
                    }
                }
            }
        }
        Ok(())
    }
}
