// Writing new keys/values into the paged cache. Cache layout per layer:
// [num_blocks][kv_heads][block_size][head_dim], K and V separate.
#include "common.cuh"

// grid = (rows, kv_heads), block = head_dim threads (or fewer, looping).
extern "C" __global__ void write_kv(const bf16* __restrict__ qkv, const int* __restrict__ slot_mapping,
                                    bf16* __restrict__ k_cache, bf16* __restrict__ v_cache,
                                    int q_heads, int kv_heads, int head_dim, int block_size) {
  int row = blockIdx.x, h = blockIdx.y;
  int width = (q_heads + 2 * kv_heads) * head_dim;
  const bf16* k = qkv + (long long)row * width + (q_heads + h) * head_dim;
  const bf16* v = k + kv_heads * head_dim;
  int slot = slot_mapping[row];
  long long at = (((long long)(slot / block_size) * kv_heads + h) * block_size + slot % block_size) * head_dim;
  for (int i = threadIdx.x; i < head_dim; i += blockDim.x) {
    k_cache[at + i] = k[i];
    v_cache[at + i] = v[i];
  }
}

// One layer's attention preparation in one pass, in place on packed qkv rows: RMSNorm of
// q and k heads (Qwen3; skipped when q_w is null), RoPE of q and k heads, and the k and v
// heads written to the paged cache. grid = (rows, q_heads + 2 * kv_heads), block = a
// multiple of 32 threads >= head_dim / 2; thread i < head_dim / 2 owns the rotary pair
// (i, i + half), the others only take part in the reduction (whole warps shuffle).
extern "C" __global__ void attention_prep(bf16* __restrict__ qkv, const int* __restrict__ positions,
                                          const int* __restrict__ slot_mapping, const float* __restrict__ cos_sin,
                                          const bf16* __restrict__ q_w, const bf16* __restrict__ k_w, float eps,
                                          bf16* __restrict__ k_cache, bf16* __restrict__ v_cache,
                                          int q_heads, int kv_heads, int head_dim, int block_size) {
  __shared__ float scratch[32];
  const int row = blockIdx.x, head = blockIdx.y, half = head_dim / 2, i = threadIdx.x;
  const int width = (q_heads + 2 * kv_heads) * head_dim;
  bf16* h = qkv + (long long)row * width + head * head_dim;
  const bool is_q = head < q_heads, is_k = !is_q && head < q_heads + kv_heads;
  const bool owner = i < half;
  float a = owner ? to_f(h[i]) : 0.f, b = owner ? to_f(h[i + half]) : 0.f;
  if (is_q || is_k) {
    if (q_w != nullptr) {
      const bf16* w = is_q ? q_w : k_w;
      float inv = rsqrtf(block_sum(a * a + b * b, scratch) / head_dim + eps);
      if (!owner) return;
      a = round_bf(to_f(w[i]) * round_bf(a * inv));
      b = round_bf(to_f(w[i + half]) * round_bf(b * inv));
    }
    if (!owner) return;
    const float* cs = cos_sin + (long long)positions[row] * head_dim;
    float c = round_bf(cs[i]), s = round_bf(cs[half + i]);
    float ra = round_bf(round_bf(a * c) - round_bf(b * s));
    float rb = round_bf(round_bf(b * c) + round_bf(a * s));
    a = ra;
    b = rb;
    h[i] = to_bf(a);
    h[i + half] = to_bf(b);
  }
  if (!is_q && owner) {
    const int kv_head = is_k ? head - q_heads : head - q_heads - kv_heads;
    const int slot = slot_mapping[row];
    bf16* cache = is_k ? k_cache : v_cache;
    long long at = (((long long)(slot / block_size) * kv_heads + kv_head) * block_size + slot % block_size) * head_dim;
    cache[at + i] = to_bf(a);
    cache[at + i + half] = to_bf(b);
  }
}
