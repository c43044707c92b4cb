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
