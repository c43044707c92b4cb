// Row-wise and elementwise kernels: embedding, norms, RoPE, activation, row gather.
#include "common.cuh"

// out[t] = table[ids[t]]; one block per token.
extern "C" __global__ void embedding(const bf16* __restrict__ table, const int* __restrict__ ids,
                                     bf16* __restrict__ out, int cols) {
  const bf16* src = table + (long long)ids[blockIdx.x] * cols;
  bf16* dst = out + (long long)blockIdx.x * cols;
  for (int i = threadIdx.x; i < cols; i += blockDim.x) dst[i] = src[i];
}

// out[i] = x[rows[i]]; one block per output row.
extern "C" __global__ void gather_rows(const bf16* __restrict__ x, const int* __restrict__ rows,
                                       bf16* __restrict__ out, int cols) {
  const bf16* src = x + (long long)rows[blockIdx.x] * cols;
  bf16* dst = out + (long long)blockIdx.x * cols;
  for (int i = threadIdx.x; i < cols; i += blockDim.x) dst[i] = src[i];
}

// Hugging Face's RMSNorm in a bf16 model: normalise in f32, round to bf16, multiply by
// the weight in bf16. `x` is the row (already rounded to bf16 values).
DEVICE void rms_norm_row(const bf16* x, const bf16* w, bf16* out, int cols, float eps, float* scratch) {
  float ss = 0.f;
  for (int i = threadIdx.x; i < cols; i += blockDim.x) {
    float v = to_f(x[i]);
    ss += v * v;
  }
  float inv = rsqrtf(block_sum(ss, scratch) / cols + eps);
  for (int i = threadIdx.x; i < cols; i += blockDim.x) out[i] = to_bf(to_f(w[i]) * round_bf(to_f(x[i]) * inv));
}

// One block per row.
extern "C" __global__ void rms_norm(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                    bf16* __restrict__ out, int cols, float eps) {
  __shared__ float scratch[32];
  long long r = blockIdx.x;
  rms_norm_row(x + r * cols, w, out + r * cols, cols, eps, scratch);
}

// residual += x (rounded to bf16, as a bf16 model adds), then out = RMSNorm(residual).
extern "C" __global__ void add_rms_norm(const bf16* __restrict__ x, bf16* __restrict__ residual,
                                        const bf16* __restrict__ w, bf16* __restrict__ out, int cols, float eps) {
  __shared__ float scratch[32];
  long long r = blockIdx.x;
  bf16* res = residual + r * cols;
  const bf16* xr = x + r * cols;
  for (int i = threadIdx.x; i < cols; i += blockDim.x) res[i] = to_bf(to_f(res[i]) + to_f(xr[i]));
  __syncthreads();
  rms_norm_row(res, w, out + r * cols, cols, eps, scratch);
}

// In place RMSNorm of each q head (q_weight) and k head (k_weight) of packed qkv rows.
// grid = (rows, q_heads + kv_heads); one warp per head.
extern "C" __global__ void qk_norm(bf16* __restrict__ qkv, const bf16* __restrict__ q_w, const bf16* __restrict__ k_w,
                                   int q_heads, int kv_heads, int head_dim, float eps) {
  int head = blockIdx.y;
  int width = (q_heads + 2 * kv_heads) * head_dim;
  bf16* h = qkv + (long long)blockIdx.x * width + head * head_dim;
  const bf16* w = head < q_heads ? q_w : k_w;
  float ss = 0.f;
  for (int i = threadIdx.x; i < head_dim; i += 32) {
    float v = to_f(h[i]);
    ss += v * v;
  }
  float inv = rsqrtf(warp_sum(ss) / head_dim + eps);
  for (int i = threadIdx.x; i < head_dim; i += 32) h[i] = to_bf(to_f(w[i]) * round_bf(to_f(h[i]) * inv));
}

// In place rotary embedding (neox pairs i, i + half) of every q and k head.
// cos_sin: f32 [max_pos, head_dim], cos in the first half, sin in the second.
// grid = (rows, q_heads + kv_heads), block = head_dim / 2 threads.
extern "C" __global__ void rope(bf16* __restrict__ qkv, const int* __restrict__ positions,
                                const float* __restrict__ cos_sin, int q_heads, int kv_heads, int head_dim) {
  int half = head_dim / 2, i = threadIdx.x;
  if (i >= half) return;
  int width = (q_heads + 2 * kv_heads) * head_dim;
  bf16* h = qkv + (long long)blockIdx.x * width + blockIdx.y * head_dim;
  const float* cs = cos_sin + (long long)positions[blockIdx.x] * head_dim;
  float c = round_bf(cs[i]), s = round_bf(cs[half + i]);
  float a = to_f(h[i]), b = to_f(h[i + half]);
  h[i] = to_bf(round_bf(a * c) - round_bf(b * s));
  h[i + half] = to_bf(round_bf(b * c) + round_bf(a * s));
}

// out = silu(gate) * up for rows [gate | up] of width 2 * inter.
// grid = (rows, column blocks): a row is spread over several blocks.
extern "C" __global__ void silu_mul(const bf16* __restrict__ gate_up, bf16* __restrict__ out, int inter) {
  const bf16* row = gate_up + (long long)blockIdx.x * 2 * inter;
  bf16* o = out + (long long)blockIdx.x * inter;
  for (int i = blockIdx.y * blockDim.x + threadIdx.x; i < inter; i += gridDim.y * blockDim.x) {
    float g = to_f(row[i]);
    float act = round_bf(g / (1.f + __expf(-g)));
    o[i] = to_bf(act * to_f(row[inter + i]));
  }
}

// Converts bf16 to f32 (logits, host copies).
extern "C" __global__ void bf16_to_f32(const bf16* __restrict__ x, float* __restrict__ out, long long n) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
    out[i] = to_f(x[i]);
}
