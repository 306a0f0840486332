// CUDA kernels of the fused expert SwiGLU and combine (docs/design.md, "Fused expert SwiGLU").
//
// Token-major kernels (forward, and the first backward pass): block (token group, column tile)
// owns kGroupTokens tokens and one column tile of 32 * V columns (V consecutive ones per lane).
// Each warp walks its own tokens of the group (base + warp, + kTileWarps, ...) and their k pairs
// in j order, recomputing g, u, h of each pair on its columns in registers;
// nothing of size [T, k, I] touches memory. The warps of a block share the column tile, so the
// experts' rank-major weight rows of that tile are read from L2 once per block and then hit L1.
// Per-pair sums over the columns (zd; dweights, dzg, dzu) are reduced inside the warp in a
// fixed butterfly (a reduce-scatter: lane c ends with value c), with no block barrier; with
// several column tiles each tile writes its sums to a workspace [tile, N, values] and a small
// kernel adds the tiles in tile order. No atomics, so two runs agree bit for bit.
//
// Expert-major kernel (second backward pass): block (column tile, expert e, pair split) owns
// dBg[e, i, :], dBu[e, i, :], dAd[e, :, i] for its columns, with the expert's weights of column
// i in registers (ranks <= kFastRanks), and walks its share of e's pairs in sorted order,
// recomputing what it needs (the chunks double-buffered through cp.async): one sequential sum
// per element and split; the splits (a fixed number that depends on the shapes only) are added
// in split order. Larger ranks take a general kernel (rank tiles of kExpertRanks, one pass over
// all of e's pairs). bfloat16 on sm_80+ takes the tensor-core version where it can
// (wgrad_mma_supported, swiglu_wgrad_mma_kernels.cu).
#include <algorithm>
#include <cassert>
#include <initializer_list>

#include "swiglu/swiglu_fast_math.cuh"
#include "swiglu/swiglu_kernels.cuh"
#include "swiglu/swiglu_math.h"

namespace mixlora {
namespace cuda {
namespace {

constexpr int kTileWarps = 8;                       // warps of a token-major block
constexpr int kTileThreads = kTileWarps * kWarpSize;
constexpr int kGroupTokens = 32;                    // tokens of a token-major block
constexpr int kExpertCols = 128;  // columns (one per thread) of an expert-major block
constexpr int kExpertRanks = 16;  // ranks of a general expert-major block (its accumulators)
constexpr int kPairChunk = 16;    // pairs whose LoRA activations are staged at once
constexpr int kFastRanks = 16;    // ranks up to which the expert-major kernel keeps all in registers
constexpr int kFastChunk = 32;    // pairs staged at once by that kernel
constexpr int kMaxSplits = 8;     // pair splits of that kernel
constexpr int kSumThreads = 256;

// Columns per lane of the token-major kernels with aligned rows: 8-byte loads for 2-byte types
// (a narrower column tile keeps the experts' weight rows of a tile inside L1, and the registers
// at 2 blocks per SM; 16-byte loads ran 15% slower on the H100, bench/NOTES.md), 16 for the rest.
template <typename scalar_t>
constexpr int kTileVec = sizeof(scalar_t) == 8 ? 2 : 4;

// V consecutive elements at p (read-only data), in acc: one 8- or 16-byte load when V > 1
// (p aligned to V elements), else one element.
template <int V, typename scalar_t>
__device__ __forceinline__ void load_cols(const scalar_t* p, acc_of<scalar_t> (&out)[V]) {
  constexpr int bytes = V * static_cast<int>(sizeof(scalar_t));
  if constexpr (V > 1 && bytes == 16) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    const scalar_t* e = reinterpret_cast<const scalar_t*>(&raw);
#pragma unroll
    for (int v = 0; v < V; ++v) out[v] = to_acc(e[v]);
  } else if constexpr (V > 1 && bytes == 8) {
    const uint2 raw = __ldg(reinterpret_cast<const uint2*>(p));
    const scalar_t* e = reinterpret_cast<const scalar_t*>(&raw);
#pragma unroll
    for (int v = 0; v < V; ++v) out[v] = to_acc(e[v]);
  } else {
    static_assert(V == 1, "columns per lane: 1, or 8 or 16 bytes");
    out[0] = to_acc(__ldg(p));
  }
}

template <int V, typename scalar_t>
__device__ __forceinline__ void store_cols(scalar_t* p, const acc_of<scalar_t> (&in)[V]) {
  constexpr int bytes = V * static_cast<int>(sizeof(scalar_t));
  if constexpr (V > 1 && bytes == 16) {
    uint4 raw;
    scalar_t* e = reinterpret_cast<scalar_t*>(&raw);
#pragma unroll
    for (int v = 0; v < V; ++v) e[v] = from_acc<scalar_t>(in[v]);
    *reinterpret_cast<uint4*>(p) = raw;
  } else if constexpr (V > 1 && bytes == 8) {
    uint2 raw;
    scalar_t* e = reinterpret_cast<scalar_t*>(&raw);
#pragma unroll
    for (int v = 0; v < V; ++v) e[v] = from_acc<scalar_t>(in[v]);
    *reinterpret_cast<uint2*>(p) = raw;
  } else {
    static_assert(V == 1, "columns per lane: 1, or 8 or 16 bytes");
    p[0] = from_acc<scalar_t>(in[0]);
  }
}

// out[v] = sum_r W[r, d0 + v] * z[r], r ascending (as rank_columns, through load_cols).
// z comes 16 bytes at a time where R and z allow it (same sums, fewer loads).
template <int V, typename scalar_t, typename acc_t>
__device__ __forceinline__ void rank_cols(const scalar_t* W, int64_t R, int64_t D, int64_t d0,
                                          const acc_t* z, acc_t (&out)[V]) {
#pragma unroll
  for (int v = 0; v < V; ++v) out[v] = 0;
  constexpr int kZ = 16 / static_cast<int>(sizeof(acc_t));  // z values per 16-byte load
  using zvec_t = std::conditional_t<kZ == 4, float4, double2>;
  if (R % kZ == 0 && aligned16(z)) {
    for (int64_t r0 = 0; r0 < R; r0 += kZ) {
      const zvec_t zv = __ldg(reinterpret_cast<const zvec_t*>(z + r0));
      const acc_t* zs = reinterpret_cast<const acc_t*>(&zv);
#pragma unroll
      for (int rr = 0; rr < kZ; ++rr) {
        acc_t w[V];
        load_cols<V>(W + (r0 + rr) * D + d0, w);
#pragma unroll
        for (int v = 0; v < V; ++v) out[v] += w[v] * zs[rr];
      }
    }
    return;
  }
#pragma unroll 4
  for (int64_t r = 0; r < R; ++r) {
    acc_t w[V];
    load_cols<V>(W + r * D + d0, w);
    const acc_t zr = z[r];
#pragma unroll
    for (int v = 0; v < V; ++v) out[v] += w[v] * zr;
  }
}

// sum_v W_row[i0 + v] * x[v]: one rank's share of a per-pair sum over the lane's columns.
template <int V, typename scalar_t>
__device__ __forceinline__ acc_of<scalar_t> cols_dot(const scalar_t* W_row, int64_t i0,
                                                     const acc_of<scalar_t> (&x)[V]) {
  acc_of<scalar_t> w[V], sum = 0;
  load_cols<V>(W_row + i0, w);
#pragma unroll
  for (int v = 0; v < V; ++v) sum += w[v] * x[v];
  return sum;
}

// Up to three per-pair outputs, `width[s]` values each, filled from one run of per-pair sums
// c = 0 .. total - 1 (output s takes the next width[s] of them, times scale[s]).
template <typename acc_t>
struct PairSums {
  acc_t* out[3];
  int64_t width[3];
  acc_t scale[3];
  int64_t total;

