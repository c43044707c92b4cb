// Moving KV blocks for prefill/decode disaggregation: from another process's KV cache
// mapped over CUDA IPC with peer access on (loads travel over NVLink), or between the KV
// cache and mapped pinned host memory (the TCP path's staging, over PCIe). Driving the
// copy from the SMs keeps far more bytes in flight than a series of cuMemcpy calls (each
// of which pays its own latency), and covers every layer and block of a request in one
// launch.
#include "common.cuh"

// Chunks of at most a few tens of KiB, as (source, destination, bytes) triples; addresses
// and sizes are multiples of 16. Grid-stride over chunks, one CTA per chunk at a time;
// each thread keeps UNROLL 16-byte loads in flight before storing (a define, so the
// peer-copy benchmark can try others).
#ifndef UNROLL
#define UNROLL 4
#endif
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

// Early handoff, prefill side: once a forward's KV writes for layers
// [first_layer, first_layer + num_layers) are done (this launch follows them on the
// stream), publish `mark` as their progress for a peer reading them over CUDA IPC.
extern "C" __global__ void publish_progress(unsigned* progress, int first_layer, int num_layers, unsigned mark) {
  __threadfence_system();
  for (int l = threadIdx.x; l < num_layers; l += blockDim.x) {
    reinterpret_cast<volatile unsigned*>(progress)[first_layer + l] = mark;
  }
}

// Early handoff, decode side: holds the copy stream until the peer's progress for `layer`
// reached `mark` (compared modulo 2^32). One thread polls, so waiting costs one SM slot,
// not the copy's whole grid. Gives up after `timeout_ns` (the peer died or stalled) and
// sets *failed; the copies behind it then run on stale bytes, which the caller discards.
extern "C" __global__ void wait_progress(const unsigned* progress, int layer, unsigned mark, u64 timeout_ns, unsigned* failed) {
  u64 start;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  while ((int)(reinterpret_cast<const volatile unsigned*>(progress)[layer] - mark) < 0) {
    u64 now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    if (now - start > timeout_ns) {
      *reinterpret_cast<volatile unsigned*>(failed) = 1;
      return;
    }
    __nanosleep(1000);
  }
  __threadfence_system();
}
