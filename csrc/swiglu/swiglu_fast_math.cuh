// Device-only math shared by the 16-bit SwiGLU kernels (the tensor-core kernels of
// swiglu_mma_kernels.cu and the 16-bit instances of the expert-major pass in swiglu_kernels.cu):
// a fast SiLU with its derivative, and the split of an fp32 value into two bf16 terms for MMAs
// that keep ~16 bits of it. CUDA headers only (nvcc -c checks it without torch).
#pragma once
#include <cuda_bf16.h>

#include <cstdint>
#include <type_traits>

#include "common/activation.h"
#include "common/cuda_utils.cuh"

namespace mixlora {
namespace cuda {

// ACT of activation_at: kSilu, or kAnyActivation for the run-time switch of common/activation.h.
constexpr int kAnyActivation = -1;

template <typename acc_t>
struct ActValue {
  acc_t a, da;  // act(g), act'(g)
};

// The gate activation's value and derivative at g. kAnyActivation: activate / activate_grad
// (precise math, any acc_t). kSilu with float: sigmoid from the hardware approximations
// ex2.approx and rcp.approx (relative error ~2^-22, far below the 2^-8 rounding of the 16-bit
// outputs these kernels write): ~6 instructions instead of ~40 with the precise expf, the IEEE
// division and the switch (bench/NOTES.md v4). g -> -inf: ex2 gives inf, rcp 0, act = -0;
// NaN stays NaN.
template <int ACT, typename acc_t>
__device__ __forceinline__ ActValue<acc_t> activation_at(int act, acc_t g) {
  if constexpr (ACT == kSilu && std::is_same_v<acc_t, float>) {
    float e, sg;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(g * -1.4426950408889634f));
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(sg) : "f"(1.f + e));
    return {g * sg, sg * fmaf(g, 1.f - sg, 1.f)};
  } else {
    return {activate(act, g), activate_grad(act, g)};
  }
}

// (a, b) = hi + lo with hi, lo bf16 pairs: hi the rounded values, lo the rounded remainders.
__device__ __forceinline__ void split_bf16x2(float a, float b, uint32_t& hi, uint32_t& lo) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  const float2 hf = __bfloat1622float2(h);
  hi = pack_bf16x2(h);
  lo = pack_bf16x2(__floats2bfloat162_rn(a - hf.x, b - hf.y));
}

}  // namespace cuda
}  // namespace mixlora
