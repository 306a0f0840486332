// Tensor-core lora_shrink for bfloat16 without dropout (docs/design.md, "Low-rank expert
// GEMMs"; bench/NOTES.md v3). With PyTorch 2.9 or newer the glue (lora_cuda.cpp) takes the
// dense GEMM form instead (cuBLAS, fp32 output: 0.016 against 0.10 ms at the SPEC shape,
// bench/NOTES.md v4); this kernel serves older versions, which lack at::mm(.., out_dtype).
//
// z[t, j, :] = A[ids[t, j]] @ x[t] for every slot j is one dense product over all experts,
// Z_all [T, E*R] = x [T, D] @ A_all^T with A_all = A viewed as [E*R, D], of which each slot keeps
// its expert's R columns: E/k times the useful work, but on tensor cores (mma.sync m16n8k16,
// bf16 in, fp32 accumulate; x and A are bf16, exact in it), against ~0.16 ms per call at
// T = 4096, D = 4096, E*R = 128 for the CUDA-core kernel. With dropout each slot sees its own
// drop_q(x), so that stays on the CUDA-core kernel.
//
// Block: 4 warps, kShrinkTokens tokens; warp w owns the n-tiles 4w .. 4w + 3 of each group of
// 16 (E*R <= kShrinkMaxCols columns in 8-column n-tiles) for all the block's tokens (one m-tile).
// D is taken kShrinkChunk at a time: the chunk's x rows and A_all rows are copied to shared
// memory one chunk ahead (cp.async, two stages). The k-chunk order (d ascending) and the MMA's
// own order are fixed: bitwise deterministic.
#include <algorithm>

#include "lora/lora_kernels.cuh"

