// Pieces the Hopper bench prototypes share (bench/wgmma_gemm_proto.cu, v16, and
// bench/fused_gu_wgmma_proto.cu, v17): mbarriers, the bulk tensor copy, shared-memory matrix
// descriptors for 128-byte swizzled K-major tiles, wgmma with operands from shared memory, the
// accumulators' store, and the host's tensor maps. Bench code, not a path of the library; each
// prototype is its own translation unit (its own shared library), so everything here is internal.
#pragma once
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace {

constexpr int kBK = 64;                        // K per stage
constexpr int kRowBytes = kBK * 2;             // 128: one swizzle atom's row

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MIXLORA_PROTO_SM90A 1

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}

__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}

// Until the phase of the given parity has completed (a fresh barrier: parity 1 passes at once);
// CLUSTER_SCOPE: acquiring what other CTAs of the cluster released by their arrivals.
template <bool CLUSTER_SCOPE = false>
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    if constexpr (CLUSTER_SCOPE) {
      asm volatile(
          "{\n"
          ".reg .pred p;\n"
          "mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], %2;\n"
          "selp.u32 %0, 1, 0, p;\n"
          "}\n"
          : "=r"(done)
          : "r"(bar), "r"(parity)
          : "memory");
    } else {
      asm volatile(
          "{\n"
          ".reg .pred p;\n"
          "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
          "selp.u32 %0, 1, 0, p;\n"
          "}\n"
          : "=r"(done)
          : "r"(bar), "r"(parity)
          : "memory");
    }
  } while (done == 0);
}

// Box (c0: K, c1: rows) of the tensor map into shared memory at dst, completing bytes on bar.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, uint32_t bar,
                                            int c0, int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4}], [%2];" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1)
      : "memory");
}

// Box (c0: K, c1: rows, 0) of a 3-D tensor map into shared memory at dst (make_map_pair's: a
// box of 2 along the third dimension lands as the first matrix's rows, then the second's).
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const CUtensorMap* map, uint32_t bar,
                                            int c0, int c1) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4, 0}], [%2];" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1)
      : "memory");
}

// Shared-memory matrix descriptor of a K-major tile whose rows are 128 bytes, written by the
// tensor copy with 128-byte swizzle from a 1024-byte aligned base: start address >> 4 (bits
// 0-13), leading byte offset unused for this layout (1), stride byte offset 1024 >> 4 (8 rows of
// 128 bytes, bits 32-45), swizzle mode 1 = 128 bytes (bits 62-63). The k-th 16-wide K step of
// the tile starts 32 bytes further: + 2 in the start address field.
__device__ __forceinline__ uint64_t sw128_desc(uint32_t addr) {
  uint64_t d = static_cast<uint64_t>((addr & 0x3FFFF) >> 4);
  d |= uint64_t(1) << 16;
  d |= uint64_t(1024 >> 4) << 32;
  d |= uint64_t(1) << 62;
  return d;
}

// Keeps the compiler from moving accesses of the accumulators across the asynchronous MMAs.
template <int N>
__device__ __forceinline__ void fence_operands(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}

// The asm output operands d[i] .. d[i + 7] of a wgmma's accumulators.
#define MIXLORA_F8(i)                                                                      \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
      "+f"(d[i + 6]), "+f"(d[i + 7])

// The asm of a wgmma m64n128k16 with both operands in shared memory: %0-%63 the accumulators,
// %64 / %65 the descriptors, %66 nonzero to add to them (else scale-d 0: d = A B^T).
#define MIXLORA_WGMMA_M64N128K16_SS                                                            \
  "{\n"                                                                                         \
  ".reg .pred p;\n"                                                                             \
  "setp.ne.b32 p, %66, 0;\n"                                                                    \
  "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "                                      \
  "{"                                                                                           \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                      \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "            \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "            \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"              \
  "}, %64, %65, p, 1, 1, 0, 0;\n"                                                               \
  "}\n"

