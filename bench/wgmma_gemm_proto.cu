// A Hopper GEMM of our own, for the fused-GEMM route (bench/NOTES.md v13, "The fused-GEMM route
// in CUDA"): C [M, N] = A [M, K] @ B [N, K]^T, bf16 in, fp32 sums, bf16 out, with TMA copies and
// wgmma, as the frozen gate / up GEMM the MoE SwiGLU epilogue would live in. Bench code, not a path
// of the library: the route needs this mainloop within ~5% of cuBLAS before any epilogue is worth
// writing, and `bench/wgmma_gemm_proto.py` measures exactly that (it builds this file with nvcc
// into a shared library and calls `wgmma_gemm_bf16` through ctypes).
//
// Design (persistent, warp-specialized, "cooperative"): one CTA per SM walks output tiles of
// 128 x 256 (tile t: rows (t % m_tiles) * 128, columns (t / m_tiles) * 256, so the CTAs running
// at once share B tiles and all of A stays in L2). Warpgroup 0's first thread is the producer:
// it copies each 64-wide K slice of the tile's A (128 x 64) and B (256 x 64) rows into one of 4
// shared-memory stages with the bulk tensor copy (128-byte swizzle), completing the stage's "full"
// barrier. Warpgroups 1 and 2 are the consumers, 64 rows of the tile each: per stage four
// `wgmma.mma_async m64n256k16` (operands from shared memory, 128 fp32 accumulators a thread), one
// group in flight while the next stage is waited for; each warp arrives on the stage's "empty"
// barrier once the group that read it is complete. The epilogue stores the accumulators as bf16
// pairs straight from registers (the producer meanwhile fills the stages of the next tile).
//
// Variant 1 ("ping-pong"): the two consumer warpgroups take whole tiles of 128 x 128 in turn
// (two m64n128k16 a K step, 128 accumulators a thread), the producer filling 6 stages of 32 KiB
// in tile order: while one warpgroup stores a tile, the other's MMAs run on the next, so the
// epilogue (where the MoE SwiGLU would go) overlaps the tensor cores' work.
//
// Variant 2 ("ping-pong in 2-CTA clusters"): variant 1 with the CTAs in pairs that take two
// neighbouring 128-row blocks at the same columns in lockstep, each producer copying its own A
// rows and half of the B rows multicast into both CTAs: 24 KiB a stage from L2 instead of 32.
// Shapes (the launcher checks): K % 64 == 0, 16-byte aligned rows, and M % 128, N % 256 (variant
// 0), M % 128, N % 128 (1), M % 256, N % 128 (2).
#include "wgmma_common.cuh"

namespace {

constexpr int kConsumers = 2;                  // consumer warpgroups
constexpr int kThreads = 128 * (1 + kConsumers);

// Variant 0 (cooperative): 128 x 256 tiles, 64 rows a consumer warpgroup.
constexpr int kBM = 128, kBN = 256, kStages = 4;
constexpr int kABytes = kBM * kRowBytes;       // 16 KiB
constexpr int kBBytes = kBN * kRowBytes;       // 32 KiB
constexpr int kStageBytes = kABytes + kBBytes;
[[maybe_unused]] constexpr uint32_t kEmptyArrivals = kConsumers * 4;  // one per consumer warp
constexpr int kSmemBytes = 1024 + kStages * kStageBytes + 2 * kStages * 8;  // (1024: alignment)

// Variant 1 (ping-pong): 128 x 128 tiles, a whole tile a consumer warpgroup, in turn.
constexpr int kPpBM = 128, kPpBN = 128, kPpStages = 6;
constexpr int kPpABytes = kPpBM * kRowBytes;   // 16 KiB
constexpr int kPpStageBytes = kPpABytes + kPpBN * kRowBytes;  // 32 KiB
[[maybe_unused]] constexpr uint32_t kPpEmptyArrivals = 4;  // the warps of the tile's warpgroup
constexpr int kPpSmemBytes = 1024 + kPpStages * kPpStageBytes + (2 * kPpStages + 2) * 8;

// Variant 2 (ping-pong in 2-CTA clusters): variant 1's tiles, stages and shared memory; a stage's
// "empty" barrier takes the tile owner's 4 warps of both CTAs (either producer refills it in both).
// the B rows (64 of the tile's 128) a producer multicasts: 8 KiB
[[maybe_unused]] constexpr int kMcHalfBytes = kPpBN / 2 * kRowBytes;

#ifdef MIXLORA_PROTO_SM90A

// d (64 x 256 of the warpgroup, fp32) = A (64 x 16) @ B (256 x 16)^T + (scale_d ? d : 0).
__device__ __forceinline__ void wgmma_m64n256k16(float (&d)[128], uint64_t desc_a, uint64_t desc_b,
                                                 uint32_t scale_d) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
      "{"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
      "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
      "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
      "}, %128, %129, p, 1, 1, 0, 0;\n"
      "}\n"
      : MIXLORA_F8(0), MIXLORA_F8(8), MIXLORA_F8(16), MIXLORA_F8(24),
        MIXLORA_F8(32), MIXLORA_F8(40), MIXLORA_F8(48), MIXLORA_F8(56),
        MIXLORA_F8(64), MIXLORA_F8(72), MIXLORA_F8(80), MIXLORA_F8(88),
        MIXLORA_F8(96), MIXLORA_F8(104), MIXLORA_F8(112), MIXLORA_F8(120)
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}

