// CUDA glue of the gating ops: checks (shared with the CPU glue), contiguous inputs, outputs,
// launch on the current stream. Kernels: gating_kernels.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "gating/gating_args.h"
#include "gating/gating_kernels.cuh"

namespace mixlora {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_gating_cuda(const at::Tensor& logits_in,
                                                                int64_t k) {
  check_topk_gating(logits_in, k);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const auto logits = logits_in.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1);
  const auto acc_options = logits.options().dtype(acc_type(logits.scalar_type()));
  auto weights = at::empty({T, k}, acc_options);
  auto ids = at::empty({T, k}, logits.options().dtype(at::kInt));
  auto probs = at::empty({T, E}, acc_options);
  const cuda::TopkGatingParams p{logits.const_data_ptr(), weights.data_ptr(),
                                 ids.data_ptr<int32_t>(),  probs.data_ptr(),
                                 T,                        E,
                                 k,                        static_cast<cuda::DType>(logits.scalar_type())};
  C10_CUDA_CHECK(cuda::launch_topk_gating(p, c10::cuda::getCurrentCUDAStream()));
  return {weights, ids, probs};
}

at::Tensor topk_gating_backward_cuda(const at::Tensor& grad_weights_in,
                                     const std::optional<at::Tensor>& grad_probs_in,
                                     const at::Tensor& weights_in, const at::Tensor& ids_in,
                                     const at::Tensor& probs_in) {
  check_topk_gating_backward(grad_weights_in, grad_probs_in, weights_in, ids_in, probs_in);
  const c10::cuda::CUDAGuard guard(probs_in.device());
  const auto grad_weights = grad_weights_in.contiguous();
  const auto grad_probs = grad_probs_in.has_value() ? grad_probs_in->contiguous() : at::Tensor();
  const auto weights = weights_in.contiguous();
  const auto ids = ids_in.contiguous();
  const auto probs = probs_in.contiguous();
  auto grad_logits = at::empty(probs.sizes(), probs.options());
  const cuda::TopkGatingBackwardParams p{
      grad_weights.const_data_ptr(),
      grad_probs.defined() ? grad_probs.const_data_ptr() : nullptr,
      weights.const_data_ptr(),
      ids.const_data_ptr<int32_t>(),
      probs.const_data_ptr(),
      grad_logits.data_ptr(),
      probs.size(0),
      probs.size(1),
      ids.size(1),
      static_cast<cuda::DType>(probs.scalar_type())};
  C10_CUDA_CHECK(cuda::launch_topk_gating_backward(p, c10::cuda::getCurrentCUDAStream()));
  return grad_logits;
}

at::Tensor router_logits_cuda(const at::Tensor& x_in, const at::Tensor& weight_in) {
  check_router_logits(x_in, weight_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.contiguous();
  const auto weight = weight_in.contiguous();
  const int64_t T = x.size(0), H = x.size(1), E = weight.size(0);
  if (H == 0) return at::zeros({T, E}, weight.options());  // empty sums
  auto logits = at::empty({T, E}, weight.options());
  const cuda::RouterLogitsParams p{x.const_data_ptr(), weight.const_data_ptr(), logits.data_ptr(),
                                   T, H, E, static_cast<cuda::DType>(x.scalar_type())};
  C10_CUDA_CHECK(cuda::launch_router_logits(p, c10::cuda::getCurrentCUDAStream()));
  return logits;
}

std::tuple<at::Tensor, at::Tensor> router_logits_backward_cuda(const at::Tensor& grad_in,
                                                               const at::Tensor& x_in,
                                                               const at::Tensor& weight_in) {
  check_router_logits_backward(grad_in, x_in, weight_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto grad = grad_in.contiguous();
  const auto x = x_in.contiguous();
  const auto weight = weight_in.contiguous();
  const int64_t T = x.size(0), H = x.size(1), E = weight.size(0);
  auto grad_x = at::empty({T, H}, x.options());
  auto grad_weight = at::empty({E, H}, weight.options());
  if (H == 0) return {grad_x, grad_weight};
  const int64_t ws = cuda::router_backward_workspace_elems(T, H, E);
  const auto workspace = ws > 0 ? at::empty({ws}, weight.options()) : at::Tensor();
  const cuda::RouterLogitsBackwardParams p{grad.const_data_ptr(),
                                           x.const_data_ptr(),
                                           weight.const_data_ptr(),
                                           grad_x.data_ptr(),
                                           grad_weight.data_ptr(),
                                           ws > 0 ? workspace.data_ptr() : nullptr,
                                           T,
                                           H,
                                           E,
                                           static_cast<cuda::DType>(x.scalar_type())};
  C10_CUDA_CHECK(cuda::launch_router_logits_backward(p, c10::cuda::getCurrentCUDAStream()));
  return {grad_x, grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(mixlora, CUDA, m) {
  m.impl("topk_gating", &topk_gating_cuda);
  m.impl("topk_gating_backward", &topk_gating_backward_cuda);
  m.impl("router_logits", &router_logits_cuda);
  m.impl("router_logits_backward", &router_logits_backward_cuda);
}

}  // namespace mixlora