// The asm output operands d[i] .. d[i + 7], written only.
#define MIXLORA_W8(i)                                                                      \
  "=f"(d[i]), "=f"(d[i + 1]), "=f"(d[i + 2]), "=f"(d[i + 3]), "=f"(d[i + 4]), "=f"(d[i + 5]), \
      "=f"(d[i + 6]), "=f"(d[i + 7])

// d (64 x 128 of the warpgroup, fp32) = A (64 x 16) @ B (128 x 16)^T + (scale_d ? d : 0).
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], uint64_t desc_a, uint64_t desc_b,
                                                 uint32_t scale_d) {
  asm volatile(MIXLORA_WGMMA_M64N128K16_SS
               : MIXLORA_F8(0), MIXLORA_F8(8), MIXLORA_F8(16), MIXLORA_F8(24),
                 MIXLORA_F8(32), MIXLORA_F8(40), MIXLORA_F8(48), MIXLORA_F8(56)
               : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}

// d = A (64 x 16) @ B (128 x 16)^T, d written only: a tile's first MMA, so that the compiler sees
// the last tile's sums dead once its epilogue has read them (the "+f" form above keeps them live
// across the epilogue: v19 has no room for them, bench/NOTES.md v19).
__device__ __forceinline__ void wgmma_m64n128k16_first(float (&d)[64], uint64_t desc_a, uint64_t desc_b) {
  asm volatile(MIXLORA_WGMMA_M64N128K16_SS
               : MIXLORA_W8(0), MIXLORA_W8(8), MIXLORA_W8(16), MIXLORA_W8(24),
                 MIXLORA_W8(32), MIXLORA_W8(40), MIXLORA_W8(48), MIXLORA_W8(56)
               : "l"(desc_a), "l"(desc_b), "r"(0));
}

// d (64 x 64 of the warpgroup, fp32) = A (64 x 16, bf16 from registers: each warp's 16 rows as
// the mma.m16n8k16 A fragment) @ B (64 x 16)^T + (scale_d ? d : 0).
__device__ __forceinline__ void wgmma_m64n64k16_rs(float (&d)[32], const uint32_t (&a)[4],
                                                   uint64_t desc_b, uint32_t scale_d) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
      "}, {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n"
      "}\n"
      : MIXLORA_F8(0), MIXLORA_F8(8), MIXLORA_F8(16), MIXLORA_F8(24)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d));
}

// d (64 x 32, fp32) = A (64 x 16, bf16 from registers) @ B (32 x 16)^T + (scale_d ? d : 0).
__device__ __forceinline__ void wgmma_m64n32k16_rs(float (&d)[16], const uint32_t (&a)[4],
                                                   uint64_t desc_b, uint32_t scale_d) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %21, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 "
      "{"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15"
      "}, {%16, %17, %18, %19}, %20, p, 1, 1, 0;\n"
      "}\n"
      : MIXLORA_F8(0), MIXLORA_F8(8)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d));
}

__device__ __forceinline__ uint32_t bf16x2(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

__device__ __forceinline__ float2 unpack_bf16x2(uint32_t v) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v));
}

// Stores a warpgroup's 64 x (8 * J) fp32 accumulators as bf16 at c (row-major, ld columns):
// d[4 j + {0, 1}] is row (warp 16 + lane / 4), columns 8 j + 2 (lane % 4) + {0, 1}; d[4 j + {2, 3}]
// the row 8 below.
template <int J>
__device__ __forceinline__ void store_accumulators(const float (&d)[4 * J], __nv_bfloat16* c,
                                                   int64_t ld, int warp, int lane) {
  __nv_bfloat16* out = c + (warp * 16 + lane / 4) * ld + 2 * (lane % 4);
#pragma unroll
  for (int j = 0; j < J; ++j) {
    *reinterpret_cast<__nv_bfloat162*>(out + 8 * j) = __floats2bfloat162_rn(d[4 * j], d[4 * j + 1]);
    *reinterpret_cast<__nv_bfloat162*>(out + 8 * ld + 8 * j) =
        __floats2bfloat162_rn(d[4 * j + 2], d[4 * j + 3]);
  }
}

