// CUDA kernels of expert_ffn's decode path (layer/decode_kernels.cuh has the plan).
#include <algorithm>
#include <cassert>

#include "gating/topk_warp.cuh"
#include "layer/decode_kernels.cuh"
#include "swiglu/swiglu_math.h"

namespace mixlora {
namespace cuda {
namespace {

constexpr int kShrinkWarps = 8;  // rows of a shrink block, one per warp
constexpr int kShrinkThreads = kShrinkWarps * kWarpSize;
constexpr int64_t kShrinkStep = kWarpSize * 4;  // columns of H a warp takes per step (4 a lane)
constexpr int64_t kShrinkMinSplit = 512;        // columns of H per split, at least
constexpr int64_t kShrinkMaxSplits = 8;
constexpr int64_t kShrinkTargetBlocks = 256;    // ~2 per SM of an H100 (132)
constexpr int kSwigluThreads = 128;  // columns of a swiglu block, one per thread
constexpr int kSwigluWarps = kSwigluThreads / kWarpSize;
constexpr int kExpandThreads = 128;  // columns of an expand block, one per thread
constexpr int kExpandMaxParts = 8;   // threads that share one zd value's sum over the tiles
constexpr int kRankChunk = 16;       // weights loaded together (in flight at once) per rank loop

// Where the workspace's pieces are, and the grids' sizes (launch_all sets them).
struct Layout {
  float* weights;     // [T, k]: the routing weights
  float* part;        // [splits, T, rows]: the shrink's partial sums
  float* zd_partial;  // [tiles, T, k, Rd]: the swiglu tiles' partial sums
  int64_t rows;       // E router rows, then E * Rg gate rows, then E * Ru up rows
  int64_t splits;     // of H, by the shrink
  int64_t split_cols; // columns of H per split (a multiple of kShrinkStep)
  int64_t tiles;      // column tiles of I, by swiglu
};

Layout layout_of(const DecodeParams& p) {
  Layout l{};
  l.rows = p.E * (1 + p.Rg + p.Ru);
  const int64_t row_blocks = (l.rows + kShrinkWarps - 1) / kShrinkWarps;
  const int64_t max_splits = std::max<int64_t>(1, std::min(kShrinkMaxSplits, p.H / kShrinkMinSplit));
  l.splits = std::clamp<int64_t>((kShrinkTargetBlocks + row_blocks - 1) / row_blocks, 1, max_splits);
  const int64_t cols = (p.H + l.splits - 1) / l.splits;
  l.split_cols = (cols + kShrinkStep - 1) / kShrinkStep * kShrinkStep;
  l.splits = (p.H + l.split_cols - 1) / l.split_cols;  // none empty after the rounding
  l.tiles = (p.I + kSwigluThreads - 1) / kSwigluThreads;
  return l;
}

int64_t workspace_floats(const DecodeParams& p, const Layout& l) {
  return p.T * p.k + l.splits * p.T * l.rows + l.tiles * p.T * p.k * p.Rd;
}

// One value as float (read-only data).
__device__ __forceinline__ float load_f(const float* p) { return __ldg(p); }
__device__ __forceinline__ float load_f(const __nv_bfloat16* p) { return to_acc(__ldg(p)); }
__device__ __forceinline__ float load_f(const __half* p) { return to_acc(__ldg(p)); }

// Four consecutive values as float: one 16-byte (float) or 8-byte (2-byte types) load, p
// aligned to four elements.
__device__ __forceinline__ void load4(const float* p, float (&v)[4]) {
  const float4 raw = __ldg(reinterpret_cast<const float4*>(p));
  v[0] = raw.x, v[1] = raw.y, v[2] = raw.z, v[3] = raw.w;
}
template <typename half_t>
__device__ __forceinline__ void load4(const half_t* p, float (&v)[4]) {
  const uint2 raw = __ldg(reinterpret_cast<const uint2*>(p));
  const half_t* e = reinterpret_cast<const half_t*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) v[i] = to_acc(e[i]);
}

// w[v] = p[v] for v < min(left, kRankChunk), 0 beyond: kRankChunk weights loaded together (in
// flight at once; at a few tokens these kernels wait on memory, not arithmetic). vec: p aligned
// to 16 bytes and left % 4 == 0.
template <typename w_t>
__device__ __forceinline__ void load_chunk(const w_t* p, int64_t left, bool vec, float (&w)[kRankChunk]) {
  if (vec) {
#pragma unroll
    for (int q = 0; q < kRankChunk / 4; ++q) {
      float v4[4] = {0.f, 0.f, 0.f, 0.f};
      if (4 * q < left) load4(p + 4 * q, v4);
#pragma unroll
      for (int v = 0; v < 4; ++v) w[4 * q + v] = v4[v];
    }
  } else {
#pragma unroll
    for (int v = 0; v < kRankChunk; ++v) w[v] = v < left ? load_f(p + v) : 0.f;
  }
}

// sum_r row[r] * z[r], r ascending (the order of the composed path's rank_cols): one thread's
// row of R contiguous weights, a chunk at a time. vec: R % 4 == 0 and row aligned to 16 bytes.
template <typename w_t>
__device__ __forceinline__ float row_dot(const w_t* row, const float* z, int64_t R, bool vec) {
  float sum = 0;
  for (int64_t r0 = 0; r0 < R; r0 += kRankChunk) {
    float w[kRankChunk];
    load_chunk(row + r0, R - r0, vec, w);
#pragma unroll
    for (int v = 0; v < kRankChunk; ++v) {
      if (r0 + v < R) sum += w[v] * z[r0 + v];
    }
  }
  return sum;
}

// Rows of R weights from base can be read four at a time.
__device__ __forceinline__ bool vec_rows(const void* base, int64_t R) {
  return R % 4 == 0 && aligned16(base);
}

// One step of warp_reduce_scatter16: lanes l and l ^ (2 kHalf) swap halves of v[0 .. 2 kHalf);
// the lane with that bit set keeps the upper half, summed with its partner's, in v[0 .. kHalf).
template <int kHalf>
__device__ __forceinline__ void reduce_scatter_step(float (&v)[16], int lane) {
  const bool upper = lane & (2 * kHalf);
#pragma unroll
  for (int q = 0; q < kHalf; ++q) {
    const float lo = v[q], hi = v[q + kHalf];
    v[q] = (upper ? hi : lo) + __shfl_xor_sync(kFullMask, upper ? lo : hi, 2 * kHalf);
  }
}

// The warp's sums of 16 values at once: v[m] summed over the 32 lanes for every m, in 16
// shuffles (a sum per value, warp_sum, takes 80). Each step halves the values a lane keeps,
// adding its partner's half (lanes l and l ^ 16 swap halves, then l ^ 8, l ^ 4, l ^ 2; then
// l ^ 1 adds the last one); lane l ends with the sum of v[(l >> 1) & 15] (lanes 2m and 2m + 1
// both hold value m's). A fixed pairing, so the result does not depend on scheduling.
__device__ __forceinline__ float warp_reduce_scatter16(float (&v)[16]) {
  const int lane = threadIdx.x % kWarpSize;
  reduce_scatter_step<8>(v, lane);
  reduce_scatter_step<4>(v, lane);
  reduce_scatter_step<2>(v, lane);
  reduce_scatter_step<1>(v, lane);
  return v[0] + __shfl_xor_sync(kFullMask, v[0], 1);
}

// The tile's partial sums zd[r] = sum_i ad[r * I] h over the warp's 32 columns, r < Rd: Rd / 16
// chunks of Ad loaded together, each chunk's products reduced by warp_reduce_scatter16; lane 2m
// writes rank r0 + m's sum to out[r0 + m]. Every lane of the warp calls it (inactive columns:
// active false).
template <typename w_t>
__device__ __forceinline__ void zd_warp_sums(const w_t* ad, int64_t I, int64_t Rd, bool active,
                                             float h, float* out) {
  static_assert(kRankChunk == 16, "one warp_reduce_scatter16 per chunk");
  const int lane = threadIdx.x % kWarpSize;
  for (int64_t r0 = 0; r0 < Rd; r0 += kRankChunk) {
    float a[kRankChunk];  // loaded together, then reduced
#pragma unroll
    for (int v = 0; v < kRankChunk; ++v) a[v] = active && r0 + v < Rd ? load_f(ad + (r0 + v) * I) * h : 0.f;
    const float s = warp_reduce_scatter16(a);
    const int64_t r = r0 + lane / 2;
    if (lane % 2 == 0 && r < Rd) out[r] = s;
  }
}

// sum_s part[s * stride], s ascending over the shrink's splits: the loads issued together (a
// loop with a run-time trip count would wait for each before the next).
__device__ __forceinline__ float sum_splits(const float* part, int64_t stride, int64_t splits) {
  float v[kShrinkMaxSplits];
#pragma unroll
  for (int s = 0; s < kShrinkMaxSplits; ++s) v[s] = s < splits ? part[s * stride] : 0.f;
  float sum = 0;
#pragma unroll
  for (int s = 0; s < kShrinkMaxSplits; ++s) {
    if (s < splits) sum += v[s];
  }
  return sum;
}

// acc[t] += row[c0 .. c1) . x[t, c0 .. c1) for every token: the warp's lanes take 4 columns
// each per step, the row's values loaded once for all tokens (x's few rows stay in L1).
template <typename scalar_t, typename a_t>
__device__ __forceinline__ void shrink_row(const DecodeParams& p, const a_t* row, int64_t c0,
                                           int64_t c1, bool vec, float (&acc)[kDecodeMaxTokens]) {
  const int lane = threadIdx.x % kWarpSize;
  const scalar_t* x = static_cast<const scalar_t*>(p.x);
  if (vec) {
#pragma unroll 2
    for (int64_t c = c0 + lane * 4; c < c1; c += kShrinkStep) {
      float a[4];
      load4(row + c, a);
#pragma unroll
      for (int t = 0; t < kDecodeMaxTokens; ++t) {
        if (t < p.T) {
          float xv[4];
          load4(x + t * p.H + c, xv);
#pragma unroll
          for (int v = 0; v < 4; ++v) acc[t] += a[v] * xv[v];
        }
      }
    }
  } else {
    for (int64_t c = c0 + lane; c < c1; c += kWarpSize) {
      const float a = load_f(row + c);
#pragma unroll
      for (int t = 0; t < kDecodeMaxTokens; ++t) {
        if (t < p.T) acc[t] += a * load_f(x + t * p.H + c);
      }
    }
  }
}

// Block (8 rows, split s of H); warp w row 8 blockIdx.x + w: the router's row e (e < E), else
// a row of Ag or Au (every expert's). part[s, t, row] = row[split] . x[t, split] for all t.
template <typename scalar_t, typename w_t>
__global__ void __launch_bounds__(kShrinkThreads) decode_shrink_kernel(DecodeParams p, Layout l) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int64_t row = int64_t(blockIdx.x) * kShrinkWarps + warp;
  if (row >= l.rows) return;
  const int64_t s = blockIdx.y;
  const int64_t c0 = s * l.split_cols, c1 = c0 + l.split_cols < p.H ? c0 + l.split_cols : p.H;
  const bool vec_x = p.H % 4 == 0 && aligned16(p.x);
  float acc[kDecodeMaxTokens];
#pragma unroll
  for (int t = 0; t < kDecodeMaxTokens; ++t) acc[t] = 0;
  const int64_t gate_rows = p.E * p.Rg;
  if (row < p.E) {
    shrink_row<scalar_t>(p, p.router + row * p.H, c0, c1, vec_x && aligned16(p.router), acc);
  } else if (row < p.E + gate_rows) {
    const w_t* A = static_cast<const w_t*>(p.Ag);
    shrink_row<scalar_t>(p, A + (row - p.E) * p.H, c0, c1, vec_x && aligned16(A), acc);
  } else {
    const w_t* A = static_cast<const w_t*>(p.Au);
    shrink_row<scalar_t>(p, A + (row - p.E - gate_rows) * p.H, c0, c1, vec_x && aligned16(A), acc);
  }
  float* out = l.part + s * p.T * l.rows + row;
  if (p.T <= 3) {  // a butterfly per token: 5 T shuffles
#pragma unroll
    for (int t = 0; t < 3; ++t) {
      if (t < p.T) {
        const float sum = warp_sum(acc[t]);
        if (lane == 0) out[t * l.rows] = sum;
      }
    }
  } else {  // all 16 at once: 16 shuffles, lane 2t ends with token t's sum
    static_assert(kDecodeMaxTokens == 16, "one warp_reduce_scatter16 for the tokens' sums");
    const float sum = warp_reduce_scatter16(acc);
    const int64_t t = lane / 2;
    if (lane % 2 == 0 && t < p.T) out[t * l.rows] = sum;
  }
}

// Block (column tile, token t); thread column i. First the routing of t and the LoRA
// activations of its chosen experts, from the shrink's partials (splits in order). Then
// g = G + s Bg[e, i, :] . zg (G without Bg), u likewise, h = act(g) u per pair (swiglu_math.h,
// as the composed path's kernels), hbar = sum_j w_j h_j; the tile's share of zd[t, j, r] =
// sum_i Ad[e, r, i] h_j[i]: over the warp (zd_warp_sums), then over the block's warps in order.
template <typename scalar_t, typename w_t>
__global__ void __launch_bounds__(kSwigluThreads) decode_swiglu_kernel(DecodeParams p, Layout l) {
  __shared__ float logits[kDecodeMaxExperts];
  __shared__ float zs[kDecodeMaxSlots * 2 * kDecodeMaxRank];
  __shared__ float ws[kDecodeMaxSlots];
  __shared__ int32_t es[kDecodeMaxSlots];
  __shared__ float warp_sums[kSwigluWarps][kDecodeMaxSlots * kDecodeMaxRank];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int64_t tile = blockIdx.x, t = blockIdx.y;
  const int64_t Rz = p.Rg + p.Ru;
  const float* part = l.part + t * l.rows;  // part[s * split_stride + row] for this token
  const int64_t split_stride = p.T * l.rows;
  auto summed = [&](int64_t row) { return sum_splits(part + row, split_stride, l.splits); };
  const int64_t i = tile * kSwigluThreads + threadIdx.x;
  const bool active = i < p.I;
  // G and U do not depend on the routing: in flight while it runs.
  const float G = active ? load_f(static_cast<const scalar_t*>(p.G) + t * p.I + i) : 0.f;
  const float U = active ? load_f(static_cast<const scalar_t*>(p.U) + t * p.I + i) : 0.f;
  if (warp == 0) {
    static_assert(kDecodeMaxExperts <= 2 * kWarpSize, "two cached experts per lane");
    for (int64_t e = lane; e < p.E; e += kWarpSize) logits[e] = summed(e);
    __syncwarp();
    const bool writer = tile == 0;
    warp_softmax_topk<2>(
        p.E, p.k, [&](int64_t e) { return logits[e]; }, writer ? p.probs + t * p.E : nullptr, es, ws);
    __syncwarp();
    if (writer && lane < p.k) {
      p.ids[t * p.k + lane] = es[lane];
      l.weights[t * p.k + lane] = ws[lane];
    }
  }
  __syncthreads();
  const w_t* Bg = static_cast<const w_t*>(p.Bg);
  const w_t* Bu = static_cast<const w_t*>(p.Bu);
  const w_t* Ad = static_cast<const w_t*>(p.Ad);
  for (int64_t idx = threadIdx.x; idx < p.k * Rz; idx += kSwigluThreads) {
    const int64_t j = idx / Rz, c = idx % Rz, e = es[j];
    zs[idx] = summed(c < p.Rg ? p.E + e * p.Rg + c : p.E + p.E * p.Rg + e * p.Ru + (c - p.Rg));
  }
  __syncthreads();
  const bool vec_g = vec_rows(Bg, p.Rg), vec_u = vec_rows(Bu, p.Ru);
  float hbar = 0;
  for (int64_t j = 0; j < p.k; ++j) {
    const int64_t e = es[j];
    assert(e >= 0 && e < p.E);
    float h = 0;
    if (active) {
      float g = G, u = U;
      if (Bg != nullptr) g += p.scale * row_dot(Bg + (e * p.I + i) * p.Rg, zs + j * Rz, p.Rg, vec_g);
      if (Bu != nullptr) u += p.scale * row_dot(Bu + (e * p.I + i) * p.Ru, zs + j * Rz + p.Rg, p.Ru, vec_u);
      h = swiglu_point<float, float>(p.activation, p.scale, g, u, nullptr, nullptr, 0, nullptr,
                                     nullptr, 0).h;
      hbar += ws[j] * h;
    }
    if (Ad != nullptr) zd_warp_sums(Ad + e * p.Rd * p.I + i, p.I, p.Rd, active, h, warp_sums[warp] + j * p.Rd);
  }
  if (active) static_cast<scalar_t*>(p.hbar)[t * p.I + i] = from_acc<scalar_t>(hbar);
  if (Ad == nullptr) return;
  __syncthreads();
  for (int64_t idx = threadIdx.x; idx < p.k * p.Rd; idx += kSwigluThreads) {
    float s = 0;
#pragma unroll
    for (int w = 0; w < kSwigluWarps; ++w) s += warp_sums[w][idx];
    l.zd_partial[(tile * p.T + t) * p.k * p.Rd + idx] = s;
  }
}

// Block (column tile of H, token t); thread column h. zd[t] = the swiglu tiles' partials summed
// in a fixed order (part m of the threads of a value takes tiles m, m + parts, ...; then the
// parts in order), then y[t, h] = sum_j (w_j s) Bd[e_j, h, :] . zd[t, j, :].
template <typename scalar_t, typename w_t>
__global__ void __launch_bounds__(kExpandThreads) decode_expand_kernel(DecodeParams p, Layout l) {
  __shared__ float sums[kExpandMaxParts][kDecodeMaxSlots * kDecodeMaxRank];
  __shared__ float zd[kDecodeMaxSlots * kDecodeMaxRank];
  __shared__ float coef[kDecodeMaxSlots];
  __shared__ int32_t es[kDecodeMaxSlots];
  const int64_t t = blockIdx.y;
  const int64_t n = p.k * p.Rd;  // zd values of the token
  const int64_t fit = kExpandThreads / n;  // n >= 1 (Bd present)
  const int parts = static_cast<int>(fit < 1 ? 1 : fit > kExpandMaxParts ? kExpandMaxParts : fit);
  for (int64_t idx = threadIdx.x; idx < n * parts; idx += kExpandThreads) {
    const int64_t v = idx % n, m = idx / n;
    float s = 0;
#pragma unroll 8
    for (int64_t tile = m; tile < l.tiles; tile += parts) s += l.zd_partial[(tile * p.T + t) * n + v];
    sums[m][v] = s;
  }
  if (threadIdx.x < p.k) {
    coef[threadIdx.x] = l.weights[t * p.k + threadIdx.x] * p.scale;
    es[threadIdx.x] = p.ids[t * p.k + threadIdx.x];
  }
  __syncthreads();
  for (int64_t v = threadIdx.x; v < n; v += kExpandThreads) {
    float s = 0;
    for (int m = 0; m < parts; ++m) s += sums[m][v];
    zd[v] = s;
  }
  __syncthreads();
  const int64_t h = int64_t(blockIdx.x) * kExpandThreads + threadIdx.x;
  if (h >= p.H) return;
  const w_t* Bd = static_cast<const w_t*>(p.Bd);
  const bool vec = vec_rows(Bd, p.Rd);
  float y = 0;
  for (int64_t j = 0; j < p.k; ++j) {
    y += coef[j] * row_dot(Bd + (es[j] * p.H + h) * p.Rd, zd + j * p.Rd, p.Rd, vec);
  }
  static_cast<scalar_t*>(p.y)[t * p.H + h] = from_acc<scalar_t>(y);
}

Layout workspace_layout(const DecodeParams& p) {
  Layout l = layout_of(p);
  l.weights = p.workspace;
  l.part = l.weights + p.T * p.k;
  l.zd_partial = l.part + l.splits * p.T * l.rows;
  return l;
}

template <typename scalar_t, typename w_t>
cudaError_t launch_shrink(const DecodeParams& p, cudaStream_t stream) {
  const Layout l = workspace_layout(p);
  const dim3 grid(static_cast<unsigned>((l.rows + kShrinkWarps - 1) / kShrinkWarps),
                  static_cast<unsigned>(l.splits));
  decode_shrink_kernel<scalar_t, w_t><<<grid, kShrinkThreads, 0, stream>>>(p, l);
  MIXLORA_RETURN_IF_LAUNCH_FAILED();
  return cudaSuccess;
}

template <typename scalar_t, typename w_t>
cudaError_t launch_swiglu_expand(const DecodeParams& p, cudaStream_t stream) {
  const Layout l = workspace_layout(p);
  const dim3 grid(static_cast<unsigned>(l.tiles), static_cast<unsigned>(p.T));
  decode_swiglu_kernel<scalar_t, w_t><<<grid, kSwigluThreads, 0, stream>>>(p, l);
  MIXLORA_RETURN_IF_LAUNCH_FAILED();
  if (p.Bd == nullptr) return cudaSuccess;
  const dim3 expand_grid(static_cast<unsigned>((p.H + kExpandThreads - 1) / kExpandThreads),
                         static_cast<unsigned>(p.T));
  decode_expand_kernel<scalar_t, w_t><<<expand_grid, kExpandThreads, 0, stream>>>(p, l);
  MIXLORA_RETURN_IF_LAUNCH_FAILED();
  return cudaSuccess;
}

template <typename T>
struct Type {
  using type = T;
};

// f(Type<scalar_t>{}, Type<w_t>{}) for p's dtypes (the weights in x's dtype, or float32).
template <typename F>
cudaError_t dispatch(const DecodeParams& p, F&& f) {
  const bool own = p.wdtype == p.dtype;
  switch (p.dtype) {
    case DType::kBFloat16:
      return own ? f(Type<__nv_bfloat16>{}, Type<__nv_bfloat16>{}) : f(Type<__nv_bfloat16>{}, Type<float>{});
    case DType::kFloat16:
      return own ? f(Type<__half>{}, Type<__half>{}) : f(Type<__half>{}, Type<float>{});
    default:
      return f(Type<float>{}, Type<float>{});
  }
}

}  // namespace

