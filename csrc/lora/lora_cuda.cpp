// CUDA glue of the low-rank expert GEMMs and the dropout mask: checks (shared with the CPU
// glue), contiguous inputs, outputs, launch on the current stream. Kernels: lora_kernels.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/version.h>

#include "common/dropout_rng.h"
#include "lora/lora_args.h"
#include "lora/lora_kernels.cuh"

namespace mixlora {
namespace {


// Whether lora_shrink / lora_expand / lora_weight_grad take their dense GEMM forms
// (LoraShrinkGatherParams, LoraExpandSplitParams): bfloat16, no dropout (a mask per pair and
// column: the shrink has a masked-rows form for it, dense_masked_shrink; the others do not),
// enough tokens for the GEMM to beat the CUDA-core kernels (they are one launch; these two to
// four), and E * R small enough that the E/k times larger product stays cheap.
constexpr int64_t kDenseMinTokens = 256;
constexpr int64_t kDenseMaxCols = 1024;  // E * R

bool dense_lora(at::ScalarType dtype, int64_t T, int64_t cols, double dropout_p) {
  return dtype == at::kBFloat16 && dropout_p == 0 && T >= kDenseMinTokens && cols <= kDenseMaxCols;
}

// The shrink with dropout has a dense form too: its GEMM's rows are the pairs' masked x
// (LoraMaskRowsParams: [N, D], 2 k bytes per element of x, temporary). On the H100 at T = 4096,
// D = 4096, E R = 128 the CUDA-core kernel took 0.25 ms per call (each pair re-reads its
// expert's A); bench/NOTES.md v5f.
bool dense_masked_shrink(at::ScalarType dtype, int64_t pairs, int64_t cols, double dropout_p) {
  return dtype == at::kBFloat16 && dropout_p > 0 && pairs >= kDenseMinTokens && cols <= kDenseMaxCols;
}

// at::mm(a, b, out_dtype) (bf16 in, fp32 out on CUDA), which the dense shrink needs, came with
// PyTorch 2.9; older versions keep the shrink kernels.
#if (TORCH_VERSION_MAJOR > 2) || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 9)
#define MIXLORA_HAS_MM_OUT_DTYPE 1
#else
#define MIXLORA_HAS_MM_OUT_DTYPE 0
#endif

at::Tensor lora_shrink_cuda(const at::Tensor& x_in, const at::Tensor& A_in,
                            const at::Tensor& ids_in, double dropout_p, int64_t seed,
                            int64_t stream) {
  check_lora_shrink(x_in, A_in, ids_in, dropout_p);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.contiguous();
  const auto A = A_in.contiguous();
  const auto ids = ids_in.contiguous();
  const int64_t T = x.size(0), D = x.size(1), E = A.size(0), R = A.size(1), k = ids.size(1);
  auto z = at::empty({T, k, R}, x.options().dtype(acc_type(x.scalar_type())));
#if MIXLORA_HAS_MM_OUT_DTYPE
  if (dense_lora(x.scalar_type(), T, E * R, dropout_p)) {  // one GEMM (lora_kernels.cuh)
    const auto z_all = at::mm(x, A.view({E * R, D}).t(), at::kFloat);
    const cuda::LoraShrinkGatherParams gp{z_all.const_data_ptr<float>(), ids.const_data_ptr<int32_t>(),
                                          z.data_ptr<float>(), T, k, E, R, 1.f};
    C10_CUDA_CHECK(cuda::launch_lora_shrink_gather(gp, c10::cuda::getCurrentCUDAStream()));
    return z;
  }
  if (dense_masked_shrink(x.scalar_type(), T * k, E * R, dropout_p)) {  // masked rows, one GEMM
    const auto stream_now = c10::cuda::getCurrentCUDAStream();
    auto xm = at::empty({T * k, D}, x.options());
    const cuda::LoraMaskRowsParams mp{x.const_data_ptr(), xm.data_ptr(), T, k, D, dropout_p,
                                      dropout_key(seed, stream)};
    C10_CUDA_CHECK(cuda::launch_lora_mask_rows(mp, stream_now));
    const auto z_all = at::mm(xm, A.view({E * R, D}).t(), at::kFloat);  // [N, E R]
    const DropoutScale<float> drop(dropout_p, 0);
    const cuda::LoraShrinkGatherParams gp{z_all.const_data_ptr<float>(), ids.const_data_ptr<int32_t>(),
                                          z.data_ptr<float>(), T * k, 1, E, R, drop.inv_keep};
    C10_CUDA_CHECK(cuda::launch_lora_shrink_gather(gp, stream_now));
    return z;
  }
#endif
  const cuda::LoraShrinkParams p{x.const_data_ptr(), A.const_data_ptr(), ids.const_data_ptr<int32_t>(),
                                 z.data_ptr(),       T, D, E, R, k, dropout_p,
                                 dropout_key(seed, stream),
                                 static_cast<cuda::DType>(x.scalar_type())};
  C10_CUDA_CHECK(cuda::launch_lora_shrink(p, c10::cuda::getCurrentCUDAStream()));
  return z;
}

at::Tensor lora_expand_cuda(const at::Tensor& z_in, const at::Tensor& B_in,
                            const at::Tensor& ids_in, const std::optional<at::Tensor>& coef_in,
                            double dropout_p, int64_t seed, int64_t stream) {
  check_lora_expand(z_in, B_in, ids_in, coef_in, dropout_p);
  const c10::cuda::CUDAGuard guard(B_in.device());
  const auto z = z_in.contiguous();
  const auto ids = ids_in.contiguous();
  const auto coef = contiguous_or_undefined(coef_in);
  const int64_t T = z.size(0), k = z.size(1), E = B_in.size(0), D = B_in.size(1), R = B_in.size(2);
  auto y = at::empty({T, D}, B_in.options());
  if (dense_lora(B_in.scalar_type(), T, E * R, dropout_p)) {  // one GEMM on tensor cores (lora_kernels.cuh)
    auto zm = at::empty({T, 2 * E * R}, B_in.options());
    const cuda::LoraExpandSplitParams sp{z.const_data_ptr<float>(), ids.const_data_ptr<int32_t>(),
                                         coef.defined() ? coef.const_data_ptr<float>() : nullptr,
                                         zm.data_ptr(), T, k, E, R};
    C10_CUDA_CHECK(cuda::launch_lora_expand_split(sp, c10::cuda::getCurrentCUDAStream()));
    // [B_t; B_t] [2 E R, D] written in one copy from B's [E, D, R] layout (a view of it).
    const auto B_t = B_in.transpose(1, 2);
    at::mm_out(y, zm, at::cat({B_t, B_t}).view({2 * E * R, D}));
    return y;
  }
  // Rank-major [E, R, D] for coalesced reads (no copy when B is itself a transposed view, as
  // in the shrink's backward).
  const auto B_t = B_in.transpose(1, 2).contiguous();
  const cuda::LoraExpandParams p{z.const_data_ptr(), B_t.const_data_ptr(), ids.const_data_ptr<int32_t>(),
                                 data_or_null(coef), y.data_ptr(),       T, D, E, R, k, dropout_p,
                                 dropout_key(seed, stream),
                                 static_cast<cuda::DType>(B_t.scalar_type())};
  C10_CUDA_CHECK(cuda::launch_lora_expand(p, c10::cuda::getCurrentCUDAStream()));
  return y;
}

at::Tensor lora_weight_grad_cuda(const at::Tensor& z_in, const at::Tensor& x_in,
                                 const at::Tensor& order_in, const at::Tensor& offsets_in,
                                 const std::optional<at::Tensor>& coef_in, double dropout_p,
                                 int64_t seed, int64_t stream) {
  check_lora_weight_grad(z_in, x_in, order_in, offsets_in, coef_in, dropout_p);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto z = z_in.contiguous();
  const auto x = x_in.contiguous();
  const auto order = order_in.contiguous();
  const auto offsets = offsets_in.contiguous();
  const auto coef = contiguous_or_undefined(coef_in);
  const int64_t T = x.size(0), D = x.size(1), k = z.size(1), R = z.size(2);
  const int64_t E = offsets.size(0) - 1;
  auto out = at::empty({E, R, D}, z.options());  // every element written (0 for empty experts)
#if MIXLORA_HAS_MM_OUT_DTYPE
  if (dense_lora(x.scalar_type(), T, E * R, dropout_p)) {  // one GEMM on tensor cores
    // The slots' experts from order, their (coef *) z split into bf16 hi + lo at their experts'
    // columns as the expand's dense form does (zm [T, 2 E R]), then [hi; lo] = zm^T @ x
    // ([2 E R, D], fp32 out) and out = hi + lo: E/k times the useful work, against 0.129 ms
    // for the layer step's two lora_weight_grad_kernel calls at T = 4096, H = 4096, E = 8,
    // r = 16 on the H100 (bench/NOTES.md v5e, v15).
    const auto stream_now = c10::cuda::getCurrentCUDAStream();
    auto ids = at::empty({T, k}, order.options());
    const cuda::LoraPairIdsParams ip{order.const_data_ptr<int32_t>(),
                                     offsets.const_data_ptr<int64_t>(), ids.data_ptr<int32_t>(),
                                     T * k, E};
    C10_CUDA_CHECK(cuda::launch_lora_pair_ids(ip, stream_now));
    auto zm = at::empty({T, 2 * E * R}, x.options());
    const cuda::LoraExpandSplitParams sp{z.const_data_ptr<float>(), ids.const_data_ptr<int32_t>(),
                                         coef.defined() ? coef.const_data_ptr<float>() : nullptr,
                                         zm.data_ptr(), T, k, E, R};
    C10_CUDA_CHECK(cuda::launch_lora_expand_split(sp, stream_now));
    const auto terms = at::mm(zm.t(), x, at::kFloat);  // [2 E R, D]
    auto out_2d = out.view({E * R, D});
    at::add_out(out_2d, terms.narrow(0, 0, E * R), terms.narrow(0, E * R, E * R));
    return out;
  }
#endif
  cuda::LoraWeightGradParams p{z.const_data_ptr(), x.const_data_ptr(),
                               order.const_data_ptr<int32_t>(), offsets.const_data_ptr<int64_t>(),
                               data_or_null(coef), out.data_ptr(), nullptr, T, D, E, R, k, dropout_p,
                               dropout_key(seed, stream),
                               static_cast<cuda::DType>(x.scalar_type())};
  auto workspace = at::empty({cuda::lora_weight_grad_workspace_elems(p)}, z.options());
  p.workspace = workspace.data_ptr();
  C10_CUDA_CHECK(cuda::launch_lora_weight_grad(p, c10::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor dropout_mask_cuda(const at::Tensor& like, int64_t seed, int64_t stream, int64_t rows,
                             int64_t cols, double p) {
  check_dropout_mask(rows, cols, p);
  const c10::cuda::CUDAGuard guard(like.device());
  auto mask = at::empty({rows, cols}, like.options().dtype(at::kBool));
  const cuda::DropoutMaskParams params{mask.data_ptr<bool>(), rows * cols,
                                       dropout_key(seed, stream), static_cast<float>(p)};
  C10_CUDA_CHECK(cuda::launch_dropout_mask(params, c10::cuda::getCurrentCUDAStream()));
  return mask;
}

}  // namespace

TORCH_LIBRARY_IMPL(mixlora, CUDA, m) {
  m.impl("lora_shrink", &lora_shrink_cuda);
  m.impl("lora_expand", &lora_expand_cuda);
  m.impl("lora_weight_grad", &lora_weight_grad_cuda);
  m.impl("dropout_mask", &dropout_mask_cuda);
}

}  // namespace mixlora
