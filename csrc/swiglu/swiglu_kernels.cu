// CUDA kernels of the fused expert SwiGLU and combine (docs/design.md, "Fused expert SwiGLU").
//
// Token-major kernels (forward, and the first backward pass): block (t, column tile) owns
// kSwigluThreads * V columns of token t, V consecutive ones per thread, and visits the token's
// k pairs in j order, recomputing g, u, h of each pair on its columns in registers; nothing of
// size [T, k, I] touches memory. Per-pair sums over the columns (zd; dweights, dzg, dzu) are
// added in a fixed tree inside the block; with several column tiles each tile writes its sum to
// a workspace and a small kernel adds the tiles in order. No atomics, so two runs agree bit
// for bit.
//
// Expert-major kernel (second backward pass): block (column tile, expert e, rank tile) owns
// dBg[e, i, r], dBu[e, i, r], dAd[e, r, i] for its columns and ranks, and walks e's pairs in
// sorted order, recomputing what it needs: one sequential sum per element.
#include <algorithm>
#include <cassert>
#include <initializer_list>

#include "swiglu/swiglu_kernels.cuh"
#include "swiglu/swiglu_math.h"

namespace mixlora {
namespace cuda {
namespace {

constexpr int kSwigluThreads = 256;
constexpr int kSwigluWarps = kSwigluThreads / kWarpSize;
constexpr int kExpertCols = 128;  // columns (one per thread) of an expert-major block
constexpr int kExpertRanks = 16;  // ranks of an expert-major block (its accumulators)
constexpr int kPairChunk = 16;    // pairs whose LoRA activations are staged at once
constexpr int kSumThreads = 256;

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

// Where the per-pair sums of one column tile go: straight to the outputs when there is one tile,
// else to workspace [N, total, num_tiles] for sum_tiles_kernel.
template <typename acc_t>
struct TileSums {
  PairSums<acc_t> sums;
  acc_t* workspace;
  int64_t num_tiles;
};

// The block's sums of value(c), c < sums.total, for pair q: each warp adds its lanes
// (butterfly), then thread c adds the warps in order. warp_sums: shared [kSwigluWarps, total].
template <typename acc_t, typename Value>
__device__ __forceinline__ void block_pair_sums(const TileSums<acc_t>& dst, int64_t q,
                                                int64_t tile, acc_t* warp_sums, Value value) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int64_t total = dst.sums.total;
  for (int64_t c = 0; c < total; ++c) {
    const acc_t s = warp_sum(value(c));
    if (lane == 0) warp_sums[warp * total + c] = s;
  }
  __syncthreads();
  for (int64_t c = threadIdx.x; c < total; c += kSwigluThreads) {
    acc_t s = 0;
    for (int w = 0; w < kSwigluWarps; ++w) s += warp_sums[w * total + c];
    if (dst.num_tiles == 1) {
      dst.sums.store(q, c, s);
    } else {
      dst.workspace[(q * total + c) * dst.num_tiles + tile] = s;
    }
  }
  __syncthreads();  // warp_sums is rewritten by the next pair
}

// out = sum over tiles, in tile order, of the workspace: one thread per (pair, value).
template <typename acc_t>
__global__ void __launch_bounds__(kSumThreads) sum_tiles_kernel(TileSums<acc_t> src, int64_t N) {
  const int64_t count = N * src.sums.total;
  const int64_t stride = int64_t(gridDim.x) * kSumThreads;
  for (int64_t idx = int64_t(blockIdx.x) * kSumThreads + threadIdx.x; idx < count; idx += stride) {
    acc_t s = 0;
    for (int64_t tile = 0; tile < src.num_tiles; ++tile) s += src.workspace[idx * src.num_tiles + tile];
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

template <typename scalar_t, typename Params>
SwigluWeights<scalar_t> swiglu_weights(const Params& p) {
  return {static_cast<const scalar_t*>(p.Bg_t), static_cast<const scalar_t*>(p.Bu_t), p.I, p.Rg,
          p.Ru, static_cast<acc_of<scalar_t>>(p.scale), p.activation};
}

// g, u, act(g), h of a pair (expert e, LoRA activations zg, zu) at columns i0 .. i0 + V - 1
// from G, U there: g = G + s * (Bg[e] @ zg)[i] (just G without Bg), u likewise; swiglu_math.h
// does the rest, as on the CPU.
template <int V, typename scalar_t>
__device__ __forceinline__ void recompute(const SwigluWeights<scalar_t>& w, int64_t e, int64_t i0,
                                          const acc_of<scalar_t> (&G)[V],
                                          const acc_of<scalar_t> (&U)[V],
                                          const acc_of<scalar_t>* zg, const acc_of<scalar_t>* zu,
                                          SwigluPoint<acc_of<scalar_t>> (&pt)[V]) {
  using acc_t = acc_of<scalar_t>;
  acc_t dg[V], du[V];
  if (w.Bg_t != nullptr) rank_columns<V>(w.Bg_t + e * w.Rg * w.I, w.Rg, w.I, i0, zg, dg);
  if (w.Bu_t != nullptr) rank_columns<V>(w.Bu_t + e * w.Ru * w.I, w.Ru, w.I, i0, zu, du);
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

// Block (t, tile); thread columns i0 .. i0 + V - 1. hbar accumulates in registers over j;
// zd[q, r] = sum over the block's columns of Ad[e, r, i] * drop(h)[i] (block_pair_sums).
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kSwigluThreads)
    moe_swiglu_kernel(MoeSwigluParams p, SwigluWeights<scalar_t> weights_lora,
                      TileSums<acc_of<scalar_t>> dst) {
  using acc_t = acc_of<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  acc_t* zg = reinterpret_cast<acc_t*>(smem);  // [Rg] the current pair's
  acc_t* zu = zg + p.Rg;                       // [Ru]
  acc_t* warp_sums = zu + p.Ru;                // [kSwigluWarps, Rd]
  const int64_t t = blockIdx.x / dst.num_tiles, tile = blockIdx.x % dst.num_tiles;
  const int64_t i0 = (tile * kSwigluThreads + threadIdx.x) * V;
  const bool active = i0 < p.I;
  const scalar_t* Ad = static_cast<const scalar_t*>(p.Ad);  // [E, Rd, I] or null
  const acc_t* weights = static_cast<const acc_t*>(p.weights);
  const DropoutScale<acc_t> drop(p.dropout_p, p.key);
  acc_t G[V], U[V], hbar[V] = {};
  if (active) {
    load_acc<V>(static_cast<const scalar_t*>(p.G) + t * p.I + i0, G);
    load_acc<V>(static_cast<const scalar_t*>(p.U) + t * p.I + i0, U);
  }
  for (int64_t q = t * p.k; q < (t + 1) * p.k; ++q) {
    const int64_t e = p.ids[q];
    assert(e >= 0 && (p.E == 0 || e < p.E));
    const acc_t w = weights[q];
    __syncthreads();  // the previous pair's readers of zg, zu are done
    stage(zg, static_cast<const acc_t*>(p.zg) + q * p.Rg, p.Rg);
    stage(zu, static_cast<const acc_t*>(p.zu) + q * p.Ru, p.Ru);
    __syncthreads();
    acc_t h_drop[V] = {};  // drop_q(h) on the thread's columns
    if (active) {
      SwigluPoint<acc_t> pt[V];
      recompute<V>(weights_lora, e, i0, G, U, zg, zu, pt);
#pragma unroll
      for (int v = 0; v < V; ++v) {
        hbar[v] += w * pt[v].h;
        h_drop[v] = drop.active ? drop.factor(q * p.I + i0 + v) * pt[v].h : pt[v].h;
      }
    }
    if (Ad != nullptr) {
      block_pair_sums(dst, q, tile, warp_sums, [&](int64_t r) {
        return active ? columns_dot<V>(Ad + (e * p.Rd + r) * p.I, i0, h_drop) : acc_t(0);
      });
    }
  }
  if (active) store_acc<V>(static_cast<scalar_t*>(p.hbar) + t * p.I + i0, hbar);
}

// ---------------------------------------------------------------------------------------------
// Backward, pass 1 (token-major): dG, dU, dweights, dzg, dzu
// ---------------------------------------------------------------------------------------------

// Block (t, tile); thread columns i0 .. i0 + V - 1. dG, dU accumulate in registers over j; the
// per-pair sums over columns (value c: 0 -> dweights, 1 .. Rg -> dzg / s, then dzu / s) go
// through block_pair_sums (the scale s is applied when stored).
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kSwigluThreads)
    moe_swiglu_bwd_token_kernel(MoeSwigluBackwardParams p, SwigluWeights<scalar_t> weights_lora,
                                TileSums<acc_of<scalar_t>> dst) {
  using acc_t = acc_of<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  const bool has_gzd = p.grad_zd != nullptr;
  const int64_t Rz = has_gzd ? p.Rd : 0;
  acc_t* zg = reinterpret_cast<acc_t*>(smem);  // [Rg]
  acc_t* zu = zg + p.Rg;                       // [Ru]
  acc_t* gzd = zu + p.Ru;                      // [Rz] grad_zd of the current pair
  acc_t* warp_sums = gzd + Rz;                 // [kSwigluWarps, 1 + Rg + Ru]
  const int64_t t = blockIdx.x / dst.num_tiles, tile = blockIdx.x % dst.num_tiles;
  const int64_t i0 = (tile * kSwigluThreads + threadIdx.x) * V;
  const bool active = i0 < p.I;
  const scalar_t* Ad = static_cast<const scalar_t*>(p.Ad);  // [E, Rd, I] or null
  const acc_t* weights = static_cast<const acc_t*>(p.weights);
  const DropoutScale<acc_t> drop(p.dropout_p, p.key);
  acc_t G[V], U[V], gh[V], dG[V] = {}, dU[V] = {};
  if (active) {
    load_acc<V>(static_cast<const scalar_t*>(p.G) + t * p.I + i0, G);
    load_acc<V>(static_cast<const scalar_t*>(p.U) + t * p.I + i0, U);
    load_acc<V>(static_cast<const scalar_t*>(p.grad_hbar) + t * p.I + i0, gh);
  }
  for (int64_t q = t * p.k; q < (t + 1) * p.k; ++q) {
    const int64_t e = p.ids[q];
    assert(e >= 0 && (p.E == 0 || e < p.E));
    const acc_t w = weights[q];
    __syncthreads();  // the previous pair's readers of zg, zu, gzd are done
    stage(zg, static_cast<const acc_t*>(p.zg) + q * p.Rg, p.Rg);
    stage(zu, static_cast<const acc_t*>(p.zu) + q * p.Ru, p.Ru);
    stage(gzd, static_cast<const acc_t*>(p.grad_zd) + q * Rz, Rz);
    __syncthreads();
    acc_t dg[V] = {}, du[V] = {}, dw = 0;
    if (active) {
      acc_t ad_gz[V] = {};  // (Ad[e]^T @ grad_zd[q])[i], r ascending
      if (has_gzd) rank_columns<V>(Ad + e * p.Rd * p.I, Rz, p.I, i0, gzd, ad_gz);
      SwigluPoint<acc_t> pt[V];
      recompute<V>(weights_lora, e, i0, G, U, zg, zu, pt);
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
    block_pair_sums(dst, q, tile, warp_sums, [&](int64_t c) {
      if (!active) return acc_t(0);
      if (c == 0) return dw;
      if (c <= p.Rg) return columns_dot<V>(weights_lora.Bg_t + (e * p.Rg + c - 1) * p.I, i0, dg);
      return columns_dot<V>(weights_lora.Bu_t + (e * p.Ru + c - 1 - p.Rg) * p.I, i0, du);
    });
  }
  if (active) {
    store_acc<V>(static_cast<scalar_t*>(p.dG) + t * p.I + i0, dG);
    store_acc<V>(static_cast<scalar_t*>(p.dU) + t * p.I + i0, dU);
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
      recompute<1>(weights_lora, e, i, Gi, Ui, zg + c * p.Rg, zu + c * p.Ru, pts);
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

// ---------------------------------------------------------------------------------------------
// Launch helpers
// ---------------------------------------------------------------------------------------------

// V = kVec when the [T, I] rows (and the rank-major weights' rows) allow 16-byte access, else 1.
template <typename scalar_t>
int column_width(int64_t I, std::initializer_list<const void*> bases) {
  bool vec = I % kVec<scalar_t> == 0;
  for (const void* base : bases) vec = vec && aligned16(base);
  return vec ? kVec<scalar_t> : 1;
}

int64_t num_column_tiles(int64_t I, int V) {
  const int64_t cols = int64_t(kSwigluThreads) * V;
  return std::max<int64_t>(1, (I + cols - 1) / cols);  // one tile even when I == 0: sums of 0
}

template <typename acc_t>
cudaError_t launch_sum_tiles(const TileSums<acc_t>& tiles, int64_t N, cudaStream_t stream) {
  if (tiles.num_tiles == 1 || tiles.sums.total == 0) return cudaSuccess;
  const int64_t blocks =
      std::min<int64_t>((N * tiles.sums.total + kSumThreads - 1) / kSumThreads, 65536);
  sum_tiles_kernel<acc_t><<<static_cast<unsigned>(blocks), kSumThreads, 0, stream>>>(tiles, N);
  MIXLORA_RETURN_IF_LAUNCH_FAILED();
  return cudaSuccess;
}

// Calls launch(V) with V = kVec or 1 (an integral_constant) for the run-time width.
template <typename scalar_t, typename Launch>
cudaError_t with_width(int V, Launch&& launch) {
  if (V == kVec<scalar_t>) return launch(std::integral_constant<int, kVec<scalar_t>>{});
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

// Backward pass 1 (token-major), and the tile sums when I spans several column tiles.
template <typename scalar_t>
cudaError_t launch_token_pass(const MoeSwigluBackwardParams& p,
                              const SwigluWeights<scalar_t>& weights_lora, cudaStream_t stream) {
  using acc_t = acc_of<scalar_t>;
  const int64_t Rz = p.grad_zd != nullptr ? p.Rd : 0;
  const int V = backward_width<scalar_t>(p);
  const acc_t s = static_cast<acc_t>(p.scale);
  const TileSums<acc_t> dst{{{static_cast<acc_t*>(p.dweights), static_cast<acc_t*>(p.dzg),
                              static_cast<acc_t*>(p.dzu)},
                             {1, p.Rg, p.Ru},
                             {1, s, s},
                             1 + p.Rg + p.Ru},
                            static_cast<acc_t*>(p.workspace),
                            num_column_tiles(p.I, V)};
  const size_t smem = sizeof(acc_t) * (p.Rg + p.Ru + Rz + int64_t(kSwigluWarps) * dst.sums.total);
  const dim3 grid(static_cast<unsigned>(p.T * dst.num_tiles));
  const cudaError_t err = with_width<scalar_t>(V, [&](auto width) {
    const auto kernel = moe_swiglu_bwd_token_kernel<scalar_t, decltype(width)::value>;
    const cudaError_t attr = allow_dynamic_smem(kernel, smem);
    if (attr != cudaSuccess) return attr;
    kernel<<<grid, kSwigluThreads, smem, stream>>>(p, weights_lora, dst);
    MIXLORA_RETURN_IF_LAUNCH_FAILED();
    return cudaSuccess;
  });
  if (err != cudaSuccess) return err;
  return launch_sum_tiles(dst, p.T * p.k, stream);
}

// Backward pass 2 (expert-major): every element of dBg, dBu, dAd, zeros for empty experts.
template <typename scalar_t>
cudaError_t launch_expert_pass(const MoeSwigluBackwardParams& p,
                               const SwigluWeights<scalar_t>& weights_lora, cudaStream_t stream) {
  using acc_t = acc_of<scalar_t>;
  const int64_t Rz = p.grad_zd != nullptr ? p.Rd : 0;
  const int64_t max_rank = std::max({p.Rg, p.Ru, p.Rd});
  if (p.E == 0 || max_rank == 0 || p.I == 0) return cudaSuccess;  // no weight grad to write
  const size_t smem = sizeof(acc_t) * kPairChunk * (p.Rg + p.Ru + Rz) +
                      sizeof(scalar_t) * 3 * kPairChunk * kExpertCols;
  const auto kernel = moe_swiglu_bwd_expert_kernel<scalar_t>;
  const cudaError_t attr = allow_dynamic_smem(kernel, smem);
  if (attr != cudaSuccess) return attr;
  const dim3 grid(static_cast<unsigned>((p.I + kExpertCols - 1) / kExpertCols),
                  static_cast<unsigned>(p.E),
                  static_cast<unsigned>((max_rank + kExpertRanks - 1) / kExpertRanks));
  kernel<<<grid, kExpertCols, smem, stream>>>(p, weights_lora);
  MIXLORA_RETURN_IF_LAUNCH_FAILED();
  return cudaSuccess;
}

}  // namespace

int64_t moe_swiglu_workspace_elems(const MoeSwigluParams& p) {
  int64_t elems = 0;
  dispatch_dtype(p.dtype, [&](auto zero) {
    using scalar_t = decltype(zero);
    const int64_t tiles = num_column_tiles(p.I, forward_width<scalar_t>(p));
    elems = tiles > 1 ? p.T * p.k * p.Rd * tiles : 0;
    return cudaSuccess;
  });
  return elems;
}

int64_t moe_swiglu_backward_workspace_elems(const MoeSwigluBackwardParams& p) {
  int64_t elems = 0;
  dispatch_dtype(p.dtype, [&](auto zero) {
    using scalar_t = decltype(zero);
    const int64_t tiles = num_column_tiles(p.I, backward_width<scalar_t>(p));
    elems = tiles > 1 ? p.T * p.k * (1 + p.Rg + p.Ru) * tiles : 0;
    return cudaSuccess;
  });
  return elems;
}

cudaError_t launch_moe_swiglu(const MoeSwigluParams& p, cudaStream_t stream) {
  if (p.T == 0) return cudaSuccess;
  return dispatch_dtype(p.dtype, [&](auto zero) {
    using scalar_t = decltype(zero);
    using acc_t = acc_of<scalar_t>;
    const int V = forward_width<scalar_t>(p);
    const TileSums<acc_t> dst{
        {{static_cast<acc_t*>(p.zd), nullptr, nullptr}, {p.Rd, 0, 0}, {1, 0, 0}, p.Rd},
        static_cast<acc_t*>(p.workspace),
        num_column_tiles(p.I, V)};
    const size_t smem = sizeof(acc_t) * (p.Rg + p.Ru + int64_t(kSwigluWarps) * p.Rd);
    const dim3 grid(static_cast<unsigned>(p.T * dst.num_tiles));
    const cudaError_t err = with_width<scalar_t>(V, [&](auto width) {
      const auto kernel = moe_swiglu_kernel<scalar_t, decltype(width)::value>;
      const cudaError_t attr = allow_dynamic_smem(kernel, smem);
      if (attr != cudaSuccess) return attr;
      kernel<<<grid, kSwigluThreads, smem, stream>>>(p, swiglu_weights<scalar_t>(p), dst);
      MIXLORA_RETURN_IF_LAUNCH_FAILED();
      return cudaSuccess;
    });
    if (err != cudaSuccess) return err;
    return launch_sum_tiles(dst, p.T * p.k, stream);
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
