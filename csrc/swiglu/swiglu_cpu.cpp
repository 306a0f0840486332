// CPU kernels of the fused expert SwiGLU and combine (docs/design.md, "Fused expert SwiGLU").
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/dropout_rng.h"
#include "swiglu/swiglu_args.h"
#include "swiglu/swiglu_math.h"

namespace mixlora {
namespace {

// Zeros of `sizes`, or shape [0] for the gradient of an absent optional input.
at::Tensor zeros_if(bool present, at::IntArrayRef sizes, const at::TensorOptions& options) {
  return present ? at::zeros(sizes, options) : at::empty({0}, options);
}

// Raw views of the (contiguous) moe_swiglu inputs, null where an optional tensor is absent (its
// rank then 0), and the recompute at one (pair q, expert e, column i) that the forward and both
// backward passes share.
template <typename scalar_t>
struct SwigluView {
  using acc_t = at::opmath_type<scalar_t>;

  SwigluView(const at::Tensor& G, const at::Tensor& U, const at::Tensor& ids,
             const at::Tensor& weights, const at::Tensor& zg, const at::Tensor& Bg,
             const at::Tensor& zu, const at::Tensor& Bu, const at::Tensor& Ad, double scale,
             int64_t activation, double dropout_p, int64_t seed)
      : I(G.size(1)), k(ids.size(1)),
        Rg(Bg.defined() ? Bg.size(2) : 0), Ru(Bu.defined() ? Bu.size(2) : 0),
        Rd(Ad.defined() ? Ad.size(1) : 0),
        G(G.const_data_ptr<scalar_t>()), U(U.const_data_ptr<scalar_t>()),
        ids(ids.const_data_ptr<int32_t>()), weights(weights.const_data_ptr<acc_t>()),
        zg(data_or_null<acc_t>(zg)), Bg(data_or_null<scalar_t>(Bg)),
        zu(data_or_null<acc_t>(zu)), Bu(data_or_null<scalar_t>(Bu)),
        Ad(data_or_null<scalar_t>(Ad)),
        scale(static_cast<acc_t>(scale)), act(static_cast<int>(activation)),
        dropout(dropout_p, dropout_key(seed, 2)) {}

  // g, u, act(g), h of pair q (expert e) at column i.
  SwigluPoint<acc_t> point(int64_t q, int64_t e, int64_t i) const {
    const int64_t ti = (q / k) * I + i;
    return swiglu_point(act, scale, G[ti], U[ti], Bg ? Bg + (e * I + i) * Rg : nullptr,
                        zg + q * Rg, Rg, Bu ? Bu + (e * I + i) * Ru : nullptr, zu + q * Ru, Ru);
  }

  // The stream-2 dropout factor m of h at (q, i): 1 / (1 - p) if kept, else 0.
  acc_t drop(int64_t q, int64_t i) const {
    return dropout.factor(q * I + i);
  }

  struct PairGrad {
    SwigluPoint<acc_t> pt;
    acc_t dg, du;
  };

  // The recompute plus dh, dg and du of pair q (expert e) at column i (backward only).
  PairGrad grad(int64_t q, int64_t e, int64_t i) const {
    PairGrad pg;
    pg.pt = point(q, e, i);
    const bool has_zd = grad_zd != nullptr;  // else dh has no zd term
    const acc_t dh = swiglu_dh(weights[q], static_cast<acc_t>(grad_hbar[(q / k) * I + i]),
                               has_zd ? drop(q, i) : acc_t(0),
                               has_zd ? Ad + e * Rd * I + i : nullptr, I,
                               has_zd ? grad_zd + q * Rd : nullptr, Rd);
    swiglu_point_grad(act, pg.pt, dh, &pg.dg, &pg.du);
    return pg;
  }