// Thread 0: the stages' barriers ("full": the producer's arrival and the copies' bytes;
// "empty": the consumers' arrivals), made visible to the copy engine before anyone uses them.
__device__ __forceinline__ void init_stage_barriers(uint32_t full0, uint32_t empty0, int stages,
                                                    uint32_t empty_arrivals) {
  for (int s = 0; s < stages; ++s) {
    mbar_init(full0 + 8 * s, 1);
    mbar_init(empty0 + 8 * s, empty_arrivals);
  }
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}

// Clusters of CTAs (v16's variant 2): the CTA's rank in its cluster; the shared::cluster address
// of a shared variable in the CTA of another rank (the same offset); an arrival on a barrier at
// such an address, releasing the thread's earlier accesses (an MMA group's reads, waited for) to
// the cluster (`mbar_wait<true>` acquires them); a bulk tensor copy written into the same offset of
// every CTA in `mask`, completing bytes on each one's barrier at bar's offset; the cluster-wide
// barrier (every thread of every CTA, not warp-aligned).
__device__ __forceinline__ uint32_t cluster_rank() {
  uint32_t rank;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
  return rank;
}

__device__ __forceinline__ uint32_t cluster_address(uint32_t local, uint32_t rank) {
  uint32_t address;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(address) : "r"(local), "r"(rank));
  return address;
}

__device__ __forceinline__ void mbar_arrive_cluster(uint32_t cluster_bar) {
  asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];" ::"r"(cluster_bar)
               : "memory");
}


__device__ __forceinline__ void tma_load_2d_multicast(uint32_t dst, const CUtensorMap* map,
                                                      uint32_t bar, int c0, int c1, uint16_t mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
      ".multicast::cluster [%0], [%1, {%3, %4}], [%2], %5;" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1), "h"(mask)
      : "memory");
}

// A consumer warp's release of a shared-memory stage: on this CTA's barrier, and with clusters of
// 2 (whose producers each refill both CTAs' stages) on the other CTA's too.
template <int CLUSTER>
__device__ __forceinline__ void release(uint32_t bar, uint32_t rank) {
  if constexpr (CLUSTER == 2) {
    mbar_arrive_cluster(cluster_address(bar, rank));
    mbar_arrive_cluster(cluster_address(bar, rank ^ 1u));
  } else {
    mbar_arrive(bar);
  }
}

__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;" ::: "memory");
}

#endif  // sm_90a

// A 2-D tensor map of a row-major bf16 matrix [rows, cols] (cols contiguous), boxes of
// box_rows x 64 columns, 128-byte swizzle.
CUresult make_map(CUtensorMap* map, PFN_cuTensorMapEncodeTiled_v12000 encode, const void* ptr,
                  int rows, int cols, int box_rows) {
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(cols) * 2};  // bytes, dimension 1
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(kBK), static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t element_strides[2] = {1, 1};
  return encode(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(ptr), dims, strides, box,
                element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
}

// A 3-D tensor map over two row-major bf16 matrices [rows, cols] of the same shape, the second
// `gap` bytes after the first (positive, a multiple of 16), as [2][rows][cols]: boxes of 64
// columns x box_rows x 2, 128-byte swizzle (v17s: Wg and Wu as the model holds them).
CUresult make_map_pair(CUtensorMap* map, PFN_cuTensorMapEncodeTiled_v12000 encode, const void* first,
                       intptr_t gap, int rows, int cols, int box_rows) {
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows), 2};
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(cols) * 2, static_cast<cuuint64_t>(gap)};
  const cuuint32_t box[3] = {static_cast<cuuint32_t>(kBK), static_cast<cuuint32_t>(box_rows), 2};
  const cuuint32_t element_strides[3] = {1, 1, 1};
  return encode(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, const_cast<void*>(first), dims, strides, box,
                element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
}

// cuTensorMapEncodeTiled from the driver (looked up once), or nullptr.
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = nullptr;
  if (encode == nullptr) {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault,
                                         &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess || fn == nullptr) {
      return nullptr;
    }
    encode = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }
  return encode;
}

}  // namespace
