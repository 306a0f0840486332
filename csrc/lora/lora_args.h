// Argument checks of the LoRA ops, shared by the CPU and CUDA glue. The dropout seed and
// stream take any value, so they are not checked.
#pragma once
#include <ATen/core/Tensor.h>

#include "common/checks.h"

namespace mixlora {

inline void check_dropout_p(double p) {
  TORCH_CHECK(p >= 0 && p < 1, "mixlora: dropout_p must be in [0, 1), got ", p);
}

// A stacked expert weight: 3-D [E, ..., ...] of `dtype` on ref's device with E >= 1 and its
// rank dimension r_dim of size R >= 1.
inline void check_lora_weight(const char* name, const at::Tensor& W, int64_t r_dim,
                              at::ScalarType dtype, const at::Tensor& ref) {
  MIXLORA_CHECK_DIM(name, W, 3);
  MIXLORA_CHECK_DTYPE(name, W, dtype);
  MIXLORA_CHECK_SAME_DEVICE(name, W, ref);
  TORCH_CHECK(W.size(0) >= 1, "mixlora: ", name, ".size(0) (E) must be >= 1, got shape ",
              W.sizes());
  TORCH_CHECK(W.size(r_dim) >= 1, "mixlora: ", name, ".size(", r_dim,
              ") (R) must be >= 1, got shape ", W.sizes());
}

// x [T, D] floating, A [E, R, D] of x's dtype, ids [T, k] int32.
inline void check_lora_shrink(const at::Tensor& x, const at::Tensor& A, const at::Tensor& ids,
                              double dropout_p) {
  MIXLORA_CHECK_DIM("x", x, 2);
  MIXLORA_CHECK_FLOAT("x", x);
  check_lora_weight("A", A, 1, x.scalar_type(), x);
  MIXLORA_CHECK_SIZE("A", A, 2, x.size(1));
  check_ids(ids, x.size(0), x);
  check_dropout_p(dropout_p);
}

// z [T, k, R] acc, B [E, D, R] floating, ids [T, k] int32, coef [T, k]? acc.
inline void check_lora_expand(const at::Tensor& z, const at::Tensor& B, const at::Tensor& ids,
                              const std::optional<at::Tensor>& coef, double dropout_p) {
  MIXLORA_CHECK_FLOAT("B", B);
  check_lora_weight("B", B, 2, B.scalar_type(), B);
  MIXLORA_CHECK_DIM("z", z, 3);
  const int64_t T = z.size(0);
  const int64_t k = check_ids(ids, T, B);
  const auto acc = acc_type(B.scalar_type());
  check_tensor("z", z, {T, k, B.size(2)}, acc, B);
  if (coef.has_value()) check_tensor("coef", *coef, {T, k}, acc, B);
  check_dropout_p(dropout_p);
}

// z [T, k, R] acc, x [T, D] floating, order [T*k] int32, offsets [E + 1] int64, coef [T, k]? acc.
inline void check_lora_weight_grad(const at::Tensor& z, const at::Tensor& x,
                                   const at::Tensor& order, const at::Tensor& offsets,
                                   const std::optional<at::Tensor>& coef, double dropout_p) {
  MIXLORA_CHECK_DIM("x", x, 2);
  MIXLORA_CHECK_FLOAT("x", x);
  const int64_t T = x.size(0);
  const auto acc = acc_type(x.scalar_type());
  MIXLORA_CHECK_DIM("z", z, 3);
  MIXLORA_CHECK_SIZE("z", z, 0, T);
  MIXLORA_CHECK_DTYPE("z", z, acc);
  MIXLORA_CHECK_SAME_DEVICE("z", z, x);
  const int64_t k = z.size(1);
  TORCH_CHECK(k >= 1, "mixlora: z.size(1) (k) must be >= 1, got shape ", z.sizes());
  TORCH_CHECK(z.size(2) >= 1, "mixlora: z.size(2) (R) must be >= 1, got shape ", z.sizes());
  check_tensor("order", order, {T * k}, at::kInt, x);
  check_offsets(offsets, x);
  if (coef.has_value()) check_tensor("coef", *coef, {T, k}, acc, x);
  check_dropout_p(dropout_p);
}

// rows, cols >= 0, 0 <= p < 1.
inline void check_dropout_mask(int64_t rows, int64_t cols, double p) {
  TORCH_CHECK(rows >= 0 && cols >= 0, "mixlora: rows and cols must be >= 0, got rows = ", rows,
              ", cols = ", cols);
  check_dropout_p(p);
}

}  // namespace mixlora
