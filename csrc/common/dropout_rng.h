// Counter-based LoRA-dropout masks, identical on CPU and GPU.
//
// Element `col` of pair `q` in dropout stream `stream` (0: gate input x, 1: up input x,
// 2: down input h) is kept iff uniform(seed, stream, q * cols + col) >= p. Nothing is stored:
// forward and backward regenerate the same mask from (seed, stream). Kept values are scaled
// by 1 / (1 - p), as in torch.nn.Dropout.
#pragma once
#include <cstdint>

#include "host_device.h"

namespace mixlora {

MIXLORA_HD uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// One key per (seed, stream); hashing key + element index gives independent uniforms.
MIXLORA_HD uint64_t dropout_key(int64_t seed, int64_t stream) {
  return splitmix64(static_cast<uint64_t>(seed) ^ splitmix64(static_cast<uint64_t>(stream)));
}

// 24-bit uniform in [0, 1): exact in float32, so CPU and GPU agree bit for bit.
MIXLORA_HD bool dropout_keep(uint64_t key, int64_t index, float p) {
  const uint64_t h = splitmix64(key + static_cast<uint64_t>(index));
  const float u = static_cast<float>(h >> 40) * (1.0f / 16777216.0f);
  return u >= p;
}

// The mask of one (seed, stream) key as factors: 1 / (1 - p) where kept, else 0.
template <typename acc_t>
struct DropoutScale {
  MIXLORA_HD DropoutScale(double p, uint64_t key)
      : key(key), p(static_cast<float>(p)),
        inv_keep(acc_t(1) / (acc_t(1) - static_cast<acc_t>(p))), active(p > 0) {}

  MIXLORA_HD bool keep(int64_t index) const { return dropout_keep(key, index, p); }
  MIXLORA_HD acc_t factor(int64_t index) const { return keep(index) ? inv_keep : acc_t(0); }

  uint64_t key;
  float p;
  acc_t inv_keep;
  bool active;  // false when p == 0: then there is no mask at all
};

}  // namespace mixlora
