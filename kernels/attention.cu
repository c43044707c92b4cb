// Paged causal attention. Compiled per model with HEAD_DIM, GROUP (q heads per kv head),
// KV_HEADS and BLOCK_SIZE defined, so every loop bound is a compile-time constant.
// KV cache layout per layer: [num_blocks][KV_HEADS][BLOCK_SIZE][HEAD_DIM].
#include "common.cuh"

#ifndef HEAD_DIM
#error "HEAD_DIM must be defined"
#endif

#define Q_HEADS (KV_HEADS * GROUP)
#define QKV_WIDTH ((Q_HEADS + 2 * KV_HEADS) * HEAD_DIM)

DEVICE long long cache_offset(const int* table, int pos, int kv_head) {
  int block = table[pos / BLOCK_SIZE];
  return (((long long)block * KV_HEADS + kv_head) * BLOCK_SIZE + pos % BLOCK_SIZE) * HEAD_DIM;
}

// ---------------------------------------------------------------------------------------
// Decode: one query row per sequence. Flash-decoding with a fixed split count:
// grid = (num_seqs, KV_HEADS, num_splits), 128 threads. Block (s, h, z) covers partitions
// z, z + num_splits, ... of sequence s for the GROUP q heads sharing kv head h, with an
// online softmax, and writes a partial result that decode_reduce combines.
// Scores: one key per thread. Values: HEAD_DIM / 8 threads read one key's row with
// 16-byte loads and KEY_GROUPS keys are read at once; the key groups' partial sums are
// added at the end.
#define DEC_THREADS 128
#define PART 128
#define VEC (HEAD_DIM / 8)
#define KEY_GROUPS (DEC_THREADS / VEC)
#define OUT_PER_THREAD ((GROUP * HEAD_DIM + DEC_THREADS - 1) / DEC_THREADS)

extern "C" __global__ void __launch_bounds__(DEC_THREADS)
decode_attention(const bf16* __restrict__ qkv, const bf16* __restrict__ k_cache, const bf16* __restrict__ v_cache,
                 const int* __restrict__ query_start, const int* __restrict__ context_lens,
                 const int* __restrict__ block_tables, int table_stride, float scale,
                 float* __restrict__ part_acc, float* __restrict__ part_ml) {
  __shared__ float q_s[GROUP][HEAD_DIM];
  __shared__ float p_s[GROUP][PART];
  __shared__ long long off_s[PART];
  __shared__ float alpha_s[GROUP];
  __shared__ float m_s[GROUP], l_s[GROUP];
  __shared__ float red_s[KEY_GROUPS][GROUP][HEAD_DIM];
  const int seq = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z, splits = gridDim.z;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int kg = tid / VEC, d0 = (tid % VEC) * 8;
  const int ctx = context_lens[seq];
  const int* table = block_tables + (long long)seq * table_stride;
  const bf16* q = qkv + (long long)query_start[seq] * QKV_WIDTH + kvh * GROUP * HEAD_DIM;
  for (int i = tid; i < GROUP * HEAD_DIM; i += DEC_THREADS) q_s[i / HEAD_DIM][i % HEAD_DIM] = to_f(q[i]) * scale;
  if (tid < GROUP) {
    m_s[tid] = -INFINITY;
    l_s[tid] = 0.f;
  }
  float acc[GROUP][8];
#pragma unroll
  for (int g = 0; g < GROUP; ++g)
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[g][e] = 0.f;
  __syncthreads();

  const int parts = (ctx + PART - 1) / PART;
  for (int part = split; part < parts; part += splits) {
    const int t0 = part * PART, n = min(PART, ctx - t0);
    // Scores: one key per thread, all GROUP heads at once; remember where the key lives.
    for (int j = tid; j < PART; j += DEC_THREADS) {
      float dot[GROUP];
#pragma unroll
      for (int g = 0; g < GROUP; ++g) dot[g] = 0.f;
      if (j < n) {
        const long long off = cache_offset(table, t0 + j, kvh);
        off_s[j] = off;
        const bf16* k = k_cache + off;
#pragma unroll 1
        for (int c = 0; c < VEC; c += 4) {
          bf16x8 kv[4];
#pragma unroll
          for (int u = 0; u < 4; ++u) kv[u] = *reinterpret_cast<const bf16x8*>(k + (c + u < VEC ? c + u : c) * 8);
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            if (c + u < VEC) {
#pragma unroll
              for (int g = 0; g < GROUP; ++g)
#pragma unroll
                for (int e = 0; e < 8; ++e) dot[g] += q_s[g][(c + u) * 8 + e] * to_f(kv[u].v[e]);
            }
          }
        }
      }
#pragma unroll
      for (int g = 0; g < GROUP; ++g) p_s[g][j] = j < n ? dot[g] : -INFINITY;
    }
    __syncthreads();
    // Online softmax bookkeeping, one warp per head.
    for (int g = warp; g < GROUP; g += DEC_THREADS / 32) {
      float mx = -INFINITY;
      for (int j = lane; j < PART; j += 32) mx = fmaxf(mx, p_s[g][j]);
      mx = warp_max(mx);
      float m_old = m_s[g], m_new = fmaxf(m_old, mx);
      float sum = 0.f;
      for (int j = lane; j < PART; j += 32) {
        float p = __expf(p_s[g][j] - m_new);
        p_s[g][j] = p;
        sum += p;
      }
      sum = warp_sum(sum);
      if (lane == 0) {
        alpha_s[g] = __expf(m_old - m_new);
        l_s[g] = l_s[g] * alpha_s[g] + sum;
        m_s[g] = m_new;
      }
    }
    __syncthreads();
    // acc = acc * alpha + sum_j p_j v_j over this thread's key group and 8 dims.
#pragma unroll
    for (int g = 0; g < GROUP; ++g)
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[g][e] *= alpha_s[g];
#pragma unroll 2
    for (int j = kg; j < n; j += KEY_GROUPS) {
      float v[8];
      load8(v_cache + off_s[j] + d0, v);
#pragma unroll
      for (int g = 0; g < GROUP; ++g) {
        float p = p_s[g][j];
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[g][e] += p * v[e];
      }
    }
    __syncthreads();
  }
  // Sum the key groups' partial accumulators.
