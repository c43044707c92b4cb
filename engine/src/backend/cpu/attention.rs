//! Paged causal attention on the CPU: each query row attends to its sequence's cached
//! keys at positions up to its own (the step's own keys were written first), so one
//! routine serves prefill chunks, prefix-cache hits and decodes alike.

use super::kv_cache::CpuKvCache;
use super::ops::maybe_par_for_each;
use super::CpuTensor;
use crate::backend::{QkvLayout, StepInput};

pub fn paged_attention(
    qkv: &CpuTensor,
    layout: QkvLayout,
    kv: &CpuKvCache,
    layer: usize,
    scale: f32,
    batch: &StepInput,
) -> CpuTensor {
    let d = layout.head_dim;
    let group = layout.q_heads / layout.kv_heads;
    let mut out = vec![0.0f32; qkv.rows * layout.q_width()];
    let work: usize = batch.positions.iter().map(|&p| (p as usize + 1) * d * layout.q_heads * 2).sum();
    let rows: Vec<(usize, &mut [f32])> = out.chunks_mut(layout.q_width()).enumerate().collect();
    maybe_par_for_each(rows, work, |(row, out_row)| {
        let seq = batch.query_start.partition_point(|&s| s as usize <= row) - 1;
        let table = batch.block_table(seq);
        let ctx = batch.positions[row] as usize + 1;
        let slots: Vec<usize> = (0..ctx)
            .map(|t| table[t / batch.block_size] as usize * batch.block_size + t % batch.block_size)
            .collect();
        let q_row = qkv.row(row);
        let mut scores = vec![0.0f32; ctx];
        for h in 0..layout.q_heads {
            let q = &q_row[h * d..(h + 1) * d];
            let kv_head = h / group;
            for (t, &slot) in slots.iter().enumerate() {
                let (k, _) = kv.head(layer, slot, kv_head);
                scores[t] = q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale;
            }
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            let o = &mut out_row[h * d..(h + 1) * d];
            for (t, &slot) in slots.iter().enumerate() {
                let (_, v) = kv.head(layer, slot, kv_head);
                let p = scores[t] / sum;
                o.iter_mut().zip(v).for_each(|(acc, x)| *acc += p * x);
            }
        }
    });
    CpuTensor::new(out, qkv.rows, layout.q_width())
}
