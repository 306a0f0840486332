// The gate activations the fused SwiGLU supports, with their derivatives, in acc precision.
// Codes match mixlora_ext.ops.ACTIVATIONS.
#pragma once
#include <cmath>

#include "host_device.h"

namespace mixlora {

enum Activation : int { kSilu = 0, kGelu = 1, kGeluTanh = 2, kRelu = 3 };

// std:: overloads keep float math in float on the host (an unqualified exp(float) would be
// C's double exp there); nvcc maps them to its device math functions.
template <typename acc_t>
MIXLORA_HD acc_t sigmoid(acc_t x) {
  return acc_t(1) / (acc_t(1) + std::exp(-x));
}

template <typename acc_t>
MIXLORA_HD acc_t activate(int act, acc_t x) {
  switch (act) {
    case kSilu:
      return x * sigmoid(x);
    case kGelu:
      return acc_t(0.5) * x * (acc_t(1) + std::erf(x * acc_t(0.70710678118654752440)));
    case kGeluTanh: {
      const acc_t c = acc_t(0.79788456080286535588);  // sqrt(2 / pi)
      return acc_t(0.5) * x * (acc_t(1) + std::tanh(c * (x + acc_t(0.044715) * x * x * x)));
    }
    default:
      return x > acc_t(0) ? x : acc_t(0);
  }
}

template <typename acc_t>
MIXLORA_HD acc_t activate_grad(int act, acc_t x) {
  switch (act) {
    case kSilu: {
      const acc_t s = sigmoid(x);
      return s * (acc_t(1) + x * (acc_t(1) - s));
    }
    case kGelu: {
      const acc_t cdf = acc_t(0.5) * (acc_t(1) + std::erf(x * acc_t(0.70710678118654752440)));
      const acc_t pdf = std::exp(acc_t(-0.5) * x * x) * acc_t(0.39894228040143267794);
      return cdf + x * pdf;
    }
    case kGeluTanh: {
      const acc_t c = acc_t(0.79788456080286535588);
      const acc_t inner = c * (x + acc_t(0.044715) * x * x * x);
      const acc_t th = std::tanh(inner);
      return acc_t(0.5) * (acc_t(1) + th) +
             acc_t(0.5) * x * (acc_t(1) - th * th) * c * (acc_t(1) + acc_t(3 * 0.044715) * x * x);
    }
    default:
      return x > acc_t(0) ? acc_t(1) : acc_t(0);
  }
}

}  // namespace mixlora
