// The MoE epilogue pieces the fused-GEMM prototypes share (bench/NOTES.md v17-v19): the rows'
// routing, the SiLU, and per-row rank sums as wgmma with A from registers. E = 8 experts of rank
// R = 16, k = 2 pairs a token, bf16.
#pragma once
#include "wgmma_common.cuh"

#include "swiglu/swiglu_fast_math.cuh"  // activation_at: the library's SiLU

namespace {

constexpr int kExperts = 8, kRank = 16, kER = kExperts * kRank;  // E R = 128
constexpr int kPairs = 2;

// How a launch of the fused prototypes splits the work: items of (a block of tm tokens, a chunk
// of the I / tn column tiles), as many chunks as the CTAs over the token blocks allow.
struct Plan {
  int m_blocks, n_tiles, n_chunks, tiles_per_chunk, items;
};

__host__ __device__ inline Plan make_plan(int T, int I, int ctas, int tm, int tn) {
  Plan p{};
  p.m_blocks = T / tm;
  p.n_tiles = I / tn;
  int chunks = ctas / p.m_blocks;
  chunks = chunks < 1 ? 1 : (chunks > p.n_tiles ? p.n_tiles : chunks);
  p.tiles_per_chunk = (p.n_tiles + chunks - 1) / chunks;
  p.n_chunks = (p.n_tiles + p.tiles_per_chunk - 1) / p.tiles_per_chunk;
  p.items = p.m_blocks * p.n_chunks;
  return p;
}

#ifdef MIXLORA_PROTO_SM90A

__device__ __forceinline__ float silu_mul(float g, float u) {
  return mixlora::cuda::activation_at<mixlora::kSilu, float>(mixlora::kSilu, g).a * u;
}

// What the epilogue needs of the thread's two rows (r, r + 8) of a 64-row half.
struct Rows {
  int e[2][kPairs];    // [row][pair] experts
  float w[2][kPairs];  // weights
  int at[2];           // [row]: the row's first bf16 pair of zg / zu [T, 2, R] the thread reads
};

__device__ __forceinline__ void load_rows(Rows& rw, const int* __restrict__ ids,
                                          const float* __restrict__ w, int row0, int q) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int t = row0 + 8 * r;
#pragma unroll
    for (int j = 0; j < kPairs; ++j) {
      rw.e[r][j] = __ldg(ids + t * kPairs + j);
      rw.w[r][j] = __ldg(w + t * kPairs + j);
    }
    rw.at[r] = t * kPairs * (kRank / 2) + q;
  }
}

// Per-row rank sums of a product with each row's expert: the thread's two rows' (r, r + 8)
// ranks 2 q, 2 q + 1, 8 + 2 q, 9 + 2 q of its expert e[r], in shared memory at
// zd[r * 8 * ROW_WORDS + {0, 1, 8, 9}], += h @ B^T over 16 STEPS columns, where B is a K-major
// [E R, columns] tile (128-byte rows, swizzled) at b whose columns k0 * 16 .. are h's, and h holds
// 4 STEPS bf16 pairs, h[2 j + r] = row r, columns 8 j + 2 q, +1 (the A fragments of the product).
// The forward's zd = h Ad^T (v17, v18), the backward's dzg = dg Bg, dzu = du Bu (v19).
template <int STEPS, int ROW_WORDS>
__device__ __forceinline__ void add_rank_sums(float* zd, const uint32_t (&h)[4 * STEPS],
                                              const int (&e)[2], uint32_t ad, int k0) {
  float sum[2][4];
#pragma unroll
  for (int gamma = 0; gamma < kExperts / 2; ++gamma) {  // experts 2 gamma, 2 gamma + 1
    float t[16];
    wgmma_fence();
#pragma unroll
    for (int s = 0; s < STEPS; ++s) {
      const uint32_t a[4] = {h[4 * s], h[4 * s + 1], h[4 * s + 2], h[4 * s + 3]};
      wgmma_m64n32k16_rs(t, a, sw128_desc(ad + 32 * gamma * kRowBytes) + 2 * (k0 + s), s > 0 ? 1u : 0u);
    }
    wgmma_commit();
    wgmma_wait<0>();
    fence_operands(t);
    // t's n8 block b: expert 2 gamma + b / 2, ranks 8 (b % 2) + 2 q, +1; t[4 b + 2 r + {0, 1}]
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const bool lo = e[r] == 2 * gamma, hi = e[r] == 2 * gamma + 1;
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        const int b = v / 2, c = v % 2;  // ranks block b (0: 2q.., 1: 8 + 2q..), element c
        const float x = lo ? t[4 * b + 2 * r + c] : (hi ? t[4 * (b + 2) + 2 * r + c] : 0.f);
        sum[r][v] = gamma == 0 ? x : sum[r][v] + x;
      }
    }
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float2* lo = reinterpret_cast<float2*>(zd + r * 8 * ROW_WORDS);
    float2* hi = reinterpret_cast<float2*>(zd + r * 8 * ROW_WORDS + 8);
    const float2 a = *lo, b = *hi;
    *lo = make_float2(a.x + sum[r][0], a.y + sum[r][1]);
    *hi = make_float2(b.x + sum[r][2], b.y + sum[r][3]);
  }
}

#endif  // sm_90a

}  // namespace
