// Argument checks shared by the CPU and CUDA glue: every message names the argument and
// what was expected.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#define MIXLORA_CHECK_DIM(name, t, d) \
  TORCH_CHECK((t).dim() == (d), "mixlora: ", name, " must be ", d, "-D, got shape ", (t).sizes())

#define MIXLORA_CHECK_SIZE(name, t, dim, expected)                                              \
  TORCH_CHECK((t).size(dim) == (expected), "mixlora: ", name, ".size(", dim, ") must be ",     \
              (expected), ", got shape ", (t).sizes())

#define MIXLORA_CHECK_FLOAT(name, t)                                                          \
  TORCH_CHECK(at::isFloatingType((t).scalar_type()), "mixlora: ", name,                       \
              " must be a floating tensor, got ", (t).scalar_type())

#define MIXLORA_CHECK_DTYPE(name, t, dtype)                                                     \
  TORCH_CHECK((t).scalar_type() == (dtype), "mixlora: ", name, " must be ", (dtype), ", got ", \
              (t).scalar_type())

#define MIXLORA_CHECK_SAME_DEVICE(name, t, ref)                                             \
  TORCH_CHECK((t).device() == (ref).device(), "mixlora: ", name, " is on ", (t).device(), \
              " but the other inputs are on ", (ref).device())

namespace mixlora {

// float64 for float64 inputs, float32 for everything else: the precision of all sums.
inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// A present optional tensor made contiguous, else an undefined tensor.
inline at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

// A tensor's data, or null for an undefined tensor.
template <typename T = void>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? static_cast<const T*>(t.const_data_ptr()) : nullptr;
}

// Checks of the (token, slot) pair indices (ids, order, position, offsets) every op family takes.
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

}  // namespace mixlora