#pragma unroll
  for (int g = 0; g < GROUP; ++g)
#pragma unroll
    for (int e = 0; e < 8; ++e) red_s[kg][g][d0 + e] = acc[g][e];
  __syncthreads();
  const long long head0 = (long long)seq * Q_HEADS + kvh * GROUP;
#pragma unroll
  for (int o = 0; o < OUT_PER_THREAD; ++o) {
    int idx = tid + o * DEC_THREADS;
    if (idx < GROUP * HEAD_DIM) {
      int g = idx / HEAD_DIM, d = idx % HEAD_DIM;
      float sum = 0.f;
#pragma unroll
      for (int k = 0; k < KEY_GROUPS; ++k) sum += red_s[k][g][d];
      part_acc[((head0 + g) * splits + split) * HEAD_DIM + d] = sum;
    }
  }
  if (tid < GROUP) {
    part_ml[((head0 + tid) * splits + split) * 2] = m_s[tid];
    part_ml[((head0 + tid) * splits + split) * 2 + 1] = l_s[tid];
  }
}

// grid = (num_seqs, Q_HEADS), block = HEAD_DIM threads: combines the splits.
extern "C" __global__ void decode_reduce(const float* __restrict__ part_acc, const float* __restrict__ part_ml,
                                         const int* __restrict__ query_start, int splits, bf16* __restrict__ out) {
  const int seq = blockIdx.x, h = blockIdx.y, d = threadIdx.x;
  const long long head = (long long)seq * Q_HEADS + h;
  float m = -INFINITY;
  for (int z = 0; z < splits; ++z) m = fmaxf(m, part_ml[(head * splits + z) * 2]);
  float l = 0.f, acc = 0.f;
  for (int z = 0; z < splits; ++z) {
    float mz = part_ml[(head * splits + z) * 2];
    if (mz == -INFINITY) continue;
    float w = __expf(mz - m);
    l += w * part_ml[(head * splits + z) * 2 + 1];
    acc += w * part_acc[(head * splits + z) * HEAD_DIM + d];
  }
  out[(long long)query_start[seq] * (Q_HEADS * HEAD_DIM) + h * HEAD_DIM + d] = to_bf(l > 0.f ? acc / l : 0.f);
}

