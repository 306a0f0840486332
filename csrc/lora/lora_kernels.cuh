// CUDA kernels of the low-rank expert GEMMs and the LoRA-dropout mask (docs/design.md,
// "Low-rank expert GEMMs"): Params structs and launchers. CUDA headers only, so `nvcc -c`
// checks them without torch (see common/cuda_utils.cuh).
//
// Legend: T tokens, k slots, N = T*k pairs, q = t*k + j, E experts, D feature width, R rank.
// "acc" = double for double activations, else float. Dropout: `key` = dropout_key(seed, stream)
// (common/dropout_rng.h); dropout_p == 0 means no mask at all.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_utils.cuh"

namespace mixlora {
namespace cuda {

// z[t, j, r] = sum_d A[ids[t, j], r, d] * drop_q(x[t])[d]
struct LoraShrinkParams {
  const void* x;       // [T, D] dtype
  const void* A;       // [E, R, D] dtype
  const int32_t* ids;  // [T, k]
  void* z;             // [T, k, R] acc
  int64_t T, D, E, R, k;
  double dropout_p;
  uint64_t key;
  DType dtype;
};
cudaError_t launch_lora_shrink(const LoraShrinkParams& p, cudaStream_t stream);
// The tensor-core shrink (lora_mma_kernels.cu) that launch_lora_shrink takes where supported
// (the glue's dense GEMM form, LoraShrinkGatherParams, comes first where PyTorch has it):
// bf16, no dropout, T >= 256, R % 8 == 0, E * R <= 128, D % 8 == 0, 16-byte aligned x and A,
// compute capability 8.0 or newer.
bool mma_shrink_supported(const LoraShrinkParams& p);
cudaError_t launch_lora_shrink_mma(const LoraShrinkParams& p, cudaStream_t stream);

// y[t, d] = sum_j (coef[t, j] or 1) * keep/(1-p)(q, d) * sum_r B[ids[t, j], d, r] * z[t, j, r]
struct LoraExpandParams {
  const void* z;       // [T, k, R] acc
  const void* B_t;     // [E, R, D] dtype: B transposed (rank-major, so warps read it coalesced)
  const int32_t* ids;  // [T, k]
  const void* coef;    // [T, k] acc, or null
  void* y;             // [T, D] dtype
  int64_t T, D, E, R, k;
  double dropout_p;
  uint64_t key;
  DType dtype;
};
cudaError_t launch_lora_expand(const LoraExpandParams& p, cudaStream_t stream);

// The dense form of lora_shrink for bfloat16 without dropout (lora_cuda.cpp): z_all [T, E R] =
// x @ A_all^T is one GEMM with fp32 output (cuBLAS; x and A are bf16, so the products are exact
// and only the fp32 sums round), of which slot (t, j) keeps its expert's R columns:
// z[t, j, r] = scale * z_all[t, ids[t, j] R + r] (scale 1). With dropout the GEMM's rows are
// the pairs' masked x (LoraMaskRowsParams; T := N pairs, k := 1) and scale = 1 / (1 - p).
struct LoraShrinkGatherParams {
  const float* z_all;   // [T, E, R]
  const int32_t* ids;   // [T, k]
  float* z;             // [T, k, R]
  int64_t T, k, E, R;
  float scale;
};
cudaError_t launch_lora_shrink_gather(const LoraShrinkGatherParams& p, cudaStream_t stream);

// xm[q, d] = x[q / k, d] where pair q keeps column d (the kernels' LoRA-dropout mask), else 0:
// the rows of the dense shrink with dropout. Elements are copied as 16-bit words (bf16 / fp16),
// so the kept ones are exact; the 1 / (1 - p) is applied to the GEMM's fp32 result.
struct LoraMaskRowsParams {
  const void* x;  // [T, D] 16-bit
  void* xm;       // [T k, D] 16-bit
  int64_t T, k, D;
  double dropout_p;
  uint64_t key;
};
cudaError_t launch_lora_mask_rows(const LoraMaskRowsParams& p, cudaStream_t stream);

// The dense form of lora_expand for bfloat16 without dropout (lora_cuda.cpp): with
// zm[t, term, e, r] = the bf16 hi (term 0) and lo (term 1) parts of
// sum_{j: ids[t, j] == e} (coef[t, j] or 1) * z[t, j, r] (zero for experts no slot picked),
// y = zm [T, 2 E R] @ [B_t; B_t] [2 E R, D] is one GEMM on tensor cores (cuBLAS), E/k times the
// useful work, against ~0.09 ms per call for lora_expand_kernel at T = 4096, D = 4096, E R = 128
// on the H100 (bench/NOTES.md v4). The hi + lo split keeps 16 bits of z * coef.
struct LoraExpandSplitParams {
  const float* z;       // [T, k, R]
  const int32_t* ids;   // [T, k]
  const float* coef;    // [T, k], or null
  void* zm;             // [T, 2, E, R] bf16
  int64_t T, k, E, R;
};
cudaError_t launch_lora_expand_split(const LoraExpandSplitParams& p, cudaStream_t stream);

// ids[order[p]] = e for offsets[e] <= p < offsets[e + 1]: the slots' experts back from the
// pairs grouped by expert (sort_pairs' order and offsets), for the dense form of
// lora_weight_grad, whose split (LoraExpandSplitParams) takes them per token.
struct LoraPairIdsParams {
  const int32_t* order;    // [N]
  const int64_t* offsets;  // [E + 1], offsets[E] == N
  int32_t* ids;            // [N] = [T, k]
  int64_t N, E;
};
cudaError_t launch_lora_pair_ids(const LoraPairIdsParams& p, cudaStream_t stream);

// out[e, r, d] = sum_{p in [offsets[e], offsets[e+1])} (coef.flat[q] or 1) * z.flat[q, r]
//                * drop_q(x[q / k])[d],   q = order[p]: e's pairs cut into a number of splits
// that depends on the shapes only, each summed in ascending p, the splits added in order.
struct LoraWeightGradParams {
  const void* z;           // [T, k, R] acc
  const void* x;           // [T, D] dtype
  const int32_t* order;    // [N]
  const int64_t* offsets;  // [E + 1]
  const void* coef;        // [T, k] acc, or null
  void* out;               // [E, R, D] acc
  void* workspace;         // lora_weight_grad_workspace_elems(*this) acc elements
  int64_t T, D, E, R, k;
  double dropout_p;
  uint64_t key;
  DType dtype;
};
// acc elements of workspace the launch needs (0: none); call with every other field set.
int64_t lora_weight_grad_workspace_elems(const LoraWeightGradParams& p);
cudaError_t launch_lora_weight_grad(const LoraWeightGradParams& p, cudaStream_t stream);

// mask[i] = dropout_keep(key, i, p), i < numel
struct DropoutMaskParams {
  bool* mask;  // [numel]
  int64_t numel;
  uint64_t key;
  float p;
};
cudaError_t launch_dropout_mask(const DropoutMaskParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace mixlora