  __device__ __forceinline__ void store(int64_t q, int64_t c, acc_t sum) const {
    // Written out rather than looped so that out[] stays in registers (no local-memory copy).
    if (c < width[0]) {
      out[0][q * width[0] + c] = scale[0] * sum;
    } else if (c - width[0] < width[1]) {
      out[1][q * width[1] + c - width[0]] = scale[1] * sum;
    } else {
      out[2][q * width[2] + c - width[0] - width[1]] = scale[2] * sum;
    }
  }
};

// Where the per-pair sums of one column tile go: straight to the outputs when there is one
// tile, else to workspace [num_tiles, N, total] for sum_tiles_kernel.
template <typename acc_t>
struct TileSums {
  PairSums<acc_t> sums;
  acc_t* workspace;
  int64_t num_tiles;
  int64_t N;

  __device__ __forceinline__ void put(int64_t q, int64_t tile, int64_t c, acc_t s) const {
    if (num_tiles == 1) {
      sums.store(q, c, s);
    } else {
      workspace[(tile * N + q) * sums.total + c] = s;
    }
  }
};

// One step of the warp's reduce-scatter of 32 values: lanes with bit OFF set keep values
// OFF .. 2 OFF - 1 (moved to 0 .. OFF - 1), the others 0 .. OFF - 1, and each adds the
// partner's copy of what it keeps.
template <int OFF, int N, typename acc_t>
__device__ __forceinline__ void reduce_scatter_step(acc_t (&v)[N], int lane) {
  const bool upper = (lane & OFF) != 0;
#pragma unroll
  for (int c = 0; c < OFF; ++c) {
    const acc_t send = upper ? v[c] : v[c + OFF];
    const acc_t keep = upper ? v[c + OFF] : v[c];
    v[c] = keep + __shfl_xor_sync(kFullMask, send, OFF);
  }
}

// The warp's sums of value(c), c < count, stored as per-pair values first .. first + count - 1
// of pair q in column tile `tile`, up to 32 at a time: a butterfly reduce-scatter (each step, a
// lane keeps half its values and adds the partner's share of them), after which lane c holds
// the sum of value(c0 + c) over the warp. Short remainders take one butterfly sum each. Fixed
// pairings: the bits do not depend on scheduling. Every lane of the warp must call this.
template <typename acc_t, typename Value>
__device__ __forceinline__ void warp_pair_sums(const TileSums<acc_t>& dst, int64_t q,
                                               int64_t tile, int64_t first, int64_t count,
                                               Value value) {
  const int lane = threadIdx.x % kWarpSize;
  for (int64_t c0 = 0; c0 < count; c0 += kWarpSize) {
    const int64_t n = min(int64_t(kWarpSize), count - c0);
    if (n > 8 && n <= 16) {  // half the butterfly, then the two half-warps added
      acc_t v[16];
#pragma unroll
      for (int c = 0; c < 16; ++c) v[c] = c < n ? value(c0 + c) : acc_t(0);
      reduce_scatter_step<8>(v, lane);
      reduce_scatter_step<4>(v, lane);
      reduce_scatter_step<2>(v, lane);
      reduce_scatter_step<1>(v, lane);
      v[0] += __shfl_xor_sync(kFullMask, v[0], 16);
      if (lane < n) dst.put(q, tile, first + c0 + lane, v[0]);
    } else if (n > 16) {
      acc_t v[kWarpSize];
#pragma unroll
      for (int c = 0; c < kWarpSize; ++c) v[c] = c < n ? value(c0 + c) : acc_t(0);
      reduce_scatter_step<16>(v, lane);
      reduce_scatter_step<8>(v, lane);
      reduce_scatter_step<4>(v, lane);
      reduce_scatter_step<2>(v, lane);
      reduce_scatter_step<1>(v, lane);
      if (lane < n) dst.put(q, tile, first + c0 + lane, v[0]);
    } else {
      for (int64_t c = 0; c < n; ++c) {
        const acc_t s = warp_sum(value(c0 + c));
        if (lane == 0) dst.put(q, tile, first + c0 + c, s);
      }
    }
  }
}

// out = sum over tiles, in tile order, of the workspace: one thread per (pair, value).
template <typename acc_t>
__global__ void __launch_bounds__(kSumThreads) sum_tiles_kernel(TileSums<acc_t> src) {
  const int64_t count = src.N * src.sums.total;
  const int64_t stride = int64_t(gridDim.x) * kSumThreads;
  for (int64_t idx = int64_t(blockIdx.x) * kSumThreads + threadIdx.x; idx < count; idx += stride) {
    acc_t s = 0;
    for (int64_t tile = 0; tile < src.num_tiles; ++tile) s += src.workspace[tile * count + idx];
    src.sums.store(idx / src.sums.total, idx % src.sums.total, s);
  }
}

// The pair-independent inputs of the recompute: the rank-major LoRA weights of g and u.
template <typename scalar_t>
struct SwigluWeights {
  using acc_t = acc_of<scalar_t>;
  const scalar_t* Bg_t;  // [E, Rg, I] or null
  const scalar_t* Bu_t;  // [E, Ru, I] or null
  int64_t I, Rg, Ru;
  acc_t scale;
  int act;
};

template <typename scalar_t>
SwigluWeights<scalar_t> swiglu_weights(const SwigluInputs& p) {
  return {static_cast<const scalar_t*>(p.Bg_t), static_cast<const scalar_t*>(p.Bu_t), p.I, p.Rg,
          p.Ru, static_cast<acc_of<scalar_t>>(p.scale), p.activation};
}

// g, u, act(g), h of a pair (expert e, LoRA activations zg, zu) at columns i0 .. i0 + V - 1
// from G, U there: g = G + s * (Bg[e] @ zg)[i] (just G without Bg), u likewise; swiglu_math.h
// does the rest, as on the CPU. kZGlobal: z in global memory (the token-major kernels), read
// by rank_cols with 16-byte __ldg loads; else z in shared memory, read by rank_columns.
template <int V, bool kZGlobal, typename scalar_t>
__device__ __forceinline__ void recompute(const SwigluWeights<scalar_t>& w, int64_t e, int64_t i0,
                                          const acc_of<scalar_t> (&G)[V],
                                          const acc_of<scalar_t> (&U)[V],
                                          const acc_of<scalar_t>* zg, const acc_of<scalar_t>* zu,
                                          SwigluPoint<acc_of<scalar_t>> (&pt)[V]) {
  using acc_t = acc_of<scalar_t>;
  auto rank_dot = [&](const scalar_t* W, int64_t R, const acc_t* z, acc_t (&out)[V]) {
    if constexpr (kZGlobal) {
      rank_cols<V>(W, R, w.I, i0, z, out);
    } else {
      rank_columns<V>(W, R, w.I, i0, z, out);
    }
  };
  acc_t dg[V], du[V];
  if (w.Bg_t != nullptr) rank_dot(w.Bg_t + e * w.Rg * w.I, w.Rg, zg, dg);
  if (w.Bu_t != nullptr) rank_dot(w.Bu_t + e * w.Ru * w.I, w.Ru, zu, du);
#pragma unroll
  for (int v = 0; v < V; ++v) {
    const acc_t g = w.Bg_t != nullptr ? G[v] + w.scale * dg[v] : G[v];
    const acc_t u = w.Bu_t != nullptr ? U[v] + w.scale * du[v] : U[v];
    pt[v] = swiglu_point<acc_t, acc_t>(w.act, w.scale, g, u, nullptr, nullptr, 0, nullptr, nullptr, 0);
  }
}

// sum_v W_row[i0 + v] * x[v]: one rank's share of a per-pair sum over the thread's columns.
template <int V, typename scalar_t>
__device__ __forceinline__ acc_of<scalar_t> columns_dot(const scalar_t* W_row, int64_t i0,
                                                        const acc_of<scalar_t> (&x)[V]) {
  acc_of<scalar_t> w[V], sum = 0;
  load_acc<V>(W_row + i0, w);
#pragma unroll
  for (int v = 0; v < V; ++v) sum += w[v] * x[v];
  return sum;
}

// Copies n acc values to shared memory (all threads of the block take part).
template <typename acc_t>
__device__ __forceinline__ void stage(acc_t* dst, const acc_t* src, int64_t n) {
  for (int64_t r = threadIdx.x; r < n; r += blockDim.x) dst[r] = src[r];
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

// Block (token group, column tile); warp w takes the group's tokens w, w + kTileWarps, ...;
// lane columns i0 .. i0 + V - 1. hbar accumulates in registers over j; zd[q, r] = sum over the
// tile's columns of Ad[e, r, i] * drop(h)[i] (warp_pair_sums).
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kTileThreads)
    moe_swiglu_kernel(MoeSwigluParams p, SwigluWeights<scalar_t> weights_lora,
                      TileSums<acc_of<scalar_t>> dst) {
  using acc_t = acc_of<scalar_t>;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int64_t tile = blockIdx.y;
  const int64_t i0 = (tile * kWarpSize + lane) * V;
  const bool active = i0 < p.I;
  const scalar_t* Ad = static_cast<const scalar_t*>(p.Ad);  // [E, Rd, I] or null
  const acc_t* weights = static_cast<const acc_t*>(p.weights);
  const acc_t* zg_all = static_cast<const acc_t*>(p.zg);
  const acc_t* zu_all = static_cast<const acc_t*>(p.zu);
  const DropoutScale<acc_t> drop(p.dropout_p, p.key);
  const int64_t t_end = min(p.T, int64_t(blockIdx.x + 1) * kGroupTokens);
  for (int64_t t = int64_t(blockIdx.x) * kGroupTokens + warp; t < t_end; t += kTileWarps) {
    acc_t G[V], U[V], hbar[V] = {};
    if (active) {
      load_cols<V>(static_cast<const scalar_t*>(p.G) + t * p.I + i0, G);
      load_cols<V>(static_cast<const scalar_t*>(p.U) + t * p.I + i0, U);
    }
    for (int64_t q = t * p.k; q < (t + 1) * p.k; ++q) {
      const int64_t e = p.ids[q];
      assert(e >= 0 && (p.E == 0 || e < p.E));
      const acc_t w = weights[q];
      acc_t h_drop[V] = {};  // drop_q(h) on the lane's columns
      if (active) {
        SwigluPoint<acc_t> pt[V];
        recompute<V, true>(weights_lora, e, i0, G, U, zg_all + q * p.Rg, zu_all + q * p.Ru, pt);
#pragma unroll
        for (int v = 0; v < V; ++v) {
          hbar[v] += w * pt[v].h;
          h_drop[v] = drop.active ? drop.factor(q * p.I + i0 + v) * pt[v].h : pt[v].h;
        }
      }
      if (Ad != nullptr) {
        const scalar_t* Ad_e = Ad + e * p.Rd * p.I;
        warp_pair_sums(dst, q, tile, 0, p.Rd, [&](int64_t r) {
          return active ? cols_dot<V>(Ad_e + r * p.I, i0, h_drop) : acc_t(0);
        });
      }
    }
    if (active) store_cols<V>(static_cast<scalar_t*>(p.hbar) + t * p.I + i0, hbar);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward, pass 1 (token-major): dG, dU, dweights, dzg, dzu
// ---------------------------------------------------------------------------------------------

// Block and warps as in the forward. dG, dU accumulate in registers over j; the per-pair sums
// over columns (value c: 0 -> dweights, 1 .. Rg -> dzg / s, then dzu / s) go through
// warp_pair_sums (the scale s is applied when stored).
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kTileThreads)
    moe_swiglu_bwd_token_kernel(MoeSwigluBackwardParams p, SwigluWeights<scalar_t> weights_lora,
                                TileSums<acc_of<scalar_t>> dst) {
  using acc_t = acc_of<scalar_t>;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const bool has_gzd = p.grad_zd != nullptr;
  const int64_t Rz = has_gzd ? p.Rd : 0;
  const int64_t tile = blockIdx.y;
  const int64_t i0 = (tile * kWarpSize + lane) * V;
  const bool active = i0 < p.I;
  const scalar_t* Ad = static_cast<const scalar_t*>(p.Ad);  // [E, Rd, I] or null
  const acc_t* weights = static_cast<const acc_t*>(p.weights);
  const acc_t* zg_all = static_cast<const acc_t*>(p.zg);
  const acc_t* zu_all = static_cast<const acc_t*>(p.zu);
  const acc_t* gzd_all = static_cast<const acc_t*>(p.grad_zd);
  const DropoutScale<acc_t> drop(p.dropout_p, p.key);
  const int64_t t_end = min(p.T, int64_t(blockIdx.x + 1) * kGroupTokens);
  for (int64_t t = int64_t(blockIdx.x) * kGroupTokens + warp; t < t_end; t += kTileWarps) {
    acc_t G[V], U[V], gh[V], dG[V] = {}, dU[V] = {};
    if (active) {
      load_cols<V>(static_cast<const scalar_t*>(p.G) + t * p.I + i0, G);
      load_cols<V>(static_cast<const scalar_t*>(p.U) + t * p.I + i0, U);
      load_cols<V>(static_cast<const scalar_t*>(p.grad_hbar) + t * p.I + i0, gh);
    }
    for (int64_t q = t * p.k; q < (t + 1) * p.k; ++q) {
      const int64_t e = p.ids[q];
      assert(e >= 0 && (p.E == 0 || e < p.E));
      const acc_t w = weights[q];
      acc_t dg[V] = {}, du[V] = {}, dw = 0;
      if (active) {
        acc_t ad_gz[V] = {};  // (Ad[e]^T @ grad_zd[q])[i], r ascending
        if (has_gzd) rank_cols<V>(Ad + e * p.Rd * p.I, Rz, p.I, i0, gzd_all + q * Rz, ad_gz);
        SwigluPoint<acc_t> pt[V];
        recompute<V, true>(weights_lora, e, i0, G, U, zg_all + q * p.Rg, zu_all + q * p.Ru, pt);
#pragma unroll
        for (int v = 0; v < V; ++v) {
          acc_t dh = w * gh[v];
          if (has_gzd) dh += (drop.active ? drop.factor(q * p.I + i0 + v) : acc_t(1)) * ad_gz[v];
          dw += gh[v] * pt[v].h;
          swiglu_point_grad(p.activation, pt[v], dh, &dg[v], &du[v]);
          dG[v] += dg[v];
          dU[v] += du[v];
        }
      }
      const acc_t dw_sum = warp_sum(dw);
      if (lane == 0) dst.put(q, tile, 0, dw_sum);
      if (p.Rg > 0) {
        const scalar_t* Bg_e = weights_lora.Bg_t + e * p.Rg * p.I;
        warp_pair_sums(dst, q, tile, 1, p.Rg, [&](int64_t r) {
          return active ? cols_dot<V>(Bg_e + r * p.I, i0, dg) : acc_t(0);
        });
      }
      if (p.Ru > 0) {
        const scalar_t* Bu_e = weights_lora.Bu_t + e * p.Ru * p.I;
        warp_pair_sums(dst, q, tile, 1 + p.Rg, p.Ru, [&](int64_t r) {
          return active ? cols_dot<V>(Bu_e + r * p.I, i0, du) : acc_t(0);
        });
      }
    }
    if (active) {
      store_cols<V>(static_cast<scalar_t*>(p.dG) + t * p.I + i0, dG);
      store_cols<V>(static_cast<scalar_t*>(p.dU) + t * p.I + i0, dU);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward, pass 2 (expert-major): dBg, dBu, dAd
// ---------------------------------------------------------------------------------------------

// Block (column tile, expert e, rank tile); thread column i, ranks r0 .. r0 + 15. The block
// walks e's pairs [offsets[e], offsets[e+1]) in order, kPairChunk at a time with their zg, zu,
// grad_zd rows and their G, U, grad_hbar entries staged in shared memory, and recomputes
// g, u, h, dh, dg, du at (pair, i).
template <typename scalar_t>
__global__ void __launch_bounds__(kExpertCols)
    moe_swiglu_bwd_expert_kernel(MoeSwigluBackwardParams p, SwigluWeights<scalar_t> weights_lora) {
  using acc_t = acc_of<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ int64_t pairs[kPairChunk];
  const bool has_gzd = p.grad_zd != nullptr;
  const int64_t Rz = has_gzd ? p.Rd : 0;
  acc_t* zg = reinterpret_cast<acc_t*>(smem);  // [kPairChunk, Rg]
  acc_t* zu = zg + kPairChunk * p.Rg;          // [kPairChunk, Ru]
  acc_t* gzd = zu + kPairChunk * p.Ru;         // [kPairChunk, Rz]
  // G, U, grad_hbar of the chunk's pairs at the block's columns: [kPairChunk, kExpertCols] each.
  scalar_t* G_s = reinterpret_cast<scalar_t*>(gzd + kPairChunk * Rz);
  scalar_t* U_s = G_s + kPairChunk * kExpertCols;
  scalar_t* gh_s = U_s + kPairChunk * kExpertCols;
  const int64_t e = blockIdx.y;
  const int64_t i = int64_t(blockIdx.x) * kExpertCols + threadIdx.x;
  const int64_t r0 = int64_t(blockIdx.z) * kExpertRanks;
  const bool active = i < p.I;
  const scalar_t* G = static_cast<const scalar_t*>(p.G);
  const scalar_t* U = static_cast<const scalar_t*>(p.U);
  const scalar_t* grad_hbar = static_cast<const scalar_t*>(p.grad_hbar);
  const scalar_t* Ad = static_cast<const scalar_t*>(p.Ad);
  const acc_t* weights = static_cast<const acc_t*>(p.weights);
  const DropoutScale<acc_t> drop(p.dropout_p, p.key);
  acc_t dBg[kExpertRanks] = {}, dBu[kExpertRanks] = {}, dAd[kExpertRanks] = {};
  const int64_t begin = p.offsets[e], end = p.offsets[e + 1];
  for (int64_t base = begin; base < end; base += kPairChunk) {
    const int64_t n = min(int64_t(kPairChunk), end - base);
    __syncthreads();  // the previous chunk's readers are done
    if (threadIdx.x < n) pairs[threadIdx.x] = p.order[base + threadIdx.x];
    auto stage_rows = [&](acc_t* dst, const void* src, int64_t R) {
      for (int64_t idx = threadIdx.x; idx < n * R; idx += kExpertCols) {
        dst[idx] = static_cast<const acc_t*>(src)[int64_t(p.order[base + idx / R]) * R + idx % R];
      }
    };
    stage_rows(zg, p.zg, p.Rg);
    stage_rows(zu, p.zu, p.Ru);
    stage_rows(gzd, p.grad_zd, Rz);
    if (active) {  // every load of the chunk in flight at once; each thread reads back its own
      for (int64_t c = 0; c < n; ++c) {
        const int64_t ti = (p.order[base + c] / p.k) * p.I + i;
        G_s[c * kExpertCols + threadIdx.x] = G[ti];
        U_s[c * kExpertCols + threadIdx.x] = U[ti];
        gh_s[c * kExpertCols + threadIdx.x] = grad_hbar[ti];
      }
    }
    __syncthreads();
    if (!active) continue;
    for (int64_t c = 0; c < n; ++c) {
      const int64_t q = pairs[c];
      const int64_t col = c * kExpertCols + threadIdx.x;
      const acc_t Gi[1] = {to_acc(G_s[col])}, Ui[1] = {to_acc(U_s[col])};
      SwigluPoint<acc_t> pts[1];
      recompute<1, false>(weights_lora, e, i, Gi, Ui, zg + c * p.Rg, zu + c * p.Ru, pts);
      const SwigluPoint<acc_t>& pt = pts[0];
      const acc_t m = drop.active ? drop.factor(q * p.I + i) : acc_t(1);
      acc_t dh = weights[q] * to_acc(gh_s[col]);
      if (has_gzd) {
        acc_t ad_gz[1];
        rank_columns<1>(Ad + e * p.Rd * p.I, Rz, p.I, i, gzd + c * Rz, ad_gz);
        dh += m * ad_gz[0];
      }
      acc_t dg, du;
      swiglu_point_grad(p.activation, pt, dh, &dg, &du);
      const acc_t mh = m * pt.h;
#pragma unroll
      for (int rr = 0; rr < kExpertRanks; ++rr) {
        const int64_t r = r0 + rr;
        if (r < p.Rg) dBg[rr] += dg * zg[c * p.Rg + r];
        if (r < p.Ru) dBu[rr] += du * zu[c * p.Ru + r];
        if (r < Rz) dAd[rr] += gzd[c * Rz + r] * mh;
      }
    }
  }
  if (!active) return;
  const acc_t s = static_cast<acc_t>(p.scale);
#pragma unroll
  for (int rr = 0; rr < kExpertRanks; ++rr) {
    const int64_t r = r0 + rr;
    if (r < p.Rg) {
      static_cast<scalar_t*>(p.dBg)[(e * p.I + i) * p.Rg + r] = from_acc<scalar_t>(s * dBg[rr]);
    }
    if (r < p.Ru) {
      static_cast<scalar_t*>(p.dBu)[(e * p.I + i) * p.Ru + r] = from_acc<scalar_t>(s * dBu[rr]);
    }
    if (r < p.Rd) {
      static_cast<scalar_t*>(p.dAd)[(e * p.Rd + r) * p.I + i] = from_acc<scalar_t>(dAd[rr]);
    }
  }
}

// Block (column tile, expert e, split); thread column i with all ranks (<= kFastRanks): the
// expert's weights of column i in registers, kFastChunk pairs at a time with their zg, zu,
// grad_zd rows (zero-padded to kFastRanks) and G, U, grad_hbar entries staged in shared memory
// in two stages: cp.async copies chunk n + 1 while chunk n is computed (the staging latency,
// scattered token rows mostly from DRAM, was the kernel's largest stall).
// The split takes pairs [b + n * split / splits, b + n * (split + 1) / splits) of e's n pairs
// starting at b. One split writes the outputs; several write [splits, E, Rg + Ru + Rd, I] acc
// partials to the workspace for sum_splits_kernel. ACT: kSilu (the fast SiLU, 16-bit types) or
// kAnyActivation (swiglu_fast_math.cuh).
template <typename scalar_t, int ACT>
__global__ void __launch_bounds__(kExpertCols, sizeof(scalar_t) == 8 ? 1 : 3)
    moe_swiglu_bwd_expert_fast_kernel(MoeSwigluBackwardParams p,
                                      SwigluWeights<scalar_t> weights_lora, int64_t splits) {
  using acc_t = acc_of<scalar_t>;
  constexpr int RM = kFastRanks;
  extern __shared__ __align__(16) unsigned char smem[];
  // Two stages: chunk n + 1 is copied (cp.async) while chunk n is computed.
  __shared__ int64_t pairs_s[2][kFastChunk];
  __shared__ int64_t rows_s[2][kFastChunk];  // (q / k) * I: the pair's token row
  __shared__ acc_t pair_w_s[2][kFastChunk];  // weights[q]
  constexpr int kZElems = kFastChunk * RM;               // per z array and stage
  constexpr int kRowElems = kFastChunk * kExpertCols;    // per G / U / grad_hbar array and stage
  acc_t* z_s = reinterpret_cast<acc_t*>(smem);  // [2 stages][zg, zu, gzd][kFastChunk, RM]
  scalar_t* rows_data = reinterpret_cast<scalar_t*>(z_s + 2 * 3 * kZElems);
  // [2 stages][G, U, grad_hbar][kFastChunk, kExpertCols]
  const bool has_gzd = p.grad_zd != nullptr;
  const int64_t Rz = has_gzd ? p.Rd : 0;
  const bool has_g = weights_lora.Bg_t != nullptr, has_u = weights_lora.Bu_t != nullptr;
  const int64_t e = blockIdx.y, split = blockIdx.z;
  const int64_t col0 = int64_t(blockIdx.x) * kExpertCols;
  const int64_t i = col0 + threadIdx.x;
  const bool active = i < p.I;
  const scalar_t* G = static_cast<const scalar_t*>(p.G);
  const scalar_t* U = static_cast<const scalar_t*>(p.U);
  const scalar_t* grad_hbar = static_cast<const scalar_t*>(p.grad_hbar);
  const scalar_t* Ad = static_cast<const scalar_t*>(p.Ad);
  const acc_t* zg_all = static_cast<const acc_t*>(p.zg);
  const acc_t* zu_all = static_cast<const acc_t*>(p.zu);
  const acc_t* gzd_all = static_cast<const acc_t*>(p.grad_zd);
  const acc_t* weights = static_cast<const acc_t*>(p.weights);
  const DropoutScale<acc_t> drop(p.dropout_p, p.key);
  const acc_t s = weights_lora.scale;
  acc_t wg[RM], wu[RM], wa[RM];
#pragma unroll
  for (int r = 0; r < RM; ++r) {
    wg[r] = active && has_g && r < p.Rg ? to_acc(weights_lora.Bg_t[(e * p.Rg + r) * p.I + i]) : acc_t(0);
    wu[r] = active && has_u && r < p.Ru ? to_acc(weights_lora.Bu_t[(e * p.Ru + r) * p.I + i]) : acc_t(0);
    wa[r] = active && r < Rz ? to_acc(Ad[(e * p.Rd + r) * p.I + i]) : acc_t(0);
  }
  acc_t dBg[RM] = {}, dBu[RM] = {}, dAd[RM] = {};
  const int64_t first = p.offsets[e], count = p.offsets[e + 1] - first;
  const int64_t begin = first + count * split / splits;
  const int64_t end = first + count * (split + 1) / splits;
  // 2-byte types copy 4-byte words (two columns) where I and the row bases allow, the others
  // one element; a 2-byte copy that cannot go by words goes element by element, synchronously.
  constexpr int kWordElems = sizeof(scalar_t) == 2 ? 2 : 1;
  constexpr int kWordBytes = kWordElems * static_cast<int>(sizeof(scalar_t));
  const bool async_rows = sizeof(scalar_t) != 2 ||
                          (p.I % 2 == 0 && (reinterpret_cast<uintptr_t>(G) & 3) == 0 &&
                           (reinterpret_cast<uintptr_t>(U) & 3) == 0 &&
                           (reinterpret_cast<uintptr_t>(grad_hbar) & 3) == 0);
  // Stage `st` <- the chunk of pairs at base (its pair list first, then the copies, committed
  // as one group). All threads take part; the caller has made the stage's previous readers wait.
  auto stage_chunk = [&](int st, int64_t base) {
    const int64_t n = min(int64_t(kFastChunk), end - base);
    if (threadIdx.x < n) {
      const int64_t q = p.order[base + threadIdx.x];
      pairs_s[st][threadIdx.x] = q;
      rows_s[st][threadIdx.x] = (q / p.k) * p.I;
      pair_w_s[st][threadIdx.x] = weights[q];
    }
    __syncthreads();
    acc_t* zst = z_s + st * 3 * kZElems;
    for (int idx = threadIdx.x; idx < kZElems; idx += kExpertCols) {
      const int c = idx / RM, r = idx % RM;
      const int64_t q = c < n ? pairs_s[st][c] : 0;
      if (c < n && r < p.Rg) cp_async<sizeof(acc_t)>(zst + idx, zg_all + q * p.Rg + r);
      else zst[idx] = acc_t(0);
      if (c < n && r < p.Ru) cp_async<sizeof(acc_t)>(zst + kZElems + idx, zu_all + q * p.Ru + r);
      else zst[kZElems + idx] = acc_t(0);
      if (c < n && r < Rz) cp_async<sizeof(acc_t)>(zst + 2 * kZElems + idx, gzd_all + q * Rz + r);
      else zst[2 * kZElems + idx] = acc_t(0);
    }
    scalar_t* rst = rows_data + st * 3 * kRowElems;
    constexpr int kWords = kExpertCols / kWordElems;  // per row
    for (int idx = threadIdx.x; idx < n * kWords; idx += kExpertCols) {
      const int c = idx / kWords, col = (idx % kWords) * kWordElems;
      if (col0 + col >= p.I) continue;
      const int64_t src = rows_s[st][c] + col0 + col;
      const int dst = c * kExpertCols + col;
      if (async_rows) {  // (with I even, col0 + col < I means the whole word is inside)
        cp_async<kWordBytes>(rst + dst, G + src);
        cp_async<kWordBytes>(rst + kRowElems + dst, U + src);
        cp_async<kWordBytes>(rst + 2 * kRowElems + dst, grad_hbar + src);
      } else {
        for (int v = 0; v < kWordElems && col0 + col + v < p.I; ++v) {
          rst[dst + v] = G[src + v];
          rst[kRowElems + dst + v] = U[src + v];
          rst[2 * kRowElems + dst + v] = grad_hbar[src + v];
        }
      }
    }
    cp_async_commit();
  };
  if (begin < end) stage_chunk(0, begin);
  int st = 0;
  for (int64_t base = begin; base < end; base += kFastChunk, st ^= 1) {
    const int64_t n = min(int64_t(kFastChunk), end - base);
    const bool more = base + kFastChunk < end;
    __syncthreads();  // the other stage's readers (the previous chunk) are done
    if (more) stage_chunk(st ^ 1, base + kFastChunk);
    if (more) {
      cp_async_wait<1>();  // this chunk's group has landed (the next one may still fly)
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // ... for every thread's copies
    if (!active) continue;
    const int64_t* pairs = pairs_s[st];
    const acc_t* pair_w = pair_w_s[st];
    const acc_t* zg = z_s + st * 3 * kZElems;
    const acc_t* zu = zg + kZElems;
    const acc_t* gzd = zu + kZElems;
    const scalar_t* G_s = rows_data + st * 3 * kRowElems;
    const scalar_t* U_s = G_s + kRowElems;
    const scalar_t* gh_s = U_s + kRowElems;
    // dg, du, m * h of the chunk's pair c at column i. (Two pairs at a time, for more
    // independent work in flight, spilled and ran slower: see bench/NOTES.md.)
    struct PairGrad {
      acc_t dg, du, mh;
    };
    auto pair_grad = [&](int64_t c) {
      const int64_t q = pairs[c];
      const int64_t col = c * kExpertCols + threadIdx.x;
      const acc_t* zgc = zg + c * RM;
      const acc_t* zuc = zu + c * RM;
      const acc_t* gzc = gzd + c * RM;
      acc_t lg = 0, lu = 0, ag = 0;  // r ascending, as rank_columns
#pragma unroll
      for (int r = 0; r < RM; ++r) {
        lg += wg[r] * zgc[r];
        lu += wu[r] * zuc[r];
        ag += wa[r] * gzc[r];
      }
      const acc_t g = has_g ? to_acc(G_s[col]) + s * lg : to_acc(G_s[col]);
      const acc_t u = has_u ? to_acc(U_s[col]) + s * lu : to_acc(U_s[col]);
      const ActValue<acc_t> act = activation_at<ACT>(weights_lora.act, g);
      const acc_t m = drop.active ? drop.factor(q * p.I + i) : acc_t(1);
      acc_t dh = pair_w[c] * to_acc(gh_s[col]);
      if (has_gzd) dh += m * ag;
      PairGrad out;  // (swiglu_point, swiglu_point_grad)
      out.dg = dh * u * act.da;
      out.du = dh * act.a;
      out.mh = m * (act.a * u);
      return out;
    };
    auto accumulate = [&](int64_t c, const PairGrad& pg) {
      const acc_t* zgc = zg + c * RM;
      const acc_t* zuc = zu + c * RM;
      const acc_t* gzc = gzd + c * RM;
#pragma unroll
      for (int r = 0; r < RM; ++r) {
        dBg[r] += pg.dg * zgc[r];
        dBu[r] += pg.du * zuc[r];
        dAd[r] += gzc[r] * pg.mh;
      }
    };
    for (int64_t c = 0; c < n; ++c) accumulate(c, pair_grad(c));
  }
  if (!active) return;
  if (splits == 1) {
#pragma unroll
    for (int r = 0; r < RM; ++r) {
      if (r < p.Rg) {
        static_cast<scalar_t*>(p.dBg)[(e * p.I + i) * p.Rg + r] = from_acc<scalar_t>(s * dBg[r]);
      }
      if (r < p.Ru) {
        static_cast<scalar_t*>(p.dBu)[(e * p.I + i) * p.Ru + r] = from_acc<scalar_t>(s * dBu[r]);
      }
      if (r < p.Rd) {
        static_cast<scalar_t*>(p.dAd)[(e * p.Rd + r) * p.I + i] = from_acc<scalar_t>(dAd[r]);
      }
    }
    return;
  }
  const int64_t R3 = p.Rg + p.Ru + p.Rd;
  acc_t* ws = static_cast<acc_t*>(p.workspace) + ((split * p.E + e) * R3) * p.I + i;
#pragma unroll
  for (int r = 0; r < RM; ++r) {
    if (r < p.Rg) ws[r * p.I] = dBg[r];
    if (r < p.Ru) ws[(p.Rg + r) * p.I] = dBu[r];
    if (r < p.Rd) ws[(p.Rg + p.Ru + r) * p.I] = dAd[r];
  }
}

// dBg, dBu, dAd = the sum over splits, in split order, of the fast kernel's partials.
template <typename scalar_t>
__global__ void __launch_bounds__(kSumThreads)
    sum_splits_kernel(MoeSwigluBackwardParams p, int64_t splits) {
  using acc_t = acc_of<scalar_t>;
  const int64_t R3 = p.Rg + p.Ru + p.Rd;
  const int64_t count = p.E * R3 * p.I;
  const int64_t stride = int64_t(gridDim.x) * kSumThreads;
  const acc_t* ws = static_cast<const acc_t*>(p.workspace);
  const acc_t scale = static_cast<acc_t>(p.scale);
  for (int64_t idx = int64_t(blockIdx.x) * kSumThreads + threadIdx.x; idx < count; idx += stride) {
    acc_t sum = 0;
    for (int64_t sp = 0; sp < splits; ++sp) sum += ws[sp * count + idx];
    const int64_t i = idx % p.I, row = (idx / p.I) % R3, e = idx / (p.I * R3);
    if (row < p.Rg) {
      static_cast<scalar_t*>(p.dBg)[(e * p.I + i) * p.Rg + row] = from_acc<scalar_t>(scale * sum);
    } else if (row < p.Rg + p.Ru) {
      static_cast<scalar_t*>(p.dBu)[(e * p.I + i) * p.Ru + row - p.Rg] =
          from_acc<scalar_t>(scale * sum);
    } else {
      static_cast<scalar_t*>(p.dAd)[(e * p.Rd + row - p.Rg - p.Ru) * p.I + i] =
          from_acc<scalar_t>(sum);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Launch helpers
// ---------------------------------------------------------------------------------------------

// V = kTileVec when the [T, I] rows (and the rank-major weights' rows) allow V-element access,
// else 1.
template <typename scalar_t>
int column_width(int64_t I, std::initializer_list<const void*> bases) {
  constexpr int V = kTileVec<scalar_t>;
  bool vec = I % V == 0;
  for (const void* base : bases) vec = vec && aligned_to(base, V * sizeof(scalar_t));
  return vec ? V : 1;
}

int64_t num_column_tiles(int64_t I, int V) {
  const int64_t cols = int64_t(kWarpSize) * V;
  return std::max<int64_t>(1, (I + cols - 1) / cols);  // one tile even when I == 0: sums of 0
}

dim3 token_grid(int64_t T, int64_t num_tiles) {
  return dim3(static_cast<unsigned>((T + kGroupTokens - 1) / kGroupTokens),
              static_cast<unsigned>(num_tiles));
}

template <typename acc_t>
cudaError_t launch_sum_tiles(const TileSums<acc_t>& tiles, cudaStream_t stream) {
  if (tiles.num_tiles == 1 || tiles.sums.total == 0) return cudaSuccess;
  const int64_t blocks =
      std::min<int64_t>((tiles.N * tiles.sums.total + kSumThreads - 1) / kSumThreads, 65536);
  sum_tiles_kernel<acc_t><<<static_cast<unsigned>(blocks), kSumThreads, 0, stream>>>(tiles);
  MIXLORA_RETURN_IF_LAUNCH_FAILED();
  return cudaSuccess;
}

// Calls launch(V) with V = kTileVec or 1 (an integral_constant) for the run-time width.
template <typename scalar_t, typename Launch>
cudaError_t with_width(int V, Launch&& launch) {
  if (V == kTileVec<scalar_t>) return launch(std::integral_constant<int, kTileVec<scalar_t>>{});
  return launch(std::integral_constant<int, 1>{});
}

template <typename scalar_t>
int forward_width(const MoeSwigluParams& p) {
  return column_width<scalar_t>(p.I, {p.G, p.U, p.hbar, p.Bg_t, p.Bu_t, p.Ad});
}

template <typename scalar_t>
int backward_width(const MoeSwigluBackwardParams& p) {
  return column_width<scalar_t>(p.I, {p.G, p.U, p.grad_hbar, p.dG, p.dU, p.Bg_t, p.Bu_t, p.Ad});
}

// Pair splits of the fast expert-major kernel: enough blocks to fill the device several
// times over, from the shapes alone (so the summation order never depends on the device), and
// no more than the pairs warrant (about a chunk per split and expert on average; few tokens
// take one split and skip the partials' round trip through the workspace), with partials of
// at most one [T, I] activation's bytes (so the workspace stays small next to what the layer
// itself holds: at T = 512 four splits' partials were 67 MB, the dense MLP's whole peak 64 MiB).
int64_t expert_splits(const MoeSwigluBackwardParams& p) {
  const int64_t E = std::max<int64_t>(p.E, 1);
  const int64_t blocks = ((p.I + kExpertCols - 1) / kExpertCols) * E;
  const int64_t fill = (2048 + blocks - 1) / blocks;
  const int64_t by_pairs = p.T * p.k / (E * kFastChunk);
  int64_t elem_bytes = 0;
  dispatch_dtype(p.dtype, [&](auto zero) {
    elem_bytes = sizeof(zero);
    return cudaSuccess;
  });
  const int64_t acc_bytes = elem_bytes == 8 ? 8 : 4;
  const int64_t partial_bytes = E * (p.Rg + p.Ru + p.Rd) * p.I * acc_bytes;
  const int64_t by_memory = partial_bytes > 0 ? p.T * p.I * elem_bytes / partial_bytes : 1;
  return std::max<int64_t>(1, std::min({int64_t(kMaxSplits), fill, by_pairs, by_memory}));
}

bool fast_expert_pass(const MoeSwigluBackwardParams& p) {
  return std::max({p.Rg, p.Ru, p.Rd}) <= kFastRanks;
}

// acc elements of the fast expert-major kernel's partials (0 with one split).
int64_t expert_workspace_elems(const MoeSwigluBackwardParams& p) {
  const int64_t splits = expert_splits(p);
  if (!fast_expert_pass(p) || splits == 1) return 0;
  return splits * p.E * (p.Rg + p.Ru + p.Rd) * p.I;
}

// Backward pass 1 (token-major), and the tile sums when I spans several column tiles.
template <typename scalar_t>
cudaError_t launch_token_pass(const MoeSwigluBackwardParams& p,
                              const SwigluWeights<scalar_t>& weights_lora, cudaStream_t stream) {
  using acc_t = acc_of<scalar_t>;
  const int V = backward_width<scalar_t>(p);
  const acc_t s = static_cast<acc_t>(p.scale);
  const bool mma = mma_backward_supported(p);
  const TileSums<acc_t> dst{{{static_cast<acc_t*>(p.dweights), static_cast<acc_t*>(p.dzg),
                              static_cast<acc_t*>(p.dzu)},
                             {1, p.Rg, p.Ru},
                             {1, s, s},
                             1 + p.Rg + p.Ru},
                            static_cast<acc_t*>(p.workspace),
                            mma ? mma_column_tiles(p.T, p.k, p.I) : num_column_tiles(p.I, V),
                            p.T * p.k};
  if constexpr (std::is_same_v<acc_t, float>) {
    if (mma) {
      const cudaError_t err = launch_moe_swiglu_bwd_mma(p, dst.workspace, stream);
      if (err != cudaSuccess) return err;
      return launch_sum_tiles(dst, stream);
    }
  }
  const dim3 grid = token_grid(p.T, dst.num_tiles);
  const cudaError_t err = with_width<scalar_t>(V, [&](auto width) {
    const auto kernel = moe_swiglu_bwd_token_kernel<scalar_t, decltype(width)::value>;
    kernel<<<grid, kTileThreads, 0, stream>>>(p, weights_lora, dst);
    MIXLORA_RETURN_IF_LAUNCH_FAILED();
    return cudaSuccess;
  });
  if (err != cudaSuccess) return err;
  return launch_sum_tiles(dst, stream);
}

// dBg, dBu, dAd from the pair splits' partials in the workspace (sum_splits_kernel).
template <typename scalar_t>
cudaError_t launch_sum_splits(const MoeSwigluBackwardParams& p, int64_t splits, cudaStream_t stream) {
  const int64_t count = p.E * (p.Rg + p.Ru + p.Rd) * p.I;
  const int64_t blocks = std::min<int64_t>((count + kSumThreads - 1) / kSumThreads, 65536);
  sum_splits_kernel<scalar_t><<<static_cast<unsigned>(blocks), kSumThreads, 0, stream>>>(p, splits);
  MIXLORA_RETURN_IF_LAUNCH_FAILED();
  return cudaSuccess;
}

// Backward pass 2 (expert-major): every element of dBg, dBu, dAd, zeros for empty experts.
template <typename scalar_t>
cudaError_t launch_expert_pass(const MoeSwigluBackwardParams& p,
                               const SwigluWeights<scalar_t>& weights_lora, cudaStream_t stream) {
  using acc_t = acc_of<scalar_t>;
  const int64_t Rz = p.grad_zd != nullptr ? p.Rd : 0;
  const int64_t max_rank = std::max({p.Rg, p.Ru, p.Rd});
  if (p.E == 0 || max_rank == 0 || p.I == 0) return cudaSuccess;  // no weight grad to write
  if constexpr (std::is_same_v<scalar_t, __nv_bfloat16>) {
    if (wgrad_mma_supported(p)) {  // tensor cores (swiglu_wgrad_mma_kernels.cu)
      const int64_t splits = wgrad_mma_splits(p);
      const cudaError_t err = launch_moe_swiglu_wgrad_mma(p, splits, stream);
      if (err != cudaSuccess || splits == 1) return err;
      return launch_sum_splits<scalar_t>(p, splits, stream);
    }
  }
  const unsigned col_tiles = static_cast<unsigned>((p.I + kExpertCols - 1) / kExpertCols);
  if (fast_expert_pass(p)) {
    const int64_t splits = expert_splits(p);
    const size_t smem = 2 * (sizeof(acc_t) * 3 * kFastChunk * kFastRanks +
                             sizeof(scalar_t) * 3 * kFastChunk * kExpertCols);
    const dim3 grid(col_tiles, static_cast<unsigned>(p.E), static_cast<unsigned>(splits));
    const cudaError_t err = [&](auto kernel) {
      const cudaError_t attr = allow_dynamic_smem(kernel, smem);
      if (attr != cudaSuccess) return attr;
      kernel<<<grid, kExpertCols, smem, stream>>>(p, weights_lora, splits);
      MIXLORA_RETURN_IF_LAUNCH_FAILED();
      return cudaSuccess;
    }(sizeof(scalar_t) == 2 && p.activation == kSilu
          ? moe_swiglu_bwd_expert_fast_kernel<scalar_t, sizeof(scalar_t) == 2 ? kSilu : kAnyActivation>
          : moe_swiglu_bwd_expert_fast_kernel<scalar_t, kAnyActivation>);
    if (err != cudaSuccess || splits == 1) return err;
    return launch_sum_splits<scalar_t>(p, splits, stream);
  }
  const size_t smem = sizeof(acc_t) * kPairChunk * (p.Rg + p.Ru + Rz) +
                      sizeof(scalar_t) * 3 * kPairChunk * kExpertCols;
  const auto kernel = moe_swiglu_bwd_expert_kernel<scalar_t>;
  const cudaError_t attr = allow_dynamic_smem(kernel, smem);
  if (attr != cudaSuccess) return attr;
  const dim3 grid(col_tiles, static_cast<unsigned>(p.E),
                  static_cast<unsigned>((max_rank + kExpertRanks - 1) / kExpertRanks));
  kernel<<<grid, kExpertCols, smem, stream>>>(p, weights_lora);
  MIXLORA_RETURN_IF_LAUNCH_FAILED();
  return cudaSuccess;
}

}  // namespace

bool moe_swiglu_needs_rank_major(const MoeSwigluParams& p) { return !mma_forward_supported(p); }

int64_t moe_swiglu_workspace_elems(const MoeSwigluParams& p) {
  if (mma_forward_supported(p)) {
    const int64_t tiles = mma_column_tiles(p.T, p.k, p.I);
    return tiles > 1 ? p.T * p.k * p.Rd * tiles : 0;
  }
  int64_t elems = 0;
  dispatch_dtype(p.dtype, [&](auto zero) {
    using scalar_t = decltype(zero);
    const int64_t tiles = num_column_tiles(p.I, forward_width<scalar_t>(p));
    elems = tiles > 1 ? p.T * p.k * p.Rd * tiles : 0;
    return cudaSuccess;
  });
  return elems;
}

// Pass 1's tile sums are done (same stream) before pass 2 writes its partials: one workspace.
int64_t moe_swiglu_backward_workspace_elems(const MoeSwigluBackwardParams& p) {
  int64_t elems = 0;
  dispatch_dtype(p.dtype, [&](auto zero) {
    using scalar_t = decltype(zero);
    const int64_t tiles = mma_backward_supported(p) ? mma_column_tiles(p.T, p.k, p.I)
                                                    : num_column_tiles(p.I, backward_width<scalar_t>(p));
    elems = tiles > 1 && p.T > 0 ? p.T * p.k * (1 + p.Rg + p.Ru) * tiles : 0;
    return cudaSuccess;
  });
  const bool pass2 = p.E > 0 && std::max({p.Rg, p.Ru, p.Rd}) > 0 && p.I > 0;
  const int64_t pass2_elems = !pass2                   ? 0
                              : wgrad_mma_supported(p) ? wgrad_mma_workspace_elems(p)
                                                       : expert_workspace_elems(p);
  return std::max(elems, pass2_elems);
}

bool moe_swiglu_backward_needs_rank_major(const MoeSwigluBackwardParams& p) {
  return !(mma_backward_supported(p) && wgrad_mma_supported(p));
}

cudaError_t launch_moe_swiglu(const MoeSwigluParams& p, cudaStream_t stream) {
  if (p.T == 0) return cudaSuccess;
  if (mma_forward_supported(p)) {
    const TileSums<float> dst{
        {{static_cast<float*>(p.zd), nullptr, nullptr}, {p.Rd, 0, 0}, {1, 0, 0}, p.Rd},
        static_cast<float*>(p.workspace),
        mma_column_tiles(p.T, p.k, p.I),
        p.T * p.k};
    const cudaError_t err = launch_moe_swiglu_mma(p, dst.num_tiles > 1 ? dst.workspace : dst.sums.out[0], stream);
    if (err != cudaSuccess) return err;
    return launch_sum_tiles(dst, stream);
  }
  return dispatch_dtype(p.dtype, [&](auto zero) {
    using scalar_t = decltype(zero);
    using acc_t = acc_of<scalar_t>;
    const int V = forward_width<scalar_t>(p);
    const TileSums<acc_t> dst{
        {{static_cast<acc_t*>(p.zd), nullptr, nullptr}, {p.Rd, 0, 0}, {1, 0, 0}, p.Rd},
        static_cast<acc_t*>(p.workspace),
        num_column_tiles(p.I, V),
        p.T * p.k};
    const dim3 grid = token_grid(p.T, dst.num_tiles);
    const cudaError_t err = with_width<scalar_t>(V, [&](auto width) {
      const auto kernel = moe_swiglu_kernel<scalar_t, decltype(width)::value>;
      kernel<<<grid, kTileThreads, 0, stream>>>(p, swiglu_weights<scalar_t>(p), dst);
      MIXLORA_RETURN_IF_LAUNCH_FAILED();
      return cudaSuccess;
    });
    if (err != cudaSuccess) return err;
    return launch_sum_tiles(dst, stream);
  });
}

cudaError_t launch_moe_swiglu_backward(const MoeSwigluBackwardParams& p, cudaStream_t stream) {
  return dispatch_dtype(p.dtype, [&](auto zero) {
    using scalar_t = decltype(zero);
    const SwigluWeights<scalar_t> weights_lora = swiglu_weights<scalar_t>(p);
    // Without tokens pass 1 has nothing to do; pass 2 still writes the (zero) weight grads.
    const cudaError_t err = p.T > 0 ? launch_token_pass(p, weights_lora, stream) : cudaSuccess;
    if (err != cudaSuccess) return err;
    return launch_expert_pass(p, weights_lora, stream);
  });
}

}  // namespace cuda
}  // namespace mixlora
