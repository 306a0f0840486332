// CUDA glue of the permutation ops: checks (shared with the CPU glue), contiguous inputs,
// outputs, launch on the current stream. Kernels: permute_kernels.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "permute/permute_args.h"
#include "permute/permute_kernels.cuh"

namespace mixlora {

// cuda::DType mirrors c10::ScalarType's numbering, so every glue file converts with a cast.
static_assert(static_cast<int>(cuda::DType::kFloat16) == static_cast<int>(at::kHalf));
static_assert(static_cast<int>(cuda::DType::kFloat32) == static_cast<int>(at::kFloat));
static_assert(static_cast<int>(cuda::DType::kFloat64) == static_cast<int>(at::kDouble));
static_assert(static_cast<int>(cuda::DType::kBFloat16) == static_cast<int>(at::kBFloat16));

namespace {


std::tuple<at::Tensor, at::Tensor, at::Tensor> sort_pairs_cuda(const at::Tensor& ids_in,
                                                               int64_t num_experts) {
  check_sort_pairs(ids_in, num_experts);
  const c10::cuda::CUDAGuard guard(ids_in.device());
  const auto ids = ids_in.contiguous();
  const int64_t N = ids.numel(), E = num_experts;
  auto order = at::empty({N}, ids.options());
  auto offsets = at::empty({E + 1}, ids.options().dtype(at::kLong));
  auto position = at::empty({N}, ids.options());
  // Per-chunk counts, then write cursors; its size follows from N and E only.
  auto chunk_cursor = at::empty({cuda::sort_pairs_num_chunks(N) * E}, ids.options());
  const cuda::SortPairsParams p{ids.const_data_ptr<int32_t>(), order.data_ptr<int32_t>(),
                                offsets.data_ptr<int64_t>(),   position.data_ptr<int32_t>(),
                                chunk_cursor.data_ptr<int32_t>(), N, E};
  C10_CUDA_CHECK(cuda::launch_sort_pairs(p, c10::cuda::getCurrentCUDAStream()));
  return {order, offsets, position};
}

at::Tensor gather_pairs_cuda(const at::Tensor& src_in, const at::Tensor& order_in, int64_t k,
                             const std::optional<at::Tensor>& weights_in) {
  check_gather_pairs(src_in, order_in, k, weights_in);
  const c10::cuda::CUDAGuard guard(src_in.device());
  const auto src = src_in.contiguous();
  const auto order = order_in.contiguous();
  const auto weights = contiguous_or_undefined(weights_in);
  const int64_t N = order.numel(), D = src.size(1);
  auto out = at::empty({N, D}, src.options());
  const cuda::GatherPairsParams p{src.const_data_ptr(), order.const_data_ptr<int32_t>(),
                                  data_or_null(weights), out.data_ptr(), N, D, k,
                                  static_cast<cuda::DType>(src.scalar_type())};
  C10_CUDA_CHECK(cuda::launch_gather_pairs(p, c10::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor scatter_pairs_cuda(const at::Tensor& src_in, const at::Tensor& position_in, int64_t k,
                              const std::optional<at::Tensor>& weights_in) {
  check_scatter_pairs(src_in, position_in, k, weights_in);
  const c10::cuda::CUDAGuard guard(src_in.device());
  const auto src = src_in.contiguous();
  const auto position = position_in.contiguous();
  const auto weights = contiguous_or_undefined(weights_in);
  const int64_t T = src.size(0) / k, D = src.size(1);
  auto out = at::empty({T, D}, src.options());
  const cuda::ScatterPairsParams p{src.const_data_ptr(), position.const_data_ptr<int32_t>(),
                                   data_or_null(weights), out.data_ptr(), T, D, k,
                                   static_cast<cuda::DType>(src.scalar_type())};
  C10_CUDA_CHECK(cuda::launch_scatter_pairs(p, c10::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor pair_dot_cuda(const at::Tensor& dense_in, const at::Tensor& paired_in,
                         const at::Tensor& position_in, int64_t k) {
  check_pair_dot(dense_in, paired_in, position_in, k);
  const c10::cuda::CUDAGuard guard(dense_in.device());
  const auto dense = dense_in.contiguous();
  const auto paired = paired_in.contiguous();
  const auto position = position_in.contiguous();
  const int64_t T = dense.size(0), D = dense.size(1);
  auto out = at::empty({T, k}, dense.options().dtype(acc_type(dense.scalar_type())));
  const cuda::PairDotParams p{dense.const_data_ptr(), paired.const_data_ptr(),
                              position.const_data_ptr<int32_t>(), out.data_ptr(), T, D, k,
                              static_cast<cuda::DType>(dense.scalar_type())};
  C10_CUDA_CHECK(cuda::launch_pair_dot(p, c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mixlora, CUDA, m) {
  m.impl("sort_pairs", &sort_pairs_cuda);
  m.impl("gather_pairs", &gather_pairs_cuda);
  m.impl("scatter_pairs", &scatter_pairs_cuda);
  m.impl("pair_dot", &pair_dot_cuda);
}

}  // namespace mixlora
