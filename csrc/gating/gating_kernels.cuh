// CUDA kernels of the gating ops (docs/design.md, "Gating"): Params structs and launchers.
// CUDA headers only, so `nvcc -c` checks them without torch (see common/cuda_utils.cuh).
//
// Legend: T tokens, E experts, k experts per token. "acc" = double for double logits, else float.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_utils.cuh"

namespace mixlora {
namespace cuda {

// probs = softmax(logits); ids = the k most probable experts (prob desc, index asc);
// weights = probs[ids] / sum_j probs[ids[j]].
struct TopkGatingParams {
  const void* logits;  // [T, E] dtype
  void* weights;       // [T, k] acc
  int32_t* ids;        // [T, k]
  void* probs;         // [T, E] acc
  int64_t T, E, k;
  DType dtype;
};
cudaError_t launch_topk_gating(const TopkGatingParams& p, cudaStream_t stream);

// grad_logits from the gradients of weights and (optionally) probs; every tensor is acc.
struct TopkGatingBackwardParams {
  const void* grad_weights;  // [T, k]
  const void* grad_probs;    // [T, E], or null
  const void* weights;       // [T, k]
  const int32_t* ids;        // [T, k]
  const void* probs;         // [T, E]
  void* grad_logits;         // [T, E]
  int64_t T, E, k;
  DType acc_dtype;  // kFloat32 or kFloat64
};
cudaError_t launch_topk_gating_backward(const TopkGatingBackwardParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace mixlora
