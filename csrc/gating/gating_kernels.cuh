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

// logits [T, E] acc = x [T, H] @ weight [E, H]^T: x read in its own dtype (no float32 copy).
struct RouterLogitsParams {
  const void* x;       // [T, H] dtype
  const void* weight;  // [E, H] acc
  void* logits;        // [T, E] acc
  int64_t T, H, E;
  DType dtype;
};
cudaError_t launch_router_logits(const RouterLogitsParams& p, cudaStream_t stream);

// grad_x [T, H] dtype = grad @ weight (rounded once); grad_weight [E, H] acc = grad^T @ x, in
// token order: per split of kRouterSplitTokens tokens, the splits' partials (workspace) added
// in split order.
struct RouterLogitsBackwardParams {
  const void* grad;    // [T, E] acc
  const void* x;       // [T, H] dtype
  const void* weight;  // [E, H] acc
  void* grad_x;        // [T, H] dtype
  void* grad_weight;   // [E, H] acc
  void* workspace;     // router_backward_workspace_elems(T, H, E) acc, or null when 0
  int64_t T, H, E;
  DType dtype;
};
int64_t router_backward_workspace_elems(int64_t T, int64_t H, int64_t E);
cudaError_t launch_router_logits_backward(const RouterLogitsBackwardParams& p, cudaStream_t stream);

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
