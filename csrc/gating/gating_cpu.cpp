// CPU kernels of the gating ops (docs/design.md, "Gating").
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "gating/gating_args.h"

namespace mixlora {
namespace {

// One task per token: softmax, top-k and renormalization read and write only that token's row.
std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_gating_cpu(const at::Tensor& logits_in,
                                                               int64_t k) {
  check_topk_gating(logits_in, k);
  const auto logits = logits_in.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1);
  const auto acc_options = logits.options().dtype(acc_type(logits.scalar_type()));
  auto weights = at::empty({T, k}, acc_options);
  auto ids = at::empty({T, k}, logits.options().dtype(at::kInt));
  auto probs = at::empty({T, E}, acc_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "topk_gating", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = logits.const_data_ptr<scalar_t>();  // [T, E]
    acc_t* w = weights.data_ptr<acc_t>();                    // [T, k]
    int32_t* id = ids.data_ptr<int32_t>();                   // [T, k]
    acc_t* prob = probs.data_ptr<acc_t>();                   // [T, E]
    at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> rank(E);
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* row = x + t * E;
        acc_t* p = prob + t * E;
        acc_t max = static_cast<acc_t>(row[0]);
        for (int64_t e = 1; e < E; ++e) max = std::max(max, static_cast<acc_t>(row[e]));
        acc_t sum = 0;
        for (int64_t e = 0; e < E; ++e) {
          p[e] = std::exp(static_cast<acc_t>(row[e]) - max);
          sum += p[e];
        }
        for (int64_t e = 0; e < E; ++e) p[e] /= sum;
        // Descending prob, equal probs -> lower expert first (a stable descending sort).
        std::iota(rank.begin(), rank.end(), int64_t(0));
        std::partial_sort(rank.begin(), rank.begin() + k, rank.end(), [p](int64_t a, int64_t b) {
          return p[a] > p[b] || (p[a] == p[b] && a < b);
        });
        acc_t top_sum = 0;
        for (int64_t j = 0; j < k; ++j) top_sum += p[rank[j]];
        for (int64_t j = 0; j < k; ++j) {
          id[t * k + j] = static_cast<int32_t>(rank[j]);
          w[t * k + j] = p[rank[j]] / top_sum;
        }
      }
    });
  });
  return {weights, ids, probs};
}

// One task per token: grad_logits[t] depends only on row t of every input.
at::Tensor topk_gating_backward_cpu(const at::Tensor& grad_weights_in,
                                    const std::optional<at::Tensor>& grad_probs_in,
                                    const at::Tensor& weights_in, const at::Tensor& ids_in,
                                    const at::Tensor& probs_in) {
  check_topk_gating_backward(grad_weights_in, grad_probs_in, weights_in, ids_in, probs_in);
  const auto grad_weights = grad_weights_in.contiguous();
  const auto grad_probs = grad_probs_in.has_value() ? grad_probs_in->contiguous() : at::Tensor();
  const auto weights = weights_in.contiguous();
  const auto ids = ids_in.contiguous();
  const auto probs = probs_in.contiguous();
  const int64_t T = probs.size(0), E = probs.size(1), k = ids.size(1);
  check_index_values("ids", ids, E);
  auto grad_logits = at::empty({T, E}, probs.options());
  AT_DISPATCH_FLOATING_TYPES(probs.scalar_type(), "topk_gating_backward", [&] {
    const scalar_t* gw = grad_weights.const_data_ptr<scalar_t>();                          // [T, k]
    const scalar_t* gp =
        grad_probs.defined() ? grad_probs.const_data_ptr<scalar_t>() : nullptr;  // [T, E]
    const scalar_t* w = weights.const_data_ptr<scalar_t>();                                // [T, k]
    const int32_t* id = ids.const_data_ptr<int32_t>();                                     // [T, k]
    const scalar_t* prob = probs.const_data_ptr<scalar_t>();                               // [T, E]
    scalar_t* grad = grad_logits.data_ptr<scalar_t>();                                     // [T, E]
    at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* p = prob + t * E;
        const int64_t q0 = t * k;
        // The output row first holds gp (the gradient w.r.t. probs), then the softmax backward.
        scalar_t* out = grad + t * E;
        for (int64_t e = 0; e < E; ++e) out[e] = gp != nullptr ? gp[t * E + e] : scalar_t(0);
        scalar_t top_sum = 0, c = 0;
        for (int64_t j = 0; j < k; ++j) {
          top_sum += p[id[q0 + j]];
          c += gw[q0 + j] * w[q0 + j];
        }
        for (int64_t j = 0; j < k; ++j) out[id[q0 + j]] += (gw[q0 + j] - c) / top_sum;
        scalar_t dot = 0;
        for (int64_t e = 0; e < E; ++e) dot += p[e] * out[e];
        for (int64_t e = 0; e < E; ++e) out[e] = p[e] * (out[e] - dot);
      }
    });
  });
  return grad_logits;
}

