// CUDA helpers every op family's kernels share: dtype codes, acc conversions, 16-byte row
// access, deterministic warp sums and split sums, launch checks (the LoRA-dropout mask is in dropout_rng.h).
//
// CUDA headers only (no torch), so `nvcc -c` checks the kernels without a CUDA build of
// PyTorch; the glue (*_cuda.cpp) includes it with the host compiler, which sees only the part
// outside `__CUDACC__`.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "common/host_device.h"

namespace mixlora {
namespace cuda {

// Activation dtypes, numbered like c10::ScalarType so that the glue converts with a cast
// (static_asserts in permute_cuda.cpp keep the two in step).
enum class DType : int { kFloat16 = 5, kFloat32 = 6, kFloat64 = 7, kBFloat16 = 15 };

}  // namespace cuda
}  // namespace mixlora

// Device helpers (seen by nvcc only).
#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>
#include <initializer_list>
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

// Whether p is aligned to `bytes` (a power of two); null is aligned.
__host__ __device__ __forceinline__ bool aligned_to(const void* p, uintptr_t bytes) {
  return (reinterpret_cast<uintptr_t>(p) & (bytes - 1)) == 0;
}
__host__ __device__ __forceinline__ bool aligned16(const void* p) { return aligned_to(p, 16); }

// Whether rows of D scalar_t starting at each base can be read kVec at a time (16 bytes).
template <typename scalar_t>
bool rows_vectorizable(int64_t D, std::initializer_list<const void*> bases) {
  bool vec = D % kVec<scalar_t> == 0;
  for (const void* base : bases) vec = vec && aligned16(base);
  return vec;
}

// out[i] = the sum over the splits s, in split order, of partials[s * count + i]: the fixed-order
// reduction of per-split partial sums (one thread per element, grid-stride).
constexpr int kSumSplitsThreads = 256;
template <typename acc_t>
__global__ void __launch_bounds__(kSumSplitsThreads)
    sum_split_partials_kernel(acc_t* out, const acc_t* partials, int64_t count, int64_t splits) {
  const int64_t stride = int64_t(gridDim.x) * kSumSplitsThreads;
  for (int64_t idx = int64_t(blockIdx.x) * kSumSplitsThreads + threadIdx.x; idx < count; idx += stride) {
    acc_t sum = 0;
    for (int64_t s = 0; s < splits; ++s) sum += partials[s * count + idx];
    out[idx] = sum;
  }
}

template <typename acc_t>
cudaError_t launch_sum_splits(acc_t* out, const acc_t* partials, int64_t count, int64_t splits,
                              cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>((count + kSumSplitsThreads - 1) / kSumSplitsThreads, 65536);
  sum_split_partials_kernel<acc_t><<<static_cast<unsigned>(blocks), kSumSplitsThreads, 0, stream>>>(
      out, partials, count, splits);
  MIXLORA_RETURN_IF_LAUNCH_FAILED();
  return cudaSuccess;
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

// Asynchronous global -> shared copies (cp.async, sm_80+), in commit groups: cp_async copies
// BYTES (4, 8 or 16) bytes; cp_async16_zfill copies 16 bytes, or writes 16 zero bytes when
// !valid (gmem_ptr must still be a valid address); cp_async_wait<N> waits until at most N of
// the thread's committed groups are in flight. Kernels built for older GPUs trap.
template <int BYTES>
__device__ __forceinline__ void cp_async(void* smem_ptr, const void* gmem_ptr) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_ptr));
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(dst), "l"(gmem_ptr), "n"(BYTES)
               : "memory");
#else
  __trap();
#endif
}

// cp_async16_zfill_shared takes the destination as a shared-memory address (what
// __cvta_generic_to_shared gives), for callers that step it themselves.
__device__ __forceinline__ void cp_async16_zfill_shared(unsigned smem_addr, const void* gmem_ptr,
                                                        bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr), "l"(gmem_ptr),
               "r"(valid ? 16 : 0)
               : "memory");
#else
  __trap();
#endif
}

__device__ __forceinline__ void cp_async16_zfill(void* smem_ptr, const void* gmem_ptr, bool valid) {
  cp_async16_zfill_shared(static_cast<unsigned>(__cvta_generic_to_shared(smem_ptr)), gmem_ptr, valid);
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// Two floats as a bf16 pair (a in the low half: the lower k or n index).
__device__ __forceinline__ uint32_t pack_bf16x2(__nv_bfloat162 v) {
  return *reinterpret_cast<const uint32_t*>(&v);
}

// c += a @ b for one m16n8k16 tile (bf16 operands, fp32 accumulators).
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  __trap();  // the hosts pick the tensor-core kernels on sm_80 and newer only
#endif
}

// ldmatrix: four 8x8 b16 matrices from shared memory in one warp instruction; lane l gives the
// address of row l % 8 of matrix l / 8 (16 bytes, 16-byte aligned), and r[m] receives the MMA
// fragment word of matrix m (row lane / 4, columns 2 (lane % 4), + 1). The .trans form
// transposes each matrix (r[m]: rows 2 (lane % 4), + 1 of column lane / 4): a B operand whose
// k rows are stored n-contiguous (ldmatrix_x4<true>).
// (smem_addr: a shared-memory address, as __cvta_generic_to_shared gives.)
template <bool kTrans = false>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], unsigned smem_addr) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr));
  }
#else
  __trap();
#endif
}
template <bool kTrans = false>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  ldmatrix_x4<kTrans>(r, static_cast<unsigned>(__cvta_generic_to_shared(row)));
}

// What the launchers ask of the current device: its compute capability's major number, the
// shared memory one block may opt in to (227 KiB on sm_90, 163 KiB on sm_80) and an SM's
// (228 / 164 KiB). Queried once per device: the launchers ask on every op call, several times,
// and decode is host-bound. A failed query is not cached (the next call asks again) and reads
// as "no device".
struct DeviceCaps {
  int major = 0;
  int smem_optin = 0;   // bytes
  int smem_per_sm = 0;  // bytes
};

inline DeviceCaps current_device_caps() {
  constexpr int kMaxDevices = 64;
  // 0: not yet known. (Each field is written once with the same value, so relaxed is enough.)
  static std::atomic<int> known[kMaxDevices][3];
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices) return {};
  int v[3];
  for (int i = 0; i < 3; ++i) v[i] = known[device][i].load(std::memory_order_relaxed);
  if (v[0] == 0 || v[1] == 0 || v[2] == 0) {
    const cudaDeviceAttr attrs[3] = {cudaDevAttrComputeCapabilityMajor,
                                     cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                     cudaDevAttrMaxSharedMemoryPerMultiprocessor};
    for (int i = 0; i < 3; ++i) {
      if (cudaDeviceGetAttribute(&v[i], attrs[i], device) != cudaSuccess) return {};
    }
    for (int i = 0; i < 3; ++i) known[device][i].store(v[i], std::memory_order_relaxed);
  }
  DeviceCaps caps;
  caps.major = v[0];
  caps.smem_optin = v[1];
  caps.smem_per_sm = v[2];
  return caps;
}

// Whether the current device has the warp MMAs (mma.sync, bf16) and cp.async: sm_80 or newer.
inline bool device_has_mma() { return current_device_caps().major >= 8; }

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
