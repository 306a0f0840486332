// Argument checks of the permutation ops, shared by the CPU and CUDA glue.
#pragma once
#include <ATen/ATen.h>
#include <limits>

#include "common/checks.h"

namespace mixlora {

// ids [T, k] int32, num_experts >= 1; N = T*k must fit the int32 order/position.
inline void check_sort_pairs(const at::Tensor& ids, int64_t num_experts) {
  MIXLORA_CHECK_DIM("ids", ids, 2);
  MIXLORA_CHECK_DTYPE("ids", ids, at::kInt);
  TORCH_CHECK(num_experts >= 1, "mixlora: num_experts must be >= 1, got ", num_experts);
  TORCH_CHECK(ids.numel() <= std::numeric_limits<int32_t>::max(),
              "mixlora: ids has ", ids.numel(), " pairs, more than int32 order/position can index");
}

// src [T, D] floating, order [T*k] int32, weights [T, k]? acc.
inline void check_gather_pairs(const at::Tensor& src, const at::Tensor& order, int64_t k,
                               const std::optional<at::Tensor>& weights) {
  MIXLORA_CHECK_DIM("src", src, 2);
  MIXLORA_CHECK_FLOAT("src", src);
  check_k(k);
  const int64_t T = src.size(0);
  check_tensor("order", order, {T * k}, at::kInt, src);
  if (weights.has_value()) {
    check_tensor("weights", *weights, {T, k}, acc_type(src.scalar_type()), src);
  }
}

// src [N, D] floating with N a multiple of k, position [N] int32, weights [N / k, k]? acc.
inline void check_scatter_pairs(const at::Tensor& src, const at::Tensor& position, int64_t k,
                                const std::optional<at::Tensor>& weights) {
  MIXLORA_CHECK_DIM("src", src, 2);
  MIXLORA_CHECK_FLOAT("src", src);
  check_k(k);
  const int64_t N = src.size(0);
  TORCH_CHECK(N % k == 0, "mixlora: src.size(0) (N = T*k) must be a multiple of k = ", k,
              ", got shape ", src.sizes());
  check_tensor("position", position, {N}, at::kInt, src);
  if (weights.has_value()) {
    check_tensor("weights", *weights, {N / k, k}, acc_type(src.scalar_type()), src);
  }
}

// dense [T, D] floating, paired [T*k, D] of dense's dtype, position [T*k] int32.
inline void check_pair_dot(const at::Tensor& dense, const at::Tensor& paired,
                           const at::Tensor& position, int64_t k) {
  MIXLORA_CHECK_DIM("dense", dense, 2);
  MIXLORA_CHECK_FLOAT("dense", dense);
  check_k(k);
  const int64_t N = dense.size(0) * k;
  check_tensor("paired", paired, {N, dense.size(1)}, dense.scalar_type(), dense);
  check_tensor("position", position, {N}, at::kInt, dense);
}

}  // namespace mixlora
