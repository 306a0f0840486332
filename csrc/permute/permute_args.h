// Argument checks of the permutation ops, shared by the CPU and CUDA glue. The helpers at the
// top check the (token, slot) pair indices (ids, order, position, offsets) that every op
// family takes, so the other families' checks include this header.
#pragma once
#include <ATen/ATen.h>
#include <limits>

#include "common/checks.h"

namespace mixlora {

// t has exactly shape `sizes`, dtype `dtype` and ref's device.
inline void check_tensor(const char* name, const at::Tensor& t, at::IntArrayRef sizes,
                         at::ScalarType dtype, const at::Tensor& ref) {
  TORCH_CHECK(t.sizes() == sizes, "mixlora: ", name, " must have shape ", sizes, ", got shape ",
              t.sizes());
  MIXLORA_CHECK_DTYPE(name, t, dtype);
  MIXLORA_CHECK_SAME_DEVICE(name, t, ref);
}

// ids [T, k] int32 with k >= 1 on ref's device; returns k.
inline int64_t check_ids(const at::Tensor& ids, int64_t T, const at::Tensor& ref) {
  MIXLORA_CHECK_DIM("ids", ids, 2);
  MIXLORA_CHECK_DTYPE("ids", ids, at::kInt);
  MIXLORA_CHECK_SIZE("ids", ids, 0, T);
  TORCH_CHECK(ids.size(1) >= 1, "mixlora: ids.size(1) (k) must be >= 1, got shape ", ids.sizes());
  MIXLORA_CHECK_SAME_DEVICE("ids", ids, ref);
  return ids.size(1);
}

// offsets [E + 1] int64 with E >= 1 on ref's device; returns E.
inline int64_t check_offsets(const at::Tensor& offsets, const at::Tensor& ref) {
  MIXLORA_CHECK_DIM("offsets", offsets, 1);
  MIXLORA_CHECK_DTYPE("offsets", offsets, at::kLong);
  TORCH_CHECK(offsets.size(0) >= 2, "mixlora: offsets must have E + 1 >= 2 entries, got shape ",
              offsets.sizes());
  MIXLORA_CHECK_SAME_DEVICE("offsets", offsets, ref);
  return offsets.size(0) - 1;
}

// k >= 1, the pair-count divisor of gather/scatter/pair_dot.
inline void check_k(int64_t k) { TORCH_CHECK(k >= 1, "mixlora: k must be >= 1, got ", k); }

// Value checks, for the CPU glue only: on CUDA they would need a host sync.
// Every entry of idx lies in [0, bound).
inline void check_index_values(const char* name, const at::Tensor& idx, int64_t bound) {
  if (idx.numel() == 0) return;
  const auto [lo, hi] = at::aminmax(idx);
  const int64_t min = lo.item<int64_t>(), max = hi.item<int64_t>();
  TORCH_CHECK(min >= 0 && max < bound, "mixlora: ", name, " must hold values in [0, ", bound,
              "), got values in [", min, ", ", max, "]");
}

// offsets starts at 0, never decreases and ends at N.
inline void check_offsets_values(const at::Tensor& offsets, int64_t N) {
  const int64_t first = offsets[0].item<int64_t>(), last = offsets[-1].item<int64_t>();
  TORCH_CHECK(first == 0 && last == N && (offsets.diff() >= 0).all().item<bool>(),
              "mixlora: offsets must rise from 0 to N = ", N, " without decreasing, got ",
              offsets);
}

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
