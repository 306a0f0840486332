// Argument checks shared by the CPU and CUDA glue: every message names the argument and
// what was expected.
#pragma once
#include <ATen/core/Tensor.h>
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

}  // namespace mixlora
