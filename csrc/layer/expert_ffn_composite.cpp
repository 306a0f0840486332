// The layer's eager step as one op, `expert_ffn`, composed of the other ops and the frozen
// GEMMs (docs/design.md, "The layer's dataflow"), with its backward written out in C++:
//   - CompositeExplicitAutograd kernel: the forward alone (no grad mode, fake tensors); the ops
//     inside dispatch to their CPU or CUDA kernels, so one kernel serves every backend;
//   - Autograd kernel: ExpertFFNFunction, a C++ autograd Function whose forward also keeps
//     what the backward needs (the pairs sorted by expert once, G, U, the LoRA activations and
//     the LoRA weights in x's dtype) and whose backward is the ops' own backwards (ops.py),
//     term for term.
//
// Why in C++: a step is ~20 launches forward and ~40 backward. Issued from Python, each op
// call cost 10-30 us of host time, and a Python autograd Function ~0.2 ms more per step, so
// below a few hundred tokens the host, not the GPU, set the time of a step (bench/NOTES.md v6).
//
// Legend: T tokens, H hidden, I intermediate, E experts, k slots, r rank.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <vector>

#include "common/checks.h"
#include "layer/expert_ffn.h"

namespace mixlora {
namespace {

constexpr int64_t kStreamGate = 0, kStreamUp = 1;  // LoRA-dropout streams (dropout_rng.h)

using Tensor2 = std::tuple<at::Tensor, at::Tensor>;
using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

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

// t in dtype: t itself where it already is. (Tensor::to would return t too, but through a
// dispatched aten::to, whose returning an input the schema checks reject below autograd.)
at::Tensor as_dtype(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}

// A tensor as an optional input (absent when undefined).
OptTensor optional(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// The LoRA weights Ag, Bg, Au, Bu, Ad, Bd (undefined where absent).
using LoraWeights = std::array<at::Tensor, 6>;
using LoraInputs = std::array<const OptTensor*, 6>;

// The LoRA weights in the activations' dtype: the input itself where it is of that dtype. The
// others are cast by one _foreach_copy_: on a GPU one launch for all of them (six were a tenth
// of a decode step's launches, bench/NOTES.md v6).
LoraWeights cast_lora(const LoraInputs& in, at::ScalarType dtype) {
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

// A forward step: its outputs and what its backward takes.
struct Step {
  at::Tensor out, probs, ids;                   // [T, H], [T, E] acc, [T, k] int32
  at::Tensor weights, G, U, zg, zu, zd;         // [T, k] acc, [T, I], [T, I], [T, k, r] acc x 3
  at::Tensor order, offsets;                    // the pairs grouped by expert (only if saved)
  LoraWeights lora;                             // in x's dtype
};

Step step_forward(const at::Tensor& x, const at::Tensor& gate_weight, const OptTensor& gate_bias,
                  const at::Tensor& up_weight, const OptTensor& up_bias,
                  const at::Tensor& down_weight, const OptTensor& down_bias,
                  const at::Tensor& router, const LoraInputs& lora_in, int64_t top_k,
                  double scale, int64_t activation, double dropout_p, int64_t seed, bool save) {
  MIXLORA_CHECK_DIM("x", x, 2);
  MIXLORA_CHECK_FLOAT("x", x);
  MIXLORA_CHECK_DIM("router", router, 2);
  const auto dtype = x.scalar_type();
  Step s;
  // The frozen GEMMs first: on a GPU they run while the small ops below are issued.
  s.G = at::linear(x, gate_weight, gate_bias);                                     // [T, I]
  s.U = at::linear(x, up_weight, up_bias);                                         // [T, I]
  const auto logits = router_logits(x, as_dtype(router, acc_type(dtype)));         // [T, E] acc
  std::tie(s.weights, s.ids, s.probs) = topk_gating(logits, top_k);
  s.lora = cast_lora(lora_in, dtype);
  const auto& [Ag, Bg, Au, Bu, Ad, Bd] = s.lora;
  if (Ag.defined()) s.zg = lora_shrink(x, Ag, s.ids, dropout_p, seed, kStreamGate);  // [T, k, r]
  if (Au.defined()) s.zu = lora_shrink(x, Au, s.ids, dropout_p, seed, kStreamUp);
  at::Tensor hbar;                                                                 // [T, I]
  std::tie(hbar, s.zd) = moe_swiglu(s.G, s.U, s.ids, s.weights, optional(s.zg), optional(Bg),
                                    optional(s.zu), optional(Bu), optional(Ad), scale, activation,
                                    dropout_p, seed);
  if (Bd.defined()) {  // the down LoRA, then the frozen GEMM onto it (beta = 1: no add pass)
    s.out = lora_expand(s.zd, Bd, s.ids, s.weights * scale, 0.0, 0, 0);             // [T, H]
    s.out.addmm_(hbar, down_weight.t());
    if (down_bias.has_value()) s.out.add_(*down_bias);
  } else {
    s.out = at::linear(hbar, down_weight, down_bias);
  }
  if (save) {  // the pairs grouped by expert, for every per-expert sum of the backward
    std::tie(s.order, s.offsets, std::ignore) = sort_pairs(s.ids, router.size(0));
  }
  return s;
}

// Which gradients a backward computes: x, the router, then Ag, Bg, Au, Bu, Ad, Bd.
using Needs = std::array<bool, 8>;

struct Grads {
  at::Tensor dx, drouter;  // x's dtype, acc
  LoraWeights dlora;       // as the ops give them: x's dtype (dBg, dBu, dAd) or acc (the rest)
};

Grads step_backward(const at::Tensor& grad_out_in, const at::Tensor& grad_probs,
                    const at::Tensor& x, const at::Tensor& gate_weight,
                    const at::Tensor& up_weight, const at::Tensor& down_weight,
                    const at::Tensor& router, const Step& f, double s, int64_t activation,
                    double p, int64_t seed, const Needs& needs) {
  const auto& [Ag, Bg, Au, Bu, Ad, Bd] = f.lora;
  const auto grad_out = grad_out_in.contiguous();
  auto dhbar = grad_out.mm(down_weight);  // [T, I]; first, as in the forward
  Grads out;

  // Down LoRA (lora_expand with coef = weights * s, no dropout): its z and coef gradients
  // (a shrink through Bd^T) and dBd.
  at::Tensor grad_zd, dweights;                                                    // [T, k] acc
  if (Bd.defined()) {
    const auto coef = f.weights * s;
    const auto g = lora_shrink(grad_out, Bd.transpose(1, 2), f.ids, 0.0, 0, 0);   // [T, k, r]
    grad_zd = g * coef.unsqueeze(-1);
    dweights = (g * f.zd).sum(-1).mul_(s);
    if (needs[7]) {
      out.dlora[5] = lora_weight_grad(f.zd, grad_out, f.order, f.offsets, coef, 0.0, 0, 0).transpose(1, 2);
    }
  }

  // The fused SwiGLU: dG, dU, the routing weights' share, dz and the expert weights.
  auto [dG, dU, dw, dzg, dzu, dBg, dBu, dAd] = moe_swiglu_backward(
      dhbar, Ad.defined() ? optional(grad_zd) : std::nullopt, f.G, f.U, f.ids, f.weights,
      optional(f.zg), optional(Bg), optional(f.zu), optional(Bu), optional(Ad), f.order,
      f.offsets, s, activation, p, seed);
  dweights = dweights.defined() ? dweights.add_(dw) : dw;
  dhbar.reset();  // ([T, I]: not held while dx is formed; the peak is in this pass)
  grad_zd.reset();

  // dx: the router's term, the frozen projections accumulated onto it by their GEMMs
  // (beta = 1), then the gate / up shrinks' (expands through A^T with the forward's masks).
  const auto dlogits = topk_gating_backward(dweights, grad_probs, f.weights, f.ids, f.probs);
  std::tie(out.dx, out.drouter) =
      router_logits_backward(dlogits, x, as_dtype(router, acc_type(x.scalar_type())));
  out.dx.addmm_(dG, gate_weight);
  out.dx.addmm_(dU, up_weight);
  dG.reset();
  dU.reset();

  if (p == 0 && Ag.defined() && Au.defined()) {
    // Without dropout both shrinks see the same x: their dx terms are one expand and their
    // weight gradients one lora_weight_grad, over the two LoRAs' ranks side by side (one pass
    // over x and one [T, H] add fewer; bench/NOTES.md v5e).
    const int64_t Rg = Ag.size(1);
    const auto dz = at::cat({dzg, dzu}, -1);                                     // [T, k, Rg + Ru]
    out.dx.add_(lora_expand(dz, at::cat({Ag, Au}, 1).transpose(1, 2), f.ids, std::nullopt, 0.0, 0, 0));
    if (needs[2] || needs[4]) {
      const auto dA = lora_weight_grad(dz, x, f.order, f.offsets, std::nullopt, 0.0, 0, 0);
      if (needs[2]) out.dlora[0] = dA.slice(1, 0, Rg).contiguous();
      if (needs[4]) out.dlora[2] = dA.slice(1, Rg).contiguous();
    }
  } else {
    auto shrink_backward = [&](const at::Tensor& A, const at::Tensor& dz, int64_t stream,
                               bool needed) {  // dx += drop(dz A); dA if needed
      if (!A.defined()) return at::Tensor();
      out.dx.add_(lora_expand(dz, A.transpose(1, 2), f.ids, std::nullopt, p, seed, stream));
      return needed ? lora_weight_grad(dz, x, f.order, f.offsets, std::nullopt, p, seed, stream)
                    : at::Tensor();
    };
    out.dlora[0] = shrink_backward(Ag, dzg, kStreamGate, needs[2]);
    out.dlora[2] = shrink_backward(Au, dzu, kStreamUp, needs[4]);
  }
  // (An absent weight needs no gradient: its [0]-shaped placeholder is not returned.)
  if (needs[3]) out.dlora[1] = dBg;
  if (needs[5]) out.dlora[3] = dBu;
  if (needs[6]) out.dlora[4] = dAd;
  return out;
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The autograd node of a step. Its forward only keeps what the step computed before and
// returns the step's outputs: expert_ffn_autograd runs step_forward outside Function::apply,
// so an error in the step is raised before any node exists (on the device's torch 2.11 an
// error thrown inside apply crashed the process; bench/NOTES.md v6).
class ExpertFFNFunction : public torch::autograd::Function<ExpertFFNFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x,
                               const at::Tensor& gate_weight, const OptTensor& gate_bias,
                               const at::Tensor& up_weight, const OptTensor& up_bias,
                               const at::Tensor& down_weight, const OptTensor& down_bias,
                               const at::Tensor& router, const OptTensor& Ag, const OptTensor& Bg,
                               const OptTensor& Au, const OptTensor& Bu, const OptTensor& Ad,
                               const OptTensor& Bd, const Step* step, const Needs& needs,
                               double scale, int64_t activation, double dropout_p,
                               int64_t seed) {
    c10::List<int64_t> dtypes({static_cast<int64_t>(router.scalar_type())});  // the params'
    for (const OptTensor* w : {&Ag, &Bg, &Au, &Bu, &Ad, &Bd}) {
      dtypes.push_back(static_cast<int64_t>(w->has_value() ? (*w)->scalar_type() : x.scalar_type()));
    }
    const Step& s = *step;
    ctx->mark_non_differentiable({s.ids});
    const auto& L = s.lora;
    ctx->save_for_backward({x, gate_weight, up_weight, down_weight, router, s.probs, s.ids,
                            s.weights, s.G, s.U, s.zg, s.zu, s.zd, s.order, s.offsets, L[0], L[1],
                            L[2], L[3], L[4], L[5]});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["activation"] = activation;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["seed"] = seed;
    c10::List<bool> needs_list;
    for (bool n : needs) needs_list.push_back(n);
    ctx->saved_data["needs"] = needs_list;
    ctx->saved_data["dtypes"] = dtypes;
    return {s.out, s.probs, s.ids};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "mixlora: the backward of MixLoRAFFN's expert FFN is not differentiable (no "
                "create_graph / double backward)");
    // Unpacked first, with autograd on: under non-reentrant activation checkpointing this
    // re-runs the checkpointed forward, which must record autograd as usual.
    const variable_list v = ctx->get_saved_variables();
    Step f;
    f.probs = v[5], f.ids = v[6], f.weights = v[7], f.G = v[8], f.U = v[9], f.zg = v[10];
    f.zu = v[11], f.zd = v[12], f.order = v[13], f.offsets = v[14];
    f.lora = {v[15], v[16], v[17], v[18], v[19], v[20]};
    const auto needs_list = ctx->saved_data["needs"].toBoolList();
    const auto dtypes = ctx->saved_data["dtypes"].toIntList();
    Needs needs;
    for (size_t i = 0; i < needs.size(); ++i) needs[i] = needs_list.get(i);
    Grads g;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      g = step_backward(grads[0], grads[1], v[0], v[1], v[2], v[3], v[4], f,
                        ctx->saved_data["scale"].toDouble(), ctx->saved_data["activation"].toInt(),
                        ctx->saved_data["dropout_p"].toDouble(), ctx->saved_data["seed"].toInt(),
                        needs);
      // The router and LoRA gradients in their parameters' dtypes.
      auto as_param = [&](const at::Tensor& grad, size_t i) {
        return grad.defined() ? as_dtype(grad, static_cast<at::ScalarType>(dtypes.get(i))) : grad;
      };
      g.drouter = needs[1] ? as_param(g.drouter, 0) : at::Tensor();
      for (size_t i = 0; i < g.dlora.size(); ++i) g.dlora[i] = as_param(g.dlora[i], i + 1);
    }
    // One gradient per forward argument (undefined for the frozen MLP's and the non-tensors).
    const at::Tensor none;
    const auto& d = g.dlora;
    return {needs[0] ? g.dx : none, none, none, none, none, none, none, g.drouter,
            d[0], d[1], d[2], d[3], d[4], d[5], none, none, none, none, none, none};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> expert_ffn_autograd(
    const at::Tensor& x, const at::Tensor& gate_weight, const OptTensor& gate_bias,
    const at::Tensor& up_weight, const OptTensor& up_bias, const at::Tensor& down_weight,
    const OptTensor& down_bias, const at::Tensor& router, const OptTensor& Ag,
    const OptTensor& Bg, const OptTensor& Au, const OptTensor& Bu, const OptTensor& Ad,
    const OptTensor& Bd, int64_t top_k, double scale, int64_t activation, double dropout_p,
    int64_t seed) {
  // Which gradients a backward would compute: x, router, then the LoRA weights.
  Needs needs{x.requires_grad(), router.requires_grad()};
  const LoraInputs lora_in{&Ag, &Bg, &Au, &Bu, &Ad, &Bd};
  for (size_t i = 0; i < lora_in.size(); ++i) {
    needs[2 + i] = lora_in[i]->has_value() && (*lora_in[i])->requires_grad();
  }
  const bool any_needed = std::find(needs.begin(), needs.end(), true) != needs.end();
  if (!at::GradMode::is_enabled() || !any_needed) {  // no node: nothing to sort or keep
    // Dispatched again below autograd: to the backend's kernel (CUDA: expert_ffn_cuda.cpp,
    // the decode path for a few tokens) or else expert_ffn_forward.
    static const auto h = op<ExpertFFNSig>("mixlora::expert_ffn");
    at::AutoDispatchBelowADInplaceOrView below;
    return h.call(x, gate_weight, gate_bias, up_weight, up_bias, down_weight, down_bias, router,
                  Ag, Bg, Au, Bu, Ad, Bd, top_k, scale, activation, dropout_p, seed);
  }
  for (const at::Tensor* w : {&gate_weight, &up_weight, &down_weight}) {
    TORCH_CHECK(!w->requires_grad(),
                "mixlora: expert_ffn's frozen MLP weights must not require grad (MixLoRAFFN "
                "freezes them; a trainable base MLP takes the per-op path)");
  }
  Step step;
  {
    at::AutoDispatchBelowADInplaceOrView below;  // the ops' own autograd (ops.py) is not wanted
    step = step_forward(x, gate_weight, gate_bias, up_weight, up_bias, down_weight, down_bias,
                        router, lora_in, top_k, scale, activation, dropout_p, seed,
                        /*save=*/true);
  }
  const auto outs = ExpertFFNFunction::apply(x, gate_weight, gate_bias, up_weight, up_bias,
                                             down_weight, down_bias, router, Ag, Bg, Au, Bu, Ad,
                                             Bd, &step, needs, scale, activation, dropout_p,
                                             seed);
  return {outs[0], outs[1], outs[2]};
}

}  // namespace

// The forward alone: no grad mode, fake tensors, and below the Autograd key where the backend
// has no kernel of its own (and the CUDA kernel's fallback).
std::tuple<at::Tensor, at::Tensor, at::Tensor> expert_ffn_forward(
    const at::Tensor& x, const at::Tensor& gate_weight, const OptTensor& gate_bias,
    const at::Tensor& up_weight, const OptTensor& up_bias, const at::Tensor& down_weight,
    const OptTensor& down_bias, const at::Tensor& router, const OptTensor& Ag,
    const OptTensor& Bg, const OptTensor& Au, const OptTensor& Bu, const OptTensor& Ad,
    const OptTensor& Bd, int64_t top_k, double scale, int64_t activation, double dropout_p,
    int64_t seed) {
  const Step s = step_forward(x, gate_weight, gate_bias, up_weight, up_bias, down_weight,
                              down_bias, router, {&Ag, &Bg, &Au, &Bu, &Ad, &Bd}, top_k, scale,
                              activation, dropout_p, seed, /*save=*/false);
  return {s.out, s.probs, s.ids};
}

TORCH_LIBRARY_IMPL(mixlora, CompositeExplicitAutograd, m) {
  m.impl("expert_ffn", &expert_ffn_forward);
}

TORCH_LIBRARY_IMPL(mixlora, Autograd, m) {
  m.impl("expert_ffn", &expert_ffn_autograd);
}

}  // namespace mixlora
