// y[n, m] = x[n, k] . W[m, k]^T for a handful of rows (decode at small batch), where the
// weight read dominates: one warp per output column, 16-byte loads, several in flight,
// f32 accumulation. Requires k % 8 == 0 and n <= GEMV_MAX_ROWS.
#include "common.cuh"

#define GEMV_MAX_ROWS 8
#define WARPS 8
#define UNROLL 4

extern "C" __global__ void __launch_bounds__(WARPS * 32)
gemv(const bf16* __restrict__ x, const bf16* __restrict__ w, bf16* __restrict__ y, int n, int k, int m) {
  const int lane = threadIdx.x & 31;
  const int col = blockIdx.x * WARPS + (threadIdx.x >> 5);
  if (col >= m) return;
  const bf16* wrow = w + (long long)col * k;
  float acc[GEMV_MAX_ROWS];
#pragma unroll
  for (int r = 0; r < GEMV_MAX_ROWS; ++r) acc[r] = 0.f;
  const int step = 32 * 8;
  int i = lane * 8;
  // Main loop: UNROLL weight vectors loaded before any is used.
  for (; i + (UNROLL - 1) * step < k; i += UNROLL * step) {
    bf16x8 wv[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) wv[u] = *reinterpret_cast<const bf16x8*>(wrow + i + u * step);
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
#pragma unroll
      for (int r = 0; r < GEMV_MAX_ROWS; ++r) {
        if (r < n) {
          bf16x8 xv = *reinterpret_cast<const bf16x8*>(x + (long long)r * k + i + u * step);
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[r] += to_f(wv[u].v[e]) * to_f(xv.v[e]);
        }
      }
    }
  }
  for (; i < k; i += step) {
    bf16x8 wv = *reinterpret_cast<const bf16x8*>(wrow + i);
#pragma unroll
    for (int r = 0; r < GEMV_MAX_ROWS; ++r) {
      if (r < n) {
        bf16x8 xv = *reinterpret_cast<const bf16x8*>(x + (long long)r * k + i);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[r] += to_f(wv.v[e]) * to_f(xv.v[e]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < GEMV_MAX_ROWS; ++r) {
    if (r < n) {
      float v = warp_sum(acc[r]);
      if (lane == 0) y[(long long)r * m + col] = to_bf(v);
    }
  }
}