// The producer thread: for each of the CTA's tiles (M fastest) and each K step, waits for the
// stage to be empty, then copies the tile's A rows (BM x 64) and B rows (BN x 64) into it.
template <int BM, int BN, int STAGES>
__device__ __forceinline__ void produce(const CUtensorMap* map_a, const CUtensorMap* map_b,
                                        uint32_t base, uint32_t full0, uint32_t empty0,
                                        int m_tiles, int tiles, int k_steps) {
  constexpr int a_bytes = BM * kRowBytes, stage_bytes = a_bytes + BN * kRowBytes;
  int it = 0;
  for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int m0 = (tile % m_tiles) * BM, n0 = (tile / m_tiles) * BN;
    for (int ks = 0; ks < k_steps; ++ks, ++it) {
      const int s = it % STAGES;
      mbar_wait(empty0 + 8 * s, (static_cast<uint32_t>(it / STAGES) & 1u) ^ 1u);
      const uint32_t sa = base + s * stage_bytes;
      mbar_expect_tx(full0 + 8 * s, stage_bytes);
      tma_load_2d(sa, map_a, full0 + 8 * s, ks * kBK, m0);
      tma_load_2d(sa + a_bytes, map_b, full0 + 8 * s, ks * kBK, n0);
    }
  }
}

// Variant 2's producer: the CTA's tiles in its cluster's order (pair tile pt: rows of block
// 2 (pt % m_pairs) + rank, columns (pt / m_pairs) 128); per K step, once both CTAs' owners have
// released the stage, its own A rows (128 x 64) and half the B rows (64 x 64: the rank's), those
// multicast into the same stage of both CTAs. Each CTA's "full" barrier expects the stage's 32
// KiB: its A, its half of B and the other producer's half.
__device__ __forceinline__ void produce_multicast(const CUtensorMap* map_a,
                                                  const CUtensorMap* map_b_half, uint32_t base,
                                                  uint32_t full0, uint32_t empty0, uint32_t rank,
                                                  int m_pairs, int pair_tiles, int k_steps) {
  const int cluster = static_cast<int>(blockIdx.x) / 2, clusters = static_cast<int>(gridDim.x) / 2;
  int it = 0;
  for (int pt = cluster; pt < pair_tiles; pt += clusters) {
    const int m0 = ((pt % m_pairs) * 2 + static_cast<int>(rank)) * kPpBM;
    const int n0 = (pt / m_pairs) * kPpBN;
    for (int ks = 0; ks < k_steps; ++ks, ++it) {
      const int s = it % kPpStages;
      mbar_wait<true>(empty0 + 8 * s, (static_cast<uint32_t>(it / kPpStages) & 1u) ^ 1u);
      const uint32_t sa = base + s * kPpStageBytes;
      mbar_expect_tx(full0 + 8 * s, kPpStageBytes);
      tma_load_2d(sa, map_a, full0 + 8 * s, ks * kBK, m0);
      tma_load_2d_multicast(sa + kPpABytes + rank * kMcHalfBytes, map_b_half, full0 + 8 * s,
                            ks * kBK, n0 + static_cast<int>(rank) * (kPpBN / 2), 0x3);
    }
  }
}

