// Moving KV blocks for prefill/decode disaggregation: from another process's KV cache
// mapped over CUDA IPC with peer access on (loads travel over NVLink), or between the KV
// cache and mapped pinned host memory (the TCP path's staging, over PCIe). Driving the
// copy from the SMs keeps far more bytes in flight than a series of cuMemcpy calls (each
// of which pays its own latency), and covers every layer and block of a request in one
// launch.
#include "common.cuh"

// Chunks of at most a few tens of KiB, as (source, destination, bytes) triples; addresses
// and sizes are multiples of 16. Grid-stride over chunks, one CTA per chunk at a time;
// each thread keeps UNROLL 16-byte loads in flight before storing.
#define UNROLL 4
extern "C" __global__ void copy_chunks(const u64* __restrict__ chunks, int num_chunks) {
  for (int c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    const uint4* src = reinterpret_cast<const uint4*>(chunks[3 * c]);
    uint4* dst = reinterpret_cast<uint4*>(chunks[3 * c + 1]);
    const int words = (int)(chunks[3 * c + 2] / 16);
    for (int base = threadIdx.x; base < words; base += blockDim.x * UNROLL) {
      uint4 v[UNROLL];
#pragma unroll
      for (int u = 0; u < UNROLL; u++) {
        int i = base + u * blockDim.x;
        if (i < words) v[u] = src[i];
      }
#pragma unroll
      for (int u = 0; u < UNROLL; u++) {
        int i = base + u * blockDim.x;
        if (i < words) dst[i] = v[u];
      }
    }
  }
}