// ---------------------------------------------------------------------------------------
// Prefill: a chunk of query rows per sequence attends causally to the sequence's cached
// prefix plus itself. FlashAttention-2 structure on bf16 tensor cores (mma.sync m16n8k16):
// a block takes 64 query rows of one sequence and one q head (4 warps x 16 rows) and walks
// the keys in tiles of 64. grid = (work items, Q_HEADS); items[i] = (seq, first row of tile).
#define BQ 64
#define BK 64
#define K_STRIDE (HEAD_DIM + 8)  // padding keeps fragment loads free of bank conflicts
#define V_STRIDE (BK + 8)

DEVICE void mma_bf16(float c[4], const unsigned a[4], unsigned b0, unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

DEVICE unsigned load_pair(const bf16* p) { return *reinterpret_cast<const unsigned*>(p); }

extern "C" __global__ void __launch_bounds__(128)
prefill_attention(const bf16* __restrict__ qkv, const bf16* __restrict__ k_cache, const bf16* __restrict__ v_cache,
                  const int* __restrict__ query_start, const int* __restrict__ positions,
                  const int* __restrict__ block_tables, int table_stride, const int2* __restrict__ items,
                  float scale, bf16* __restrict__ out) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* k_s = reinterpret_cast<bf16*>(smem_raw);  // [BK][K_STRIDE]
  bf16* v_t = k_s + BK * K_STRIDE;                  // [HEAD_DIM][V_STRIDE], transposed
  const int2 item = items[blockIdx.x];
  const int seq = item.x, tile = item.y, h = blockIdx.y, kvh = h / GROUP;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, gid = lane >> 2, tig = lane & 3;
  const int q0 = query_start[seq], qlen = query_start[seq + 1] - q0;
  const int* table = block_tables + (long long)seq * table_stride;

  // This thread's two rows (within the tile) and their positions.
  const int r_lo = warp * 16 + gid, r_hi = r_lo + 8;
  const bool ok_lo = tile + r_lo < qlen, ok_hi = tile + r_hi < qlen;
  const int pos_lo = ok_lo ? positions[q0 + tile + r_lo] : -1;
  const int pos_hi = ok_hi ? positions[q0 + tile + r_hi] : -1;
  const int last_row = min(tile + BQ, qlen) - 1;
  const int n_keys = positions[q0 + last_row] + 1;

  // Q fragments for every 16-wide slice of the head.
  unsigned qa[HEAD_DIM / 16][4];
  const bf16* q_lo = qkv + (long long)(q0 + tile + r_lo) * QKV_WIDTH + h * HEAD_DIM;
  const bf16* q_hi = qkv + (long long)(q0 + tile + r_hi) * QKV_WIDTH + h * HEAD_DIM;
#pragma unroll
  for (int ks = 0; ks < HEAD_DIM / 16; ++ks) {
    int c = ks * 16 + tig * 2;
    qa[ks][0] = ok_lo ? load_pair(q_lo + c) : 0u;
    qa[ks][1] = ok_hi ? load_pair(q_hi + c) : 0u;
    qa[ks][2] = ok_lo ? load_pair(q_lo + c + 8) : 0u;
    qa[ks][3] = ok_hi ? load_pair(q_hi + c + 8) : 0u;
  }
  float o[HEAD_DIM / 8][4];
#pragma unroll
  for (int i = 0; i < HEAD_DIM / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.f, l_hi = 0.f;

  for (int kt = 0; kt < n_keys; kt += BK) {
    __syncthreads();
    // Stage a K tile (row per key) and a transposed V tile; keys past n_keys are zeros.
    for (int i = tid; i < BK * (HEAD_DIM / 8); i += 128) {
      int j = i / (HEAD_DIM / 8), d = (i % (HEAD_DIM / 8)) * 8;
      bf16x8 kv, vv;
      if (kt + j < n_keys) {
        long long at = cache_offset(table, kt + j, kvh) + d;
        kv = *reinterpret_cast<const bf16x8*>(k_cache + at);
        vv = *reinterpret_cast<const bf16x8*>(v_cache + at);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) kv.v[e] = vv.v[e] = to_bf(0.f);
      }
      *reinterpret_cast<bf16x8*>(k_s + j * K_STRIDE + d) = kv;
#pragma unroll
      for (int e = 0; e < 8; ++e) v_t[(d + e) * V_STRIDE + j] = vv.v[e];
    }
    __syncthreads();

    // S = Q K^T for this warp's 16 rows and the tile's 64 keys.
    float s[BK / 8][4];
#pragma unroll
    for (int nt = 0; nt < BK / 8; ++nt) {
      s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
      const bf16* krow = k_s + (nt * 8 + gid) * K_STRIDE + tig * 2;
#pragma unroll
      for (int ks = 0; ks < HEAD_DIM / 16; ++ks) mma_bf16(s[nt], qa[ks], load_pair(krow + ks * 16), load_pair(krow + ks * 16 + 8));
    }
    // Scale, causal mask, online softmax (rows are shared by the 4 threads of a group).
    float mx_lo = -INFINITY, mx_hi = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < BK / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        int key = kt + nt * 8 + tig * 2 + e;
        s[nt][e] = key <= pos_lo ? s[nt][e] * scale : -INFINITY;
        s[nt][2 + e] = key <= pos_hi ? s[nt][2 + e] * scale : -INFINITY;
        mx_lo = fmaxf(mx_lo, s[nt][e]);
        mx_hi = fmaxf(mx_hi, s[nt][2 + e]);
      }
    }
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
      mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, off));
      mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, off));
    }
    const float new_lo = fmaxf(m_lo, mx_lo), new_hi = fmaxf(m_hi, mx_hi);
    // A row with nothing visible yet keeps m = -inf; avoid (-inf) - (-inf).
    const float base_lo = new_lo == -INFINITY ? 0.f : new_lo, base_hi = new_hi == -INFINITY ? 0.f : new_hi;
    const float alpha_lo = __expf(m_lo - base_lo), alpha_hi = __expf(m_hi - base_hi);
    float sum_lo = 0.f, sum_hi = 0.f;
