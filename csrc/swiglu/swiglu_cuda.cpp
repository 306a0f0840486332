// CUDA glue of the fused expert SwiGLU and combine: checks (shared with the CPU glue),
// contiguous inputs, outputs and workspace, launch on the current stream. Kernels:
// swiglu_kernels.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/dropout_rng.h"
#include "swiglu/swiglu_args.h"
#include "swiglu/swiglu_kernels.cuh"

namespace mixlora {
namespace {


constexpr int64_t kDownStream = 2;  // the dropout stream of the down-LoRA input h

// The stacked expert weights' E, 0 when none is given (then nothing is indexed by ids).
int64_t num_experts(const at::Tensor& Bg, const at::Tensor& Bu, const at::Tensor& Ad) {
  for (const at::Tensor* W : {&Bg, &Bu, &Ad}) {
    if (W->defined()) return W->size(0);
  }
  return 0;
}

// Bg / Bu rank-major, [E, R, I], as the CUDA-core kernels read them (swiglu_kernels.cuh).
at::Tensor rank_major_or_undefined(const at::Tensor& B) {
  return B.defined() ? B.transpose(1, 2).contiguous() : at::Tensor();
}

// The inputs forward and backward share, contiguous; Bg / Bu also rank-major once
// make_rank_major is called.
struct SwigluTensors {
  SwigluTensors(const at::Tensor& G_in, const at::Tensor& U_in, const at::Tensor& ids_in,
                const at::Tensor& weights_in, const std::optional<at::Tensor>& zg_in,
                const std::optional<at::Tensor>& Bg_in, const std::optional<at::Tensor>& zu_in,
                const std::optional<at::Tensor>& Bu_in, const std::optional<at::Tensor>& Ad_in)
      : G(G_in.contiguous()), U(U_in.contiguous()), ids(ids_in.contiguous()),
        weights(weights_in.contiguous()), zg(contiguous_or_undefined(zg_in)),
        Bg(contiguous_or_undefined(Bg_in)), zu(contiguous_or_undefined(zu_in)),
        Bu(contiguous_or_undefined(Bu_in)), Ad(contiguous_or_undefined(Ad_in)) {}

  void make_rank_major() {
    Bg_t = rank_major_or_undefined(Bg);
    Bu_t = rank_major_or_undefined(Bu);
  }

  // Fills every field of SwigluInputs (Bg_t / Bu_t null until make_rank_major).
  void fill(cuda::SwigluInputs& in, double scale, int64_t activation, double dropout_p,
            int64_t seed) const {
    in.G = G.const_data_ptr();
    in.U = U.const_data_ptr();
    in.ids = ids.const_data_ptr<int32_t>();
    in.weights = weights.const_data_ptr();
    in.zg = data_or_null(zg);
    in.Bg = data_or_null(Bg);
    in.Bg_t = data_or_null(Bg_t);
    in.zu = data_or_null(zu);
    in.Bu = data_or_null(Bu);
    in.Bu_t = data_or_null(Bu_t);
    in.Ad = data_or_null(Ad);
    in.T = T(), in.I = I(), in.E = num_experts(Bg, Bu, Ad), in.k = k();
    in.Rg = Rg(), in.Ru = Ru(), in.Rd = Rd();
    in.scale = scale;
    in.activation = static_cast<int>(activation);
    in.dropout_p = dropout_p;
    in.key = dropout_key(seed, kDownStream);
    in.dtype = static_cast<cuda::DType>(G.scalar_type());
  }

  int64_t T() const { return G.size(0); }
  int64_t I() const { return G.size(1); }
  int64_t k() const { return ids.size(1); }
  int64_t Rg() const { return Bg.defined() ? Bg.size(2) : 0; }
  int64_t Ru() const { return Bu.defined() ? Bu.size(2) : 0; }
  int64_t Rd() const { return Ad.defined() ? Ad.size(1) : 0; }

