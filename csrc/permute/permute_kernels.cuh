// CUDA kernels of the permutation ops (docs/design.md, "Permutation"): their Params structs
// and launchers, plus the few CUDA helpers that every op family's kernels share (dtype codes,
// acc conversions, 16-byte row access, deterministic warp and block sums, launch checks).
//
// CUDA headers only (no torch), so `nvcc -c` checks the kernels without a CUDA build of
// PyTorch; the glue (permute_cuda.cpp) includes this file with the host compiler, which sees
// only the declarations outside `__CUDACC__`.
//
// Legend: T tokens, k slots per token, N = T*k pairs, pair id q = t*k + j, E experts,
// D a feature width, R LoRA rank. "acc" = double for double inputs, else float.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <optional>

#include "common/host_device.h"

namespace mixlora {
namespace cuda {

// Activation dtypes, numbered like c10::ScalarType so that the glue converts with a cast
// (static_asserts in permute_cuda.cpp keep the two in step).
enum class DType : int { kFloat16 = 5, kFloat32 = 6, kFloat64 = 7, kBFloat16 = 15 };

// Optional-tensor helpers for the glue files (templates, so this header needs no torch):
// a present tensor made contiguous, else an undefined one; and its data or null.
template <typename Tensor>
Tensor contiguous_or_undefined(const std::optional<Tensor>& t) {
  return t.has_value() ? t->contiguous() : Tensor();
}
template <typename Tensor>
const void* data_or_null(const Tensor& t) {
  return t.defined() ? t.const_data_ptr() : nullptr;
}

// ---------------------------------------------------------------------------------------------
// sort_pairs: a stable counting sort of the N pairs by expert, in three launches whose grids
// follow from N and E only. The pairs are cut into chunks of kSortChunk; one warp owns a chunk
// and walks it in pair order, 32 pairs at a time, ranking equal experts within the 32 by lane
// (match_any + popc). Pass 1 counts each chunk's pairs per expert, pass 2 (one block) turns the
// counts into offsets and into each chunk's first slot per expert, pass 3 repeats the walk and
// writes order/position. Every slot follows from (expert, chunk, pair order): no atomics.
// ---------------------------------------------------------------------------------------------
constexpr int64_t kSortChunk = 512;

MIXLORA_HD int64_t sort_pairs_num_chunks(int64_t N) { return (N + kSortChunk - 1) / kSortChunk; }

struct SortPairsParams {
  const int32_t* ids;      // [N] the expert of each pair
  int32_t* order;          // [N] pair ids grouped by expert, stable
  int64_t* offsets;        // [E + 1]
  int32_t* position;       // [N] inverse of order
  int32_t* chunk_cursor;   // [sort_pairs_num_chunks(N), E] workspace
  int64_t N;
  int64_t E;
};

// Writes offsets even when N == 0.
cudaError_t launch_sort_pairs(const SortPairsParams& p, cudaStream_t stream);

// out[p] = (weights.flat[order[p]] or 1) * src[order[p] / k]
struct GatherPairsParams {
  const void* src;       // [T, D] dtype
  const int32_t* order;  // [N]
  const void* weights;   // [T, k] acc, or null
  void* out;             // [N, D] dtype
  int64_t N, D, k;
  DType dtype;
};
cudaError_t launch_gather_pairs(const GatherPairsParams& p, cudaStream_t stream);

// out[t] = sum_j (weights[t, j] or 1) * src[position[t*k + j]], j in order
struct ScatterPairsParams {
  const void* src;          // [N, D] dtype
  const int32_t* position;  // [N]
  const void* weights;      // [T, k] acc, or null
  void* out;                // [T, D] dtype
  int64_t T, D, k;
  DType dtype;
};
cudaError_t launch_scatter_pairs(const ScatterPairsParams& p, cudaStream_t stream);

// out[t, j] = <dense[t], paired[position[t*k + j]]>
struct PairDotParams {
  const void* dense;        // [T, D] dtype
  const void* paired;       // [N, D] dtype
  const int32_t* position;  // [N]
  void* out;                // [T, k] acc
  int64_t T, D, k;
  DType dtype;
};
cudaError_t launch_pair_dot(const PairDotParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace mixlora

// =============================================================================================
// Device helpers shared by every family's kernels (seen by nvcc only).
// =============================================================================================
#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "common/dropout_rng.h"

// Return the launch error, if any, from the enclosing launcher: one check after every launch.
#define MIXLORA_RETURN_IF_LAUNCH_FAILED()         \
  do {                                            \
    const cudaError_t launch_err = cudaGetLastError(); \
    if (launch_err != cudaSuccess) return launch_err;  \
  } while (0)

namespace mixlora {
namespace cuda {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

template <typename scalar_t>
using acc_of = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Elements per 16-byte access.
template <typename scalar_t>
constexpr int kVec = 16 / static_cast<int>(sizeof(scalar_t));

// Explicit conversions: torch builds define __CUDA_NO_HALF_CONVERSIONS__ and
// __CUDA_NO_BFLOAT16_CONVERSIONS__, which remove the implicit ones.
__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename scalar_t>
__device__ __forceinline__ scalar_t from_acc(acc_of<scalar_t> x) {
  if constexpr (std::is_same_v<scalar_t, __half>) {
    return __float2half_rn(x);
  } else if constexpr (std::is_same_v<scalar_t, __nv_bfloat16>) {
    return __float2bfloat16_rn(x);
  } else {
    return x;
  }
}

// V consecutive elements at p, in acc. With V == kVec, p must be 16-byte aligned (one load).
template <int V, typename scalar_t>
__device__ __forceinline__ void load_acc(const scalar_t* p, acc_of<scalar_t> (&out)[V]) {
  if constexpr (V == kVec<scalar_t>) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const scalar_t* e = reinterpret_cast<const scalar_t*>(&raw);
#pragma unroll
    for (int v = 0; v < V; ++v) out[v] = to_acc(e[v]);
  } else {
#pragma unroll
    for (int v = 0; v < V; ++v) out[v] = to_acc(p[v]);
  }
}

// Store V acc values at p, rounded to scalar_t (to nearest even).
template <int V, typename scalar_t>
__device__ __forceinline__ void store_acc(scalar_t* p, const acc_of<scalar_t> (&in)[V]) {
  if constexpr (V == kVec<scalar_t>) {
    uint4 raw;
    scalar_t* e = reinterpret_cast<scalar_t*>(&raw);
#pragma unroll
    for (int v = 0; v < V; ++v) e[v] = from_acc<scalar_t>(in[v]);
    *reinterpret_cast<uint4*>(p) = raw;
  } else {
#pragma unroll
    for (int v = 0; v < V; ++v) p[v] = from_acc<scalar_t>(in[v]);
  }
}

// out[v] = sum_r W[r, d0 + v] * z[r], r ascending (the order the CPU kernels use), for a
// rank-major weight block W [R, D] (row stride D): the low-rank product on V consecutive
// columns. A warp's lanes own consecutive column groups, so each step is one coalesced load.
template <int V, typename scalar_t, typename acc_t>
__device__ __forceinline__ void rank_columns(const scalar_t* W, int64_t R, int64_t D, int64_t d0,
                                             const acc_t* z, acc_t (&out)[V]) {
#pragma unroll
  for (int v = 0; v < V; ++v) out[v] = 0;
  for (int64_t r = 0; r < R; ++r) {
    acc_t w[V];
    load_acc<V>(W + r * D + d0, w);
#pragma unroll
    for (int v = 0; v < V; ++v) out[v] += w[v] * z[r];
  }
}

__host__ __device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

// Butterfly sum over the warp: fixed pairing, and since a + b == b + a every lane ends with the
// same bits, so the result does not depend on scheduling.
template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(kFullMask, v, offset);
  }
  return v;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_max(acc_t v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v = max(v, __shfl_xor_sync(kFullMask, v, offset));
  }
  return v;
}

// LoRA dropout of one (seed, stream) key as factors: 1 / (1 - p) where kept, else 0 (what the
// CPU kernels compute). `active` is false when p == 0: then there is no mask at all.
template <typename acc_t>
struct DropoutScale {
  __device__ DropoutScale(double dropout_p, uint64_t key)
      : key(key), p(static_cast<float>(dropout_p)),
        inv_keep(acc_t(1) / (acc_t(1) - static_cast<acc_t>(dropout_p))), active(dropout_p > 0) {}

  __device__ __forceinline__ bool keep(int64_t index) const { return dropout_keep(key, index, p); }
  __device__ __forceinline__ acc_t factor(int64_t index) const {
    return keep(index) ? inv_keep : acc_t(0);
  }

  uint64_t key;
  float p;
  acc_t inv_keep;
  bool active;
};

// Calls f(scalar_t{}) with the C++ type of `dtype`.
template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat64:
      return f(double{});
    case DType::kFloat32:
      return f(float{});
    case DType::kFloat16:
      return f(__half{});
    case DType::kBFloat16:
      return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

// Raises a kernel's dynamic shared memory limit when it needs more than the default 48 KiB.
template <typename Kernel>
cudaError_t allow_dynamic_smem(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(bytes));
}

}  // namespace cuda
}  // namespace mixlora
#endif  // __CUDACC__