  int64_t I, k, Rg, Ru, Rd;
  const scalar_t* G;      // [T, I]
  const scalar_t* U;      // [T, I]
  const int32_t* ids;     // [N]
  const acc_t* weights;   // [N]
  const acc_t* zg;        // [N, Rg]
  const scalar_t* Bg;     // [E, I, Rg]
  const acc_t* zu;        // [N, Ru]
  const scalar_t* Bu;     // [E, I, Ru]
  const scalar_t* Ad;     // [E, Rd, I]
  acc_t scale;
  int act;
  DropoutScale<acc_t> dropout;  // stream 2: the down LoRA's input h
  const scalar_t* grad_hbar = nullptr;  // [T, I], backward only
  const acc_t* grad_zd = nullptr;       // [N, Rd], backward only, null when absent
};

// E from the stacked expert weights (the checks made them agree), -1 when none is given.
int64_t num_experts(const at::Tensor& Bg, const at::Tensor& Bu, const at::Tensor& Ad) {
  for (const auto* W : {&Bg, &Bu, &Ad}) {
    if (W->defined()) return W->size(0);
  }
  return -1;
}

// One task per token t: it owns hbar[t] and zd[t], visiting columns in ascending order and, at
// each column, its k pairs in j order, so every sum has one fixed order.
std::tuple<at::Tensor, at::Tensor> moe_swiglu_cpu(
    const at::Tensor& G_in, const at::Tensor& U_in, const at::Tensor& ids_in,
    const at::Tensor& weights_in, const std::optional<at::Tensor>& zg_in,
    const std::optional<at::Tensor>& Bg_in, const std::optional<at::Tensor>& zu_in,
    const std::optional<at::Tensor>& Bu_in, const std::optional<at::Tensor>& Ad_in, double scale,
    int64_t activation, double dropout_p, int64_t seed) {
  check_moe_swiglu(G_in, U_in, ids_in, weights_in, zg_in, Bg_in, zu_in, Bu_in, Ad_in, activation,
                   dropout_p);
  const auto G = G_in.contiguous(), U = U_in.contiguous(), ids = ids_in.contiguous();
  const auto weights = weights_in.contiguous();
  const auto zg = contiguous_or_undefined(zg_in), Bg = contiguous_or_undefined(Bg_in);
  const auto zu = contiguous_or_undefined(zu_in), Bu = contiguous_or_undefined(Bu_in);
  const auto Ad = contiguous_or_undefined(Ad_in);
  const int64_t T = G.size(0), I = G.size(1), k = ids.size(1);
  const int64_t E = num_experts(Bg, Bu, Ad);
  if (E >= 0) check_index_values("ids", ids, E);
  auto hbar = at::empty({T, I}, G.options());
  auto zd = zeros_if(Ad.defined(), {T, k, Ad.defined() ? Ad.size(1) : 0},
                     G.options().dtype(acc_type(G.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, G.scalar_type(), "moe_swiglu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const SwigluView<scalar_t> v(G, U, ids, weights, zg, Bg, zu, Bu, Ad, scale, activation,
                                 dropout_p, seed);
    scalar_t* hb = hbar.data_ptr<scalar_t>();                      // [T, I]
    acc_t* zdp = Ad.defined() ? zd.data_ptr<acc_t>() : nullptr;  // [N, Rd]
    at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        for (int64_t i = 0; i < I; ++i) {
          acc_t sum = 0;
          for (int64_t q = t * k; q < (t + 1) * k; ++q) {
            const int64_t e = v.ids[q];
            const auto pt = v.point(q, e, i);
            sum += v.weights[q] * pt.h;
            if (zdp != nullptr) {
              const acc_t mh = v.drop(q, i) * pt.h;
              for (int64_t r = 0; r < v.Rd; ++r) {
                zdp[q * v.Rd + r] += static_cast<acc_t>(v.Ad[(e * v.Rd + r) * I + i]) * mh;
              }
            }
          }
          hb[t * I + i] = static_cast<scalar_t>(sum);
        }
      }
    });
  });
  return {hbar, zd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
moe_swiglu_backward_cpu(const at::Tensor& grad_hbar_in,
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
  const auto grad_hbar = grad_hbar_in.contiguous(), grad_zd = contiguous_or_undefined(grad_zd_in);
  const auto G = G_in.contiguous(), U = U_in.contiguous(), ids = ids_in.contiguous();
  const auto weights = weights_in.contiguous();
  const auto zg = contiguous_or_undefined(zg_in), Bg = contiguous_or_undefined(Bg_in);
  const auto zu = contiguous_or_undefined(zu_in), Bu = contiguous_or_undefined(Bu_in);
  const auto Ad = contiguous_or_undefined(Ad_in);
  const auto order = order_in.contiguous(), offsets = offsets_in.contiguous();
  const int64_t T = G.size(0), I = G.size(1), k = ids.size(1), N = T * k;
  const bool has_experts = num_experts(Bg, Bu, Ad) >= 0;
  const int64_t E = offsets.size(0) - 1;  // equal to the weights' E (checked)
  if (has_experts) {
    check_index_values("ids", ids, E);
    check_index_values("order", order, N);
    check_offsets_values(offsets, N);
  }
  const int64_t Rg = Bg.defined() ? Bg.size(2) : 0, Ru = Bu.defined() ? Bu.size(2) : 0;
  const int64_t Rd = Ad.defined() ? Ad.size(1) : 0;
  const auto options = G.options();
  const auto acc_options = options.dtype(acc_type(G.scalar_type()));
  auto dG = at::empty({T, I}, options), dU = at::empty({T, I}, options);
  auto dweights = at::zeros({T, k}, acc_options);
  auto dzg = zeros_if(zg.defined(), {T, k, Rg}, acc_options);
  auto dzu = zeros_if(zu.defined(), {T, k, Ru}, acc_options);
  auto dBg = zeros_if(Bg.defined(), {E, I, Rg}, options);
  auto dBu = zeros_if(Bu.defined(), {E, I, Ru}, options);
  auto dAd = zeros_if(Ad.defined(), {E, Rd, I}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, G.scalar_type(), "moe_swiglu_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    SwigluView<scalar_t> v(G, U, ids, weights, zg, Bg, zu, Bu, Ad, scale, activation, dropout_p,
                           seed);
    v.grad_hbar = grad_hbar.const_data_ptr<scalar_t>();
    v.grad_zd = data_or_null<acc_t>(grad_zd);
    const acc_t s = v.scale;

    // Pass 1, one task per token t: it owns dG[t], dU[t], dweights[t], dzg[t] and dzu[t],
    // summing over j in order at each column and over columns in ascending order.
    scalar_t* dGp = dG.data_ptr<scalar_t>();       // [T, I]
    scalar_t* dUp = dU.data_ptr<scalar_t>();       // [T, I]
    acc_t* dwp = dweights.data_ptr<acc_t>();       // [N]
    acc_t* dzgp = dzg.data_ptr<acc_t>();           // [N, Rg]
    acc_t* dzup = dzu.data_ptr<acc_t>();           // [N, Ru]
    at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        for (int64_t i = 0; i < I; ++i) {
          acc_t dg_sum = 0, du_sum = 0;
          for (int64_t q = t * k; q < (t + 1) * k; ++q) {
            const int64_t e = v.ids[q];
            const auto pg = v.grad(q, e, i);
            dg_sum += pg.dg;
            du_sum += pg.du;
            dwp[q] += static_cast<acc_t>(v.grad_hbar[t * I + i]) * pg.pt.h;
            for (int64_t r = 0; r < Rg; ++r) {
              dzgp[q * Rg + r] += static_cast<acc_t>(v.Bg[(e * I + i) * Rg + r]) * (s * pg.dg);
            }
            for (int64_t r = 0; r < Ru; ++r) {
              dzup[q * Ru + r] += static_cast<acc_t>(v.Bu[(e * I + i) * Ru + r]) * (s * pg.du);
            }
          }
          dGp[t * I + i] = static_cast<scalar_t>(dg_sum);
          dUp[t * I + i] = static_cast<scalar_t>(du_sum);
        }
      }
    });
    if (!has_experts) return;

    // Pass 2, one task per (expert e, column i): it owns dBg[e, i, :], dBu[e, i, :] and
    // dAd[e, :, i], summing over e's pairs in sorted order, so the result does not depend on
    // the thread count.
    const int32_t* ord = order.const_data_ptr<int32_t>();    // [N]
    const int64_t* off = offsets.const_data_ptr<int64_t>();  // [E + 1]
    scalar_t* dBgp = dBg.data_ptr<scalar_t>();               // [E, I, Rg]
    scalar_t* dBup = dBu.data_ptr<scalar_t>();               // [E, I, Ru]
    scalar_t* dAdp = dAd.data_ptr<scalar_t>();               // [E, Rd, I]
    at::parallel_for(0, E * I, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> dbg(Rg), dbu(Ru), dad(Rd);
      for (int64_t ei = begin; ei < end; ++ei) {
        const int64_t e = ei / I, i = ei % I;
        std::fill(dbg.begin(), dbg.end(), acc_t(0));
        std::fill(dbu.begin(), dbu.end(), acc_t(0));
        std::fill(dad.begin(), dad.end(), acc_t(0));
        for (int64_t p = off[e]; p < off[e + 1]; ++p) {
          const int64_t q = ord[p];
          const auto pg = v.grad(q, e, i);
          for (int64_t r = 0; r < Rg; ++r) dbg[r] += pg.dg * v.zg[q * Rg + r];
          for (int64_t r = 0; r < Ru; ++r) dbu[r] += pg.du * v.zu[q * Ru + r];
          if (v.grad_zd != nullptr) {
            const acc_t mh = v.drop(q, i) * pg.pt.h;
            for (int64_t r = 0; r < Rd; ++r) dad[r] += v.grad_zd[q * Rd + r] * mh;
          }
        }
        for (int64_t r = 0; r < Rg; ++r) dBgp[ei * Rg + r] = static_cast<scalar_t>(s * dbg[r]);
        for (int64_t r = 0; r < Ru; ++r) dBup[ei * Ru + r] = static_cast<scalar_t>(s * dbu[r]);
        for (int64_t r = 0; r < Rd; ++r) dAdp[(e * Rd + r) * I + i] = static_cast<scalar_t>(dad[r]);
      }
    });
  });
  return {dG, dU, dweights, dzg, dzu, dBg, dBu, dAd};
}

}  // namespace

TORCH_LIBRARY_IMPL(mixlora, CPU, m) {
  m.impl("moe_swiglu", &moe_swiglu_cpu);
  m.impl("moe_swiglu_backward", &moe_swiglu_backward_cpu);
}

}  // namespace mixlora
