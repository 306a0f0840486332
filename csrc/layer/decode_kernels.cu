// CUDA kernels of expert_ffn's decode path (layer/decode_kernels.cuh has the plan).
#include <algorithm>
#include <cassert>

#include "gating/topk_warp.cuh"
#include "layer/decode_kernels.cuh"
#include "swiglu/swiglu_math.h"

namespace mixlora {
namespace cuda {
namespace {

constexpr int kRouteWarps = 8;  // LoRA activations per route block, one warp each
constexpr int kRouteThreads = kRouteWarps * kWarpSize;
constexpr int kSwigluThreads = 128;  // columns of a swiglu block, one per thread
constexpr int kSwigluWarps = kSwigluThreads / kWarpSize;
constexpr int kExpandThreads = 128;  // columns of an expand block, one per thread

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

// a . b over n elements by the whole warp (lane-strided, then the butterfly); every lane ends
// with the sum. vec4: n % 4 == 0 and a, b aligned to 16 bytes.
template <typename a_t, typename b_t>
__device__ __forceinline__ float warp_dot(const a_t* a, const b_t* b, int64_t n, bool vec4) {
  const int lane = threadIdx.x % kWarpSize;
  float sum = 0;
  if (vec4) {
#pragma unroll 4
    for (int64_t i = int64_t(lane) * 4; i < n; i += kWarpSize * 4) {
      float av[4], bv[4];
      load4(a + i, av);
      load4(b + i, bv);
#pragma unroll
      for (int v = 0; v < 4; ++v) sum += av[v] * bv[v];
    }
  } else {
    for (int64_t i = lane; i < n; i += kWarpSize) sum += load_f(a + i) * load_f(b + i);
  }
  return warp_sum(sum);
}

// sum_r row[r] * z[r], r ascending (the order of the composed path's rank_cols): one thread's
// row of R contiguous weights. vec4: R % 4 == 0 and row aligned to 16 bytes.
template <typename w_t>
__device__ __forceinline__ float row_dot(const w_t* row, const float* z, int64_t R, bool vec4) {
  float sum = 0;
  if (vec4) {
    for (int64_t r = 0; r < R; r += 4) {
      float w[4];
      load4(row + r, w);
#pragma unroll
      for (int v = 0; v < 4; ++v) sum += w[v] * z[r + v];
    }
  } else {
    for (int64_t r = 0; r < R; ++r) sum += load_f(row + r) * z[r];
  }
  return sum;
}

template <typename w_t>
__device__ __forceinline__ bool vec_rows(const void* base, int64_t R) {
  return R % 4 == 0 && aligned16(base);
}

// Block (token t, slot j, rank group): the routing of t (warp w sums the logits of experts
// w, w + 8, ...; warp 0 the softmax and top-k; block (t, 0, 0) writes probs, ids, weights),
// then warp w the LoRA activation c = 8 z + w of pair (t, j): gate ranks first, then up.
template <typename scalar_t, typename w_t>
__global__ void __launch_bounds__(kRouteThreads) decode_route_kernel(DecodeParams p) {
  __shared__ float logits[kDecodeMaxExperts];
  __shared__ int32_t pick_ids[kDecodeMaxSlots];
  __shared__ float pick_weights[kDecodeMaxSlots];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int64_t t = blockIdx.x, j = blockIdx.y;
  const scalar_t* x = static_cast<const scalar_t*>(p.x) + t * p.H;
  const bool vec_router = p.H % 4 == 0 && aligned16(p.x) && aligned16(p.router);
  for (int64_t e = warp; e < p.E; e += kRouteWarps) {
    const float s = warp_dot(x, p.router + e * p.H, p.H, vec_router);
    if (lane == 0) logits[e] = s;
  }
  __syncthreads();
  const bool writer = blockIdx.y == 0 && blockIdx.z == 0;
  if (warp == 0) {
    static_assert(kDecodeMaxExperts <= 2 * kWarpSize, "two cached experts per lane");
    warp_softmax_topk<2>(
        p.E, p.k, [&](int64_t e) { return logits[e]; }, writer ? p.probs + t * p.E : nullptr,
        pick_ids, pick_weights);
    __syncwarp();
    if (writer && lane < p.k) {
      p.ids[t * p.k + lane] = pick_ids[lane];
      p.weights[t * p.k + lane] = pick_weights[lane];
    }
  }
  __syncthreads();
  const int64_t Rz = p.Rg + p.Ru;
  const int64_t c = int64_t(blockIdx.z) * kRouteWarps + warp;
  if (c >= Rz) return;
  const int64_t e = pick_ids[j];
  const bool gate = c < p.Rg;
  const w_t* A = gate ? static_cast<const w_t*>(p.Ag) + (e * p.Rg + c) * p.H
                      : static_cast<const w_t*>(p.Au) + (e * p.Ru + c - p.Rg) * p.H;
  const bool vec_A = p.H % 4 == 0 && aligned16(p.x) && aligned16(gate ? p.Ag : p.Au);
  const float z = warp_dot(x, A, p.H, vec_A);
  if (lane == 0) p.z[(t * p.k + j) * Rz + c] = z;
}

// Block (column tile, token t); thread column i. g = G + s Bg[e, i, :] . zg (G without Bg),
// u likewise, h = act(g) u per pair (swiglu_math.h, as the composed path's kernels), hbar =
// sum_j w_j h_j; the tile's share of zd[t, j, r] = sum_i Ad[e, r, i] h_j[i]: over the warp
// (butterfly), then over the block's warps in order.
template <typename scalar_t, typename w_t>
__global__ void __launch_bounds__(kSwigluThreads) decode_swiglu_kernel(DecodeParams p) {
  __shared__ float zs[kDecodeMaxSlots * 2 * kDecodeMaxRank];
  __shared__ float ws[kDecodeMaxSlots];
  __shared__ int32_t es[kDecodeMaxSlots];
  __shared__ float warp_sums[kSwigluWarps][kDecodeMaxSlots * kDecodeMaxRank];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int64_t tile = blockIdx.x, t = blockIdx.y;
  const int64_t Rz = p.Rg + p.Ru;
  for (int64_t idx = threadIdx.x; idx < p.k * Rz; idx += kSwigluThreads) zs[idx] = p.z[t * p.k * Rz + idx];
  if (threadIdx.x < p.k) {
    ws[threadIdx.x] = p.weights[t * p.k + threadIdx.x];
    es[threadIdx.x] = p.ids[t * p.k + threadIdx.x];
  }
  __syncthreads();
  const w_t* Bg = static_cast<const w_t*>(p.Bg);
  const w_t* Bu = static_cast<const w_t*>(p.Bu);
  const w_t* Ad = static_cast<const w_t*>(p.Ad);
  const bool vec_g = vec_rows<w_t>(Bg, p.Rg), vec_u = vec_rows<w_t>(Bu, p.Ru);
  const int64_t i = tile * kSwigluThreads + threadIdx.x;
  const bool active = i < p.I;
  const float G = active ? load_f(static_cast<const scalar_t*>(p.G) + t * p.I + i) : 0.f;
  const float U = active ? load_f(static_cast<const scalar_t*>(p.U) + t * p.I + i) : 0.f;
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
    if (Ad != nullptr) {
      for (int64_t r = 0; r < p.Rd; ++r) {
        const float s = warp_sum(active ? load_f(Ad + (e * p.Rd + r) * p.I + i) * h : 0.f);
        if (lane == 0) warp_sums[warp][j * p.Rd + r] = s;
      }
    }
  }
  if (active) static_cast<scalar_t*>(p.hbar)[t * p.I + i] = from_acc<scalar_t>(hbar);
  if (Ad == nullptr) return;
  __syncthreads();
  for (int64_t idx = threadIdx.x; idx < p.k * p.Rd; idx += kSwigluThreads) {
    float s = 0;
#pragma unroll
    for (int w = 0; w < kSwigluWarps; ++w) s += warp_sums[w][idx];
    p.zd_partial[(tile * p.T + t) * p.k * p.Rd + idx] = s;
  }
}

// Block (column tile of H, token t); thread column h. zd[t] = the swiglu tiles' partials summed
// in tile order, then y[t, h] = sum_j (w_j s) Bd[e_j, h, :] . zd[t, j, :].
template <typename scalar_t, typename w_t>
__global__ void __launch_bounds__(kExpandThreads) decode_expand_kernel(DecodeParams p, int64_t tiles) {
  __shared__ float zd[kDecodeMaxSlots * kDecodeMaxRank];
  __shared__ float coef[kDecodeMaxSlots];
  __shared__ int32_t es[kDecodeMaxSlots];
  const int64_t t = blockIdx.y;
  const int64_t pair_values = p.k * p.Rd;
  for (int64_t idx = threadIdx.x; idx < pair_values; idx += kExpandThreads) {
    float s = 0;
    for (int64_t tile = 0; tile < tiles; ++tile) s += p.zd_partial[(tile * p.T + t) * pair_values + idx];
    zd[idx] = s;
  }
  if (threadIdx.x < p.k) {
    coef[threadIdx.x] = p.weights[t * p.k + threadIdx.x] * p.scale;
    es[threadIdx.x] = p.ids[t * p.k + threadIdx.x];
  }
  __syncthreads();
  const int64_t h = int64_t(blockIdx.x) * kExpandThreads + threadIdx.x;
  if (h >= p.H) return;
  const w_t* Bd = static_cast<const w_t*>(p.Bd);
  const bool vec = vec_rows<w_t>(Bd, p.Rd);
  float y = 0;
  for (int64_t j = 0; j < p.k; ++j) {
    y += coef[j] * row_dot(Bd + (es[j] * p.H + h) * p.Rd, zd + j * p.Rd, p.Rd, vec);
  }
  static_cast<scalar_t*>(p.y)[t * p.H + h] = from_acc<scalar_t>(y);
}

template <typename scalar_t, typename w_t>
cudaError_t launch_all(const DecodeParams& p, cudaStream_t stream) {
  const int64_t Rz = p.Rg + p.Ru;
  const dim3 route_grid(static_cast<unsigned>(p.T), static_cast<unsigned>(p.k),
                        static_cast<unsigned>(std::max<int64_t>(1, (Rz + kRouteWarps - 1) / kRouteWarps)));
  decode_route_kernel<scalar_t, w_t><<<route_grid, kRouteThreads, 0, stream>>>(p);
  MIXLORA_RETURN_IF_LAUNCH_FAILED();
  const int64_t tiles = decode_column_tiles(p.I);
  const dim3 swiglu_grid(static_cast<unsigned>(tiles), static_cast<unsigned>(p.T));
  decode_swiglu_kernel<scalar_t, w_t><<<swiglu_grid, kSwigluThreads, 0, stream>>>(p);
  MIXLORA_RETURN_IF_LAUNCH_FAILED();
  if (p.Bd == nullptr) return cudaSuccess;
  const dim3 expand_grid(static_cast<unsigned>((p.H + kExpandThreads - 1) / kExpandThreads),
                         static_cast<unsigned>(p.T));
  decode_expand_kernel<scalar_t, w_t><<<expand_grid, kExpandThreads, 0, stream>>>(p, tiles);
  MIXLORA_RETURN_IF_LAUNCH_FAILED();
  return cudaSuccess;
}

}  // namespace

bool decode_supported(const DecodeParams& p) {
  const bool dtype_ok = p.dtype == DType::kBFloat16 || p.dtype == DType::kFloat16 ||
                        p.dtype == DType::kFloat32;
  if (!dtype_ok || (p.wdtype != DType::kFloat32 && p.wdtype != p.dtype)) return false;
  if (p.T < 1 || p.T > 65535 || p.H < 1 || p.I < 1) return false;
  if (p.E < 1 || p.E > kDecodeMaxExperts || p.k < 1 || p.k > std::min(p.E, kDecodeMaxSlots)) return false;
  if (std::max({p.Rg, p.Ru, p.Rd}) > kDecodeMaxRank) return false;
  // Each LoRA whole or absent: A with its B (the ranks are the glue's to check).
  if ((p.Ag == nullptr) != (p.Bg == nullptr) || (p.Au == nullptr) != (p.Bu == nullptr) ||
      (p.Ad == nullptr) != (p.Bd == nullptr)) {
    return false;
  }
  return decode_column_tiles(p.I) <= 65535;
}

int64_t decode_column_tiles(int64_t I) { return (I + kSwigluThreads - 1) / kSwigluThreads; }

cudaError_t launch_expert_ffn_decode(const DecodeParams& p, cudaStream_t stream) {
  if (!decode_supported(p)) return cudaErrorInvalidValue;
  const bool own = p.wdtype == p.dtype;  // the weights in x's dtype, else float32
  switch (p.dtype) {
    case DType::kBFloat16:
      return own ? launch_all<__nv_bfloat16, __nv_bfloat16>(p, stream)
                 : launch_all<__nv_bfloat16, float>(p, stream);
    case DType::kFloat16:
      return own ? launch_all<__half, __half>(p, stream) : launch_all<__half, float>(p, stream);
    default:
      return launch_all<float, float>(p, stream);
  }
}

}  // namespace cuda
}  // namespace mixlora