// One task per token: logits[t, e] = sum_h x[t, h] * weight[e, h], h ascending.
at::Tensor router_logits_cpu(const at::Tensor& x_in, const at::Tensor& weight_in) {
  check_router_logits(x_in, weight_in);
  const auto x = x_in.contiguous();
  const auto weight = weight_in.contiguous();
  const int64_t T = x.size(0), H = x.size(1), E = weight.size(0);
  auto logits = at::empty({T, E}, weight.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "router_logits", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xs = x.const_data_ptr<scalar_t>();
    const acc_t* w = weight.const_data_ptr<acc_t>();
    acc_t* out = logits.data_ptr<acc_t>();
    at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        for (int64_t e = 0; e < E; ++e) {
          acc_t sum = 0;
          for (int64_t h = 0; h < H; ++h) sum += static_cast<acc_t>(xs[t * H + h]) * w[e * H + h];
          out[t * E + e] = sum;
        }
      }
    });
  });
  return logits;
}

// grad_x: one task per token, e ascending; grad_weight: one task per column h, t ascending.
std::tuple<at::Tensor, at::Tensor> router_logits_backward_cpu(const at::Tensor& grad_in,
                                                              const at::Tensor& x_in,
                                                              const at::Tensor& weight_in) {
  check_router_logits_backward(grad_in, x_in, weight_in);
  const auto grad = grad_in.contiguous();
  const auto x = x_in.contiguous();
  const auto weight = weight_in.contiguous();
  const int64_t T = x.size(0), H = x.size(1), E = weight.size(0);
  auto grad_x = at::empty({T, H}, x.options());
  auto grad_weight = at::empty({E, H}, weight.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "router_logits_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* g = grad.const_data_ptr<acc_t>();
    const scalar_t* xs = x.const_data_ptr<scalar_t>();
    const acc_t* w = weight.const_data_ptr<acc_t>();
    scalar_t* gx = grad_x.data_ptr<scalar_t>();
    acc_t* gw = grad_weight.data_ptr<acc_t>();
    at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        for (int64_t h = 0; h < H; ++h) {
          acc_t sum = 0;
          for (int64_t e = 0; e < E; ++e) sum += g[t * E + e] * w[e * H + h];
          gx[t * H + h] = static_cast<scalar_t>(sum);
        }
      }
    });
    at::parallel_for(0, H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t h = begin; h < end; ++h) {
        for (int64_t e = 0; e < E; ++e) {
          acc_t sum = 0;
          for (int64_t t = 0; t < T; ++t) sum += g[t * E + e] * static_cast<acc_t>(xs[t * H + h]);
          gw[e * H + h] = sum;
        }
      }
    });
  });
  return {grad_x, grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(mixlora, CPU, m) {
  m.impl("topk_gating", &topk_gating_cpu);
  m.impl("topk_gating_backward", &topk_gating_backward_cpu);
  m.impl("router_logits", &router_logits_cpu);
  m.impl("router_logits_backward", &router_logits_backward_cpu);
}

}  // namespace mixlora