  at::Tensor G, U, ids, weights, zg, Bg, zu, Bu, Ad, Bg_t, Bu_t;
};

// An output of `sizes`, or shape [0] for the gradient of an absent optional input.
at::Tensor empty_if(bool present, at::IntArrayRef sizes, const at::TensorOptions& options) {
  return present ? at::empty(sizes, options) : at::empty({0}, options);
}

std::tuple<at::Tensor, at::Tensor> moe_swiglu_cuda(
    const at::Tensor& G_in, const at::Tensor& U_in, const at::Tensor& ids_in,
    const at::Tensor& weights_in, const std::optional<at::Tensor>& zg_in,
    const std::optional<at::Tensor>& Bg_in, const std::optional<at::Tensor>& zu_in,
    const std::optional<at::Tensor>& Bu_in, const std::optional<at::Tensor>& Ad_in, double scale,
    int64_t activation, double dropout_p, int64_t seed) {
  check_moe_swiglu(G_in, U_in, ids_in, weights_in, zg_in, Bg_in, zu_in, Bu_in, Ad_in, activation,
                   dropout_p);
  const c10::cuda::CUDAGuard guard(G_in.device());
  SwigluTensors in(G_in, U_in, ids_in, weights_in, zg_in, Bg_in, zu_in, Bu_in, Ad_in);
  const int64_t T = in.T(), I = in.I(), k = in.k(), Rd = in.Rd();
  const auto acc_options = in.G.options().dtype(acc_type(in.G.scalar_type()));
  auto hbar = at::empty({T, I}, in.G.options());
  auto zd = empty_if(in.Ad.defined(), {T, k, Rd}, acc_options);
  cuda::MoeSwigluParams p{};
  in.fill(p, scale, activation, dropout_p, seed);
  p.hbar = hbar.data_ptr();
  p.zd = in.Ad.defined() ? zd.data_ptr() : nullptr;
  if (cuda::moe_swiglu_needs_rank_major(p)) {
    in.make_rank_major();
    in.fill(p, scale, activation, dropout_p, seed);
  }
  auto workspace = at::empty({cuda::moe_swiglu_workspace_elems(p)}, acc_options);
  p.workspace = workspace.data_ptr();
  C10_CUDA_CHECK(cuda::launch_moe_swiglu(p, c10::cuda::getCurrentCUDAStream()));
  return {hbar, zd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
moe_swiglu_backward_cuda(const at::Tensor& grad_hbar_in,
                         const std::optional<at::Tensor>& grad_zd_in, const at::Tensor& G_in,
                         const at::Tensor& U_in, const at::Tensor& ids_in,
                         const at::Tensor& weights_in, const std::optional<at::Tensor>& zg_in,
                         const std::optional<at::Tensor>& Bg_in,
                         const std::optional<at::Tensor>& zu_in,
                         const std::optional<at::Tensor>& Bu_in,
                         const std::optional<at::Tensor>& Ad_in, const at::Tensor& order_in,
                         const at::Tensor& offsets_in, double scale, int64_t activation,
                         double dropout_p, int64_t seed) {
  check_moe_swiglu_backward(grad_hbar_in, grad_zd_in, G_in, U_in, ids_in, weights_in, zg_in, Bg_in,
                            zu_in, Bu_in, Ad_in, order_in, offsets_in, activation, dropout_p);
  const c10::cuda::CUDAGuard guard(G_in.device());
  SwigluTensors in(G_in, U_in, ids_in, weights_in, zg_in, Bg_in, zu_in, Bu_in, Ad_in);
  const auto grad_hbar = grad_hbar_in.contiguous(), grad_zd = contiguous_or_undefined(grad_zd_in);
  const auto order = order_in.contiguous(), offsets = offsets_in.contiguous();
  const int64_t T = in.T(), I = in.I(), k = in.k(), Rg = in.Rg(), Ru = in.Ru(), Rd = in.Rd();
  const int64_t E = offsets.size(0) - 1;  // the weights' E when any is given (checked)
  const auto options = in.G.options();
  const auto acc_options = options.dtype(acc_type(in.G.scalar_type()));
  auto dG = at::empty({T, I}, options), dU = at::empty({T, I}, options);
  auto dweights = at::empty({T, k}, acc_options);
  auto dzg = empty_if(in.zg.defined(), {T, k, Rg}, acc_options);
  auto dzu = empty_if(in.zu.defined(), {T, k, Ru}, acc_options);
  auto dBg = empty_if(in.Bg.defined(), {E, I, Rg}, options);
  auto dBu = empty_if(in.Bu.defined(), {E, I, Ru}, options);
  auto dAd = empty_if(in.Ad.defined(), {E, Rd, I}, options);
  cuda::MoeSwigluBackwardParams p{};
  in.fill(p, scale, activation, dropout_p, seed);
  p.grad_hbar = grad_hbar.const_data_ptr();
  p.grad_zd = data_or_null(grad_zd);
  p.order = order.const_data_ptr<int32_t>();
  p.offsets = offsets.const_data_ptr<int64_t>();
  p.dG = dG.data_ptr();
  p.dU = dU.data_ptr();
  p.dweights = dweights.data_ptr();
  p.dzg = in.zg.defined() ? dzg.data_ptr() : nullptr;
  p.dzu = in.zu.defined() ? dzu.data_ptr() : nullptr;
  p.dBg = in.Bg.defined() ? dBg.data_ptr() : nullptr;
  p.dBu = in.Bu.defined() ? dBu.data_ptr() : nullptr;
  p.dAd = in.Ad.defined() ? dAd.data_ptr() : nullptr;
  if (cuda::moe_swiglu_backward_needs_rank_major(p)) {  // the CUDA-core passes
    in.make_rank_major();
    p.Bg_t = data_or_null(in.Bg_t);
    p.Bu_t = data_or_null(in.Bu_t);
  }
  auto workspace = at::empty({cuda::moe_swiglu_backward_workspace_elems(p)}, acc_options);
  p.workspace = workspace.data_ptr();
  C10_CUDA_CHECK(cuda::launch_moe_swiglu_backward(p, c10::cuda::getCurrentCUDAStream()));
  return {dG, dU, dweights, dzg, dzu, dBg, dBu, dAd};
}

}  // namespace

TORCH_LIBRARY_IMPL(mixlora, CUDA, m) {
  m.impl("moe_swiglu", &moe_swiglu_cuda);
  m.impl("moe_swiglu_backward", &moe_swiglu_backward_cuda);
}

}  // namespace mixlora