#endif  // sm_90a

// One CTA per SM (or per tile, if fewer), 384 threads: warpgroup 0 the producer (one thread),
// warpgroups 1 and 2 the consumers.
__global__ void __launch_bounds__(kThreads, 1)
    wgmma_gemm_kernel(const __grid_constant__ CUtensorMap map_a,
                      const __grid_constant__ CUtensorMap map_b, __nv_bfloat16* __restrict__ c,
                      int M, int N, int K) {
#ifdef MIXLORA_PROTO_SM90A
  extern __shared__ uint8_t smem_raw[];
  const uint32_t base = (smem_u32(smem_raw) + 1023u) & ~1023u;
  const uint32_t full0 = base + kStages * kStageBytes;  // full[s] at full0 + 8 s
  const uint32_t empty0 = full0 + kStages * 8;          // empty[s] at empty0 + 8 s
  const int wg = static_cast<int>(threadIdx.x) / 128, tid = static_cast<int>(threadIdx.x) % 128;
  const int m_tiles = M / kBM, tiles = m_tiles * (N / kBN), k_steps = K / kBK;
  if (threadIdx.x == 0) init_stage_barriers(full0, empty0, kStages, kEmptyArrivals);
  __syncthreads();
  if (wg == 0) {  // the producer
    if (tid == 0) {
      produce<kBM, kBN, kStages>(&map_a, &map_b, base, full0, empty0, m_tiles, tiles, k_steps);
    }
    return;
  }

  const int half = wg - 1;  // rows 64 half .. 64 half + 63 of the tile
  const int warp = tid / 32, lane = tid % 32;
  float d[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) d[i] = 0.f;
  int it = 0;
  for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int m0 = (tile % m_tiles) * kBM, n0 = (tile / m_tiles) * kBN;
    int previous = -1;
    for (int ks = 0; ks < k_steps; ++ks, ++it) {
      const int s = it % kStages;
      mbar_wait(full0 + 8 * s, static_cast<uint32_t>(it / kStages) & 1u);
      const uint32_t sa = base + s * kStageBytes;
      const uint64_t desc_a = sw128_desc(sa + half * 64 * kRowBytes);
      const uint64_t desc_b = sw128_desc(sa + kABytes);
      fence_operands(d);
      wgmma_fence();
#pragma unroll
      for (int k = 0; k < kBK / 16; ++k) {
        wgmma_m64n256k16(d, desc_a + 2 * k, desc_b + 2 * k, (ks > 0 || k > 0) ? 1u : 0u);
      }
      wgmma_commit();
      wgmma_wait<1>();  // the previous stage's group is complete: release that stage
      fence_operands(d);
      if (previous >= 0 && lane == 0) mbar_arrive(empty0 + 8 * previous);
      previous = s;
    }
    wgmma_wait<0>();
    fence_operands(d);
    if (previous >= 0 && lane == 0) mbar_arrive(empty0 + 8 * previous);

    store_accumulators<kBN / 8>(d, c + static_cast<int64_t>(m0 + half * 64) * N + n0, N, warp, lane);
  }
#else
  (void)M, (void)N, (void)K, (void)c;
  __trap();  // built without sm_90a
#endif
}

