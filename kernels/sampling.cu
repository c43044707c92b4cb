// Logits processing and sampling on the device; only token ids (and requested
// log-probabilities) go back to the host. One block per sampling row.
#include "common.cuh"

#define SAMPLE_THREADS 1024
#define BISECT_STEPS 28

// Per-row parameters, laid out as on the host (engine/cuda/src/sampling.rs).
struct RowParams {
  int logit_row;
  int top_k;       // 0: off
  float temperature;
  float top_p;
  float min_p;
  int num_logprobs;  // -1: none
  u64 seed;
  u64 step;
};

// Best (value, index) with ties to the lower index.
DEVICE void better(float& v, int& i, float ov, int oi) {
  if (ov > v || (ov == v && oi < i)) {
    v = ov;
    i = oi;
  }
}

DEVICE void block_argmax(float& v, int& i, float* sv, int* si) {
  for (int o = 16; o > 0; o >>= 1) better(v, i, __shfl_xor_sync(0xffffffffu, v, o), __shfl_xor_sync(0xffffffffu, i, o));
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) {
    sv[warp] = v;
    si[warp] = i;
  }
  __syncthreads();
  v = lane < (blockDim.x >> 5) ? sv[lane] : -INFINITY;
  i = lane < (blockDim.x >> 5) ? si[lane] : 0x7fffffff;
  for (int o = 16; o > 0; o >>= 1) better(v, i, __shfl_xor_sync(0xffffffffu, v, o), __shfl_xor_sync(0xffffffffu, i, o));
}

// This thread's best (value, index) over a row: 16-byte loads, four in flight, while the
// row is 16-byte aligned and long enough; a scalar tail.
DEVICE void row_argmax(const bf16* x, int vocab, float& best, int& best_i) {
  const bool vec = (vocab % 8 == 0) && ((reinterpret_cast<size_t>(x) & 15) == 0);
  const int vecs = vec ? vocab / 8 : 0;
  const int stride = blockDim.x;
  int v = threadIdx.x;
  for (; v + 3 * stride < vecs; v += 4 * stride) {
    bf16x8 c[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) c[u] = reinterpret_cast<const bf16x8*>(x)[v + u * stride];
#pragma unroll
    for (int u = 0; u < 4; ++u)
#pragma unroll
      for (int e = 0; e < 8; ++e) better(best, best_i, to_f(c[u].v[e]), (v + u * stride) * 8 + e);
  }
  for (; v < vecs; v += stride) {
    bf16x8 c = reinterpret_cast<const bf16x8*>(x)[v];
#pragma unroll
    for (int e = 0; e < 8; ++e) better(best, best_i, to_f(c.v[e]), v * 8 + e);
  }
  for (int i = vecs * 8 + threadIdx.x; i < vocab; i += stride) better(best, best_i, to_f(x[i]), i);
}

// Sum of exp((x - mx) / t) over entries >= thr, and their count.
DEVICE void mass_above(const bf16* x, int vocab, float thr, float mx, float inv_t, float& mass, float& count,
                       float* scratch) {
  float s = 0.f, c = 0.f;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    float v = to_f(x[i]);
    if (v >= thr) {
      s += __expf((v - mx) * inv_t);
      c += 1.f;
    }
  }
  mass = block_sum(s, scratch);
  count = block_sum(c, scratch);
}