bool decode_supported(const DecodeParams& p) {
  const bool dtype_ok = p.dtype == DType::kBFloat16 || p.dtype == DType::kFloat16 ||
                        p.dtype == DType::kFloat32;
  if (!dtype_ok || (p.wdtype != DType::kFloat32 && p.wdtype != p.dtype)) return false;
  if (p.T < 1 || p.T > kDecodeMaxTokens || p.H < 1 || p.I < 1) return false;
  if (p.E < 1 || p.E > kDecodeMaxExperts || p.k < 1 || p.k > std::min(p.E, kDecodeMaxSlots)) return false;
  if (std::max({p.Rg, p.Ru, p.Rd}) > kDecodeMaxRank) return false;
  // Each LoRA whole or absent: A with its B (the ranks are the glue's to check).
  if ((p.Ag == nullptr) != (p.Bg == nullptr) || (p.Au == nullptr) != (p.Bu == nullptr) ||
      (p.Ad == nullptr) != (p.Bd == nullptr)) {
    return false;
  }
  const Layout l = layout_of(p);
  return l.tiles <= 65535 && (l.rows + kShrinkWarps - 1) / kShrinkWarps <= 65535;
}

int64_t decode_workspace_floats(const DecodeParams& p) { return workspace_floats(p, layout_of(p)); }

cudaError_t launch_decode_shrink(const DecodeParams& p, cudaStream_t stream) {
  if (!decode_supported(p)) return cudaErrorInvalidValue;
  return dispatch(p, [&](auto s, auto w) {
    return launch_shrink<typename decltype(s)::type, typename decltype(w)::type>(p, stream);
  });
}

cudaError_t launch_decode_swiglu_expand(const DecodeParams& p, cudaStream_t stream) {
  if (!decode_supported(p)) return cudaErrorInvalidValue;
  return dispatch(p, [&](auto s, auto w) {
    return launch_swiglu_expand<typename decltype(s)::type, typename decltype(w)::type>(p, stream);
  });
}

}  // namespace cuda
}  // namespace mixlora