// Variant 1: the same producer; consumer warpgroup w takes the CTA's tiles i with i % 2 == w
// (tile i's K steps are the producer's steps i * k_steps ...), two m64n128k16 a K step (its
// rows 0-63 and 64-127), its own stage releases (4 arrivals: its warps). The two warpgroups'
// main loops take turns (barrier turn[w]: the other's main loop of the previous tile has waited
// for all its stages): so neither waits on a stage's "full" barrier more than one phase ahead
// of it, which a parity wait could not tell from the phase before, and the tensor cores work
// on one tile at a time while the other warpgroup stores its last.
// Variant 2 (CLUSTER 2, launched in clusters of 2 CTAs): the CTAs of a cluster take the tiles of
// two neighbouring 128-row blocks at the same 128 columns in lockstep, each producer copying its
// own A rows and half of the B rows multicast into both CTAs: 24 KiB a stage read from L2 per
// CTA, not 32, against the ~12.5 TB/s 128 x 128 tiles would ask of L2 at 800 TFLOP/s
// (bench/NOTES.md v17). A consumer warp releases a stage on its own CTA's "empty" barrier and the
// other CTA's; the clusters sync after the barriers' init (no copy or arrival before them) and
// before exit (none after).
template <int CLUSTER>
__global__ void __launch_bounds__(kThreads, 1)
    wgmma_gemm_pingpong_kernel(const __grid_constant__ CUtensorMap map_a,
                               const __grid_constant__ CUtensorMap map_b,
                               __nv_bfloat16* __restrict__ c, int M, int N, int K) {
#ifdef MIXLORA_PROTO_SM90A
  extern __shared__ uint8_t smem_raw[];
  const uint32_t base = (smem_u32(smem_raw) + 1023u) & ~1023u;
  const uint32_t full0 = base + kPpStages * kPpStageBytes;
  const uint32_t empty0 = full0 + kPpStages * 8;
  const uint32_t turn0 = empty0 + kPpStages * 8;  // turn[w] at turn0 + 8 w
  const int wg = static_cast<int>(threadIdx.x) / 128, tid = static_cast<int>(threadIdx.x) % 128;
  const uint32_t rank = CLUSTER == 2 ? cluster_rank() : 0u;
  // tiles of the CTA (variant 1) or of its cluster, whose CTAs take neighbouring row blocks
  const int m_units = M / (kPpBM * CLUSTER), tiles = m_units * (N / kPpBN), k_steps = K / kBK;
  if (threadIdx.x == 0) {
    init_stage_barriers(full0, empty0, kPpStages, kPpEmptyArrivals * CLUSTER);
    mbar_init(turn0, 4);  // the other warpgroup's 4 warps
    mbar_init(turn0 + 8, 4);
  }
  if constexpr (CLUSTER == 2) {
    cluster_sync();
  } else {
    __syncthreads();
  }
  if (wg == 0) {  // the producer, as variant 0's with the smaller tiles (variant 2: multicast)
    if (tid == 0) {
      if constexpr (CLUSTER == 2) {
        produce_multicast(&map_a, &map_b, base, full0, empty0, rank, m_units, tiles, k_steps);
      } else {
        produce<kPpBM, kPpBN, kPpStages>(&map_a, &map_b, base, full0, empty0, m_units, tiles,
                                         k_steps);
      }
    }
    if constexpr (CLUSTER == 2) cluster_sync();  // (the consumers' at the end)
    return;
  }

  const int own = wg - 1;  // this warpgroup's tiles: the CTA's i-th with i % 2 == own
  const int warp = tid / 32, lane = tid % 32;
  const int unit = static_cast<int>(blockIdx.x) / CLUSTER, units = static_cast<int>(gridDim.x) / CLUSTER;
  float d0[64], d1[64];  // rows 0-63 and 64-127 of the tile
#pragma unroll
  for (int i = 0; i < 64; ++i) d0[i] = d1[i] = 0.f;
  int i = own, turns = 0;
  for (int tile = unit + own * units; tile < tiles; tile += 2 * units, i += 2) {
    const int m0 = ((tile % m_units) * CLUSTER + static_cast<int>(rank)) * kPpBM;
    const int n0 = (tile / m_units) * kPpBN;
    if (i > 0) {  // the CTA's tile i - 1 (the other warpgroup's) has had all its stages
      mbar_wait(turn0 + 8 * own, static_cast<uint32_t>(turns) & 1u);
      ++turns;
    }
    int it = i * k_steps, previous = -1;
    for (int ks = 0; ks < k_steps; ++ks, ++it) {
      const int s = it % kPpStages;
      mbar_wait(full0 + 8 * s, static_cast<uint32_t>(it / kPpStages) & 1u);
      const uint32_t sa = base + s * kPpStageBytes;
      const uint64_t desc_a0 = sw128_desc(sa), desc_a1 = sw128_desc(sa + 64 * kRowBytes);
      const uint64_t desc_b = sw128_desc(sa + kPpABytes);
      fence_operands(d0);
      fence_operands(d1);
      wgmma_fence();
#pragma unroll
      for (int k = 0; k < kBK / 16; ++k) {
        const uint32_t accumulate = (ks > 0 || k > 0) ? 1u : 0u;
        wgmma_m64n128k16(d0, desc_a0 + 2 * k, desc_b + 2 * k, accumulate);
        wgmma_m64n128k16(d1, desc_a1 + 2 * k, desc_b + 2 * k, accumulate);
      }
      wgmma_commit();
      wgmma_wait<1>();
      fence_operands(d0);
      fence_operands(d1);
      if (previous >= 0 && lane == 0) release<CLUSTER>(empty0 + 8 * previous, rank);
      previous = s;
    }
    if (lane == 0) mbar_arrive(turn0 + 8 * (1 - own));  // the other's next tile may start
    wgmma_wait<0>();
    fence_operands(d0);
    fence_operands(d1);
    if (previous >= 0 && lane == 0) release<CLUSTER>(empty0 + 8 * previous, rank);
    __nv_bfloat16* tile_c = c + static_cast<int64_t>(m0) * N + n0;
    store_accumulators<kPpBN / 8>(d0, tile_c, N, warp, lane);
    store_accumulators<kPpBN / 8>(d1, tile_c + static_cast<int64_t>(64) * N, N, warp, lane);
  }
  if constexpr (CLUSTER == 2) cluster_sync();  // the other CTA's releases here are all in
#else
  (void)M, (void)N, (void)K, (void)c;
  __trap();  // built without sm_90a
#endif
}

}  // namespace

