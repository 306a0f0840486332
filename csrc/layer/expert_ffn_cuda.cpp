// CUDA kernel of expert_ffn, reached below the Autograd key (no grad mode, or nothing that
// requires grad): a few tokens without LoRA dropout take the decode path (decode_kernels.cuh:
// the frozen GEMMs and three kernels, six launches in all against ~16 composed); everything
// else, and any call whose shapes, dtypes or devices are off (so that the composed forward's
// ops raise their errors), takes expert_ffn_forward.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <cstdlib>

#include "layer/decode_kernels.cuh"
#include "layer/expert_ffn.h"

namespace mixlora {
namespace {

bool decode_dtype(at::ScalarType t) {
  return t == at::kBFloat16 || t == at::kHalf || t == at::kFloat;
}

// t is a CUDA tensor on `device` of the given sizes.
bool shaped(const at::Tensor& t, const c10::Device& device, at::IntArrayRef sizes) {
  return t.device() == device && t.sizes() == sizes;
}

// What the decode path takes: the LoRA weights' common dtype when it is float32 or x's
// (std::nullopt: take the composed forward).
std::optional<at::ScalarType> decode_weight_dtype(
    const at::Tensor& x, const at::Tensor& gate_weight, const OptTensor& gate_bias,
    const at::Tensor& up_weight, const OptTensor& up_bias, const at::Tensor& down_weight,
    const OptTensor& down_bias, const at::Tensor& router, const std::array<const OptTensor*, 6>& lora,
    int64_t top_k, int64_t activation, double dropout_p) {
  if (x.dim() != 2 || !x.is_cuda() || !decode_dtype(x.scalar_type())) return std::nullopt;
  const int64_t T = x.size(0), H = x.size(1);
  if (T < 1 || T > cuda::kDecodeMaxTokens || dropout_p != 0 || activation < 0 || activation > 3) return std::nullopt;
  if (router.dim() != 2 || router.size(1) != H || !router.is_floating_point()) return std::nullopt;
  const int64_t E = router.size(0), I = gate_weight.dim() == 2 ? gate_weight.size(0) : -1;
  const auto device = x.device();
  if (router.device() != device || top_k < 1 || top_k > E) return std::nullopt;
  for (const at::Tensor* w : {&gate_weight, &up_weight, &down_weight}) {
    if (w->scalar_type() != x.scalar_type()) return std::nullopt;
  }
  if (!shaped(gate_weight, device, {I, H}) || !shaped(up_weight, device, {I, H}) ||
      !shaped(down_weight, device, {H, I})) {
    return std::nullopt;
  }
  for (const auto& [b, n] : {std::pair{&gate_bias, I}, std::pair{&up_bias, I}, std::pair{&down_bias, H}}) {
    if (b->has_value() && (!shaped(**b, device, {n}) || (*b)->scalar_type() != x.scalar_type())) {
      return std::nullopt;
    }
  }
  // LoRA pairs (A [E, r, in], B [E, out, r]) for gate, up (in = H, out = I) and down.
  std::optional<at::ScalarType> wdtype;
  const std::array<std::pair<int64_t, int64_t>, 3> in_out{{{H, I}, {H, I}, {I, H}}};
  for (size_t l = 0; l < 3; ++l) {
    const OptTensor& A = *lora[2 * l];
    const OptTensor& B = *lora[2 * l + 1];
    if (A.has_value() != B.has_value()) return std::nullopt;
    if (!A.has_value()) continue;
    if (A->dim() != 3 || A->size(1) < 1) return std::nullopt;
    const int64_t r = A->size(1);
    const auto [in, out] = in_out[l];
    if (!shaped(*A, device, {E, r, in}) || !shaped(*B, device, {E, out, r})) return std::nullopt;
    for (const at::Tensor* w : {&*A, &*B}) {
      if (wdtype.has_value() && w->scalar_type() != *wdtype) return std::nullopt;
      wdtype = w->scalar_type();
    }
  }
  const auto own = wdtype.value_or(at::kFloat);
  if (own != at::kFloat && own != x.scalar_type()) return std::nullopt;
  return own;
}

const void* data_of(const OptTensor& t) { return t.has_value() ? t->const_data_ptr() : nullptr; }

// How the decode path runs (bench/NOTES.md v8): with kSideStream (the default), the shrink on
// a side stream beside the frozen G and U GEMMs. MIXLORA_DECODE_FLAGS overrides the default,
// for measurements and tests: not a setting.
constexpr int kSideStream = 1;

int decode_flags() {
  const char* env = std::getenv("MIXLORA_DECODE_FLAGS");  // read per call: tests switch it
  return env != nullptr && *env != '\0' ? std::atoi(env) : kSideStream;
}

// Events for the side stream's fork and join, one pair per device and thread, made once.
std::pair<cudaEvent_t, cudaEvent_t> fork_join_events(c10::DeviceIndex device) {
  constexpr int kMaxDevices = 64;
  thread_local std::array<std::pair<cudaEvent_t, cudaEvent_t>, kMaxDevices> events{};
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "expert_ffn: CUDA device index ", device);
  auto& [fork, join] = events[device];
  if (fork == nullptr) {
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&fork, cudaEventDisableTiming));
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&join, cudaEventDisableTiming));
  }
  return events[device];
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> expert_ffn_cuda(
    const at::Tensor& x_in, const at::Tensor& gate_weight, const OptTensor& gate_bias,
    const at::Tensor& up_weight, const OptTensor& up_bias, const at::Tensor& down_weight,
    const OptTensor& down_bias, const at::Tensor& router_in, const OptTensor& Ag_in,
    const OptTensor& Bg_in, const OptTensor& Au_in, const OptTensor& Bu_in, const OptTensor& Ad_in,
    const OptTensor& Bd_in, int64_t top_k, double scale, int64_t activation, double dropout_p,
    int64_t seed) {
  const std::array<const OptTensor*, 6> lora_in{&Ag_in, &Bg_in, &Au_in, &Bu_in, &Ad_in, &Bd_in};
  const auto wdtype = decode_weight_dtype(x_in, gate_weight, gate_bias, up_weight, up_bias,
                                          down_weight, down_bias, router_in, lora_in, top_k,
                                          activation, dropout_p);
  auto composed = [&] {
    return expert_ffn_forward(x_in, gate_weight, gate_bias, up_weight, up_bias, down_weight,
                              down_bias, router_in, Ag_in, Bg_in, Au_in, Bu_in, Ad_in, Bd_in,
                              top_k, scale, activation, dropout_p, seed);
  };
  if (!wdtype.has_value()) return composed();
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.contiguous();
  const auto router =
      (router_in.scalar_type() == at::kFloat ? router_in : router_in.to(at::kFloat)).contiguous();
  std::array<OptTensor, 6> lora;
  for (size_t i = 0; i < lora.size(); ++i) {
    if (lora_in[i]->has_value()) lora[i] = (*lora_in[i])->contiguous();
  }
  const auto& [Ag, Bg, Au, Bu, Ad, Bd] = lora;
  const int64_t T = x.size(0), H = x.size(1), E = router.size(0), I = gate_weight.size(0);
  cuda::DecodeParams p{};
  p.x = x.const_data_ptr();
  p.router = router.const_data_ptr<float>();
  p.Ag = data_of(Ag), p.Bg = data_of(Bg), p.Au = data_of(Au), p.Bu = data_of(Bu);
  p.Ad = data_of(Ad), p.Bd = data_of(Bd);
  p.T = T, p.H = H, p.I = I, p.E = E, p.k = top_k;
  p.Rg = Ag.has_value() ? Ag->size(1) : 0;
  p.Ru = Au.has_value() ? Au->size(1) : 0;
  p.Rd = Ad.has_value() ? Ad->size(1) : 0;
  p.scale = static_cast<float>(scale);
  p.activation = static_cast<int>(activation);
  p.dtype = static_cast<cuda::DType>(x.scalar_type());
  p.wdtype = static_cast<cuda::DType>(*wdtype);
  const int flags = decode_flags();
  if (!cuda::decode_supported(p)) return composed();

  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto f32 = x.options().dtype(at::kFloat);
  const auto new_workspace = [&] {
    auto w = at::empty({cuda::decode_workspace_floats(p)}, f32);
    p.workspace = w.data_ptr<float>();
    return w;
  };
  at::Tensor workspace;
  std::optional<cudaEvent_t> join;
  if ((flags & kSideStream) != 0) {
    // The shrink reads x and the LoRA A / router weights only: a side stream runs it beside
    // the G and U GEMMs, the current stream waits for it before swiglu. Every tensor it touches
    // was made on, or is used next by, the current stream after that wait, so the allocator
    // can reuse none of them early.
    workspace = new_workspace();
    const auto side = c10::cuda::getStreamFromPool(false, x.device().index());
    const auto [fork_event, join_event] = fork_join_events(x.device().index());
    C10_CUDA_CHECK(cudaEventRecord(fork_event, stream));
    C10_CUDA_CHECK(cudaStreamWaitEvent(side, fork_event, 0));
    C10_CUDA_CHECK(cuda::launch_decode_shrink(p, side));
    C10_CUDA_CHECK(cudaEventRecord(join_event, side));
    join = join_event;
  }
  // The frozen GEMMs as early as can be (first of all without the side stream): the GPU runs
  // them while the rest is issued.
  const auto G = at::linear(x, gate_weight, gate_bias);  // [T, I]
  const auto U = at::linear(x, up_weight, up_bias);      // [T, I]
  auto probs = at::empty({T, E}, f32);
  auto ids = at::empty({T, top_k}, x.options().dtype(at::kInt));
  auto hbar = at::empty({T, I}, x.options());
  at::Tensor out = Bd.has_value() ? at::empty({T, H}, x.options()) : at::Tensor();
  p.G = G.const_data_ptr();
  p.U = U.const_data_ptr();
  p.ids = ids.data_ptr<int32_t>();
  p.probs = probs.data_ptr<float>();
  p.hbar = hbar.data_ptr();
  p.y = Bd.has_value() ? out.data_ptr() : nullptr;
  if (join.has_value()) {
    C10_CUDA_CHECK(cudaStreamWaitEvent(stream, *join, 0));
  } else {
    workspace = new_workspace();
    C10_CUDA_CHECK(cuda::launch_decode_shrink(p, stream));
  }
  C10_CUDA_CHECK(cuda::launch_decode_swiglu_expand(p, stream));
  if (Bd.has_value()) {  // y, then the frozen down GEMM onto it (beta = 1), as composed
    out.addmm_(hbar, down_weight.t());
    if (down_bias.has_value()) out.add_(*down_bias);
  } else {
    out = at::linear(hbar, down_weight, down_bias);
  }
  return {out, probs, ids};
}

}  // namespace

TORCH_LIBRARY_IMPL(mixlora, CUDA, m) {
  m.impl("expert_ffn", &expert_ffn_cuda);
}

}  // namespace mixlora
