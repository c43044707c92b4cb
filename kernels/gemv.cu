// y[n, m] = x[n, k] . W[m, k]^T for one row (batch-1 decode), where the weight read
// dominates. A persistent grid (a few blocks per SM): each block stages its input row in
// shared memory once (the inner loop then reads x from shared memory while weights stream
// from HBM, bypassing L1), and its warps walk the output columns, one column at a time,
// with 16-byte weight loads, UNROLL in flight per lane, f32 accumulation. The template
// takes up to ROWS rows, but only ROWS = 1 is built: instances for 2, 4 and 8 rows were
// slower than cuBLAS (each weight vector re-read every row from shared memory; see
// engine/cuda/src/gemm.rs). Requires k % 8 == 0; dynamic shared memory holds n * k bf16.
//
// gemv_add_rms fuses the residual add and RMSNorm that precede a projection in a
// pre-norm decoder: every block computes s = residual + delta and RMSNorm(s) for its own
// staging (a few KB, from L2), and block 0 alone writes s as the new residual, to a
// different buffer than it reads so no block sees a half-updated residual.
#include "common.cuh"

#define WARPS 8
#define UNROLL 8

// A 16-byte weight load that does not allocate in L1 (weights are read once).
DEVICE bf16x8 load_stream(const bf16* p) {
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return *reinterpret_cast<bf16x8*>(&r);
}

// One output column from the staged rows `xs` [n][k].
template <int ROWS>
DEVICE void gemv_column(const bf16* xs, const bf16* __restrict__ w, bf16* __restrict__ y, int n, int k, int m, int col) {
  const int lane = threadIdx.x & 31;
  const bf16* wrow = w + (long long)col * k;
  float acc[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) acc[r] = 0.f;
  const int step = 32 * 8;
  for (int base = lane * 8; base < k; base += UNROLL * step) {
    bf16x8 wv[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u)
      if (base + u * step < k) wv[u] = load_stream(wrow + base + u * step);
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int i = base + u * step;
      if (i < k) {
        float wf[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) wf[e] = to_f(wv[u].v[e]);
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          if (r < n) {
            bf16x8 xv = *reinterpret_cast<const bf16x8*>(xs + r * k + i);
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[r] += wf[e] * to_f(xv.v[e]);
          }
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    if (r < n) {
      float v = warp_sum(acc[r]);
      if (lane == 0) y[(long long)r * m + col] = to_bf(v);
    }
  }
}

// The block's warps walk the columns col = block * WARPS + warp, + gridDim * WARPS, ...
template <int ROWS>
DEVICE void gemv_columns(const bf16* xs, const bf16* __restrict__ w, bf16* __restrict__ y, int n, int k, int m) {
  for (int col = blockIdx.x * WARPS + (threadIdx.x >> 5); col < m; col += gridDim.x * WARPS)
    gemv_column<ROWS>(xs, w, y, n, k, m, col);
}

DEVICE void stage_rows(const bf16* __restrict__ x, bf16* xs, int n, int k) {
  for (int i = threadIdx.x * 8; i < n * k; i += blockDim.x * 8)
    *reinterpret_cast<bf16x8*>(xs + i) = *reinterpret_cast<const bf16x8*>(x + i);
  __syncthreads();
}

// xs = RMSNorm(residual + delta); block 0 writes residual + delta to residual_out.
DEVICE void stage_add_rms(const bf16* __restrict__ delta, const bf16* __restrict__ residual, bf16* __restrict__ residual_out,
                          const bf16* __restrict__ norm_w, float eps, bf16* xs, int n, int k) {
  __shared__ float scratch[32];
  for (int r = 0; r < n; ++r) {
    bf16* s = xs + r * k;
    float ss = 0.f;
    for (int i = threadIdx.x; i < k; i += blockDim.x) {
      bf16 v = to_bf(to_f(residual[(long long)r * k + i]) + to_f(delta[(long long)r * k + i]));
      s[i] = v;
      if (blockIdx.x == 0) residual_out[(long long)r * k + i] = v;
      ss += to_f(v) * to_f(v);
    }
    const float inv = rsqrtf(block_sum(ss, scratch) / k + eps);
    for (int i = threadIdx.x; i < k; i += blockDim.x) s[i] = to_bf(to_f(norm_w[i]) * round_bf(to_f(s[i]) * inv));
  }
  __syncthreads();
}

#define GEMV_KERNELS(ROWS)                                                                                     \
  extern "C" __global__ void __launch_bounds__(WARPS * 32)                                                     \
      gemv##ROWS(const bf16* __restrict__ x, const bf16* __restrict__ w, bf16* __restrict__ y, int n, int k,    \
                 int m) {                                                                                      \
    extern __shared__ __align__(16) unsigned char smem_raw[];                                                  \
    bf16* xs = reinterpret_cast<bf16*>(smem_raw);                                                             \
    stage_rows(x, xs, n, k);                                                                                   \
    gemv_columns<ROWS>(xs, w, y, n, k, m);                                                                     \
  }                                                                                                            \
  extern "C" __global__ void __launch_bounds__(WARPS * 32)                                                     \
      gemv_add_rms##ROWS(const bf16* __restrict__ delta, const bf16* __restrict__ residual,                    \
                         bf16* __restrict__ residual_out, const bf16* __restrict__ norm_w, float eps,           \
                         const bf16* __restrict__ w, bf16* __restrict__ y, int n, int k, int m) {              \
    extern __shared__ __align__(16) unsigned char smem_raw[];                                                  \
    bf16* xs = reinterpret_cast<bf16*>(smem_raw);                                                             \
    stage_add_rms(delta, residual, residual_out, norm_w, eps, xs, n, k);                                      \
    gemv_columns<ROWS>(xs, w, y, n, k, m);                                                                     \
  }

GEMV_KERNELS(1)