// C = A @ B^T on `stream` by variant 0 (cooperative: M % 128, N % 256), 1 (ping-pong: M % 128,
// N % 128) or 2 (ping-pong in 2-CTA clusters: M % 256, N % 128), K % 64, with at most `max_ctas`
// CTAs (<= 0: one per SM; variant 2 an even number). Returns 0, or a nonzero code: 1 a shape,
// alignment or variant this prototype does not take, 2 no cuTensorMapEncodeTiled, 3 a tensor map
// the driver refused, else the CUDA error of the launch.
extern "C" int wgmma_gemm_bf16(const void* a, const void* b, void* c, int M, int N, int K,
                               void* stream, int max_ctas, int variant) {
  if (variant < 0 || variant > 2) return 1;
  const int bm = variant == 0 ? kBM : kPpBM, bn = variant == 0 ? kBN : kPpBN;
  const int m_unit = variant == 2 ? 2 * bm : bm;  // variant 2: a cluster's two row blocks
  if (M <= 0 || N <= 0 || K <= 0 || M % m_unit != 0 || N % bn != 0 || K % kBK != 0) return 1;
  if ((reinterpret_cast<uintptr_t>(a) | reinterpret_cast<uintptr_t>(b) |
       reinterpret_cast<uintptr_t>(c)) % 16 != 0) {
    return 1;
  }
  const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  if (encode == nullptr) return 2;
  const int smem = variant == 0 ? kSmemBytes : kPpSmemBytes;
  const auto kernel = variant == 0   ? wgmma_gemm_kernel
                      : variant == 1 ? wgmma_gemm_pingpong_kernel<1>
                                     : wgmma_gemm_pingpong_kernel<2>;
  CUtensorMap map_a{}, map_b{};
  if (make_map(&map_a, encode, a, M, K, bm) != CUDA_SUCCESS) return 3;
  // variant 2's producers each copy half of a tile's B rows
  if (make_map(&map_b, encode, b, N, K, variant == 2 ? bn / 2 : bn) != CUDA_SUCCESS) return 3;
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess) err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return static_cast<int>(err);
  const int tiles = (M / bm) * (N / bn);
  int grid = max_ctas > 0 ? max_ctas : sms;
  grid = grid < tiles ? grid : tiles;
  if (variant == 2) grid &= ~1;  // whole clusters (tiles is even: M % 256)
  if (grid <= 0) return 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(grid);
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = smem;
  config.stream = static_cast<cudaStream_t>(stream);
  cudaLaunchAttribute cluster[1]{};
  cluster[0].id = cudaLaunchAttributeClusterDimension;
  cluster[0].val.clusterDim.x = 2;
  cluster[0].val.clusterDim.y = 1;
  cluster[0].val.clusterDim.z = 1;
  if (variant == 2) {
    config.attrs = cluster;
    config.numAttrs = 1;
  }
  err = cudaLaunchKernelEx(&config, kernel, map_a, map_b, static_cast<__nv_bfloat16*>(c), M, N, K);
  return static_cast<int>(err != cudaSuccess ? err : cudaGetLastError());
}
