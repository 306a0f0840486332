// The layer's eager step, forward and backward, each as one op composed of the other ops
// (docs/design.md, "The layer's dataflow"). One registration (CompositeExplicitAutograd) serves
// every backend: the ops inside dispatch to their CPU or CUDA kernels.
//
// Why in C++: the step is ~20 launches forward and ~40 backward. Issued from Python, each cost
// 10-30 us of host time (the op call, its argument parsing, the tensor wrappers), so below a
// few hundred tokens the host, not the GPU, set the time of a step (bench/NOTES.md v5, v6).
// Here each launch costs the dispatcher and the kernel launch alone.
//
// Legend: T tokens, H hidden, I intermediate, E experts, k slots, r rank.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <array>
#include <vector>

#include "common/checks.h"

namespace mixlora {
namespace {

constexpr int64_t kStreamGate = 0, kStreamUp = 1;  // LoRA-dropout streams (dropout_rng.h)

using OptTensor = std::optional<at::Tensor>;
using Tensor2 = std::tuple<at::Tensor, at::Tensor>;
using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using OptTensors = c10::List<OptTensor>;  // Tensor?[]: undefined tensors go out as None

// Typed handles of the ops this file composes, looked up once.
template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

at::Tensor router_logits(const at::Tensor& x, const at::Tensor& w) {
  static const auto h = op<at::Tensor(const at::Tensor&, const at::Tensor&)>("mixlora::router_logits");
  return h.call(x, w);
}

Tensor2 router_logits_backward(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w) {
  static const auto h = op<Tensor2(const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
      "mixlora::router_logits_backward");
  return h.call(g, x, w);
}

Tensor3 topk_gating(const at::Tensor& logits, int64_t k) {
  static const auto h = op<Tensor3(const at::Tensor&, int64_t)>("mixlora::topk_gating");
  return h.call(logits, k);
}

at::Tensor topk_gating_backward(const at::Tensor& gw, const OptTensor& gp, const at::Tensor& w,
                                const at::Tensor& ids, const at::Tensor& probs) {
  static const auto h = op<at::Tensor(const at::Tensor&, const OptTensor&, const at::Tensor&,
                                      const at::Tensor&, const at::Tensor&)>(
      "mixlora::topk_gating_backward");
  return h.call(gw, gp, w, ids, probs);
}

Tensor3 sort_pairs(const at::Tensor& ids, int64_t E) {
  static const auto h = op<Tensor3(const at::Tensor&, int64_t)>("mixlora::sort_pairs");
  return h.call(ids, E);
}

at::Tensor lora_shrink(const at::Tensor& x, const at::Tensor& A, const at::Tensor& ids, double p,
                       int64_t seed, int64_t stream) {
  static const auto h = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      double, int64_t, int64_t)>("mixlora::lora_shrink");
  return h.call(x, A, ids, p, seed, stream);
}

at::Tensor lora_expand(const at::Tensor& z, const at::Tensor& B, const at::Tensor& ids,
                       const OptTensor& coef, double p, int64_t seed, int64_t stream) {
  static const auto h = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      const OptTensor&, double, int64_t, int64_t)>(
      "mixlora::lora_expand");
  return h.call(z, B, ids, coef, p, seed, stream);
}

at::Tensor lora_weight_grad(const at::Tensor& z, const at::Tensor& x, const at::Tensor& order,
                            const at::Tensor& offsets, const OptTensor& coef, double p,
                            int64_t seed, int64_t stream) {
  static const auto h = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      const at::Tensor&, const OptTensor&, double, int64_t,
                                      int64_t)>("mixlora::lora_weight_grad");
  return h.call(z, x, order, offsets, coef, p, seed, stream);
}

Tensor2 moe_swiglu(const at::Tensor& G, const at::Tensor& U, const at::Tensor& ids,
                   const at::Tensor& w, const OptTensor& zg, const OptTensor& Bg,
                   const OptTensor& zu, const OptTensor& Bu, const OptTensor& Ad, double s,
                   int64_t act, double p, int64_t seed) {
  static const auto h =
      op<Tensor2(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                 const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                 const OptTensor&, double, int64_t, double, int64_t)>("mixlora::moe_swiglu");
  return h.call(G, U, ids, w, zg, Bg, zu, Bu, Ad, s, act, p, seed);
}

using SwigluGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                               at::Tensor, at::Tensor, at::Tensor>;

SwigluGrads moe_swiglu_backward(const at::Tensor& gh, const OptTensor& gzd, const at::Tensor& G,
                                const at::Tensor& U, const at::Tensor& ids, const at::Tensor& w,
                                const OptTensor& zg, const OptTensor& Bg, const OptTensor& zu,
                                const OptTensor& Bu, const OptTensor& Ad, const at::Tensor& order,
                                const at::Tensor& offsets, double s, int64_t act, double p,
                                int64_t seed) {
  static const auto h =
      op<SwigluGrads(const at::Tensor&, const OptTensor&, const at::Tensor&, const at::Tensor&,
                     const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                     const OptTensor&, const OptTensor&, const OptTensor&, const at::Tensor&,
                     const at::Tensor&, double, int64_t, double, int64_t)>(
          "mixlora::moe_swiglu_backward");
  return h.call(gh, gzd, G, U, ids, w, zg, Bg, zu, Bu, Ad, order, offsets, s, act, p, seed);
}

// An optional input as a tensor (undefined when absent), and back.
at::Tensor value_or_undefined(const OptTensor& t) { return t.has_value() ? *t : at::Tensor(); }
OptTensor optional(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

OptTensors optionals(std::initializer_list<at::Tensor> ts) {
  OptTensors out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(optional(t));
  return out;
}

// The LoRA weights Ag, Bg, Au, Bu, Ad, Bd in the activations' dtype: the input itself where it
// is of that dtype, undefined where absent. The others are cast by one _foreach_copy_: on a GPU
// one launch for all of them (six were a tenth of a decode step's launches, bench/NOTES.md v6).
using LoraWeights = std::array<at::Tensor, 6>;

LoraWeights cast_lora(const std::array<const OptTensor*, 6>& in, at::ScalarType dtype) {
  LoraWeights out;
  std::vector<at::Tensor> dst, src;
  for (size_t i = 0; i < in.size(); ++i) {
    if (!in[i]->has_value()) continue;
    const at::Tensor& w = **in[i];
    if (w.scalar_type() == dtype) {
      out[i] = w;
    } else {
      out[i] = at::empty(w.sizes(), w.options().dtype(dtype));
      dst.push_back(out[i]);
      src.push_back(w);
    }
  }
  if (!dst.empty()) at::_foreach_copy_(dst, src);
  return out;
}

// A cast made by cast_lora, as an output: undefined where it is the input itself (an op's
// outputs must not alias its inputs; the caller keeps the input).
at::Tensor copy_or_undefined(const at::Tensor& cast, const OptTensor& w) {
  return cast.defined() && !cast.is_same(*w) ? cast : at::Tensor();
}

// out, probs, ids; with save, also what expert_ffn_backward takes, in its order: weights, G, U,
// zg, zu, zd, order, offsets, and Ag, Bg, Au, Bu, Ad, Bd cast to the activations' dtype.
// Undefined tensors (None in Python) for absent inputs, and for weights already of that dtype
// (the backward takes the input itself).
OptTensors expert_ffn(const at::Tensor& x, const at::Tensor& gate_weight,
                                   const OptTensor& gate_bias, const at::Tensor& up_weight,
                                   const OptTensor& up_bias, const at::Tensor& down_weight,
                                   const OptTensor& down_bias, const at::Tensor& router,
                                   const OptTensor& Ag_in, const OptTensor& Bg_in,
                                   const OptTensor& Au_in, const OptTensor& Bu_in,
                                   const OptTensor& Ad_in, const OptTensor& Bd_in, int64_t top_k,
                                   double scale, int64_t activation, double dropout_p,
                                   int64_t seed, bool save) {
  MIXLORA_CHECK_DIM("x", x, 2);
  MIXLORA_CHECK_FLOAT("x", x);
  MIXLORA_CHECK_DIM("router", router, 2);
  const auto dtype = x.scalar_type();
  // The frozen GEMMs first: on a GPU they run while the small ops below are issued.
  const auto G = at::linear(x, gate_weight, gate_bias);                            // [T, I]
  const auto U = at::linear(x, up_weight, up_bias);                                // [T, I]
  const auto logits = router_logits(x, router.to(acc_type(dtype)));                // [T, E] acc
  const auto [weights, ids, probs] = topk_gating(logits, top_k);                   // [T, k] ...
  const auto [Ag, Bg, Au, Bu, Ad, Bd] = cast_lora({&Ag_in, &Bg_in, &Au_in, &Bu_in, &Ad_in, &Bd_in}, dtype);
  const auto zg = Ag.defined() ? lora_shrink(x, Ag, ids, dropout_p, seed, kStreamGate) : at::Tensor();
  const auto zu = Au.defined() ? lora_shrink(x, Au, ids, dropout_p, seed, kStreamUp) : at::Tensor();
  const auto [hbar, zd] = moe_swiglu(G, U, ids, weights, optional(zg), optional(Bg), optional(zu),
                                     optional(Bu), optional(Ad), scale, activation, dropout_p,
                                     seed);                                     // [T, I], [T, k, r]
  at::Tensor out;                                                                  // [T, H]
  if (Bd.defined()) {  // the down LoRA, then the frozen GEMM onto it (beta = 1: no add pass)
    out = lora_expand(zd, Bd, ids, weights * scale, 0.0, 0, 0);
    out.addmm_(hbar, down_weight.t());
    if (down_bias.has_value()) out.add_(*down_bias);
  } else {
    out = at::linear(hbar, down_weight, down_bias);
  }
  if (!save) return optionals({out, probs, ids});
  // The pairs grouped by expert, for every per-expert sum of the backward (sorted once).
  const auto sorted = sort_pairs(ids, router.size(0));
  return optionals({out, probs, ids, weights, G, U, zg, zu, zd, std::get<0>(sorted),
                    std::get<1>(sorted), copy_or_undefined(Ag, Ag_in), copy_or_undefined(Bg, Bg_in),
                    copy_or_undefined(Au, Au_in), copy_or_undefined(Bu, Bu_in),
                    copy_or_undefined(Ad, Ad_in), copy_or_undefined(Bd, Bd_in)});
}

// The gradients of x, router, Ag, Bg, Au, Bu, Ad, Bd (the LoRA weights' in the activations'
// dtype, the router's in acc), each undefined where needs_grad says it is not needed. The
// LoRA weights are expert_ffn's casts; the rest is what it saved. The math is that of the ops'
// own backwards (mixlora_ext/ops.py), term for term.
OptTensors expert_ffn_backward(
    const at::Tensor& grad_out_in, const OptTensor& grad_probs, const at::Tensor& x,
    const at::Tensor& gate_weight, const at::Tensor& up_weight, const at::Tensor& down_weight,
    const at::Tensor& router, const OptTensor& Ag_in, const OptTensor& Bg, const OptTensor& Au_in,
    const OptTensor& Bu, const OptTensor& Ad, const OptTensor& Bd_in, const at::Tensor& weights,
    const at::Tensor& ids, const at::Tensor& probs, const at::Tensor& G, const at::Tensor& U,
    const OptTensor& zg, const OptTensor& zu, const at::Tensor& zd, const at::Tensor& order,
    const at::Tensor& offsets, double s, int64_t activation, double p, int64_t seed,
    std::array<bool, 8> needs_grad) {
  const auto grad_out = grad_out_in.contiguous();
  auto dhbar = grad_out.mm(down_weight);  // [T, I]; first, as in the forward

  // Down LoRA (lora_expand with coef = weights * s, no dropout): its z and coef gradients
  // (a shrink through Bd^T) and dBd.
  at::Tensor grad_zd, dBd, dweights;                                               // [T, k] acc
  if (Bd_in.has_value()) {
    const auto& Bd = *Bd_in;
    const auto coef = weights * s;
    const auto g = lora_shrink(grad_out, Bd.transpose(1, 2), ids, 0.0, 0, 0);     // [T, k, r]
    grad_zd = g * coef.unsqueeze(-1);
    dweights = (g * zd).sum(-1).mul_(s);
    if (needs_grad[7]) {
      dBd = lora_weight_grad(zd, grad_out, order, offsets, coef, 0.0, 0, 0).transpose(1, 2);
    }
  }

  // The fused SwiGLU: dG, dU, the routing weights' share, dz and the expert weights.
  auto [dG, dU, dw, dzg, dzu, dBg, dBu, dAd] = moe_swiglu_backward(
      dhbar, Ad.has_value() ? optional(grad_zd) : std::nullopt, G, U, ids, weights, zg, Bg, zu,
      Bu, Ad, order, offsets, s, activation, p, seed);
  dweights = dweights.defined() ? dweights.add_(dw) : dw;
  dhbar.reset();  // ([T, I]: not held while dx is formed; the peak is in this pass)
  grad_zd.reset();

  // dx: the router's term, the frozen projections accumulated onto it by their GEMMs
  // (beta = 1), then the gate / up shrinks' (expands through A^T with the forward's masks).
  const auto dlogits = topk_gating_backward(dweights, grad_probs, weights, ids, probs);
  auto [dx, drouter] = router_logits_backward(dlogits, x, router.to(acc_type(x.scalar_type())));
  dx.addmm_(dG, gate_weight);
  dx.addmm_(dU, up_weight);
  dG.reset();
  dU.reset();

  at::Tensor dAg, dAu;
  const at::Tensor Ag = value_or_undefined(Ag_in), Au = value_or_undefined(Au_in);
  if (p == 0 && Ag.defined() && Au.defined()) {
    // Without dropout both shrinks see the same x: their dx terms are one expand and their
    // weight gradients one lora_weight_grad, over the two LoRAs' ranks side by side (one pass
    // over x and one [T, H] add fewer; bench/NOTES.md v5e).
    const int64_t Rg = Ag.size(1);
    const auto dz = at::cat({dzg, dzu}, -1);                                     // [T, k, Rg + Ru]
    dx.add_(lora_expand(dz, at::cat({Ag, Au}, 1).transpose(1, 2), ids, std::nullopt, 0.0, 0, 0));
    if (needs_grad[2] || needs_grad[4]) {
      const auto dA = lora_weight_grad(dz, x, order, offsets, std::nullopt, 0.0, 0, 0);
      if (needs_grad[2]) dAg = dA.slice(1, 0, Rg).contiguous();
      if (needs_grad[4]) dAu = dA.slice(1, Rg).contiguous();
    }
  } else {
    auto shrink_backward = [&](const at::Tensor& A, const at::Tensor& dz, int64_t stream,
                               bool needed) {  // dx += drop(dz A); dA if needed
      if (!A.defined()) return at::Tensor();
      dx.add_(lora_expand(dz, A.transpose(1, 2), ids, std::nullopt, p, seed, stream));
      return needed ? lora_weight_grad(dz, x, order, offsets, std::nullopt, p, seed, stream)
                    : at::Tensor();
    };
    dAg = shrink_backward(Ag, dzg, kStreamGate, needs_grad[2]);
    dAu = shrink_backward(Au, dzu, kStreamUp, needs_grad[4]);
  }

  // (An absent weight's input needs no grad, so its [0]-shaped placeholder is dropped.)
  auto keep = [&](at::Tensor g, int i) { return needs_grad[i] ? g : at::Tensor(); };
  return optionals({keep(dx, 0), keep(drouter, 1), keep(dAg, 2), keep(dBg, 3), keep(dAu, 4),
                    keep(dBu, 5), keep(dAd, 6), keep(dBd, 7)});
}

}  // namespace

TORCH_LIBRARY_IMPL(mixlora, CompositeExplicitAutograd, m) {
  m.impl("expert_ffn", &expert_ffn);
  m.impl("expert_ffn_backward", &expert_ffn_backward);
}

}  // namespace mixlora
