// Argument checks of the fused SwiGLU ops, shared by the CPU and CUDA glue.
#pragma once
#include <ATen/core/Tensor.h>

#include "common/activation.h"
#include "common/checks.h"
#include "lora/lora_args.h"

namespace mixlora {

namespace detail {

// The number of experts E that the stacked weights agree on; -1 until one weight is seen.
inline void check_num_experts(const char* name, const at::Tensor& W, int64_t& E) {
  if (E < 0) E = W.size(0);
  TORCH_CHECK(W.size(0) == E, "mixlora: ", name, ".size(0) (E) must match the other expert ",
              "weights' E = ", E, ", got shape ", W.sizes());
}

// z [T, k, R] acc and B [E, I, R] of G's dtype, both present or both absent.
inline void check_swiglu_lora(const char* z_name, const std::optional<at::Tensor>& z,
                              const char* B_name, const std::optional<at::Tensor>& B,
                              const at::Tensor& G, int64_t k, int64_t& E) {
  TORCH_CHECK(z.has_value() == B.has_value(), "mixlora: ", z_name, " and ", B_name,
              " must be given together (got only ", z.has_value() ? z_name : B_name, ")");
  if (!B.has_value()) return;
  check_lora_weight(B_name, *B, 2, G.scalar_type(), G);
  MIXLORA_CHECK_SIZE(B_name, *B, 1, G.size(1));
  check_num_experts(B_name, *B, E);
  check_tensor(z_name, *z, {G.size(0), k, B->size(2)}, acc_type(G.scalar_type()), G);
}

// The inputs moe_swiglu and its backward share; returns k and E (-1 when no expert weight is
// given: then nothing is indexed by ids).
inline std::pair<int64_t, int64_t> check_swiglu_inputs(
    const at::Tensor& G, const at::Tensor& U, const at::Tensor& ids, const at::Tensor& weights,
    const std::optional<at::Tensor>& zg, const std::optional<at::Tensor>& Bg,
    const std::optional<at::Tensor>& zu, const std::optional<at::Tensor>& Bu,
    const std::optional<at::Tensor>& Ad, int64_t activation, double dropout_p) {
  MIXLORA_CHECK_DIM("G", G, 2);
  MIXLORA_CHECK_FLOAT("G", G);
  const int64_t T = G.size(0), I = G.size(1);
  check_tensor("U", U, {T, I}, G.scalar_type(), G);
  const int64_t k = check_ids(ids, T, G);
  check_tensor("weights", weights, {T, k}, acc_type(G.scalar_type()), G);
  int64_t E = -1;
  check_swiglu_lora("zg", zg, "Bg", Bg, G, k, E);
  check_swiglu_lora("zu", zu, "Bu", Bu, G, k, E);
  if (Ad.has_value()) {
    check_lora_weight("Ad", *Ad, 1, G.scalar_type(), G);
    MIXLORA_CHECK_SIZE("Ad", *Ad, 2, I);
    check_num_experts("Ad", *Ad, E);
  }
  TORCH_CHECK(activation >= kSilu && activation <= kRelu,
              "mixlora: activation must be 0 (silu), 1 (gelu), 2 (gelu tanh) or 3 (relu), got ",
              activation);
  check_dropout_p(dropout_p);
  return {k, E};
}

}  // namespace detail

// G, U [T, I] floating; ids [T, k] int32; weights [T, k] acc; zg, zu [T, k, R]? acc;
// Bg, Bu [E, I, R]? and Ad [E, R, I]? of G's dtype.
inline void check_moe_swiglu(const at::Tensor& G, const at::Tensor& U, const at::Tensor& ids,
                             const at::Tensor& weights, const std::optional<at::Tensor>& zg,
                             const std::optional<at::Tensor>& Bg,
                             const std::optional<at::Tensor>& zu,
                             const std::optional<at::Tensor>& Bu,
                             const std::optional<at::Tensor>& Ad, int64_t activation,
                             double dropout_p) {
  detail::check_swiglu_inputs(G, U, ids, weights, zg, Bg, zu, Bu, Ad, activation, dropout_p);
}

// The forward's inputs, plus grad_hbar [T, I] of G's dtype, grad_zd [T, k, R]? acc (only with
// Ad), order [T*k] int32 and offsets [E + 1] int64.
inline void check_moe_swiglu_backward(
    const at::Tensor& grad_hbar, const std::optional<at::Tensor>& grad_zd, const at::Tensor& G,
    const at::Tensor& U, const at::Tensor& ids, const at::Tensor& weights,
    const std::optional<at::Tensor>& zg, const std::optional<at::Tensor>& Bg,
    const std::optional<at::Tensor>& zu, const std::optional<at::Tensor>& Bu,
    const std::optional<at::Tensor>& Ad, const at::Tensor& order, const at::Tensor& offsets,
    int64_t activation, double dropout_p) {
  const auto [k, E] =
      detail::check_swiglu_inputs(G, U, ids, weights, zg, Bg, zu, Bu, Ad, activation, dropout_p);
  const int64_t T = G.size(0);
  check_tensor("grad_hbar", grad_hbar, G.sizes(), G.scalar_type(), G);
  if (grad_zd.has_value()) {
    TORCH_CHECK(Ad.has_value(), "mixlora: grad_zd is given but Ad is absent");
    check_tensor("grad_zd", *grad_zd, {T, k, Ad->size(1)}, acc_type(G.scalar_type()), G);
  }
  check_tensor("order", order, {T * k}, at::kInt, G);
  const int64_t offsets_E = check_offsets(offsets, G);
  TORCH_CHECK(E < 0 || offsets_E == E, "mixlora: offsets must have E + 1 = ", E + 1,
              " entries (E from the expert weights), got shape ", offsets.sizes());
}

}  // namespace mixlora
