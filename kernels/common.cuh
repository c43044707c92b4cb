// Shared helpers for dlengine's kernels. Storage is bf16; arithmetic is f32.
// bf16 is defined here (bits plus PTX conversions) so NVRTC needs no CUDA headers.
#pragma once

#define INFINITY __int_as_float(0x7f800000)
#define DEVICE __device__ __forceinline__

typedef unsigned long long u64;

struct __align__(2) bf16 {
  unsigned short bits;
};

DEVICE float to_f(bf16 x) { return __uint_as_float(((unsigned)x.bits) << 16); }
DEVICE bf16 to_bf(float f) {
  bf16 r;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r.bits) : "f"(f));
  return r;
}
// Round through bf16, as a bf16 model computes each intermediate.
DEVICE float round_bf(float x) { return to_f(to_bf(x)); }
// Two floats as a bf16 pair in one register: `lo` in the low half.
DEVICE unsigned pack_bf16(float lo, float hi) {
  unsigned r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

DEVICE float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

DEVICE float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the whole block; every thread gets the result. `scratch` holds 32 floats.
DEVICE float block_sum(float v, float* scratch) {
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : 0.f;
  return warp_sum(v);
}

DEVICE float block_max(float v, float* scratch) {
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : -INFINITY;
  return warp_max(v);
}

// Eight bf16 values moved as one 16-byte access.
struct __align__(16) bf16x8 {
  bf16 v[8];
};

DEVICE void load8(const bf16* p, float out[8]) {
  bf16x8 x = *reinterpret_cast<const bf16x8*>(p);
#pragma unroll
  for (int i = 0; i < 8; ++i) out[i] = to_f(x.v[i]);
}

DEVICE void store8(bf16* p, const float in[8]) {
  bf16x8 x;
#pragma unroll
  for (int i = 0; i < 8; ++i) x.v[i] = to_bf(in[i]);
  *reinterpret_cast<bf16x8*>(p) = x;
}

// SplitMix64, identical to the host sampler's (engine/src/sampler.rs), so a seed draws
// the same uniform on every backend.
DEVICE u64 splitmix64(u64 z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

DEVICE double uniform(u64 seed, u64 step) {
  u64 bits = splitmix64(seed ^ splitmix64(step + 0x5EEDull));
  return (double)(bits >> 11) * (1.0 / 9007199254740992.0);
}
