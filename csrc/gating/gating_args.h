// Argument checks of the gating ops, shared by the CPU and CUDA glue.
#pragma once
#include <ATen/core/Tensor.h>

#include "common/checks.h"

namespace mixlora {

// logits [T, E] floating, E >= 1, 1 <= k <= E.
inline void check_topk_gating(const at::Tensor& logits, int64_t k) {
  MIXLORA_CHECK_DIM("logits", logits, 2);
  MIXLORA_CHECK_FLOAT("logits", logits);
  const int64_t E = logits.size(1);
  TORCH_CHECK(E >= 1, "mixlora: logits must have E >= 1 expert columns, got shape ",
              logits.sizes());
  TORCH_CHECK(k >= 1 && k <= E, "mixlora: k must be in [1, E = ", E, "], got ", k);
}

// grad_weights, weights [T, k] acc; grad_probs [T, E]? acc; ids [T, k] int32; probs [T, E] acc.
inline void check_topk_gating_backward(const at::Tensor& grad_weights,
                                       const std::optional<at::Tensor>& grad_probs,
                                       const at::Tensor& weights, const at::Tensor& ids,
                                       const at::Tensor& probs) {
  MIXLORA_CHECK_DIM("probs", probs, 2);
  const auto acc = probs.scalar_type();
  TORCH_CHECK(acc == at::kFloat || acc == at::kDouble,
              "mixlora: probs must be float32 or float64 (an acc dtype), got ", acc);
  const int64_t T = probs.size(0), E = probs.size(1);
  TORCH_CHECK(E >= 1, "mixlora: probs must have E >= 1 expert columns, got shape ", probs.sizes());
  const int64_t k = check_ids(ids, T, probs);
  TORCH_CHECK(k <= E, "mixlora: ids.size(1) (k) must be <= E = ", E, ", got shape ", ids.sizes());
  check_tensor("weights", weights, {T, k}, acc, probs);
  check_tensor("grad_weights", grad_weights, {T, k}, acc, probs);
  if (grad_probs.has_value()) check_tensor("grad_probs", *grad_probs, {T, E}, acc, probs);
}

// x [T, H] floating, weight [E, H] acc (of x's dtype), E >= 1.
inline void check_router_logits(const at::Tensor& x, const at::Tensor& weight) {
  MIXLORA_CHECK_DIM("x", x, 2);
  MIXLORA_CHECK_FLOAT("x", x);
  MIXLORA_CHECK_DIM("weight", weight, 2);
  TORCH_CHECK(weight.size(0) >= 1, "mixlora: weight must have E >= 1 rows, got shape ",
              weight.sizes());
  check_tensor("weight", weight, {weight.size(0), x.size(1)}, acc_type(x.scalar_type()), x);
}

// grad [T, E] acc, x [T, H], weight [E, H] acc.
inline void check_router_logits_backward(const at::Tensor& grad, const at::Tensor& x,
                                         const at::Tensor& weight) {
  check_router_logits(x, weight);
  check_tensor("grad", grad, {x.size(0), weight.size(0)}, weight.scalar_type(), x);
}

}  // namespace mixlora