#pragma unroll
    for (int nt = 0; nt < BK / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        s[nt][e] = __expf(s[nt][e] - base_lo);
        s[nt][2 + e] = __expf(s[nt][2 + e] - base_hi);
        sum_lo += s[nt][e];
        sum_hi += s[nt][2 + e];
      }
    }
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
      sum_lo += __shfl_xor_sync(0xffffffffu, sum_lo, off);
      sum_hi += __shfl_xor_sync(0xffffffffu, sum_hi, off);
    }
    l_lo = l_lo * alpha_lo + sum_lo;
    l_hi = l_hi * alpha_hi + sum_hi;
    m_lo = new_lo;
    m_hi = new_hi;
#pragma unroll
    for (int dt = 0; dt < HEAD_DIM / 8; ++dt) {
      o[dt][0] *= alpha_lo;
      o[dt][1] *= alpha_lo;
      o[dt][2] *= alpha_hi;
      o[dt][3] *= alpha_hi;
    }
    // O += P V, with P re-used from the S accumulators as A fragments (in bf16).
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
      unsigned pa[4] = {pack_bf16(s[2 * kk][0], s[2 * kk][1]), pack_bf16(s[2 * kk][2], s[2 * kk][3]),
                        pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]), pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dt = 0; dt < HEAD_DIM / 8; ++dt) {
        const bf16* vrow = v_t + (dt * 8 + gid) * V_STRIDE + kk * 16 + tig * 2;
        mma_bf16(o[dt], pa, load_pair(vrow), load_pair(vrow + 8));
      }
    }
  }
  const float inv_lo = l_lo > 0.f ? 1.f / l_lo : 0.f, inv_hi = l_hi > 0.f ? 1.f / l_hi : 0.f;
  bf16* out_lo = out + (long long)(q0 + tile + r_lo) * (Q_HEADS * HEAD_DIM) + h * HEAD_DIM;
  bf16* out_hi = out + (long long)(q0 + tile + r_hi) * (Q_HEADS * HEAD_DIM) + h * HEAD_DIM;
#pragma unroll
  for (int dt = 0; dt < HEAD_DIM / 8; ++dt) {
    int c = dt * 8 + tig * 2;
    if (ok_lo) *reinterpret_cast<unsigned*>(out_lo + c) = pack_bf16(o[dt][0] * inv_lo, o[dt][1] * inv_lo);
    if (ok_hi) *reinterpret_cast<unsigned*>(out_hi + c) = pack_bf16(o[dt][2] * inv_hi, o[dt][3] * inv_hi);
  }
}