namespace mixlora {
namespace cuda {
namespace {

using bf16 = __nv_bfloat16;

constexpr int kShrinkMmaWarps = 4;
constexpr int kShrinkMmaThreads = kShrinkMmaWarps * kWarpSize;
constexpr int kShrinkTokens = 16;                  // one m-tile
constexpr int kShrinkChunk = 64;                   // D per stage: 4 k-chunks of 16
constexpr int kShrinkStride = kShrinkChunk + 8;    // staged row stride (bf16): conflict-free
constexpr int kShrinkMaxCols = 128;                // E*R: 16 n-tiles, 4 per warp
constexpr int kTilesPerWarp = kShrinkMaxCols / 8 / kShrinkMmaWarps;
constexpr int64_t kShrinkMinTokens = 256;          // fewer: the CUDA-core kernel (no gain)

// Issues the copies of d-chunk d0 (x rows of the block's tokens, A_all rows) into a stage;
// chunks past D are zero-filled.
__device__ __forceinline__ void stage_chunk(const LoraShrinkParams& p, const bf16* x, const bf16* A,
                                            int tokens, int cols, bf16* x_s, bf16* a_s, int64_t d0) {
  constexpr int kChunks = kShrinkChunk / 8;  // 16-byte chunks per row
  for (int i = threadIdx.x; i < (kShrinkTokens + cols) * kChunks; i += kShrinkMmaThreads) {
    const int row = i / kChunks, chunk = i % kChunks;
    const int64_t d = d0 + chunk * 8;
    if (row < kShrinkTokens) {
      const bool valid = row < tokens && d < p.D;
      cp_async16_zfill(x_s + row * kShrinkStride + chunk * 8, x + (valid ? row * p.D + d : 0), valid);
    } else {
      const int n = row - kShrinkTokens;
      const bool valid = d < p.D;
      cp_async16_zfill(a_s + n * kShrinkStride + chunk * 8, A + (valid ? n * p.D + d : 0), valid);
    }
  }
}

__global__ void __launch_bounds__(kShrinkMmaThreads) lora_shrink_mma_kernel(LoraShrinkParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int g = lane / 4, c = lane % 4;
  const int cols = static_cast<int>(p.E * p.R);
  const int64_t t0 = int64_t(blockIdx.x) * kShrinkTokens;
  const int tokens = static_cast<int>(min(int64_t(kShrinkTokens), p.T - t0));
  const bf16* x = static_cast<const bf16*>(p.x) + t0 * p.D;
  const bf16* A = static_cast<const bf16*>(p.A);
  bf16* x_s[2];
  bf16* a_s[2];
  for (int st = 0; st < 2; ++st) {
    bf16* base = reinterpret_cast<bf16*>(smem) + st * (kShrinkTokens + cols) * kShrinkStride;
    x_s[st] = base;
    a_s[st] = base + kShrinkTokens * kShrinkStride;
  }
  stage_chunk(p, x, A, tokens, cols, x_s[0], a_s[0], 0);
  cp_async_commit();

  float acc[kTilesPerWarp][4] = {};
  int st = 0;
  for (int64_t d0 = 0; d0 < p.D; d0 += kShrinkChunk, st ^= 1) {
    if (d0 + kShrinkChunk < p.D) stage_chunk(p, x, A, tokens, cols, x_s[st ^ 1], a_s[st ^ 1], d0 + kShrinkChunk);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
#pragma unroll
    for (int kc = 0; kc < kShrinkChunk / 16; ++kc) {
      const bf16* xr = x_s[st] + g * kShrinkStride + kc * 16 + 2 * c;  // A regs: (g, k) (g+8, k) (g, k+8) (g+8, k+8)
      const uint32_t a[4] = {*reinterpret_cast<const uint32_t*>(xr),
                             *reinterpret_cast<const uint32_t*>(xr + 8 * kShrinkStride),
                             *reinterpret_cast<const uint32_t*>(xr + 8),
                             *reinterpret_cast<const uint32_t*>(xr + 8 * kShrinkStride + 8)};
#pragma unroll
      for (int i = 0; i < kTilesPerWarp; ++i) {
        const int nt = warp * kTilesPerWarp + i;
        if (nt * 8 >= cols) break;
        const bf16* ar = a_s[st] + (nt * 8 + g) * kShrinkStride + kc * 16 + 2 * c;  // B (k, n = g)
        mma_bf16(acc[i], a, *reinterpret_cast<const uint32_t*>(ar),
                 *reinterpret_cast<const uint32_t*>(ar + 8));
      }
    }
    __syncthreads();  // this stage is read: the next copy may reuse it
  }

  // Slot (t, j) keeps the columns of its expert: column n = e * R + r (R % 8 == 0, so an
  // n-tile lies inside one expert).
  float* z = static_cast<float*>(p.z);
#pragma unroll
  for (int i = 0; i < kTilesPerWarp; ++i) {
    const int nt = warp * kTilesPerWarp + i;
    if (nt * 8 >= cols) break;
    const int e = nt * 8 / static_cast<int>(p.R), r = nt * 8 % static_cast<int>(p.R) + 2 * c;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int t = g + 8 * half;
      if (t >= tokens) continue;
      for (int64_t j = 0; j < p.k; ++j) {
        const int64_t q = (t0 + t) * p.k + j;
        if (p.ids[q] == e) {
          *reinterpret_cast<float2*>(z + q * p.R + r) = make_float2(acc[i][2 * half], acc[i][2 * half + 1]);
        }
      }
    }
  }
}

}  // namespace

bool mma_shrink_supported(const LoraShrinkParams& p) {
  if (p.dtype != DType::kBFloat16 || p.dropout_p > 0 || p.T < kShrinkMinTokens) return false;
  if (p.R % 8 != 0 || p.E * p.R > kShrinkMaxCols || p.D % 8 != 0) return false;
  if (!aligned16(p.x) || !aligned16(p.A)) return false;
  return device_has_mma();
}

cudaError_t launch_lora_shrink_mma(const LoraShrinkParams& p, cudaStream_t stream) {
  const size_t smem = sizeof(bf16) * 2 * (kShrinkTokens + p.E * p.R) * kShrinkStride;
  const cudaError_t err = allow_dynamic_smem(lora_shrink_mma_kernel, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>((p.T + kShrinkTokens - 1) / kShrinkTokens));
  lora_shrink_mma_kernel<<<grid, kShrinkMmaThreads, smem, stream>>>(p);
  MIXLORA_RETURN_IF_LAUNCH_FAILED();
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace mixlora
