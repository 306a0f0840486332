// The layer step's op, expert_ffn (schema: registration.cpp), as the files of csrc/layer share
// it: its C++ signature and the composed forward (expert_ffn_composite.cpp), which the CUDA
// kernel (expert_ffn_cuda.cpp) falls back to outside its decode path.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace mixlora {

using OptTensor = std::optional<at::Tensor>;

using ExpertFFNSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor& x, const at::Tensor& gate_weight, const OptTensor& gate_bias,
    const at::Tensor& up_weight, const OptTensor& up_bias, const at::Tensor& down_weight,
    const OptTensor& down_bias, const at::Tensor& router, const OptTensor& Ag,
    const OptTensor& Bg, const OptTensor& Au, const OptTensor& Bu, const OptTensor& Ad,
    const OptTensor& Bd, int64_t top_k, double scale, int64_t activation, double dropout_p,
    int64_t seed);

// The forward alone, composed of the other ops (every backend; nothing kept for a backward).
ExpertFFNSig expert_ffn_forward;

}  // namespace mixlora
