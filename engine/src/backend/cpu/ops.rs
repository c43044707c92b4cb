//! Elementwise and matrix ops of the CPU backend.

use gemm::{gemm, Parallelism};
use rayon::prelude::*;

use super::CpuTensor;
use crate::backend::Result;
use crate::error::BackendError;

/// Work below this many multiply-adds runs on one thread: spawning costs more.
const PARALLEL_MIN_WORK: usize = 1 << 18;

pub fn embedding(table: &CpuTensor, ids: &[u32]) -> Result<CpuTensor> {
    let mut data = Vec::with_capacity(ids.len() * table.cols);
    for &id in ids {
        if id as usize >= table.rows {
            return Err(BackendError::Op {
                op: "embedding",
                message: format!("token id {id} outside the vocabulary of {}", table.rows),
            });
        }
        data.extend_from_slice(table.row(id as usize));
    }
    Ok(CpuTensor::new(data, ids.len(), table.cols))
}

/// RMSNorm of each `width`-wide chunk of `x`, in place.
pub fn rms_norm_rows(x: &mut [f32], width: usize, weight: &[f32], eps: f32) {
    for row in x.chunks_mut(width) {
        let mean_sq = row.iter().map(|v| v * v).sum::<f32>() / width as f32;
        let inv = 1.0 / (mean_sq + eps).sqrt();
        row.iter_mut().zip(weight).for_each(|(v, w)| *v = *v * inv * w);
    }
}

/// Rotates one head in the neox layout; `cos_sin` holds cos in its first half and sin in
/// its second.
pub fn rotate_neox(head: &mut [f32], cos_sin: &[f32]) {
    let half = head.len() / 2;
    let (cos, sin) = cos_sin.split_at(half);
    for i in 0..half {
        let (a, b) = (head[i], head[i + half]);
        head[i] = a * cos[i] - b * sin[i];
        head[i + half] = b * cos[i] + a * sin[i];
    }
}

pub fn silu_mul(gate_up: &CpuTensor) -> CpuTensor {
    let i = gate_up.cols / 2;
    let mut data = Vec::with_capacity(gate_up.rows * i);
    for row in gate_up.data.chunks(gate_up.cols) {
        let (gate, up) = row.split_at(i);
        data.extend(gate.iter().zip(up).map(|(g, u)| g / (1.0 + (-g).exp()) * u));
    }
    CpuTensor::new(data, gate_up.rows, i)
}

/// `x · wᵀ` for x [n, k] and w [m, k].
pub fn matmul_transposed(x: &CpuTensor, w: &CpuTensor) -> CpuTensor {
    let (n, k, m) = (x.rows, x.cols, w.rows);
    let mut out = vec![0.0f32; n * m];
    let threads = if n * k * m >= PARALLEL_MIN_WORK { rayon::current_num_threads() } else { 1 };
    let parallelism = if threads > 1 { Parallelism::Rayon(threads) } else { Parallelism::None };
    // SAFETY: all three buffers are live, sized n*k, m*k and n*m, and the strides below
    // address exactly those elements: out[i][j] = sum_p x[i][p] * w[j][p].
    unsafe {
        gemm(
            n, m, k,
            out.as_mut_ptr(), 1, m as isize,
            false,
            x.data.as_ptr(), 1, k as isize,
            w.data.as_ptr(), k as isize, 1,
            0.0, 1.0,
            false, false, false,
            parallelism,
        );
    }
    CpuTensor::new(out, n, m)
}

/// Runs `f` over `items` in parallel only when the total work is worth it.
pub fn maybe_par_for_each<T: Send, F: Fn(T) + Sync + Send>(items: Vec<T>, work: usize, f: F) {
    if work >= PARALLEL_MIN_WORK && rayon::current_num_threads() > 1 {
        items.into_par_iter().for_each(f);
    } else {
        items.into_iter().for_each(f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matmul_matches_a_naive_product() {
        let (n, k, m) = (5, 70, 9);
        let x: Vec<f32> = (0..n * k).map(|i| ((i * 37) % 11) as f32 - 5.0).collect();
        let w: Vec<f32> = (0..m * k).map(|i| ((i * 13) % 7) as f32 * 0.5 - 1.0).collect();
        let out = matmul_transposed(&CpuTensor::new(x.clone(), n, k), &CpuTensor::new(w.clone(), m, k));
        for i in 0..n {
            for j in 0..m {
                let want: f32 = (0..k).map(|p| x[i * k + p] * w[j * k + p]).sum();
                assert!((out.data[i * m + j] - want).abs() < 1e-3, "({i},{j})");
            }
        }
    }

    #[test]
    fn rms_norm_and_rotation_keep_their_definitions() {
        let mut x = vec![3.0, 4.0];
        rms_norm_rows(&mut x, 2, &[1.0, 2.0], 0.0);
        let inv = 1.0 / (12.5f32).sqrt();
        assert_eq!(x, vec![3.0 * inv, 8.0 * inv]);
        let mut h = vec![1.0, 0.0];
        rotate_neox(&mut h, &[0.0, 1.0]); // cos 0, sin 1: a quarter turn
        assert_eq!(h, vec![0.0, 1.0]);
    }
}