// tokens[r] = sampled id; logits may hold -inf for banned tokens (set by mask_tokens).
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
sample(const bf16* __restrict__ logits, int vocab, const RowParams* __restrict__ params, int* __restrict__ tokens) {
  __shared__ float scratch[32];
  __shared__ float sv[32];
  __shared__ int si[32];
  __shared__ float chunk_sums[SAMPLE_THREADS];
  const RowParams p = params[blockIdx.x];
  const bf16* x = logits + (long long)p.logit_row * vocab;

  float best = -INFINITY;
  int best_i = 0x7fffffff;
  row_argmax(x, vocab, best, best_i);
  block_argmax(best, best_i, sv, si);
  if (p.temperature == 0.f || p.top_k == 1) {
    if (threadIdx.x == 0) tokens[blockIdx.x] = best_i;
    return;
  }
  const float mx = best, inv_t = 1.f / p.temperature;
  float lo = -INFINITY;  // the kept set is {x >= lo}
  if (p.min_p > 0.f) lo = fmaxf(lo, mx + p.temperature * __logf(p.min_p));
  float total, count;
  mass_above(x, vocab, -INFINITY, mx, inv_t, total, count, scratch);
  // top-k and top-p thresholds by bisection on the logit value: the largest threshold
  // that still keeps at least k tokens / at least top_p of the mass.
  float floor_v = mx - 80.f * p.temperature;  // exp(-80) is nothing in f32
  if (p.top_k > 0 && p.top_k < vocab) {
    float a = floor_v, b = mx;
    for (int it = 0; it < BISECT_STEPS; ++it) {
      float mid = 0.5f * (a + b), mass, cnt;
      mass_above(x, vocab, mid, mx, inv_t, mass, cnt, scratch);
      if (cnt >= p.top_k) a = mid; else b = mid;
    }
    lo = fmaxf(lo, a);
  }
  if (p.top_p < 1.f) {
    float a = fmaxf(floor_v, lo), b = mx;
    for (int it = 0; it < BISECT_STEPS; ++it) {
      float mid = 0.5f * (a + b), mass, cnt;
      mass_above(x, vocab, mid, mx, inv_t, mass, cnt, scratch);
      if (mass >= p.top_p * total) a = mid; else b = mid;
    }
    lo = fmaxf(lo, a);
  }
  // Inverse CDF over the kept tokens in index order: each thread owns a contiguous chunk.
  const int per = (vocab + blockDim.x - 1) / blockDim.x;
  const int begin = threadIdx.x * per, end = min(vocab, begin + per);
  float mine = 0.f;
  for (int i = begin; i < end; ++i) {
    float v = to_f(x[i]);
    if (v >= lo) mine += __expf((v - mx) * inv_t);
  }
  chunk_sums[threadIdx.x] = mine;
  __syncthreads();
  if (threadIdx.x == 0) {
    float kept = 0.f;
    for (int t = 0; t < blockDim.x; ++t) kept += chunk_sums[t];
    double target = uniform(p.seed, p.step) * (double)kept;
    double cum = 0.0;
    int chosen = best_i;
    for (int t = 0; t < blockDim.x; ++t) {
      if (cum + chunk_sums[t] > target && chunk_sums[t] > 0.f) {
        int b = t * per, e = min(vocab, b + per);
        for (int i = b; i < e; ++i) {
          float v = to_f(x[i]);
          if (v < lo) continue;
          cum += __expf((v - mx) * inv_t);
          chosen = i;
          if (cum > target) break;
        }
        break;
      }
      cum += chunk_sums[t];
    }
    tokens[blockIdx.x] = chosen;
  }
}

// Log-probabilities under the raw distribution: the chosen token's and the top n.
// out_lp[r] = logprob of tokens[r]; top_ids/top_lp[r * 20 + j].
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
logprobs(const bf16* __restrict__ logits, int vocab, const RowParams* __restrict__ params, const int* __restrict__ tokens,
         float* __restrict__ out_lp, int* __restrict__ top_ids, float* __restrict__ top_lp) {
  __shared__ float scratch[32];
  __shared__ float sv[32];
  __shared__ int si[32];
  __shared__ int taken[20];
  const RowParams p = params[blockIdx.x];
  if (p.num_logprobs < 0) return;
  const bf16* x = logits + (long long)p.logit_row * vocab;
  float mx = -INFINITY;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) mx = fmaxf(mx, to_f(x[i]));
  mx = block_max(mx, scratch);
  float s = 0.f;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) s += __expf(to_f(x[i]) - mx);
  const float lse = mx + __logf(block_sum(s, scratch));
  if (threadIdx.x == 0) out_lp[blockIdx.x] = to_f(x[tokens[blockIdx.x]]) - lse;
  for (int j = 0; j < p.num_logprobs && j < 20; ++j) {
    float v = -INFINITY;
    int vi = 0x7fffffff;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
      bool used = false;
      for (int t = 0; t < j; ++t) used |= taken[t] == i;
      if (!used) better(v, vi, to_f(x[i]), i);
    }
    block_argmax(v, vi, sv, si);
    if (threadIdx.x == 0) {
      taken[j] = vi;
      top_ids[blockIdx.x * 20 + j] = vi;
      top_lp[blockIdx.x * 20 + j] = v - lse;
    }
    __syncthreads();
  }
}

// Logits processing before sampling, in place, one entry per distinct (row, token):
// Hugging Face's repetition penalty (divide positive logits by rep, multiply negative
// ones), then an additive term (presence/frequency penalties; -inf bans a token).
extern "C" __global__ void adjust_logits(bf16* __restrict__ logits, int vocab, const int* __restrict__ rows,
                                         const int* __restrict__ ids, const float* __restrict__ rep,
                                         const float* __restrict__ add, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  bf16* l = logits + (long long)rows[i] * vocab + ids[i];
  float v = to_f(*l);
  if (rep[i] != 1.f) v = v > 0.f ? v / rep[i] : v * rep[i];
  *l = to_bf(v + add[i]);
}
